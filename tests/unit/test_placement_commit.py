"""Optimistic commit of placements against host revisions, with an in-memory fake store."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest, RevisionMismatch
from novacron.model import Host, Resources
from novacron.placement import (
    Decision,
    HostWrite,
    PlacementEngine,
    PlacementRequest,
    commit_batch,
    place_and_commit,
    plan_commit,
)

GIB = 1024


def res(cpus: float, mem_gib: int) -> Resources:
    return Resources(cpus=cpus, memory_mib=mem_gib * GIB, disk_gib=0)


class FakeStore:
    """Host records with revisions and conditional writes, like the real store."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts: dict[str, Host] = {h.name: h for h in hosts}
        self.writes = 0

    def write(self, w: HostWrite) -> int:
        current = self.hosts[w.host]
        if current.revision != w.expected_revision:
            raise RevisionMismatch(f"{w.host} is at {current.revision}")
        self.writes += 1
        self.hosts[w.host] = current.model_copy(
            update={"allocated": w.allocated, "revision": current.revision + 1})
        return current.revision + 1

    def fetch(self, name: str) -> Host:
        return self.hosts[name]


def store_of(*specs: tuple[str, float, int]) -> FakeStore:
    return FakeStore([Host(name=n, driver="sim", capacity=res(c, m), revision=1)
                      for n, c, m in specs])


def test_plan_commit_of_one_decision() -> None:
    d = Decision("a", 0.5, "", res(2, 4), revision=3, base_allocated=res(1, 1))
    assert plan_commit([d]) == [HostWrite("a", 3, res(3, 5), (d,))]


def test_plan_commit_makes_one_write_per_host() -> None:
    ds = [Decision("a", 0, "", res(1, 1), 3, res(1, 1)), Decision("b", 0, "", res(2, 2), 1,
                                                                   res(0, 0)),
          Decision("a", 0, "", res(2, 2), 3, res(1, 1))]
    writes = plan_commit(ds)
    assert [(w.host, w.expected_revision, w.allocated) for w in writes] == [
        ("a", 3, res(4, 4)), ("b", 1, res(2, 2))]
    assert writes[0].decisions == (ds[0], ds[2])


def test_plan_commit_refuses_decisions_made_against_different_revisions() -> None:
    ds = [Decision("a", 0, "", res(1, 1), 3, res(0, 0)),
          Decision("a", 0, "", res(1, 1), 4, res(1, 1))]
    with pytest.raises(InvalidRequest):
        plan_commit(ds)


def test_racing_engines_never_overcommit_a_host() -> None:
    store = store_of(("a", 4, 8), ("b", 4, 8))
    # Two controllers (or two interleaved requests) built from the same snapshot of the store.
    one = PlacementEngine.from_hosts(list(store.hosts.values()))
    two = PlacementEngine.from_hosts(list(store.hosts.values()))
    request = PlacementRequest(res(3, 6))
    d1, r1 = place_and_commit(one, request, store.write, store.fetch)
    d2, r2 = place_and_commit(two, request, store.write, store.fetch)
    assert d1.host != d2.host  # the second lost the race for d1's host, refreshed, moved on
    assert r1 == r2 == 2
    for h in store.hosts.values():
        assert h.allocated.cpus <= h.limit.cpus
        assert h.allocated.memory_mib <= h.limit.memory_mib
    assert two.fleet.host(d1.host).allocated == res(3, 6)  # refreshed from the store


def test_place_and_commit_gives_up_after_repeated_races() -> None:
    store = store_of(("a", 4, 8))

    def always_stale(w: HostWrite) -> int:
        raise RevisionMismatch("changed again")

    engine = PlacementEngine.from_hosts(list(store.hosts.values()))
    with pytest.raises(RevisionMismatch):
        place_and_commit(engine, PlacementRequest(res(1, 1)), always_stale, store.fetch,
                         attempts=3)


def test_commit_batch_releases_refused_reservations() -> None:
    store = store_of(("a", 8, 16), ("b", 8, 16))
    engine = PlacementEngine.from_hosts(list(store.hosts.values()))
    results = engine.place_batch([PlacementRequest(res(4, 8), group="g")] * 2)
    decisions = [r for r in results if isinstance(r, Decision)]
    assert {d.host for d in decisions} == {"a", "b"}  # anti-affinity: one per host
    # Someone else took half of host "b" meanwhile.
    store.hosts["b"] = store.hosts["b"].model_copy(update={"allocated": res(6, 4),
                                                           "revision": 5})
    refused = commit_batch(engine, plan_commit(decisions), store.write, store.fetch)
    assert [d.host for d in refused] == ["b"]
    assert store.hosts["a"].allocated == res(4, 8)
    assert store.hosts["a"].revision == 2
    assert engine.fleet.host("a").revision == 2
    assert engine.fleet.host("b").allocated == res(6, 4)
    assert engine.fleet.group_members("g") == {engine.fleet.index["a"]: 1}

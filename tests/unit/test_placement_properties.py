"""Properties of placement over random fleets and requests (hypothesis).

* no placement ever takes a host beyond its limit (capacity after overcommit), in any dimension;
* hard anti-affinity (by host or by failure domain) and hard affinity are never broken;
* scores patched in the cache equal those of a fresh engine over the same fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.errors import NoCapacity
from novacron.model import Host, Overcommit, Resources
from novacron.placement import (
    Affinity,
    Decision,
    PlacementEngine,
    PlacementRequest,
    VMPlacementInfo,
)
from novacron.states import HostState

GIB = 1024
GROUPS = ("g0", "g1", "g2")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Policy:
    affinity: Affinity
    hard: bool
    domain: str | None


@st.composite
def hosts(draw: st.DrawFn) -> list[Host]:
    out = []
    for i in range(draw(st.integers(1, 6))):
        cpus = draw(st.sampled_from([2, 4, 8, 16]))
        mem = draw(st.sampled_from([4, 8, 16, 32])) * GIB
        disk = draw(st.sampled_from([20, 100, 500]))
        gpus = draw(st.sampled_from([0, 0, 2]))
        oc = draw(st.sampled_from([1.0, 2.0, 4.0]))
        rack = draw(st.sampled_from(["r0", "r1", "r2", None]))
        frac = draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 0.9, 1.0]))
        state = draw(st.sampled_from([HostState.UP] * 4 + [HostState.DRAINING,
                                                           HostState.MAINTENANCE]))
        out.append(Host(
            name=f"h{i}", driver="sim",
            capacity=Resources(cpus=cpus, memory_mib=mem, disk_gib=disk, gpus=gpus),
            overcommit=Overcommit(cpu=oc), state=state,
            allocated=Resources(cpus=cpus * oc * frac, memory_mib=int(mem * frac),
                                disk_gib=int(disk * frac), gpus=int(gpus * frac)),
            labels={"rack": rack} if rack else {}))
    return out


policies = st.builds(Policy, st.sampled_from(list(Affinity)), st.booleans(),
                     st.sampled_from([None, "rack"]))


@st.composite
def requests(draw: st.DrawFn, most: int = 25) -> list[PlacementRequest]:
    policy = {g: draw(policies) for g in GROUPS}
    out = []
    for _ in range(draw(st.integers(1, most))):
        group = draw(st.sampled_from([None, None, *GROUPS]))
        p = policy[group] if group else Policy(Affinity.ANTI_AFFINITY, True, None)
        out.append(PlacementRequest(
            Resources(cpus=draw(st.sampled_from([0.5, 1, 2, 4, 8])),
                      memory_mib=draw(st.sampled_from([1, 2, 4, 8, 16])) * GIB,
                      disk_gib=draw(st.sampled_from([0, 10, 50])),
                      gpus=draw(st.sampled_from([0, 0, 0, 1]))),
            group=group, affinity=p.affinity, hard=p.hard, domain=p.domain))
    return out


def check(fleet_hosts: list[Host], placed: list[tuple[PlacementRequest, str]]) -> None:
    """Every host within its limit; every hard group rule kept."""
    by_name: dict[str, Host] = {h.name: h for h in fleet_hosts}
    total: dict[str, Resources] = {h.name: h.allocated for h in fleet_hosts}
    for r, name in placed:
        assert by_name[name].state == HostState.UP
        total[name] = total[name] + r.resources
    for name, t in total.items():
        limit = by_name[name].limit
        if t == by_name[name].allocated:
            continue  # nothing placed there: a host may start out full
        assert t.cpus <= limit.cpus + 1e-6
        assert t.memory_mib <= limit.memory_mib
        assert t.disk_gib <= limit.disk_gib
        assert t.gpus <= limit.gpus
    for group in GROUPS:
        members = [(r, name) for r, name in placed if r.group == group]
        if not members or not members[0][0].hard:
            continue
        r = members[0][0]
        places = [name if r.domain is None else by_name[name].labels.get(r.domain)
                  for _, name in members]
        if r.domain is not None:
            assert None not in places  # a hard domain rule needs the label
        if r.affinity is Affinity.ANTI_AFFINITY:
            assert len(set(places)) == len(places)
        else:
            assert len(set(places)) == 1


def outcome(engine: PlacementEngine, request: PlacementRequest) -> Decision | NoCapacity:
    try:
        return engine.place(request)
    except NoCapacity as exc:
        return exc


@SETTINGS
@given(fleet=hosts(), batch=requests(), reorder=st.booleans())
def test_batch_never_overcommits_nor_breaks_hard_groups(
        fleet: list[Host], batch: list[PlacementRequest], reorder: bool) -> None:
    engine = PlacementEngine.from_hosts(fleet)
    results = engine.place_batch(batch, reorder=reorder)
    assert len(results) == len(batch)
    placed = [(r, d.host) for r, d in zip(batch, results, strict=True)
              if isinstance(d, Decision)]
    assert all(isinstance(d, Decision | NoCapacity) for d in results)
    check(fleet, placed)


@SETTINGS
@given(fleet=hosts(), batch=requests(most=12), releases=st.lists(st.integers(0, 12), max_size=4))
def test_placing_one_at_a_time_matches_a_fresh_engine_and_keeps_the_invariants(
        fleet: list[Host], batch: list[PlacementRequest], releases: list[int]) -> None:
    engine = PlacementEngine.from_hosts(fleet)
    placed: list[tuple[PlacementRequest, str]] = []
    for step, r in enumerate(batch):
        if step in releases and placed:  # sometimes a VM goes away first
            gone, where = placed.pop(0)
            engine.release(where, gone.resources, group=gone.group)
        vms: dict[str, list[VMPlacementInfo]] = {}
        for k, (p, where) in enumerate(placed):
            vms.setdefault(where, []).append(VMPlacementInfo(f"vm{k}", p.group))
        fresh = PlacementEngine.from_hosts(engine.fleet.hosts(), vms)
        d, expected = outcome(engine, r), outcome(fresh, r)
        if isinstance(expected, NoCapacity):
            assert isinstance(d, NoCapacity)
            assert d.details["removed"] == expected.details["removed"]
            continue
        assert isinstance(d, Decision)
        assert (d.host, d.score) == (expected.host, expected.score)
        engine.allocate(d.host, d.resources, group=r.group)
        placed.append((r, d.host))
    check(fleet, placed)

"""The rebalancer against the control plane, without Ray: proposals, dry runs, migrations started
within the limits, which VMs may move, and the periodic round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.model import MigrationCreate, VMCreate
from novacron.placement.rebalance import RebalanceConfig
from novacron.rebalancing import OPT_OUT_LABEL, Rebalancer, RebalanceSettings
from novacron.states import MIGRATION_DONE, VMState
from tests.unit.test_evacuation import World


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def hot_h1(w: World) -> dict[str, str]:
    """h1 at 88% of its memory (a, b running; c stopped; p paused), h2 and h3 empty."""
    ids = {n: w.vm(n, memory_mib=1024) for n in ("a", "b")}
    ids["c"] = w.vm("c", memory_mib=1024, state=VMState.STOPPED)
    ids["p"] = w.vm("p", memory_mib=512)
    w.plane.vm_action(ids["p"], "pause")
    w.report(ids["p"], VMState.PAUSED)
    return ids


def test_a_dry_run_proposes_and_apply_starts_the_same_moves(w: World) -> None:
    ids = hot_h1(w)
    rebalancer = Rebalancer(w.plane)
    dry = rebalancer.run(dry_run=True)
    assert dry["dry_run"] is True
    assert dry["enabled"] is False
    assert dry["before"]["hot"] == ["h1"]
    assert dry["after"]["hot"] == []
    assert dry["after"]["stdev"] < dry["before"]["stdev"]
    moves = [(i["name"], i["source"], i["target"], i["mode"]) for i in dry["items"]]
    assert [m[1] for m in moves] == ["h1", "h1"]
    assert {m[2] for m in moves} == {"h2", "h3"}
    assert dry["items"][0]["reason"] == ("h1 is hot: memory at 88% of its limit "
                                         "(threshold 85%)")
    assert all(i["migration"] is None and i["error"] is None for i in dry["items"])
    assert w.plane.list_migrations() == []  # a dry run moves nothing
    assert "p" not in [m[0] for m in moves]  # paused: never moved to rebalance

    applied = rebalancer.run(dry_run=False)
    assert [(i["name"], i["source"], i["target"], i["mode"]) for i in applied["items"]] == moves
    by_vm = {m.vm: m for m in w.plane.list_migrations()}
    for item in applied["items"]:
        migration = by_vm[ids[item["name"]]]
        assert item["migration"] == migration.id
        assert (migration.source, migration.target) == (item["source"], item["target"])
        assert migration.mode == ("cold" if item["name"] == "c" else "live")
    assert sorted(w.fleet.migrations) == sorted(m.id for m in by_vm.values())
    # the moves in flight count as done: nothing more to do
    again = rebalancer.run(dry_run=True)
    assert again["items"] == []
    assert again["before"]["hot"] == []


def test_opted_out_migrating_and_unsettled_vms_stay(w: World) -> None:
    pinned = w.plane.create_vm(VMCreate(name="pinned", cpus=1, memory_mib=1800, host="h1",
                                        labels={OPT_OUT_LABEL: "false"}))
    w.report(pinned.id, VMState.RUNNING)
    moving = w.vm("moving", memory_mib=1024)
    w.plane.create_migration(moving, MigrationCreate(vm=moving, target_host="h3"))
    w.plane.create_vm(VMCreate(name="starting", cpus=1, memory_mib=1000, host="h1"))
    result = Rebalancer(w.plane).run(dry_run=True)
    assert result["items"] == []
    assert result["before"]["hot"] == []  # "moving" counts on h3 already
    assert any("no VM that may move" in note for note in result["notes"])


def test_no_free_slot_means_no_move(w: World) -> None:
    hot_h1(w)
    others = [w.vm(f"o{i}", host="h2", memory_mib=64) for i in range(5)]
    for vm_id in others:
        w.plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h3"))
    result = Rebalancer(w.plane).run(dry_run=False)
    assert result["items"] == []
    assert result["notes"][0] == "no migration slot free: 5 migration(s) in flight (limit 5)"


def test_the_periodic_round_runs_only_when_enabled_and_quiet(w: World) -> None:
    hot_h1(w)
    now = [0.0]
    assert Rebalancer(w.plane, clock=lambda: now[0]).tick() is None  # off by default
    settings = RebalanceSettings(enabled=True, interval_s=60,
                                 config=RebalanceConfig(max_moves=1))
    rebalancer = Rebalancer(w.plane, settings, clock=lambda: now[0])
    assert rebalancer.tick() is None  # not before its interval
    now[0] = 61
    first = rebalancer.tick()
    assert first is not None
    assert len(first["items"]) == 1
    assert first["items"][0]["migration"] is not None
    now[0] = 200
    assert rebalancer.tick() is None  # its move is still in flight
    for m in w.plane.list_migrations():
        if m.phase not in MIGRATION_DONE:
            w.finish(m.id)
    second = rebalancer.tick()
    assert second is not None
    assert len(second["items"]) == 1
    assert second["items"][0]["vm"] != first["items"][0]["vm"]
    assert rebalancer.tick() is None  # the next round waits for its interval again

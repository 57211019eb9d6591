"""Drains against the control plane, without Ray: the host empties through migrations within the
limits, takes no new VM, can be cancelled, says why a VM cannot leave, survives a restart.
The agents (VMs, migrations) are played by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron import migrations as rules
from novacron.controlplane import ControlPlane
from novacron.errors import Conflict, InvalidTransition, NoCapacity, NotSupported
from novacron.evacuation import MAX_ATTEMPTS, Evacuator
from novacron.model import VM, Host, HostCreate, MigrationCreate, Resources, VMCreate
from novacron.states import SETTLED, DrainState, HostState, MigrationPhase, VMState
from novacron.store import Store

P = MigrationPhase


class PlayedFleet:
    """A fleet whose agents never act: converges and migrations are only recorded."""

    def __init__(self) -> None:
        self.converged: list[str] = []
        self.migrations: list[str] = []

    def probe_host(self, host: Host) -> dict[str, Any]:
        return {"cpus": 8, "memory_mib": 4096, "disk_gib": 100}

    def start_host(self, host: Host) -> None: ...

    def stop_host(self, name: str) -> None: ...

    def converge_vm(self, vm: VM, host: Host) -> None:
        self.converged.append(vm.id)

    def forget_vm(self, vm_id: str) -> None: ...

    def call_vm(self, vm: VM, host: Host, method: str, *args: Any) -> Any:
        raise AssertionError("not used")

    def run_migration(self, migration_id: str, source: str) -> None:
        self.migrations.append(migration_id)


class World:
    def __init__(self, path: Path) -> None:
        self.clock = [1000.0]
        self.path = path
        self.store = Store(path / "state.db")
        self.fleet = PlayedFleet()
        self.plane = self.new_plane()
        self.evacuator = Evacuator(self.plane)
        for name in ("h1", "h2", "h3"):
            self.host(name)

    def new_plane(self) -> ControlPlane:
        return ControlPlane(self.store, self.fleet, heartbeat_interval_s=1, heartbeat_misses=5,
                            clock=lambda: self.clock[0])

    def host(self, name: str, memory_mib: int = 4096) -> None:
        self.plane.register_host(HostCreate(name=name, driver="sim", capacity=Resources(
            cpus=8, memory_mib=memory_mib, disk_gib=100)))

    def tick(self) -> float:
        self.clock[0] += 1
        return self.clock[0]

    def vm(self, name: str, host: str = "h1", memory_mib: int = 256,
           state: VMState = VMState.RUNNING) -> str:
        vm = self.plane.create_vm(VMCreate(name=name, cpus=1, memory_mib=memory_mib, disk_gib=1,
                                           host=host, start=state != VMState.STOPPED))
        self.report(vm.id, state)
        return vm.id

    def report(self, vm_id: str, state: VMState) -> None:
        vm = self.plane.get_vm(vm_id)
        self.plane.report_vm(vm.id, vm.epoch, {"state": state.value, "guest_id": "g",
                                               "time": self.tick()})
        assert self.plane.get_vm(vm_id).state == state

    def finish(self, migration_id: str) -> None:
        """Play a migration's agent to a completed switchover."""
        plane = self.plane
        assert plane.admit_migration(migration_id)
        plane.update_migration(migration_id, phase=P.SYNCING_DISK)
        plane.update_migration(migration_id, phase=P.SWITCHOVER)
        vm = plane.get_vm(plane.get_migration(migration_id).vm)
        plane.switch_migrated_vm(migration_id, SETTLED[vm.desired], "g2")
        plane.end_migration(migration_id, P.COMPLETED)

    def fail(self, migration_id: str, reason: str) -> None:
        """Play a migration's agent failing; its VM is given back to its source and settles."""
        vm_id = self.plane.get_migration(migration_id).vm
        self.plane.end_migration(migration_id, P.FAILED, reason=reason)
        self.report(vm_id, VMState.RUNNING)

    def roll_back(self, migration_id: str) -> None:
        vm_id = self.plane.get_migration(migration_id).vm
        self.plane.update_migration(migration_id, phase=P.CANCELLING)
        self.plane.end_migration(migration_id, P.ROLLED_BACK, reason="cancelled")
        self.report(vm_id, VMState.RUNNING)

    def drain(self, name: str = "h1") -> Any:
        drain = self.plane.get_host(name).drain
        assert drain is not None
        return drain

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_drain_empties_the_host_within_the_limits(w: World) -> None:
    a, b, c = (w.vm(n) for n in ("a", "b", "c"))
    d = w.vm("d", state=VMState.STOPPED)
    host = w.evacuator.start("h1")
    assert host.state == HostState.DRAINING
    drain = w.drain()
    assert drain.state == DrainState.RUNNING
    assert list(drain.migrating) == [a, b]  # two at once out of one host
    assert set(drain.waiting) == {c, d}
    assert drain.waiting[c].startswith("its turn: 2 migration(s) out of h1 (limit 2)")
    assert drain.message == "0 moved, 2 migrating, 2 waiting, 0 blocked; 4 VM(s) left"
    migrations = [w.plane.get_migration(m) for m in drain.migrating.values()]
    assert all(m.mode == "live" and m.target in ("h2", "h3") for m in migrations)
    assert w.fleet.migrations == [m.id for m in migrations]
    # the host takes no new VM meanwhile, pinned or not
    with pytest.raises(NoCapacity, match="1 draining"):
        w.plane.create_vm(VMCreate(name="pinned", cpus=1, memory_mib=64, host="h1"))
    assert w.plane.create_vm(VMCreate(name="new", cpus=1, memory_mib=64)).host != "h1"
    revision = w.plane.get_host("h1").revision
    w.evacuator.advance()  # nothing changed: nothing is written
    assert w.plane.get_host("h1").revision == revision
    for m in migrations:
        w.finish(m.id)
    w.evacuator.advance()
    drain = w.drain()
    assert drain.moved == [a, b]
    assert list(drain.migrating) == [c, d]
    assert w.plane.get_migration(drain.migrating[d]).mode == "cold"  # it is stopped
    for m in list(drain.migrating.values()):
        w.finish(m)
    host = w.plane.get_host("h1")
    assert host.state == HostState.DRAINING  # until the next pass sees it empty
    w.evacuator.advance()
    host = w.plane.get_host("h1")
    drain = w.drain()
    assert host.state == HostState.MAINTENANCE
    assert drain.state == DrainState.COMPLETED
    assert drain.moved == [a, b, c, d]
    assert drain.message == "completed: 4 VM(s) moved; the host is in maintenance"
    assert drain.finished_at is not None
    assert all(w.plane.get_vm(v).host in ("h2", "h3") for v in (a, b, c, d))
    assert w.plane.get_vm(d).state == VMState.STOPPED
    assert w.plane.list_vms(host="h1") == []
    assert w.evacuator.start("h1").drain == drain  # idempotent: drained already
    w.plane.set_host_state("h1", HostState.UP)  # back in service by hand


def test_start_is_idempotent_and_the_drain_owns_the_host_state(w: World) -> None:
    w.vm("a")
    first = w.evacuator.start("h1")
    assert w.evacuator.start("h1") == first
    with pytest.raises(Conflict, match="being drained; cancel the drain first"):
        w.plane.set_host_state("h1", HostState.UP)
    with pytest.raises(Conflict, match="being drained"):
        w.plane.set_host_state("h1", HostState.MAINTENANCE)
    w.plane.set_host_state("h2", HostState.MAINTENANCE)
    w.vm("m", host="h3")
    w.plane.set_host_state("h3", HostState.MAINTENANCE)
    with pytest.raises(InvalidTransition, match="in maintenance with 1 VM"):
        w.evacuator.start("h3")
    empty = w.evacuator.start("h2")  # empty and in maintenance: nothing to move
    assert empty.state == HostState.MAINTENANCE
    assert empty.drain is not None
    assert empty.drain.state == DrainState.COMPLETED
    assert empty.drain.message == "completed: the host was empty"


def test_cancel_rolls_the_migrations_back_and_reopens_the_host(w: World) -> None:
    a, b, c = (w.vm(n) for n in ("a", "b", "c"))
    w.evacuator.start("h1")
    mig_a, mig_b = w.drain().migrating[a], w.drain().migrating[b]
    w.plane.admit_migration(mig_b)
    w.plane.update_migration(mig_b, phase=P.SYNCING_DISK)
    w.plane.update_migration(mig_b, phase=P.SWITCHOVER)  # past the point of no return
    host = w.evacuator.cancel("h1")
    assert host.state == HostState.UP
    drain = w.drain()
    assert drain.state == DrainState.CANCELLED
    assert drain.message == "cancelled: 0 VM(s) moved, 1 migration(s) rolling back, 1 finishing"
    assert w.plane.get_migration(mig_a).cancel_requested
    assert not w.plane.get_migration(mig_b).cancel_requested
    started = len(w.fleet.migrations)
    w.evacuator.advance()
    assert len(w.fleet.migrations) == started  # no further migration
    w.roll_back(mig_a)
    w.plane.switch_migrated_vm(mig_b, VMState.RUNNING, "g2")
    w.plane.end_migration(mig_b, P.COMPLETED)
    assert w.plane.get_vm(a).host == "h1"
    assert w.plane.get_vm(b).host != "h1"
    assert w.plane.get_vm(c).host == "h1"
    assert w.evacuator.cancel("h1").drain == drain  # idempotent
    assert w.plane.create_vm(VMCreate(name="new", cpus=1, memory_mib=64, host="h1"))
    with pytest.raises(InvalidTransition, match="no drain to cancel"):
        w.evacuator.cancel("h2")
    # a new drain starts afresh
    w.evacuator.start("h1")
    assert w.drain().state == DrainState.RUNNING
    assert w.drain().moved == []


def test_a_vm_that_fits_nowhere_blocks_the_drain_with_the_reason(w: World) -> None:
    big = w.vm("big", memory_mib=3000)
    w.vm("filler2", host="h2", memory_mib=2048)
    w.vm("filler3", host="h3", memory_mib=2048)
    w.evacuator.start("h1")
    drain = w.drain()
    assert drain.state == DrainState.BLOCKED
    assert drain.blocked == {big: "0/3 hosts fit: 2 insufficient memory, 1 draining"}
    assert drain.message == ("blocked: no VM can leave now (big: 0/3 hosts fit: 2 insufficient "
                             "memory, 1 draining); 0 moved, 0 migrating, 0 waiting, 1 blocked; "
                             "1 VM(s) left")
    assert w.plane.list_migrations() == []
    w.host("h4", memory_mib=8192)  # room appears: the next pass moves it
    w.evacuator.advance()
    drain = w.drain()
    assert drain.state == DrainState.RUNNING
    assert drain.blocked == {}
    assert w.plane.get_migration(drain.migrating[big]).target == "h4"


def test_failed_migrations_are_retried_then_block(w: World) -> None:
    a = w.vm("a")
    w.evacuator.start("h1")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        mig = w.drain().migrating[a]
        w.plane.end_migration(mig, P.FAILED, reason="disk sync failed")
        w.evacuator.advance()  # counts the failure; the VM settles first
        drain = w.drain()
        assert drain.failures == {a: attempt}
        if attempt < MAX_ATTEMPTS:
            assert drain.waiting[a] == (f"migration {mig} failed: disk sync failed; retrying "
                                        f"({attempt}/{MAX_ATTEMPTS} failed)")
            w.report(a, VMState.RUNNING)
            w.evacuator.advance()
            assert w.drain().migrating[a] != mig  # a new attempt
    drain = w.drain()
    assert drain.state == DrainState.BLOCKED
    assert drain.blocked[a].startswith(f"{MAX_ATTEMPTS} migrations failed, the last: migration")
    w.report(a, VMState.RUNNING)
    w.evacuator.advance()
    assert w.drain().blocked == drain.blocked  # not retried any more
    assert len(w.fleet.migrations) == MAX_ATTEMPTS


def test_a_vm_in_error_blocks_and_a_settling_one_waits(w: World) -> None:
    bad = w.vm("bad")
    w.report(bad, VMState.ERROR)
    starting = w.plane.create_vm(VMCreate(name="s", cpus=1, memory_mib=64, host="h1")).id
    w.evacuator.start("h1")
    drain = w.drain()
    assert drain.blocked == {bad: "the VM is in error: no error message"}
    assert drain.waiting == {starting: "the VM is pending, settling to running"}
    assert drain.state == DrainState.RUNNING  # something will change by itself
    w.report(starting, VMState.RUNNING)
    w.evacuator.advance()
    assert starting in w.drain().migrating


def test_a_drain_carries_on_after_a_controller_restart(w: World) -> None:
    a, b = w.vm("a"), w.vm("b")
    w.evacuator.start("h1")
    migs = list(w.drain().migrating.values())
    w.plane = w.new_plane()  # a new controller over the same store
    w.plane.start()
    w.evacuator = Evacuator(w.plane)
    for m in migs:
        w.finish(m)
    w.evacuator.advance()
    assert w.plane.get_host("h1").state == HostState.MAINTENANCE
    assert w.drain().moved == [a, b]


def test_migrations_heading_to_the_host_are_cancelled(w: World) -> None:
    y = w.vm("y", host="h2")
    incoming = w.plane.create_migration(y, MigrationCreate(vm=y, target_host="h1"))
    w.evacuator.start("h1")
    assert w.plane.get_migration(incoming.id).cancel_requested
    drain = w.drain()
    assert drain.state == DrainState.RUNNING  # empty, but a migration may still arrive
    assert drain.message.endswith("1 migration(s) still arriving")
    w.roll_back(incoming.id)
    w.evacuator.advance()
    assert w.plane.get_host("h1").state == HostState.MAINTENANCE


def test_an_unreachable_draining_host_comes_back_draining(w: World) -> None:
    w.vm("a")
    w.evacuator.start("h1")
    w.clock[0] += 60
    for name in ("h2", "h3"):
        w.plane.heartbeat(name, {}, [])
    w.plane.reconcile_once()
    assert w.plane.get_host("h1").state == HostState.UNREACHABLE
    assert w.plane.get_host("h1").draining
    w.plane.heartbeat("h1", {}, [])
    assert w.plane.get_host("h1").state == HostState.DRAINING


def test_the_limits_are_shared_with_other_migrations(w: World) -> None:
    others = [w.vm(f"o{i}", host=h) for i, h in enumerate(("h2", "h2", "h3", "h3"))]
    for vm_id in others:
        w.plane.create_migration(vm_id, MigrationCreate(
            vm=vm_id, target_host="h3" if w.plane.get_vm(vm_id).host == "h2" else "h2"))
    a, b = w.vm("a"), w.vm("b")
    w.evacuator.start("h1")
    drain = w.drain()
    assert rules.MAX_ACTIVE - len(others) == 1
    assert list(drain.migrating) == [a]
    assert drain.waiting[b] == (f"its turn: 1 migration(s) out of h1 (limit "
                                f"{rules.MAX_OUTBOUND}), 5 in the cluster (limit 5)")


def test_a_migration_that_cannot_start_counts_as_failed(w: World) -> None:
    def refuse(migration_id: str, source: str) -> None:
        raise NotSupported("no migration runner here")

    w.fleet.run_migration = refuse  # type: ignore[method-assign]
    a = w.vm("a")
    w.evacuator.start("h1")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        drain = w.drain()
        assert drain.failures == {a: attempt}
        w.report(a, VMState.RUNNING)  # given back to its source: it settles again
        w.evacuator.advance()
    drain = w.drain()
    assert drain.state == DrainState.BLOCKED
    assert "could not start its migration: no migration runner here" in drain.blocked[a]
    assert len(w.plane.list_migrations()) == MAX_ATTEMPTS  # not one more per pass


def test_a_migration_started_just_before_a_crash_is_not_lost(w: World) -> None:
    a = w.vm("a")

    def crash(migration_id: str, source: str) -> None:
        w.fleet.migrations.append(migration_id)
        raise RuntimeError("the controller died here")  # after the record, before the drain's

    w.fleet.run_migration = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        w.evacuator.start("h1")
    assert w.drain().migrating == {}
    assert list(w.drain().starting) == [a]
    (mig,) = w.fleet.migrations
    restarted = Evacuator(w.new_plane())
    restarted.advance()
    assert w.drain().migrating == {a: mig}  # found again by VM, source and time
    assert w.drain().starting == {}
    w.plane.update_host("h1", lambda h: h.model_copy(update={"drain": h.drain.model_copy(
        update={"migrating": {}, "starting": {a: 0.0}})}))  # as it was before that pass
    w.plane = w.new_plane()  # restarted
    w.evacuator = Evacuator(w.plane)
    w.evacuator.cancel("h1")  # cancelled at once: it is found there too
    assert w.plane.get_migration(mig).cancel_requested
    assert w.drain().migrating == {a: mig}
    assert w.drain().starting == {}


def test_the_drain_ends_once_its_last_migration_has(w: World) -> None:
    a = w.vm("a")
    w.evacuator.start("h1")
    mig = w.drain().migrating[a]
    w.plane.admit_migration(mig)
    w.plane.update_migration(mig, phase=P.SYNCING_DISK)
    w.plane.update_migration(mig, phase=P.SWITCHOVER)
    w.plane.switch_migrated_vm(mig, VMState.RUNNING, "g2")  # on its target, not yet completed
    w.evacuator.advance()
    assert w.plane.list_vms(host="h1") == []
    assert w.drain().state == DrainState.RUNNING
    w.plane.end_migration(mig, P.COMPLETED)
    w.evacuator.advance()
    assert w.drain().state == DrainState.COMPLETED
    assert w.drain().moved == [a]

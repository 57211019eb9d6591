"""The control plane's side of migrations, without Ray: reservation, admission, the one-commit
switchover and rollback. The migration's agent is played by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.controlplane import ControlPlane
from novacron.errors import InvalidRequest, InvalidTransition, NoCapacity, NotSupported
from novacron.localfleet import LocalFleet
from novacron.model import HostCreate, MigrationCreate, VMCreate
from novacron.states import MigrationPhase, VMState
from novacron.store import Store
from tests.conftest import sim_host_config
from tests.unit.test_controlplane import wait_for

P = MigrationPhase


class AgentlessFleet(LocalFleet):
    """The in-process fleet, with migrations recorded instead of run."""

    started: list[str]

    def run_migration(self, migration_id: str, source: str) -> None:
        self.started.append(migration_id)


@pytest.fixture
def plane(state_dir: Path) -> Iterator[ControlPlane]:
    store = Store(state_dir / "state.db")
    fleet = AgentlessFleet(state_dir, heartbeat_interval_s=0.1, stop_timeout_s=5)
    fleet.started = []
    plane = ControlPlane(store, fleet, heartbeat_interval_s=0.1, heartbeat_misses=50)
    fleet.bind(plane)
    for name in ("h1", "h2"):
        plane.register_host(HostCreate(name=name, driver="sim", config=sim_host_config(
            state_dir, cpus=4, memory_mib=1024)))
    yield plane
    fleet.close()
    store.close()


def running_vm(plane: ControlPlane, name: str, memory_mib: int = 256) -> str:
    vm = plane.create_vm(VMCreate(name=name, cpus=1, memory_mib=memory_mib, disk_gib=0,
                                  host="h1"))
    return wait_for(plane, vm.id, VMState.RUNNING).id


def test_reserve_switch_and_complete(plane: ControlPlane) -> None:
    vm_id = running_vm(plane, "a")
    dry = plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2",
                                                        dry_run=True))
    assert dry.prediction["converges"]
    assert plane.list_migrations() == []
    mig = plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2"))
    assert plane.fleet.started == [mig.id]  # type: ignore[attr-defined]
    assert plane.get_host("h2").allocated.memory_mib == 256  # reserved
    vm = plane.get_vm(vm_id)
    assert (vm.state, vm.migration) == (VMState.MIGRATING, mig.id)
    with pytest.raises(InvalidTransition, match="migrating"):
        plane.vm_action(vm_id, "stop")
    plane.report_vm(vm_id, vm.epoch, {"state": "paused", "time": 1e12})  # ignored meanwhile
    assert plane.get_vm(vm_id).state == VMState.MIGRATING
    assert plane.admit_migration(mig.id)
    for phase in (P.SYNCING_DISK, P.PRECOPY, P.STOP_AND_COPY):
        plane.update_migration(mig.id, phase=phase)
    with pytest.raises(InvalidTransition):
        plane.switch_migrated_vm(mig.id, VMState.RUNNING, "42")  # not in switchover yet
    plane.update_migration(mig.id, phase=P.SWITCHOVER)
    with pytest.raises(InvalidTransition, match="cannot cancel"):
        plane.request_migration(mig.id, "cancel")
    moved = plane.switch_migrated_vm(mig.id, VMState.RUNNING, "42")
    assert (moved.host, moved.epoch, moved.migration) == ("h2", vm.epoch + 1, None)
    assert plane.switch_migrated_vm(mig.id, VMState.RUNNING, "42").revision == moved.revision
    assert plane.get_host("h1").allocated.memory_mib == 0
    assert plane.get_host("h2").allocated.memory_mib == 256
    done = plane.end_migration(mig.id, P.COMPLETED, outcome={"downtime_ms": 5})
    assert (done.phase, done.outcome) == (P.COMPLETED, {"downtime_ms": 5})


def test_rollback_frees_the_target_and_gives_the_vm_back(plane: ControlPlane) -> None:
    vm_id = running_vm(plane, "b")
    mig = plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2",
                                                        mode="cold"))
    plane.request_migration(mig.id, "cancel")
    with pytest.raises(InvalidRequest, match="only a live migration"):
        plane.request_migration(mig.id, "force-complete")
    plane.update_migration(mig.id, phase=P.CANCELLING)
    ended = plane.end_migration(mig.id, P.ROLLED_BACK, reason="cancelled")
    assert (ended.phase, ended.reason, ended.cancel_requested) == (P.ROLLED_BACK, "cancelled",
                                                                   True)
    assert plane.get_host("h2").allocated.memory_mib == 0
    vm = wait_for(plane, vm_id, VMState.RUNNING)  # its agent converged it again
    assert (vm.host, vm.migration) == ("h1", None)
    assert plane.end_migration(mig.id, P.FAILED).phase == P.ROLLED_BACK  # ended already


def test_refusals_up_front(plane: ControlPlane) -> None:
    vm_id = running_vm(plane, "c", memory_mib=768)
    plane.create_vm(VMCreate(name="filler", cpus=1, memory_mib=512, disk_gib=0, host="h2",
                             start=False))
    with pytest.raises(NoCapacity):
        plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2"))
    with pytest.raises(InvalidRequest, match="already on h1"):
        plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h1"))
    with pytest.raises(NotSupported, match="post_copy"):
        plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2",
                                                      policy={"post_copy": True}))
    assert plane.list_migrations() == []
    assert plane.get_host("h2").allocated.memory_mib == 512


def test_queued_beyond_two_outbound(plane: ControlPlane) -> None:
    migs = []
    for name in ("q1", "q2", "q3"):
        vm_id = running_vm(plane, name, memory_mib=64)
        migs.append(plane.create_migration(vm_id, MigrationCreate(vm=vm_id, target_host="h2")))
    assert [plane.admit_migration(m.id) for m in migs] == [True, True, False]
    plane.end_migration(migs[0].id, P.FAILED, reason="gave up")
    assert plane.admit_migration(migs[2].id)

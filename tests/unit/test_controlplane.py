"""The control plane with real simulated guests, its agents running in-process (no Ray)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from novacron.controlplane import AGENT_START_GRACE_S, ControlPlane
from novacron.errors import (
    AlreadyExists,
    Conflict,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    RevisionMismatch,
)
from novacron.localfleet import LocalFleet
from novacron.model import VM, Host, HostCreate, Resources, VMCreate
from novacron.states import HostState, PowerState, VMState
from novacron.store import Store
from tests.conftest import sim_host_config


@pytest.fixture
def plane(state_dir: Path) -> Iterator[ControlPlane]:
    store = Store(state_dir / "state.db")
    fleet = LocalFleet(state_dir, heartbeat_interval_s=0.1, stop_timeout_s=5)
    plane = ControlPlane(store, fleet, heartbeat_interval_s=0.1, heartbeat_misses=20)
    fleet.bind(plane)
    plane.register_host(HostCreate(name="h1", driver="sim",
                                   config=sim_host_config(state_dir, cpus=2, memory_mib=2048)))
    plane.register_host(HostCreate(name="h2", driver="sim",
                                   config=sim_host_config(state_dir, cpus=4, memory_mib=4096)))
    yield plane
    fleet.close()
    store.close()


def wait_for(plane: ControlPlane, vm_id: str, state: VMState, timeout: float = 15.0) -> VM:
    deadline = time.monotonic() + timeout
    while True:
        try:
            vm = plane.get_vm(vm_id)
        except NotFound:
            if state == VMState.DELETED:
                return vm
            raise
        if vm.state == state and vm.pending is None:
            return vm
        assert time.monotonic() < deadline, f"VM is {vm.state} ({vm.last_error}), not {state}"
        time.sleep(0.05)


def snapshot(store: Store) -> list[Any]:
    """Everything stored but the audit trail (which records refusals too), to show a refused
    request changed nothing."""
    rows = store._db.execute("SELECT kind, key, revision, data FROM records "
                             "WHERE kind NOT LIKE 'auth.audit%' ORDER BY 1, 2")
    return rows.fetchall()


def test_host_capacity_comes_from_the_driver(plane: ControlPlane) -> None:
    h1 = plane.get_host("h1")
    assert h1.capacity == Resources(cpus=2, memory_mib=2048, disk_gib=100)
    assert h1.limit.cpus == 8  # default cpu overcommit 4x
    with pytest.raises(AlreadyExists):
        plane.register_host(HostCreate(name="h1", driver="sim"))
    with pytest.raises(InvalidRequest, match="unknown driver"):
        plane.register_host(HostCreate(name="h3", driver="nosuch"))


def test_full_lifecycle_with_a_real_guest(plane: ControlPlane) -> None:
    vm = plane.create_vm(VMCreate(name="web", cpus=1, memory_mib=64))
    assert vm.state == VMState.PENDING
    assert vm.epoch == 1
    vm = wait_for(plane, vm.id, VMState.RUNNING)
    pid = int(vm.guest_id or 0)
    assert psutil.pid_exists(pid)
    host = plane.get_host(vm.host or "")
    assert host.allocated == Resources(cpus=1, memory_mib=64, disk_gib=1)

    plane.vm_action(vm.id, "stop")
    wait_for(plane, vm.id, VMState.STOPPED)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    plane.vm_action(vm.id, "start")
    pid = int(wait_for(plane, vm.id, VMState.RUNNING).guest_id or 0)
    plane.vm_action(vm.id, "pause")
    wait_for(plane, vm.id, VMState.PAUSED)
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED  # really frozen
    plane.vm_action(vm.id, "resume")
    wait_for(plane, vm.id, VMState.RUNNING)
    plane.vm_action(vm.id, "reboot")
    assert int(wait_for(plane, vm.id, VMState.RUNNING).guest_id or 0) == pid
    plane.vm_action(vm.id, "stop", force=True)
    wait_for(plane, vm.id, VMState.STOPPED)

    plane.delete_vm(vm.id)
    wait_for(plane, vm.id, VMState.DELETED)
    with pytest.raises(NotFound):
        plane.get_vm(vm.id)
    assert plane.get_host(host.name).allocated == Resources.zero()
    again = plane.create_vm(VMCreate(name="web", cpus=1, memory_mib=64, start=False))
    assert wait_for(plane, again.id, VMState.STOPPED).name == "web"


def test_placement_packs_and_respects_groups_and_labels(plane: ControlPlane) -> None:
    first = plane.create_vm(VMCreate(name="small", cpus=1, memory_mib=512, start=False))
    second = plane.create_vm(VMCreate(name="small2", cpus=1, memory_mib=512, start=False))
    assert second.host == first.host  # bin-packing fills a host in use before opening another
    big = plane.create_vm(VMCreate(name="big", cpus=2, memory_mib=3000, start=False))
    assert big.host == "h2"  # only h2 has the memory
    apart = {"group": "db", "affinity": "anti-affinity", "hard": True}
    hosts = {plane.create_vm(VMCreate.model_validate(
        {"name": f"db{i}", "cpus": 1, "memory_mib": 64, "start": False,
         "placement": apart})).host for i in range(2)}
    assert hosts == {"h1", "h2"}
    for vm in plane.list_vms():
        wait_for(plane, vm.id, VMState.STOPPED)
    before = snapshot(plane.store)
    with pytest.raises(NoCapacity, match=r"0/2 hosts fit:.*anti-affinity"):
        plane.create_vm(VMCreate.model_validate({"name": "db2", "cpus": 1, "memory_mib": 64,
                                                 "placement": apart}))
    with pytest.raises(NoCapacity, match="label"):
        plane.create_vm(VMCreate.model_validate({
            "name": "gpu", "cpus": 1, "memory_mib": 64,
            "placement": {"host_labels": {"gpu": "a100"}}}))
    assert snapshot(plane.store) == before


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda p, vm: p.create_vm(VMCreate(name="huge", cpus=64, memory_mib=64)), NoCapacity,
     r"0/2 hosts fit: 2 insufficient cpus"),
    (lambda p, vm: p.create_vm(VMCreate(name="fat", cpus=1, memory_mib=1 << 20)), NoCapacity,
     r"insufficient memory"),
    (lambda p, vm: p.create_vm(VMCreate(name="pinned", cpus=1, memory_mib=64, host="ghost")),
     NotFound, "no host named 'ghost'"),
    (lambda p, vm: p.create_vm(VMCreate(name="db", cpus=1, memory_mib=64)), AlreadyExists,
     "a VM named 'db' already exists"),
    (lambda p, vm: p.vm_action("vm-nope", "start"), NotFound, "no VM"),
    (lambda p, vm: p.vm_action(vm.id, "pause"), InvalidTransition, "cannot pause a VM that is"),
    (lambda p, vm: p.vm_action(vm.id, "resume"), InvalidTransition,
     "cannot resume a VM that is"),
    (lambda p, vm: p.vm_action(vm.id, "fly"), InvalidRequest, "unknown VM action"),
    (lambda p, vm: p.delete_host("h1"), Conflict, "still has 1 VM"),
    (lambda p, vm: p.delete_host("ghost"), NotFound, "no host"),
    (lambda p, vm: p.store.put("vm", vm.id, {}, expected_revision=vm.revision - 1),
     RevisionMismatch, "changed meanwhile"),
])
def test_refused_requests_change_nothing(
        plane: ControlPlane, call: Callable[[ControlPlane, VM], Any],
        error: type[Exception], message: str) -> None:
    vm = plane.create_vm(VMCreate(name="db", cpus=1, memory_mib=64, start=False, host="h1"))
    vm = wait_for(plane, vm.id, VMState.STOPPED)
    before = snapshot(plane.store)
    with pytest.raises(error, match=message):
        call(plane, vm)
    assert snapshot(plane.store) == before


def test_maintenance_takes_no_new_vms(plane: ControlPlane) -> None:
    plane.set_host_state("h1", HostState.MAINTENANCE)
    before = snapshot(plane.store)
    with pytest.raises(InvalidTransition, match="cannot go from maintenance to draining"):
        plane.set_host_state("h1", HostState.DRAINING)
    with pytest.raises(NoCapacity, match="1 maintenance"):
        plane.create_vm(VMCreate(name="x", cpus=1, memory_mib=64, host="h1"))
    assert snapshot(plane.store) == before
    assert plane.create_vm(VMCreate(name="y", cpus=1, memory_mib=64, start=False)).host == "h2"
    plane.set_host_state("h1", HostState.UP)


def test_delete_twice_and_start_a_deleted_vm(plane: ControlPlane) -> None:
    vm = plane.create_vm(VMCreate(name="gone", cpus=1, memory_mib=64))
    wait_for(plane, vm.id, VMState.RUNNING)
    plane.delete_vm(vm.id)
    with pytest.raises((InvalidTransition, NotFound)):
        plane.delete_vm(vm.id)
    wait_for(plane, vm.id, VMState.DELETED)
    with pytest.raises(NotFound):
        plane.delete_vm(vm.id)
    with pytest.raises(NotFound):
        plane.vm_action(vm.id, "start")


def test_retried_create_returns_the_first_vm(plane: ControlPlane) -> None:
    first = plane.create_vm(VMCreate(name="once", cpus=1, memory_mib=64, start=False),
                            request_id="req-1")
    again = plane.create_vm(VMCreate(name="once", cpus=1, memory_mib=64, start=False),
                            request_id="req-1")
    assert again.id == first.id
    with pytest.raises(AlreadyExists):
        plane.create_vm(VMCreate(name="once", cpus=1, memory_mib=64), request_id="req-2")
    assert len(plane.list_vms()) == 1


def test_a_crashed_guest_is_restarted(plane: ControlPlane) -> None:
    vm = plane.create_vm(VMCreate(name="crashy", cpus=1, memory_mib=64))
    pid = int(wait_for(plane, vm.id, VMState.RUNNING).guest_id or 0)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        plane.reconcile_once()
        now = plane.get_vm(vm.id)
        if now.state == VMState.RUNNING and now.guest_id not in (None, str(pid)):
            break
        assert time.monotonic() < deadline, f"still {now.state} {now.guest_id}"
        time.sleep(0.1)


class RecordingFleet:
    """A fleet whose agents never answer: the control plane's own logic, alone."""

    def __init__(self) -> None:
        self.converged: list[tuple[str, PowerState]] = []

    def probe_host(self, host: Host) -> dict[str, Any]:
        return {"cpus": 4, "memory_mib": 4096, "disk_gib": 10, "hypervisor": "test"}

    def start_host(self, host: Host) -> None: ...

    def stop_host(self, name: str) -> None: ...

    def converge_vm(self, vm: VM, host: Host) -> None:
        self.converged.append((vm.id, vm.desired))

    def forget_vm(self, vm_id: str) -> None: ...


@pytest.fixture
def quiet(tmp_path: Path) -> Iterator[tuple[ControlPlane, RecordingFleet, list[float]]]:
    clock = [1000.0]
    fleet = RecordingFleet()
    store = Store(tmp_path / "state.db")
    plane = ControlPlane(store, fleet, heartbeat_interval_s=1, heartbeat_misses=3,
                         converge_timeout_s=10, clock=lambda: clock[0])
    plane.register_host(HostCreate(name="h", driver="sim"))
    yield plane, fleet, clock
    store.close()


def test_silent_host_becomes_unreachable_and_recovers(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, _, clock = quiet
    vm = plane.create_vm(VMCreate(name="v", cpus=1, memory_mib=64))
    plane.heartbeat("h", {}, [])
    plane.report_vm(vm.id, 1, {"state": "running", "guest_id": "42", "time": clock[0]})
    clock[0] += 2
    plane.reconcile_once()
    assert plane.get_host("h").state == HostState.UP
    clock[0] += 5
    plane.reconcile_once()
    assert plane.get_host("h").state == HostState.UNREACHABLE
    assert plane.get_vm(vm.id).state == VMState.UNKNOWN
    plane.heartbeat("h", {"cpu_load": 0.1}, [{"vm_id": vm.id, "state": "running",
                                              "guest_id": "42", "epoch": 1, "time": clock[0]}])
    assert plane.get_host("h").state == HostState.UP
    assert plane.get_vm(vm.id).state == VMState.RUNNING
    assert plane.all_host_stats() == {"h": {"cpu_load": 0.1}}


def test_a_host_in_maintenance_comes_back_in_maintenance(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, _, clock = quiet
    plane.heartbeat("h", {}, [])
    plane.set_host_state("h", HostState.MAINTENANCE)
    clock[0] += plane.heartbeat_timeout_s + 1
    plane.reconcile_once()
    assert plane.get_host("h").state == HostState.UNREACHABLE
    plane.heartbeat("h", {}, [])
    host = plane.get_host("h")
    assert (host.state, host.state_before_unreachable) == (HostState.MAINTENANCE, None)
    plane.set_host_state("h", HostState.UP)
    clock[0] += plane.heartbeat_timeout_s + 1
    plane.reconcile_once()
    plane.heartbeat("h", {}, [])
    assert plane.get_host("h").state == HostState.UP


def test_a_new_host_has_time_for_its_first_heartbeat(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, _, clock = quiet
    clock[0] += AGENT_START_GRACE_S  # silent since registration, but its agent is starting
    plane.reconcile_once()
    assert plane.get_host("h").state == HostState.UP
    clock[0] += plane.heartbeat_timeout_s + 1
    plane.reconcile_once()
    assert plane.get_host("h").state == HostState.UNREACHABLE


def test_stale_and_late_reports_are_ignored(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, _, clock = quiet
    vm = plane.create_vm(VMCreate(name="v", cpus=1, memory_mib=64))
    plane.report_vm(vm.id, 1, {"state": "running", "guest_id": "1", "time": clock[0]})
    plane.report_vm(vm.id, 0, {"state": "stopped", "time": clock[0] + 1})  # older epoch
    assert plane.get_vm(vm.id).state == VMState.RUNNING
    plane.report_vm(vm.id, 1, {"state": "stopped", "time": clock[0] - 5})  # seen earlier
    assert plane.get_vm(vm.id).state == VMState.RUNNING


def test_reconcile_retries_unsettled_vms_after_the_timeout(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, fleet, clock = quiet
    vm = plane.create_vm(VMCreate(name="v", cpus=1, memory_mib=64))
    assert fleet.converged == [(vm.id, PowerState.RUNNING)]
    plane.heartbeat("h", {}, [])
    plane.reconcile_once()
    assert len(fleet.converged) == 1  # still in flight
    clock[0] += 11
    plane.heartbeat("h", {}, [])
    plane.reconcile_once()
    assert len(fleet.converged) == 2


def test_a_guest_that_cannot_be_defined_is_an_error_retried_with_backoff(
        quiet: tuple[ControlPlane, RecordingFleet, list[float]]) -> None:
    plane, fleet, clock = quiet
    vm = plane.create_vm(VMCreate(name="noimage", cpus=1, memory_mib=64, image="missing.qcow2"))
    failed = {"state": "deleted", "guest_id": None, "time": clock[0], "error_code": "not_found",
              "error": "image 'missing.qcow2' not found in pool default"}
    plane.report_vm(vm.id, 1, failed)
    now = plane.get_vm(vm.id)
    assert now.state == VMState.ERROR
    assert now.last_error_code == "not_found"
    assert "missing.qcow2" in (now.last_error or "")
    sent = len(fleet.converged)

    def retried_after(seconds: float) -> int:
        clock[0] += seconds
        plane.heartbeat("h", {}, [])
        plane.reconcile_once()
        return len(fleet.converged) - sent

    assert retried_after(1.5) == 0  # the first failure waits 2 s
    assert retried_after(1.0) == 1
    plane.report_vm(vm.id, 1, {**failed, "time": clock[0]})
    assert retried_after(3.0) == 1  # the second waits 4 s
    assert retried_after(1.5) == 2

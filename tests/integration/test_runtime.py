"""The control plane on Ray: lifecycle, actor kills at any moment, down/up, lost hosts."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest
import ray

from actors.runtime import stop_control_plane
from novacron.errors import AlreadyExists, InvalidTransition, NoCapacity, NotFound
from novacron.states import HostState, VMState
from tests.integration.conftest import Running, start


def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.2)


def guest_alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_lifecycle_through_the_driver_api(running: Running) -> None:
    nc = running.nc
    vm = nc.vms.create("api-vm", cpus=1, memory_mib=64).wait_for("running", timeout=60)
    assert vm.host in ("h1", "h2")
    assert guest_alive(int(vm.record.guest_id or 0))
    vm.stop().wait_for("stopped", timeout=30)
    vm.start().wait_for("running", timeout=30)
    vm.pause().wait_for("paused", timeout=30)
    vm.resume().wait_for("running", timeout=30)
    assert nc.vms.get("api-vm").id == vm.id
    with pytest.raises(InvalidTransition, match="cannot resume"):
        vm.resume()
    with pytest.raises(AlreadyExists):
        nc.vms.create("api-vm", cpus=1, memory_mib=64)
    with pytest.raises(NoCapacity, match="0/2 hosts fit"):
        nc.vms.create("huge", cpus=512, memory_mib=64)
    vm.delete().wait_for("deleted", timeout=30)
    with pytest.raises(NotFound):
        nc.vms.get("api-vm")
    assert nc.status()["vms"] == 0


def test_vm_actor_restart_keeps_the_guest(running: Running) -> None:
    vm = running.nc.vms.create("keep", cpus=1, memory_mib=64).wait_for("running", timeout=60)
    guest = int(vm.record.guest_id or 0)
    actor = running.actor(f"vm:{vm.id}")
    before = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    eventually(lambda: _pid_or_none(actor) not in (None, before), what="VMActor restart")
    assert guest_alive(guest)
    assert vm.refresh().state == VMState.RUNNING
    assert vm.record.guest_id == str(guest)  # re-attached, not restarted
    vm.stop().wait_for("stopped", timeout=30)  # and the new actor drives it
    eventually(lambda: not guest_alive(guest), what="guest stopped")


def _pid_or_none(actor: object) -> int | None:
    try:
        pid: int = ray.get(actor.pid.remote(), timeout=5)  # type: ignore[attr-defined]
    except Exception:
        return None
    return pid


def test_controller_killed_mid_operations_loses_nothing(running: Running) -> None:
    nc = running.nc
    vms = [nc.vms.create(f"c{i}", cpus=1, memory_mib=64) for i in range(3)]
    ray.kill(running.controller, no_restart=False)
    for vm in vms:
        vm.wait_for("running", timeout=90)
    vms[0].stop()
    ray.kill(running.controller, no_restart=False)
    vms[0].wait_for("stopped", timeout=90)
    assert sorted(v.name for v in nc.vms.list()) == ["c0", "c1", "c2"]
    assert sum(h.allocated.cpus for h in nc.hosts.list()) == 3


def test_host_actor_restart_keeps_its_guests(running: Running) -> None:
    vm = running.nc.vms.create("steady", cpus=1, memory_mib=64).wait_for("running", timeout=60)
    guest = int(vm.record.guest_id or 0)
    ray.kill(running.actor(f"host:{vm.host}"), no_restart=False)
    time.sleep(1.0)
    eventually(lambda: running.nc.hosts.get(vm.host or "").state == HostState.UP)
    assert guest_alive(guest)
    assert vm.refresh().state == VMState.RUNNING


def test_a_lost_host_is_marked_and_recovered(running: Running) -> None:
    vm = running.nc.vms.create("lost", cpus=1, memory_mib=64, host="h1")
    vm.wait_for("running", timeout=60)
    ray.kill(running.actor("host:h1"), no_restart=True)
    eventually(lambda: running.nc.hosts.get("h1").state == HostState.UNREACHABLE,
               what="host unreachable")
    # The controller re-creates the dead agent; the host and its VM come back.
    eventually(lambda: running.nc.hosts.get("h1").state == HostState.UP, what="host back up")
    vm.wait_for("running", timeout=30)


def test_down_then_up_brings_everything_back(running: Running) -> None:
    nc = running.nc
    vms = [nc.vms.create(f"d{i}", cpus=1, memory_mib=64).wait_for("running", timeout=60)
           for i in range(2)]
    stopped = nc.vms.create("d-off", cpus=1, memory_mib=64, start=False)
    stopped.wait_for("stopped", timeout=60)
    guests = {vm.id: vm.record.guest_id for vm in vms}
    stop_control_plane(running.settings.namespace)
    assert all(guest_alive(int(pid or 0)) for pid in guests.values())  # guests outlive it

    again = start(running.settings)
    records = {vm.id: vm for vm in again.nc.vms.list()}
    assert set(records) == {*guests, stopped.id}
    for vm_id, pid in guests.items():
        handle = again.nc.vms.get(vm_id).wait_for("running", timeout=60)
        assert handle.record.guest_id == pid  # re-attached to the same guest process
    assert again.nc.vms.get("d-off").state == VMState.STOPPED
    assert len(again.nc.hosts.list()) == 2


def test_concurrent_creates_never_overcommit(running: Running) -> None:
    """Twelve creates race for room for eight (two hosts of 4 GiB, VMs of 1 GiB)."""
    from concurrent.futures import ThreadPoolExecutor

    def create(i: int) -> str:
        try:
            running.nc.vms.create(f"race{i}", cpus=1, memory_mib=1024, start=False)
        except NoCapacity as exc:
            assert "insufficient memory" in exc.message  # noqa: PT017 - in a worker thread
            return "refused"
        return "placed"

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(create, range(12)))
    assert sorted(outcomes) == ["placed"] * 8 + ["refused"] * 4
    for host in running.nc.hosts.list():
        assert host.allocated.memory_mib == 4096 <= host.limit.memory_mib
    assert len(running.nc.vms.list()) == 8

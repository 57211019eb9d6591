"""A cloud zone as a NovaCron host end to end: the control plane with in-process agents (no Ray)
registers a GCP host on the local GCE fake, places a VM there and drives its lifecycle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.controlplane import ControlPlane
from novacron.errors import NotFound
from novacron.localfleet import LocalFleet
from novacron.model import VM, HostCreate, VMCreate
from novacron.states import VMState
from novacron.store import Store
from tests.fakes.gce import GceFake

pytest_plugins = ["tests.fakes.plugin"]


@pytest.fixture
def plane(state_dir: Path, gce: GceFake) -> Iterator[ControlPlane]:
    store = Store(state_dir / "state.db")
    fleet = LocalFleet(state_dir, heartbeat_interval_s=0.1, stop_timeout_s=5)
    plane = ControlPlane(store, fleet, heartbeat_interval_s=0.1, heartbeat_misses=50)
    fleet.bind(plane)
    yield plane
    fleet.close()
    store.close()


def wait_for(plane: ControlPlane, vm_id: str, state: VMState, timeout: float = 20.0) -> VM | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            vm = plane.get_vm(vm_id)
        except NotFound:
            if state == VMState.DELETED:
                return None
            raise
        if vm.state == state and vm.pending is None:
            return vm
        assert time.monotonic() < deadline, f"VM is {vm.state} ({vm.last_error}), not {state}"
        time.sleep(0.05)


def test_a_gcp_zone_hosts_vms(plane: ControlPlane, gce: GceFake) -> None:
    host = plane.register_host(HostCreate(name="gcp-zone", driver="gcp", config={
        "project": gce.project, "zone": "us-central1-a", "endpoint_url": gce.url,
        "credentials": {"source": "anonymous"}, "poll_interval_s": 0.01,
        "retry_initial_s": 0.01, "default_image": "projects/debian-cloud/global/images/d12"}))
    assert (host.capacity.cpus, host.capacity.memory_mib) == (24, 24 * 4096)  # the CPU quota
    assert host.config["credentials"] == {"source": "anonymous"}  # a reference, no secret

    vm = plane.create_vm(VMCreate(name="web", cpus=2, memory_mib=4096, disk_gib=10))
    running = wait_for(plane, vm.id, VMState.RUNNING)
    assert running is not None
    assert running.guest_id == f"novacron-{vm.id}"
    instance = gce.instances[("us-central1-a", f"novacron-{vm.id}")]
    assert instance["machineType"].endswith("/e2-medium")
    assert instance["labels"]["novacron-epoch"] == str(running.epoch)

    plane.vm_action(vm.id, "stop")
    wait_for(plane, vm.id, VMState.STOPPED)
    assert instance["status"] == "TERMINATED"
    plane.vm_action(vm.id, "start")
    wait_for(plane, vm.id, VMState.RUNNING)
    plane.delete_vm(vm.id)
    wait_for(plane, vm.id, VMState.DELETED)
    assert ("us-central1-a", f"novacron-{vm.id}") not in gce.instances

"""A cloud zone as a NovaCron host end to end: the control plane with in-process agents (no Ray)
registers a GCP host on the local GCE fake, places a VM there and drives its lifecycle; a create
the provider would refuse is refused before anything is recorded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron.controlplane import ControlPlane
from novacron.errors import InvalidRequest, NotFound, QuotaExceeded
from novacron.localfleet import LocalFleet
from novacron.model import VM, Host, HostCreate, VMCreate
from novacron.states import VMState
from novacron.store import Store
from serve.errors import status_of
from tests.conftest import sim_host_config
from tests.fakes.gce import GceFake

pytest_plugins = ["tests.fakes.plugin"]


class Fleet(LocalFleet):
    """The in-process fleet, noting the hosts it was asked to preflight a VM on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preflights: list[str] = []

    def preflight_vm(self, vm: VM, host: Host) -> None:
        self.preflights.append(host.name)
        super().preflight_vm(vm, host)


@pytest.fixture
def fleet(state_dir: Path) -> Iterator[Fleet]:
    fleet = Fleet(state_dir, heartbeat_interval_s=0.1, stop_timeout_s=5)
    yield fleet
    fleet.close()


@pytest.fixture
def plane(state_dir: Path, gce: GceFake, fleet: Fleet) -> Iterator[ControlPlane]:
    store = Store(state_dir / "state.db")
    plane = ControlPlane(store, fleet, heartbeat_interval_s=0.1, heartbeat_misses=50)
    fleet.bind(plane)
    yield plane
    fleet.close()
    store.close()


def gcp_host(plane: ControlPlane, gce: GceFake, **config: Any) -> Host:
    return plane.register_host(HostCreate(name="gcp-zone", driver="gcp", config={
        "project": gce.project, "zone": "us-central1-a", "endpoint_url": gce.url,
        "credentials": {"source": "anonymous"}, "poll_interval_s": 0.01,
        "retry_initial_s": 0.01, "default_image": "projects/debian-cloud/global/images/d12",
        **config}))


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


@pytest.mark.parametrize(("why", "expected", "status"), [
    ("type", InvalidRequest, 422), ("quota", QuotaExceeded, 409)])
def test_a_create_the_provider_would_refuse_records_nothing(
        plane: ControlPlane, gce: GceFake, fleet: Fleet, state_dir: Path, why: str,
        expected: type[Exception], status: int) -> None:
    host = gcp_host(plane, gce)
    labels = {"gcp.machine_type": "x9-huge"} if why == "type" else {}
    if why == "quota":
        gce.cpu_quotas["CPUS"] = 1  # the cheapest fit, e2-micro, has 2
    with pytest.raises(expected) as info:
        plane.create_vm(VMCreate(name="web", cpus=1, memory_mib=512, disk_gib=10,
                                 labels=labels))
    assert info.value.details["provider"] == "gcp"  # type: ignore[attr-defined]
    assert status_of(info.value) == status  # type: ignore[arg-type]
    assert fleet.preflights == [host.name]
    assert plane.list_vms() == []
    assert plane.store.get("vmname", "default/web") is None  # the name stays free
    assert plane.get_host(host.name).allocated == host.allocated
    assert list((state_dir / "cloud" / "gcp" / "hosts").glob("*/*.json")) == []
    assert gce.calls["insert"] == 0


def test_hosts_whose_driver_asks_nothing_get_no_preflight(plane: ControlPlane, fleet: Fleet,
                                                           state_dir: Path) -> None:
    plane.register_host(HostCreate(name="sim-1", driver="sim",
                                   config=sim_host_config(state_dir)))
    plane.create_vm(VMCreate(name="local", cpus=1, memory_mib=256, disk_gib=1, start=False))
    assert fleet.preflights == []


def test_a_provider_that_cannot_answer_refuses_nothing(plane: ControlPlane, gce: GceFake,
                                                       fleet: Fleet,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    host = gcp_host(plane, gce, retry_timeout_s=0.2)
    gce.throttle(100_000)  # beyond the retries' deadline
    vm = plane.create_vm(VMCreate(name="web", cpus=1, memory_mib=512, disk_gib=10,
                                  start=False))
    assert fleet.preflights == [host.name]
    assert "could not be asked before the create: " in caplog.text
    assert "GCP kept throttling" in caplog.text
    assert plane.get_vm(vm.id).host == host.name  # its agent meets (and reports) the same
    gce.reset()
    plane.delete_vm(vm.id)
    wait_for(plane, vm.id, VMState.DELETED)

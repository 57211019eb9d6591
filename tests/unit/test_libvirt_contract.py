"""The shared driver contract against libvirt's in-process test hypervisor (``test:///default``)."""

from __future__ import annotations

import io
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install "
                    "'novacron[libvirt]'; needs the libvirt-dev and pkg-config packages)")

import libvirt

from novacron.drivers.base import Capability, Driver, GuestConfig
from novacron.drivers.libvirt import (
    _UUID_NAMESPACE,
    GIB,
    GuestEvent,
    LibvirtDriver,
    LibvirtURI,
    domain_name,
    map_state,
)
from novacron.drivers.libvirt_errors import error_class
from novacron.drivers.libvirt_xml import Domain
from novacron.errors import (
    AlreadyExists,
    DriverError,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
    OperationTimeout,
    StaleEpoch,
    Unauthenticated,
)
from novacron.states import VMState
from tests.contract.driver_contract import DriverContract


class TestLibvirtContract(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[Driver]:
        drv = LibvirtDriver("test-host", "test:///default", {"pool_path": "/novacron"},
                            tmp_path)
        drv.connect()
        yield drv
        drv.close()


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[LibvirtDriver]:
    driver = LibvirtDriver("test-host", "test:///default", {"pool_path": "/novacron"}, tmp_path)
    driver.connect()
    yield driver
    for guest in driver.list():
        if guest.vm_id.startswith("vm-unit-"):
            driver.stop(guest.vm_id, force=True)
            driver.undefine(guest.vm_id)
    driver.close()


@pytest.fixture
def vm() -> str:
    return f"vm-unit-{uuid.uuid4().hex[:10]}"


def guest(vm_id: str, **kwargs: Any) -> GuestConfig:
    return GuestConfig(**{"vm_id": vm_id, "name": "unit", "cpus": 1, "memory_mib": 64,
                          "disk_gib": 1, "epoch": 1, **kwargs})


def raw_conn() -> Any:
    return libvirt.open("test:///default")


def volume_names(drv: LibvirtDriver) -> set[str]:
    return {v.name for v in drv.list_volumes()}


# -- URIs, capabilities, config --------------------------------------------------------------


@pytest.mark.parametrize(("uri", "missing"), [
    ("qemu:///system", {Capability.MEMORY_ACCESS}),
    ("qemu+ssh://admin@kvm1/system", {Capability.MEMORY_ACCESS}),
    ("qemu+tcp://kvm1/system", {Capability.MEMORY_ACCESS}),
    ("test:///default", {Capability.MEMORY_ACCESS, Capability.LIVE_MIGRATION,
                         Capability.COLD_MIGRATION, Capability.DISK_ACCESS,
                         Capability.CONSOLE}),
    ("xen:///system", {Capability.MEMORY_ACCESS, Capability.SNAPSHOT}),
    ("esx://esx1/?no_verify=1", {Capability.MEMORY_ACCESS, Capability.LIVE_MIGRATION,
                                 Capability.COLD_MIGRATION, Capability.EVENTS,
                                 Capability.CONSOLE, Capability.DISK_ACCESS}),
])
def test_capabilities_follow_the_uri(tmp_path: Path, uri: str, missing: set[Capability]) -> None:
    driver = LibvirtDriver("h", uri, {}, tmp_path)
    assert set(driver.missing_capabilities()) == missing
    assert driver.capabilities == frozenset(Capability) - missing
    assert all(len(reason) > 20 for reason in driver.missing_capabilities().values())


@pytest.mark.parametrize("uri", [None, "", "lxc:///", "vbox:///session", "qemu+carrier://x/"])
def test_unusable_uris_are_refused(tmp_path: Path, uri: str | None) -> None:
    with pytest.raises(InvalidRequest):
        LibvirtDriver("h", uri, {}, tmp_path)


def test_ssh_uris_never_prompt() -> None:
    assert LibvirtURI.parse("qemu+ssh://u@h/system").connect_uri() == (
        "qemu+ssh://u@h/system?no_tty=1")
    assert LibvirtURI.parse("qemu+ssh://u@h/system?no_tty=0").connect_uri() == (
        "qemu+ssh://u@h/system?no_tty=0")
    assert LibvirtURI.parse("qemu+tcp://h/system").connect_uri() == "qemu+tcp://h/system"


@pytest.mark.parametrize(("config", "message"), [
    ({"pools": "x"}, "unknown"),
    ({"network": "vlan:7"}, "network"),
    ({"network": "bridge:"}, "network"),
    ({"domain_type": "lxc"}, "domain_type"),
    ({"disk_bus": "nvme0"}, "disk_bus"),
    ({"keepalive_count": "many"}, "keepalive_count"),
    ({"kernel": 3}, "kernel"),
    ({"disk_allocation_ratio": 0}, "ratio"),
])
def test_bad_config_is_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        LibvirtDriver("h", "qemu:///system", config, tmp_path)


def test_state_mapping_covers_reasons_and_unknowns() -> None:
    assert map_state(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED) == (
        VMState.RUNNING, "running:booted")
    assert map_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)[0] == (
        VMState.MIGRATING)
    assert map_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)[0] == (
        VMState.ERROR)
    assert map_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)[0] == (
        VMState.ERROR)
    assert map_state(libvirt.VIR_DOMAIN_SHUTDOWN, 0)[0] == VMState.STOPPING
    assert map_state(libvirt.VIR_DOMAIN_RUNNING, 99) == (VMState.RUNNING, "running:reason-99")
    assert map_state(42, 0) == (VMState.UNKNOWN, "state-42:reason-0")


@pytest.mark.parametrize(("code", "domain", "expected"), [
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, NotFound),
    (libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_FROM_QEMU, AlreadyExists),
    (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, InvalidTransition),
    (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_AUTH, Unauthenticated),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, HostUnreachable),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, DriverError),
    (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_QEMU, NotSupported),
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, OperationTimeout),
    (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, DriverError),
])
def test_errors_map_by_code(code: int, domain: int, expected: type[Exception]) -> None:
    assert error_class(code, domain) is expected


# -- connecting ------------------------------------------------------------------------------


def test_unreachable_host_is_host_unreachable(tmp_path: Path) -> None:
    driver = LibvirtDriver("gone", "qemu+tcp://127.0.0.1:1/system", {}, tmp_path)
    with pytest.raises(HostUnreachable, match=r"127\.0\.0\.1") as info:
        driver.connect()
    assert info.value.details["libvirt_code"] == "VIR_ERR_SYSTEM_ERROR"
    with pytest.raises(HostUnreachable):
        driver.list()


AUTH_NODE = """<node>
  <auth><user password='s3cret'>alice</user></auth>
  <domain type='test'><name>other</name><memory>65536</memory>
    <os><type>hvm</type></os></domain>
</node>"""


def test_auth_failure_and_success(tmp_path: Path) -> None:
    node = tmp_path / "node.xml"
    node.write_text(AUTH_NODE)
    uri = f"test://{node}"
    wrong = LibvirtDriver("h", uri, {"username": "alice", "password": "nope"}, tmp_path)
    with pytest.raises(Unauthenticated):
        wrong.connect()
    right = LibvirtDriver("h", uri, {"username": "alice", "password": "s3cret"}, tmp_path)
    right.connect()
    assert right.list() == []  # the node's own domain is not NovaCron's
    right.close()


# -- guests ----------------------------------------------------------------------------------


def test_define_records_metadata_and_reattaches(drv: LibvirtDriver, vm: str,
                                                tmp_path: Path) -> None:
    drv.define(guest(vm, epoch=4, labels={"libvirt.kernel": "/boot/vmlinuz",
                                          "libvirt.cmdline": "console=ttyS0"}))
    dom = raw_conn().lookupByName(domain_name(vm))
    spec = Domain.from_xml(dom.XMLDesc(0))
    assert spec.metadata is not None
    assert (spec.metadata.vm_id, spec.metadata.epoch) == (vm, 4)
    assert spec.kernel_boot is not None
    assert (spec.kernel_boot.kernel, spec.kernel_boot.cmdline) == ("/boot/vmlinuz",
                                                                   "console=ttyS0")
    assert [d.path for d in spec.disks] == list(spec.metadata.volumes)
    # a new driver (an actor restart) finds the guest and its epoch
    again = LibvirtDriver("test-host", "test:///default", {"pool_path": "/novacron"}, tmp_path)
    assert again.get(vm).epoch == 4
    again.close()


def test_running_guest_refuses_stale_epoch_and_records_newer(drv: LibvirtDriver,
                                                             vm: str) -> None:
    drv.define(guest(vm, epoch=3))
    assert drv.start(vm, epoch=5).epoch == 5
    with pytest.raises(StaleEpoch):
        drv.start(vm, epoch=4)
    assert drv.get(vm).epoch == 5


def test_image_overlay_and_undefine_keeps_template(drv: LibvirtDriver, vm: str) -> None:
    drv.ensure_pool()
    template = drv.create_volume(f"{vm}-template.qcow2", 2 * GIB)
    drv.define(guest(vm, image=f"novacron/{template.name}", disk_gib=1))
    [disk] = drv.guest_volumes(vm)
    assert disk.capacity_bytes == 2 * GIB  # at least the image's size
    assert disk.backing is not None
    assert disk.backing.path == template.path
    drv.undefine(vm, delete_storage=True)
    assert disk.name not in volume_names(drv)
    assert template.name in volume_names(drv)
    drv.delete_volume(template.name)
    drv.delete_volume(template.name)  # idempotent


def test_missing_image_leaves_nothing(drv: LibvirtDriver, vm: str) -> None:
    drv.ensure_pool()
    before = volume_names(drv)
    for image in ("novacron/nope.qcow2", "/no/such/image.qcow2", "nopool/x"):
        with pytest.raises(NotFound, match="image"):
            drv.define(guest(vm, image=image))
        with pytest.raises(NotFound):
            drv.get(vm)
    assert volume_names(drv) == before


def test_full_pool_is_no_capacity_and_leaves_nothing(drv: LibvirtDriver, vm: str) -> None:
    drv.ensure_pool()
    before = volume_names(drv)
    with pytest.raises(NoCapacity, match="GiB free") as info:
        drv.define(guest(vm, disk_gib=10**6))
    assert info.value.details["pool"] == "novacron"
    assert volume_names(drv) == before
    with pytest.raises(NotFound):
        drv.get(vm)


def test_failed_define_rolls_back_its_volume(drv: LibvirtDriver, vm: str) -> None:
    drv.ensure_pool()
    before = volume_names(drv)
    conn = raw_conn()
    clash = Domain(name="novacron-other", uuid=str(uuid.uuid5(_UUID_NAMESPACE, vm)),
                   memory_mib=64, vcpus=1, domain_type="test")
    conn.defineXML(clash.to_xml())  # another domain already holds the guest's UUID
    try:
        with pytest.raises(NovaCronError):
            drv.define(guest(vm))
        assert volume_names(drv) == before
    finally:
        conn.lookupByName("novacron-other").undefine()


def test_volumes_of_a_guest_elsewhere_are_never_deleted(drv: LibvirtDriver, vm: str) -> None:
    """On shared storage a same-named volume may be the disk of the guest on another host."""
    drv.ensure_pool()
    other = drv.create_volume(f"{domain_name(vm)}-disk0.qcow2", GIB)
    with pytest.raises(AlreadyExists, match="volume"):
        drv.define(guest(vm))
    with pytest.raises(NotFound):
        drv.get(vm)
    drv.undefine(vm, delete_storage=True)  # no such guest here: nothing to delete
    assert other.name in volume_names(drv)
    drv.delete_volume(other.name)


def test_name_clash_with_a_foreign_domain(drv: LibvirtDriver, vm: str) -> None:
    conn = raw_conn()
    foreign = Domain(name=domain_name(vm), uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                     domain_type="test")
    conn.defineXML(foreign.to_xml())
    try:
        with pytest.raises(AlreadyExists, match="not NovaCron's"):
            drv.define(guest(vm))
        with pytest.raises(NotFound):
            drv.get(vm)
        assert vm not in {g.vm_id for g in drv.list()}
        assert conn.lookupByName(domain_name(vm)).UUIDString() == foreign.uuid  # untouched
    finally:
        conn.lookupByName(domain_name(vm)).undefine()


def test_undefine_refuses_a_running_guest(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    drv.start(vm, epoch=1)
    with pytest.raises(InvalidTransition, match="stop it first"):
        drv.undefine(vm)
    assert drv.get(vm).state == VMState.RUNNING


def test_graceful_stop_of_a_paused_guest(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    drv.start(vm, epoch=1)
    drv.pause(vm)
    stopped = drv.stop(vm, timeout_s=5)
    assert (stopped.state, stopped.reason) == (VMState.STOPPED, "shutoff:shutdown")


def test_state_changes_on_a_stopped_guest_are_invalid(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    for action in (drv.pause, drv.resume, drv.reboot):
        with pytest.raises(InvalidTransition):
            action(vm)


def test_migration_is_not_supported_on_the_test_driver(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    drv.start(vm, epoch=1)
    with pytest.raises(NotSupported, match="test driver"):
        drv.migrate_live(vm, "test:///default")
    with pytest.raises(NotSupported, match="streams"):
        drv.download_volume("x", io.BytesIO())


def test_snapshots(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    drv.start(vm, epoch=1)
    first = drv.snapshot_create(vm, "first", description="clean")
    assert (first.name, first.description, first.state) == ("first", "clean", "running")
    with pytest.raises(AlreadyExists):
        drv.snapshot_create(vm, "first")
    drv.stop(vm, force=True)
    second = drv.snapshot_create(vm, "second")
    assert second.parent == "first"
    assert [s.name for s in drv.snapshot_list(vm)] == ["first", "second"]
    assert drv.snapshot_revert(vm, "first").state == VMState.RUNNING
    with pytest.raises(NotFound):
        drv.snapshot_revert(vm, "third")
    drv.snapshot_delete(vm, "second")
    drv.snapshot_delete(vm, "second")  # idempotent
    assert [s.name for s in drv.snapshot_list(vm)] == ["first"]
    drv.stop(vm, force=True)
    drv.undefine(vm)  # snapshot metadata goes with the guest


def test_events_arrive_without_polling(drv: LibvirtDriver, vm: str) -> None:
    seen: queue.Queue[GuestEvent] = queue.Queue()
    unsubscribe = drv.subscribe(lambda e: seen.put(e) if e.vm_id == vm else None)

    def next_state(event: str) -> VMState:
        while True:
            got = seen.get(timeout=5)
            if got.event == event:
                return got.state

    drv.define(guest(vm))
    assert next_state("defined") == VMState.STOPPED
    drv.start(vm, epoch=1)
    assert next_state("started") == VMState.RUNNING
    drv.pause(vm)
    assert next_state("suspended") == VMState.PAUSED
    drv.resume(vm)
    assert next_state("resumed") == VMState.RUNNING
    drv.stop(vm, timeout_s=5)
    assert next_state("stopped") == VMState.STOPPED
    drv.undefine(vm)
    assert next_state("undefined") == VMState.DELETED
    unsubscribe()


def test_stats_and_host_figures(drv: LibvirtDriver, vm: str) -> None:
    drv.define(guest(vm))
    drv.start(vm, epoch=1)
    assert drv.stats(vm).cpu_time_s > 0
    assert drv.domain_stats(vm)["state.state"] == libvirt.VIR_DOMAIN_RUNNING
    stats = drv.host_stats()
    assert 0.0 <= stats.cpu_load <= 1.0
    assert stats.memory_used_mib >= 0
    assert stats.guests >= 1
    info = drv.host_info()
    assert info.hypervisor == "test"
    assert "libvirt" in info.version

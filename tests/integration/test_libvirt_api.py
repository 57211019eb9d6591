"""A real libvirt host through NovaCron: registered by URI, its guests driven by the control plane.

Each test runs a control plane on the session's Ray (as the ``running`` fixture does) and
registers the session's system libvirtd (``libvirt_env``) as host ``kvm-1``, whose guests boot the
tiny busybox guest under TCG with their disks in a pool of their own. Heartbeats are 60 s apart,
the most the settings allow, and a test sees the HostActor's periodic sample in the host's stats
(``time``): a state change that reaches the store while that sample stays the same was carried
by a libvirt lifecycle event, not by polling.

Skips with the exact reason when this machine cannot run it (not root, packages missing: run
``bash scripts/install-system-deps.sh``).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.runtime import stop_control_plane
from novacron.client import NovaCron, VMHandle
from novacron.config import Settings
from novacron.errors import (
    AlreadyExists,
    HostUnreachable,
    InvalidRequest,
    NoCapacity,
    NotFound,
    Unauthenticated,
)
from novacron.model import Host, Resources
from novacron.states import HostState, VMState
from novacron.store import Store
from tests.integration.conftest import Running, start
from tests.integration.libvirt_env import (
    SYSTEM_URI,
    WORK,
    LibvirtEnv,
    daemons,
    skip_unless_possible,
)
from tests.libvirt_guest import GUEST_POWEROFF, GUEST_UP, heartbeats, wait_heartbeats, wait_until

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

HOST = "kvm-1"
POOL = ("novacron-it-api", str(WORK / "api"))
GIB = 2**30

skip_unless_possible()

import libvirt  # noqa: E402

from novacron.drivers.libvirt import domain_name  # noqa: E402
from novacron.drivers.libvirt_xml import Domain  # noqa: E402


@contextlib.contextmanager
def virt() -> Iterator[Any]:
    """A connection of the test's own to the system daemon (behind NovaCron's back)."""
    conn = libvirt.open(SYSTEM_URI)
    try:
        yield conn
    finally:
        conn.close()


def domain_or_none(conn: Any, vm_id: str) -> Any:
    try:
        return conn.lookupByName(domain_name(vm_id))
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None


def disk_paths(dom: Any) -> list[str]:
    return [s.get("file", "") for s in ET.fromstring(dom.XMLDesc(0)).findall(
        "devices/disk/source")]


def pool_volumes() -> set[str]:
    with virt() as conn:
        pool = conn.storagePoolLookupByName(POOL[0])
        pool.refresh(0)
        return {v.name() for v in pool.listAllVolumes(0)}


def sweep() -> None:
    """Remove every domain with a disk in this module's pool, and every volume in it (what a
    test, or an interrupted earlier run, left behind)."""
    with virt() as conn:
        for dom in conn.listAllDomains(0):
            if any(p.startswith(POOL[1] + "/") for p in disk_paths(dom)):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                  | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        try:
            pool = conn.storagePoolLookupByName(POOL[0])
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            return  # made when the first test registers the host
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)


def consecutive(counters: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(counters))


@dataclass
class Plane:
    """A control plane with the libvirt host registered."""

    running: Running
    env: LibvirtEnv
    host: Host

    @property
    def nc(self) -> NovaCron:
        return self.running.nc

    def log(self, vm: VMHandle) -> Path:
        """The guest's serial console."""
        return self.env.console_log(vm.id)

    def boot(self, name: str) -> VMHandle:
        """Create a VM on the host; wait until it runs and its guest beats."""
        vm = self.nc.vms.create(name, cpus=1, memory_mib=128, disk_gib=1,
                                image=str(self.env.template), host=HOST)
        vm.wait_for(VMState.RUNNING, timeout=60)
        wait_heartbeats(self.log(vm), 3)
        return vm

    def sample(self) -> dict[str, Any]:
        """The host's last sample, as the control plane holds it (waits for the first)."""
        wait_until(lambda: HOST in self.nc.call("all_host_stats"), 30, "the first heartbeat")
        stats: dict[str, Any] = self.nc.call("all_host_stats")[HOST]
        return stats

    def head(self) -> int:
        with Store(self.running.settings.store_path, readonly=True) as store:
            return store.head_revision()

    def states(self, vm_id: str, since: int) -> list[str]:
        """The states the VM's record went through after revision ``since`` (the event log)."""
        with Store(self.running.settings.store_path, readonly=True) as store:
            return [e.data["state"] for e in store.events(since, kinds=["vm"])
                    if e.key == vm_id and e.data is not None]

    def wait_state_logged(self, vm_id: str, since: int, state: VMState) -> None:
        wait_until(lambda: state.value in self.states(vm_id, since), 20,
                   f"VM {vm_id} recorded as {state.value}")

    def wait_error(self, vm: VMHandle, pattern: str) -> None:
        """Wait until the VM's agent reports an error matching ``pattern``."""
        wait_until(lambda: re.search(pattern, vm.refresh().record.last_error or "") is not None,
                   30, f"an error matching {pattern!r} on VM {vm.name}")


@pytest.fixture
def plane(ray_session: None, state_dir: Path, libvirt_env: LibvirtEnv) -> Iterator[Plane]:
    sweep()
    settings = Settings(state_dir=state_dir, namespace=f"nc-lv-{uuid.uuid4().hex[:8]}",
                        sim_hosts=0, heartbeat_interval_s=60, heartbeat_misses=5,
                        reconcile_interval_s=0.25, converge_timeout_s=30, stop_timeout_s=20)
    running = start(settings, hosts=0)
    try:
        host = running.nc.hosts.register(HOST, driver="libvirt", uri=SYSTEM_URI,
                                         config=libvirt_env.host_config(POOL))
        yield Plane(running, libvirt_env, host)
    finally:
        stop_control_plane(settings.namespace, stop_guests=True)
        sweep()


def test_a_vm_lives_its_whole_life_on_a_libvirt_host(plane: Plane) -> None:
    nc = plane.nc
    with virt() as conn:
        _model, memory_mib, cpus, *_ = conn.getInfo()
        pool_bytes = conn.storagePoolLookupByName(POOL[0]).info()[1]  # made at registration
    assert (plane.host.driver, plane.host.uri, plane.host.state) == (
        "libvirt", SYSTEM_URI, HostState.UP)
    assert plane.host.capacity == Resources(cpus=cpus, memory_mib=memory_mib,
                                            disk_gib=pool_bytes // GIB)
    sample = plane.sample()  # the HostActor's, through libvirt's node statistics
    assert 0.0 <= sample["cpu_load"] <= 1.0
    assert 0 < sample["memory_used_mib"] <= memory_mib
    assert sample["extra"]["pool_available_gib"] > 0

    vm = plane.boot("life")
    log = plane.log(vm)
    with virt() as conn:
        dom = conn.lookupByName(domain_name(vm.id))
        assert vm.record.guest_id == dom.UUIDString()
        [disk] = disk_paths(dom)
    assert disk.startswith(POOL[1])

    vm.stop().wait_for(VMState.STOPPED, timeout=60)
    assert GUEST_POWEROFF in log.read_bytes()  # a graceful ACPI shutdown, not a destroy
    with virt() as conn:
        assert not conn.lookupByName(domain_name(vm.id)).isActive()
    vm.start().wait_for(VMState.RUNNING, timeout=60)
    wait_until(lambda: log.read_bytes().count(GUEST_UP) == 2, 60, "the guest to boot again")
    wait_heartbeats(log, 3)

    at_snapshot = heartbeats(log)[-1]
    snap = vm.snapshot("before")
    assert (snap["name"], snap["state"]) == ("before", "running")
    moved_on = wait_heartbeats(log, 8)[-1]
    assert [s["name"] for s in vm.snapshots()] == ["before"]
    assert vm.revert("before").state == VMState.RUNNING
    seen = len(heartbeats(log))  # every line from now on is the reverted guest's
    resumed = wait_heartbeats(log, 3)[seen:]
    assert at_snapshot <= resumed[0] < moved_on  # the guest's memory went back
    assert consecutive(resumed)
    with pytest.raises(NotFound, match="no snapshot 'after'"):
        vm.revert("after")
    vm.delete_snapshot("before")
    assert vm.snapshots() == []

    vm.delete().wait_for(VMState.DELETED, timeout=60)
    with virt() as conn:
        assert domain_or_none(conn, vm.id) is None
    assert not Path(disk).exists()
    assert plane.env.template.exists()
    assert nc.hosts.get(HOST).allocated == Resources.zero()


def pid_or_none(actor: Any) -> int | None:
    try:
        pid: int = ray.get(actor.pid.remote(), timeout=5)
    except Exception:
        return None
    return pid


def test_a_restarted_vm_actor_reattaches_to_its_running_domain(plane: Plane) -> None:
    vm = plane.boot("reattach")
    log = plane.log(vm)
    actor = plane.running.actor(f"vm:{vm.id}")
    before = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    wait_until(lambda: pid_or_none(actor) not in (None, before), 60, "the VMActor's restart")

    assert vm.refresh().state == VMState.RUNNING
    with virt() as conn:
        assert conn.lookupByName(domain_name(vm.id)).UUIDString() == vm.record.guest_id
    assert consecutive(wait_heartbeats(log, 5))  # the same guest, never restarted
    assert log.read_bytes().count(GUEST_UP) == 1
    vm.stop().wait_for(VMState.STOPPED, timeout=60)  # and the new actor drives it
    assert GUEST_POWEROFF in log.read_bytes()


def destroy_behind_novacrons_back(plane: Plane, vm: VMHandle) -> None:
    """Power the guest off with the test's own libvirt connection; check the record follows
    through the HostActor's event (no periodic sample in between), and that NovaCron, whose
    desired state is still running, boots the same domain again."""
    sample = plane.sample()
    since = plane.head()
    boots = plane.log(vm).read_bytes().count(GUEST_UP)
    guest_id = vm.record.guest_id
    with virt() as conn:
        conn.lookupByName(domain_name(vm.id)).destroy()
    plane.wait_state_logged(vm.id, since, VMState.STOPPED)
    assert plane.sample() == sample  # not polled: that came from libvirt's lifecycle event
    wait_until(lambda: plane.log(vm).read_bytes().count(GUEST_UP) == boots + 1, 60,
               "NovaCron to boot the guest again")
    assert vm.wait_for(VMState.RUNNING, timeout=30).record.guest_id == guest_id


def test_a_domain_stopped_behind_novacrons_back_is_seen_through_its_event(
        plane: Plane) -> None:
    vm = plane.boot("events")
    destroy_behind_novacrons_back(plane, vm)


def test_libvirtd_restarts_under_the_host_actor_and_nothing_is_lost(plane: Plane) -> None:
    plane.env.skip_unless_restartable()
    vm = plane.boot("steady")
    log = plane.log(vm)
    host_actor = plane.running.actor(f"host:{HOST}")
    host_pid = ray.get(host_actor.pid.remote())

    daemons("restart", "system")
    assert consecutive(wait_heartbeats(log, 5))  # the guest never noticed
    assert log.read_bytes().count(GUEST_UP) == 1
    assert plane.nc.hosts.get(HOST).state == HostState.UP
    assert vm.refresh().state == VMState.RUNNING
    with virt() as conn:
        assert conn.lookupByName(domain_name(vm.id)).UUIDString() == vm.record.guest_id
    # The same HostActor, whose driver reconnected: its events flow on the new connection; the
    # VMActor's driver reconnected too, and boots the guest again.
    destroy_behind_novacrons_back(plane, vm)
    assert ray.get(host_actor.pid.remote()) == host_pid


AUTH_NODE = """<node>
  <auth><user password='s3cret'>alice</user></auth>
</node>"""


def test_bad_hosts_are_refused_with_typed_errors_and_not_recorded(plane: Plane,
                                                                  tmp_path: Path) -> None:
    nc = plane.nc
    with pytest.raises(HostUnreachable, match=r"127\.0\.0\.9"):
        nc.hosts.register("gone", driver="libvirt", uri="qemu+tcp://127.0.0.9/system")
    node = tmp_path / "node.xml"
    node.write_text(AUTH_NODE)
    with pytest.raises(Unauthenticated):
        nc.hosts.register("locked", driver="libvirt", uri=f"test://{node}",
                          config={"username": "alice", "password": "guess"})
    with pytest.raises(InvalidRequest, match="unknown libvirt driver config keys"):
        nc.hosts.register("typo", driver="libvirt", uri=SYSTEM_URI, config={"pools": "x"})
    with pytest.raises(AlreadyExists):
        nc.hosts.register(HOST, driver="libvirt", uri=SYSTEM_URI)
    assert [h.name for h in nc.hosts.list()] == [HOST]
    # The same node with the right password is a host: it was the credentials.
    nc.hosts.register("locked", driver="libvirt", uri=f"test://{node}",
                      config={"username": "alice", "password": "s3cret"})
    nc.hosts.delete("locked")


def test_bad_vms_are_reported_and_leave_nothing_behind(plane: Plane) -> None:
    nc = plane.nc
    volumes = pool_volumes()

    missing = nc.vms.create("no-image", cpus=1, memory_mib=128,
                            image=str(plane.env.template) + ".missing", host=HOST)
    plane.wait_error(missing, r"image '.*\.missing' not found on host kvm-1")
    assert missing.state == VMState.ERROR  # typed, retried with backoff, never half-defined
    assert missing.record.last_error_code == "not_found"
    with virt() as conn:
        assert domain_or_none(conn, missing.id) is None
    assert pool_volumes() == volumes
    with pytest.raises(AlreadyExists):
        nc.vms.create("no-image", cpus=1, memory_mib=128, host=HOST)

    # Someone else's domain takes the guest's name: NovaCron neither adopts nor removes it.
    foreign = Domain(name=domain_name(missing.id), uuid=str(uuid.uuid4()), memory_mib=64,
                     vcpus=1, domain_type="qemu")
    with virt() as conn:
        conn.defineXML(foreign.to_xml())
        try:
            plane.wait_error(missing, "is not NovaCron's guest")
            missing.delete().wait_for(VMState.DELETED, timeout=60)
            dom = conn.lookupByName(foreign.name)
            assert (dom.UUIDString(), dom.isActive()) == (foreign.uuid, False)
            assert Domain.from_xml(dom.XMLDesc(0)).metadata is None
        finally:
            conn.lookupByName(foreign.name).undefine()

    # A disk the host's pool is big enough for, but not with what is already in it.
    with virt() as conn:
        free = conn.storagePoolLookupByName(POOL[0]).info()[3]
    size = nc.hosts.get(HOST).capacity.disk_gib
    assert free < size * GIB, "the pool's filesystem must hold something besides free space"
    full = nc.vms.create("too-big", cpus=1, memory_mib=128, disk_gib=size, host=HOST)
    plane.wait_error(full, r"storage pool 'novacron-it-api' has .* GiB free")
    with virt() as conn:
        assert domain_or_none(conn, full.id) is None
    full.delete().wait_for(VMState.DELETED, timeout=60)
    with pytest.raises(NoCapacity, match="0/1 hosts fit"):
        nc.vms.create("bigger", cpus=1, memory_mib=128, disk_gib=size + 1, host=HOST)

    assert pool_volumes() == volumes
    assert nc.hosts.get(HOST).allocated == Resources.zero()

"""Live migration of real QEMU guests between two libvirt daemons, through NovaCron's migration
API (``nc.migrations.start``), not the driver alone.

Each test runs a control plane on the session's Ray and registers the session's two daemons
(``libvirt_env``: the system libvirtd and the peer on 127.0.0.2) as hosts ``kvm-1`` and
``kvm-2``, their guests booting the tiny busybox guest under TCG. With ``shared`` storage (the
default) both daemons see the pool's directory (under ``WORK``), so only memory moves; with
``local`` storage the pool is under /var/lib/libvirt, which the peer daemon has as a private
tmpfs, so libvirt copies the disk too. Both daemons append a guest's serial console to the same
file: its heartbeat counter shows the guest ran on without a gap or a reboot. Cancels, restarts
and force-completes need a migration that lasts: a bandwidth cap of a few MiB/s makes the
guest's ~90 MiB of memory take tens of seconds.

Skips with the exact reason when this machine cannot run it (not root, packages missing: run
``bash scripts/install-system-deps.sh``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.runtime import stop_control_plane
from novacron.client import MigrationHandle, NovaCron, VMHandle
from novacron.config import Settings
from novacron.errors import NotSupported
from novacron.model import MigrationProgress
from novacron.states import MigrationPhase, VMState
from tests.integration.conftest import Running, start
from tests.integration.libvirt_env import (
    PEER_URI,
    SYSTEM_URI,
    WORK,
    LibvirtEnv,
    skip_unless_possible,
)
from tests.libvirt_guest import GUEST_UP, heartbeats, wait_heartbeats, wait_until

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

SOURCE, TARGET = "kvm-1", "kvm-2"
POOLS = {
    "shared": ("novacron-it-migrate", str(WORK / "migrate")),
    "local": ("novacron-it-migrate-local", "/var/lib/libvirt/images/novacron-it-migrate"),
}

skip_unless_possible()

import libvirt  # noqa: E402

from novacron.drivers.libvirt import domain_name  # noqa: E402
from novacron.drivers.libvirt_xml import Domain  # noqa: E402


@contextlib.contextmanager
def virt(uri: str) -> Iterator[Any]:
    """A connection of the test's own to a daemon (behind NovaCron's back)."""
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def domain_state(uri: str, vm_id: str) -> int | None:
    """The domain's libvirt state on a daemon, or None when it has no such domain."""
    with virt(uri) as conn:
        try:
            return int(conn.lookupByName(domain_name(vm_id)).state()[0])
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            return None


def sweep(pool: tuple[str, str]) -> None:
    """Remove every domain with a disk in ``pool`` and every volume in it, on both daemons
    (what a test, or an interrupted earlier run, left behind)."""
    for uri in (SYSTEM_URI, PEER_URI):
        with virt(uri) as conn:
            for dom in conn.listAllDomains(0):
                paths = [s.get("file", "") for s in ET.fromstring(dom.XMLDesc(0)).findall(
                    "devices/disk/source")]
                if any(p.startswith(pool[1] + "/") for p in paths):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            try:
                found = conn.storagePoolLookupByName(pool[0])
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise
                continue
            if found.isActive():
                found.refresh(0)
                for vol in found.listAllVolumes(0):
                    vol.delete(0)


def consecutive(counters: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(counters))


@dataclass
class Plane:
    """A control plane with both daemons registered as hosts, guests' disks in ``pool``."""

    running: Running
    env: LibvirtEnv
    pool: tuple[str, str]

    @property
    def nc(self) -> NovaCron:
        return self.running.nc

    def boot(self, name: str) -> VMHandle:
        """A VM on the source host, running, its guest beating."""
        vm = self.nc.vms.create(name, cpus=1, memory_mib=128, disk_gib=1,
                                image=str(self.env.template), host=SOURCE)
        vm.wait_for(VMState.RUNNING, timeout=60)
        wait_heartbeats(self.env.console_log(vm.id), 3)
        return vm

    def watch(self, mig: MigrationHandle, until: set[MigrationPhase],
              timeout_s: float = 120.0) -> list[MigrationProgress]:
        """Every progress seen until the migration reaches one of ``until``."""
        seen: list[MigrationProgress] = []
        deadline = time.monotonic() + timeout_s
        while mig.refresh().phase not in until:
            assert time.monotonic() < deadline, f"{mig} still {mig.phase.value}"
            seen.append(mig.record.progress)
            time.sleep(0.05)
        seen.append(mig.record.progress)
        return seen


@pytest.fixture
def plane(request: pytest.FixtureRequest, ray_session: None, state_dir: Path,
          libvirt_env: LibvirtEnv) -> Iterator[Plane]:
    """On shared storage, or as the test's indirect parameter says."""
    pool = POOLS[getattr(request, "param", "shared")]
    sweep(pool)
    settings = Settings(state_dir=state_dir, namespace=f"nc-lm-{uuid.uuid4().hex[:8]}",
                        sim_hosts=0, heartbeat_interval_s=5, heartbeat_misses=5,
                        reconcile_interval_s=0.25, converge_timeout_s=30, stop_timeout_s=20)
    running = start(settings, hosts=0)
    try:
        for name, uri in ((SOURCE, SYSTEM_URI), (TARGET, PEER_URI)):
            running.nc.hosts.register(name, driver="libvirt", uri=uri,
                                      config=libvirt_env.host_config(pool))
        yield Plane(running, libvirt_env, pool)
    finally:
        stop_control_plane(settings.namespace, stop_guests=True)
        sweep(pool)


DONE = {MigrationPhase.COMPLETED, MigrationPhase.ROLLED_BACK, MigrationPhase.FAILED}


def assert_on_target_only(plane: Plane, vm: VMHandle, before: int, *,
                          intact: bool = True) -> None:
    """The VM's record, its domain and its guest are on the target, and only there; with
    ``intact``, the guest ran on from where it was (no gap, no reboot)."""
    record = vm.wait_for(VMState.RUNNING, timeout=30).record
    assert record.host == TARGET
    assert record.epoch == 2  # placed (1), then moved (2)
    assert domain_state(PEER_URI, vm.id) == libvirt.VIR_DOMAIN_RUNNING
    assert domain_state(SYSTEM_URI, vm.id) is None  # undefined on the source
    with virt(PEER_URI) as conn:
        dom = conn.lookupByName(domain_name(vm.id))
        assert dom.UUIDString() == record.guest_id
        meta = Domain.from_xml(dom.XMLDesc(0)).metadata
        assert meta is not None
        assert meta.epoch == 2  # the guest carries the new epoch: the source side is fenced
    log = plane.env.console_log(vm.id)
    counters = wait_heartbeats(log, 5)  # it runs on the target...
    if intact:
        assert counters[-1] > before + 3, log.read_bytes()[-600:]
        assert consecutive(counters)  # ...on from where it was: no gap, no reboot
        assert log.read_bytes().count(GUEST_UP) == 1
    assert plane.nc.hosts.get(SOURCE).allocated.memory_mib == 0
    assert plane.nc.hosts.get(TARGET).allocated.memory_mib == 128


@pytest.mark.parametrize("plane", ["shared", "local"], indirect=True)
def test_live_migration_of_a_real_guest(plane: Plane) -> None:
    nc = plane.nc
    vm = plane.boot("mover")
    with pytest.raises(NotSupported, match=r"warm migration .* not possible; use live"):
        nc.migrations.start(vm.id, to=TARGET, mode="warm")
    with pytest.raises(NotSupported, match="compress and parallel cannot be combined"):
        nc.migrations.start(vm.id, to=TARGET, policy={"compress": True, "parallel": 2})
    assert vm.refresh().state == VMState.RUNNING  # refused before anything happened
    before = heartbeats(plane.env.console_log(vm.id))[-1]

    local = plane.pool == POOLS["local"]
    policy = ({"max_downtime_ms": 300, "xbzrle": True, "auto_converge": True} if local
              else {"max_downtime_ms": 300, "parallel": 2, "bandwidth_mib_s": 1024})
    mig = nc.migrations.start(vm.id, to=TARGET, mode="live", policy=policy)
    seen = plane.watch(mig, DONE)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    percents = [p.percent for p in seen]
    assert percents == sorted(percents)
    assert mig.record.progress.percent == 100
    out = mig.record.outcome
    assert out["shared_storage"] is (not local)
    assert 0 < out["downtime_ms"] < 5000  # QEMU's own measure of the pause
    assert out["bytes_sent"] > 0
    assert out["epoch"] == 2
    assert out["disks_copied"] == (1 if local else 0)
    disk = f"{plane.pool[1]}/{domain_name(vm.id)}-disk0.qcow2"
    with virt(PEER_URI) as conn:  # the target's disk: the same file, or its own copy
        assert conn.storageVolLookupByPath(disk).info()[1] == 2**30
    assert Path(disk).exists() is (not local)  # the source's copy was deleted
    print(f"\nlibvirt live migration ({'local disks copied' if local else 'shared storage'}):"
          f" downtime {out['downtime_ms']} ms, libvirt job {out['job_ms']} ms, NovaCron total"
          f" {out['total_s']} s, {out['bytes_sent'] / 2**20:.0f} MiB sent"
          f" ({out.get('disk_bytes_sent', 0) / 2**20:.0f} MiB of disk seen)")
    assert_on_target_only(plane, vm, before)

    # The VM is NovaCron's on the target: its agent there drives it.
    vm.stop(force=True).wait_for(VMState.STOPPED, timeout=60)
    assert domain_state(PEER_URI, vm.id) == libvirt.VIR_DOMAIN_SHUTOFF


def test_cancel_keeps_the_guest_on_its_source_and_force_complete_moves_it(
        plane: Plane) -> None:
    nc = plane.nc
    vm = plane.boot("stayer")
    guest_id = vm.record.guest_id
    mig = nc.migrations.start(vm.id, to=TARGET, policy={"bandwidth_mib_s": 1})  # ~90 s
    wait_until(lambda: mig.progress().bytes_sent > 2 * 2**20, 60, "the memory to move")
    progress = mig.record.progress
    assert mig.phase == MigrationPhase.PRECOPY
    assert 0 < progress.percent < 50
    assert progress.rate > 0
    assert progress.bytes_remaining > 0
    assert progress.iteration == 1
    assert progress.eta_s is not None
    assert progress.eta_s > 10
    assert domain_state(PEER_URI, vm.id) is not None  # the incoming guest, paused

    mig.cancel()
    assert mig.wait(timeout=60).phase == MigrationPhase.ROLLED_BACK, mig.record.reason
    assert mig.record.reason == "cancelled"
    record = vm.wait_for(VMState.RUNNING, timeout=30).record
    assert (record.host, record.guest_id, record.epoch) == (SOURCE, guest_id, 1)
    assert domain_state(SYSTEM_URI, vm.id) == libvirt.VIR_DOMAIN_RUNNING
    assert domain_state(PEER_URI, vm.id) is None  # nothing left on the target
    log = plane.env.console_log(vm.id)
    assert consecutive(wait_heartbeats(log, 5))  # it ran on throughout
    assert log.read_bytes().count(GUEST_UP) == 1
    assert nc.hosts.get(TARGET).allocated.memory_mib == 0
    assert Path(plane.pool[1], f"{domain_name(vm.id)}-disk0.qcow2").exists()  # its disk

    # Again, forced to complete without post-copy: the guest is paused so that the rest goes
    # at once (still within the bandwidth cap), and runs again on the target.
    before = heartbeats(log)[-1]
    mig = nc.migrations.start(vm.id, to=TARGET, policy={"bandwidth_mib_s": 2})
    wait_until(lambda: mig.progress().bytes_sent > 2**20, 60, "the memory to move")
    mig.force_complete()
    assert mig.wait(timeout=120).phase == MigrationPhase.COMPLETED, mig.record.reason
    out = mig.record.outcome
    assert out["paused_to_finish"] is True
    print(f"\npaused to finish: downtime {out['downtime_ms']} ms, total {out['total_s']} s")
    assert_on_target_only(plane, vm, before)


def pid_or_none(actor: Any) -> int | None:
    try:
        pid: int = ray.get(actor.pid.remote(), timeout=5)
    except Exception:
        return None
    return pid


def test_a_killed_migration_actor_finds_out_what_libvirt_did(plane: Plane) -> None:
    nc = plane.nc
    vm = plane.boot("phoenix")
    before = heartbeats(plane.env.console_log(vm.id))[-1]
    # 16 MiB/s: slow enough to kill the actor mid-job, fast enough that QEMU 7.2's TCG does not
    # corrupt the guest's memory (it did in about one of four runs at 4 MiB/s; see below)
    mig = nc.migrations.start(vm.id, to=TARGET, policy={"bandwidth_mib_s": 16})
    wait_until(lambda: mig.progress().bytes_sent > 0, 60, "the migration to move data")
    actor = plane.running.actor(f"mig:{mig.id}")
    first = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    wait_until(lambda: pid_or_none(actor) not in (None, first), 60, "the actor's restart")
    assert mig.wait(timeout=120).phase == MigrationPhase.COMPLETED, mig.record.reason
    out = mig.record.outcome
    # libvirtd carries on without the dead client: the new run watched its job to the end
    # (had the job ended unfinished it would have migrated again; had it finished, found the
    # guest on the target and completed)
    found = [k for k in ("reattached", "migrated_again", "found_on_target") if out.get(k)]
    assert len(found) == 1, out
    print(f"\nrestarted run: {found[0]}; downtime {out.get('downtime_ms')} ms")
    # Not checked here: that the guest's memory came through intact. QEMU 7.2's TCG sometimes
    # corrupts a guest's memory in long, throttled migrations of many passes (a kernel oops on
    # the target in about one of four at 4 MiB/s, also calling the driver without NovaCron;
    # none in six at 16 MiB/s; KVM is not available here). The other tests check it; this one
    # checks that the guest runs on the target only.
    assert_on_target_only(plane, vm, before, intact=False)


def test_force_complete_switches_to_post_copy(plane: Plane) -> None:
    nc = plane.nc
    vm = plane.boot("hurry")
    before = heartbeats(plane.env.console_log(vm.id))[-1]
    mig = nc.migrations.start(vm.id, to=TARGET,
                              policy={"bandwidth_mib_s": 2, "post_copy": True})
    wait_until(lambda: mig.progress().bytes_sent > 2**20, 60, "the memory to move")
    mig.force_complete()
    assert mig.wait(timeout=120).phase == MigrationPhase.COMPLETED, mig.record.reason
    out = mig.record.outcome
    assert out["post_copy"] is True
    print(f"\npost-copy: libvirt job {out.get('job_ms')} ms, NovaCron total {out['total_s']} s")
    assert_on_target_only(plane, vm, before)

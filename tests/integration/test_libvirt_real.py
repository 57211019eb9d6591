"""The libvirt driver against real libvirt daemons running real QEMU (TCG) guests.

The machine (the system libvirtd, a second libvirtd on 127.0.0.2 as a migration peer, the tiny
busybox guest whose serial console prints a heartbeat counter) is the session's ``libvirt_env``
(:mod:`tests.integration.libvirt_env`); both daemons append guests' consoles to the same log
file, so a test can see that a guest is alive, paused, rebooted, reverted, or migrated without a
gap.

Skips with the exact reason when this machine cannot run it (not root, packages missing: run
``bash scripts/install-system-deps.sh``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from novacron.drivers.base import GuestConfig, GuestEvent
from novacron.errors import AlreadyExists, DriverError, NoCapacity, NotFound, NovaCronError
from novacron.states import VMState
from tests.integration.libvirt_env import (
    PEER_URI,
    SYSTEM_URI,
    WORK,
    LibvirtEnv,
    daemons,
    skip_unless_possible,
)
from tests.libvirt_guest import (
    GUEST_POWEROFF,
    GUEST_UP,
    heartbeats,
    wait_heartbeats,
    wait_until,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

SHARED_POOL = ("novacron-it-shared", str(WORK / "shared"))
# Under /var/lib/libvirt: the peer daemon sees its own private tmpfs there, so this pool is
# local storage on each daemon (what copy-storage migration is for).
LOCAL_POOL = ("novacron-it-local", "/var/lib/libvirt/images/novacron-it")

skip_unless_possible()

import libvirt  # noqa: E402

from novacron.drivers.libvirt import LibvirtDriver, domain_name  # noqa: E402
from novacron.drivers.libvirt_xml import Domain  # noqa: E402


def make_driver(env: LibvirtEnv, name: str, uri: str, pool: tuple[str, str]) -> LibvirtDriver:
    driver = LibvirtDriver(name, uri, env.host_config(pool), WORK)
    driver.connect()
    return driver


@pytest.fixture(scope="session")
def src(libvirt_env: LibvirtEnv) -> Iterator[LibvirtDriver]:
    driver = make_driver(libvirt_env, "src", SYSTEM_URI, SHARED_POOL)
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def dst(libvirt_env: LibvirtEnv) -> Iterator[LibvirtDriver]:
    driver = make_driver(libvirt_env, "dst", PEER_URI, SHARED_POOL)
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def src_local(libvirt_env: LibvirtEnv) -> Iterator[LibvirtDriver]:
    driver = make_driver(libvirt_env, "src-local", SYSTEM_URI, LOCAL_POOL)
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def dst_local(libvirt_env: LibvirtEnv) -> Iterator[LibvirtDriver]:
    driver = make_driver(libvirt_env, "dst-local", PEER_URI, LOCAL_POOL)
    yield driver
    driver.close()


class Guests:
    """Makes VM ids for a test and removes their guests from every daemon afterwards."""

    def __init__(self, env: LibvirtEnv, drivers: list[LibvirtDriver]) -> None:
        self.env = env
        self.drivers = drivers
        self.ids: list[str] = []

    def new(self) -> str:
        vm_id = f"it-{uuid.uuid4().hex[:10]}"
        self.ids.append(vm_id)
        return vm_id

    def config(self, vm_id: str, **kwargs: Any) -> GuestConfig:
        return GuestConfig(**{"vm_id": vm_id, "name": "it", "cpus": 1, "memory_mib": 128,
                              "disk_gib": 1, "image": str(self.env.template), "epoch": 1,
                              **kwargs})

    def log(self, vm_id: str) -> Path:
        return self.env.console_log(vm_id)

    def boot(self, driver: LibvirtDriver, vm_id: str) -> None:
        """Define and start the guest; wait until its heartbeat shows."""
        driver.define(self.config(vm_id))
        assert driver.start(vm_id, epoch=1).state == VMState.RUNNING
        wait_heartbeats(self.log(vm_id), 3)

    def cleanup(self) -> None:
        for vm_id in self.ids:
            for driver in self.drivers:
                with contextlib.suppress(NotFound):
                    driver.stop(vm_id, force=True)
                driver.undefine(vm_id, delete_storage=True)


@pytest.fixture(scope="session")
def drivers(src: LibvirtDriver, dst: LibvirtDriver, src_local: LibvirtDriver,
            dst_local: LibvirtDriver) -> list[LibvirtDriver]:
    """Every driver, after sweeping test volumes an interrupted earlier run left behind."""
    every = [src, dst, src_local, dst_local]
    defined = {g.vm_id for driver in every for g in driver.list()}
    for driver in every:
        driver.ensure_pool()
        for volume in driver.list_volumes():
            vm_id = volume.name.removeprefix("novacron-").partition("-disk")[0]
            if volume.name.startswith("novacron-it-") and vm_id not in defined:
                driver.delete_volume(volume.name)
    return every


@pytest.fixture
def guests(libvirt_env: LibvirtEnv, drivers: list[LibvirtDriver]) -> Iterator[Guests]:
    made = Guests(libvirt_env, drivers)
    yield made
    made.cleanup()


@dataclass
class Recorder:
    """Collects a driver's events for one guest."""

    vm_id: str
    events: list[GuestEvent] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, event: GuestEvent) -> None:
        if event.vm_id == self.vm_id:
            with self.changed:
                self.events.append(event)
                self.changed.notify_all()

    def wait(self, state: VMState, event: str | None = None,
             timeout_s: float = 30.0) -> GuestEvent:
        def match() -> GuestEvent | None:
            return next((e for e in self.events
                         if e.state == state and event in (None, e.event)), None)

        with self.changed:
            if not self.changed.wait_for(lambda: match() is not None, timeout_s):
                raise AssertionError(f"no {event or 'any'} event with state {state} in"
                                     f" {[(e.event, e.state.value) for e in self.events]}")
            found = match()
            assert found is not None
            self.events.clear()
            return found


def subscribed(driver: LibvirtDriver, vm_id: str) -> tuple[Recorder, Callable[[], None]]:
    recorder = Recorder(vm_id)
    return recorder, driver.subscribe(recorder)


def consecutive(counters: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(counters))


def test_lifecycle_of_a_real_guest(guests: Guests, src: LibvirtDriver,
                                   libvirt_env: LibvirtEnv) -> None:
    vm = guests.new()
    log = guests.log(vm)
    events, unsubscribe = subscribed(src, vm)

    defined = src.define(guests.config(vm))
    assert (defined.state, defined.epoch) == (VMState.STOPPED, 1)
    [disk] = src.guest_volumes(vm)
    assert disk.backing is not None
    assert disk.backing.path == str(libvirt_env.template)  # a qcow2 overlay on the template

    assert src.start(vm, epoch=1).state == VMState.RUNNING
    events.wait(VMState.RUNNING, "started")
    wait_heartbeats(log, 3)
    assert log.read_bytes().count(GUEST_UP) == 1

    first = src.stats(vm)
    wait_heartbeats(log, 5)
    later = src.stats(vm)
    assert later.cpu_time_s > first.cpu_time_s
    assert later.disk_written_bytes > first.disk_written_bytes
    assert later.memory_touched_bytes > 0

    assert src.pause(vm).state == VMState.PAUSED
    events.wait(VMState.PAUSED, "suspended")
    frozen = len(heartbeats(log))
    time.sleep(1.0)
    assert len(heartbeats(log)) <= frozen + 1  # at most one line was in flight
    assert src.resume(vm).state == VMState.RUNNING
    events.wait(VMState.RUNNING, "resumed")
    assert consecutive(wait_heartbeats(log, 2))  # it went on where it stopped

    assert src.resize_disk(vm, 2).capacity_bytes == 2 * 2**30  # live, through QEMU

    assert src.reboot(vm).state == VMState.RUNNING  # ACPI: the guest powers off, QEMU resets
    wait_until(lambda: log.read_bytes().count(GUEST_UP) == 2, 60, "the guest to boot again")
    after_reboot = wait_heartbeats(log, 2)
    assert after_reboot[-1] < 20  # the counter restarted

    stopped = src.stop(vm, timeout_s=60)
    assert (stopped.state, stopped.reason) == (VMState.STOPPED, "shutoff:shutdown")
    assert GUEST_POWEROFF in log.read_bytes()  # the guest's own ACPI handler, not a destroy
    events.wait(VMState.STOPPED, "stopped")

    src.undefine(vm, delete_storage=True)
    events.wait(VMState.DELETED, "undefined")
    assert not Path(disk.path).exists()
    assert libvirt_env.template.exists()
    unsubscribe()


def test_snapshot_create_list_revert_delete(guests: Guests, src: LibvirtDriver) -> None:
    vm = guests.new()
    log = guests.log(vm)
    guests.boot(src, vm)
    at_snapshot = heartbeats(log)[-1]
    snap = src.snapshot_create(vm, "before", description="heartbeat near " + str(at_snapshot))
    assert (snap.name, snap.state) == ("before", "running")
    moved_on = wait_heartbeats(log, 8)[-1]

    seen = len(heartbeats(log))
    assert src.snapshot_revert(vm, "before").state == VMState.RUNNING
    resumed = wait_heartbeats(log, 3)[seen:]
    assert resumed[0] < moved_on  # the guest's memory went back to the snapshot
    assert resumed[0] >= at_snapshot
    assert consecutive(resumed)

    assert [s.name for s in src.snapshot_list(vm)] == ["before"]
    src.snapshot_delete(vm, "before")
    src.snapshot_delete(vm, "before")
    assert src.snapshot_list(vm) == []


def watch_job(driver: LibvirtDriver, vm_id: str) -> tuple[list[float], Callable[[], None]]:
    """Sample the guest's job progress every 50 ms until the returned stop function runs."""
    progress: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            try:
                stats = driver.job_stats(vm_id)
            except NotFound:
                return
            if stats.active:
                progress.append(stats.progress)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return progress, stop


def assert_migrated(guests: Guests, vm: str, source: LibvirtDriver, dest: LibvirtDriver,
                    before: int) -> None:
    log = guests.log(vm)
    with pytest.raises(NotFound):
        source.get(vm)
    assert vm not in {g.vm_id for g in source.list()}
    assert dest.get(vm).state == VMState.RUNNING
    counters = wait_heartbeats(log, 5)
    assert counters[-1] > before + 3  # the guest runs on the destination
    assert consecutive(counters)  # no gap and no restart
    assert log.read_bytes().count(GUEST_UP) == 1
    done = dest.job_stats(vm, completed=True)
    assert done.type == "completed"
    assert done.downtime_ms is not None
    print(f"\nmigrated {done.data_processed / 2**20:.0f} MiB in {done.elapsed_ms} ms of job"
          f" time, {done.downtime_ms} ms paused")


def abort_a_slow_migration(src: LibvirtDriver, dst: LibvirtDriver, vm: str) -> None:
    """Start a migration throttled to 1 MiB/s, abort it, and check the guest stayed home."""
    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            src.migrate_live(vm, PEER_URI, allow_unsafe=True, bandwidth_mib_s=1)
        except NovaCronError as err:
            failure.append(err)

    thread = threading.Thread(target=migrate)
    thread.start()
    wait_until(lambda: src.job_stats(vm).active, 30, "the migration job to start")
    assert src.get(vm).state == VMState.MIGRATING
    assert src.abort_job(vm) is True
    thread.join(30)
    assert isinstance(failure[0], DriverError)
    assert failure[0].details["libvirt_code"] == "VIR_ERR_OPERATION_ABORTED"
    assert src.abort_job(vm) is False  # nothing left to abort
    assert src.get(vm).state == VMState.RUNNING
    with pytest.raises(NotFound):
        dst.get(vm)


def test_live_migration_on_shared_storage(guests: Guests, src: LibvirtDriver,
                                          dst: LibvirtDriver) -> None:
    vm = guests.new()
    guests.boot(src, vm)
    [disk] = src.guest_volumes(vm)
    abort_a_slow_migration(src, dst, vm)
    src_events, src_unsubscribe = subscribed(src, vm)
    dst_events, dst_unsubscribe = subscribed(dst, vm)
    progress, stop_watching = watch_job(src, vm)
    before = heartbeats(guests.log(vm))[-1]

    # Both daemons see WORK/shared, but libvirt cannot tell that a local directory is shared.
    moved = src.migrate_live(vm, PEER_URI, allow_unsafe=True, parallel=2,
                             bandwidth_mib_s=1024, max_downtime_ms=300, epoch=2)
    stop_watching()
    assert (moved.state, moved.epoch) == (VMState.RUNNING, 2)
    assert_migrated(guests, vm, src, dst, before)
    assert dst.get(vm).epoch == 2
    assert all(0.0 <= p <= 1.0 for p in progress)
    src_events.wait(VMState.DELETED)
    dst_events.wait(VMState.RUNNING, "resumed")
    src_unsubscribe()
    dst_unsubscribe()

    assert dst.guest_volumes(vm)[0].path == disk.path  # the same file, now the peer's
    dst.stop(vm, force=True)
    dst.undefine(vm, delete_storage=True)
    assert not Path(disk.path).exists()


def test_live_migration_copying_storage(guests: Guests, src_local: LibvirtDriver,
                                        dst_local: LibvirtDriver) -> None:
    vm = guests.new()
    guests.boot(src_local, vm)
    [disk] = src_local.guest_volumes(vm)
    before = heartbeats(guests.log(vm))[-1]

    moved = src_local.migrate_live(vm, PEER_URI, copy_storage=True, compressed=True,
                                   max_downtime_ms=300)
    assert moved.state == VMState.RUNNING
    assert_migrated(guests, vm, src_local, dst_local, before)
    [copied] = dst_local.guest_volumes(vm)
    assert copied.path == disk.path  # same path, on the peer's own storage
    assert copied.capacity_bytes == disk.capacity_bytes
    assert not Path(disk.path).exists()  # the source copy was deleted
    assert disk.name not in {v.name for v in src_local.list_volumes()}


def test_cold_migration_moves_the_disk_through_streams(guests: Guests, src_local: LibvirtDriver,
                                                       dst_local: LibvirtDriver) -> None:
    vm = guests.new()
    src_local.define(guests.config(vm))
    [disk] = src_local.guest_volumes(vm)

    image = io.BytesIO()
    assert src_local.download_volume(disk.name, image) == Path(disk.path).stat().st_size
    window = io.BytesIO()
    assert src_local.download_volume(disk.name, window, offset=512, length=4096) == 4096
    assert window.getvalue() == image.getvalue()[512:4608]

    dst_local.ensure_pool()
    dst_local.create_volume(disk.name, disk.capacity_bytes)
    assert dst_local.upload_volume(disk.name, io.BytesIO(image.getvalue())) == len(
        image.getvalue())
    copy = io.BytesIO()
    dst_local.download_volume(disk.name, copy)
    assert copy.getvalue() == image.getvalue()
    dst_local.pool_info()  # refresh: the uploaded header names the template as backing file
    assert dst_local.volume_info(disk.name).backing is not None

    moved = src_local.migrate_offline(vm, PEER_URI, epoch=2)
    assert (moved.state, moved.epoch) == (VMState.STOPPED, 2)
    with pytest.raises(NotFound):
        src_local.get(vm)
    src_local.delete_volume(disk.name)  # the migration engine's job once the copy is verified
    assert dst_local.start(vm, epoch=2).state == VMState.RUNNING
    wait_heartbeats(guests.log(vm), 3)


def test_events_and_guests_survive_a_libvirtd_restart(guests: Guests, src: LibvirtDriver,
                                                      libvirt_env: LibvirtEnv) -> None:
    libvirt_env.skip_unless_restartable()
    vm = guests.new()
    log = guests.log(vm)
    guests.boot(src, vm)
    events, unsubscribe = subscribed(src, vm)

    daemons("restart", "system")
    resync = events.wait(VMState.RUNNING, "resync", timeout_s=60)
    assert resync.epoch == 1
    assert consecutive(wait_heartbeats(log, 3))  # the guest never noticed
    src.pause(vm)
    events.wait(VMState.PAUSED, "suspended")  # events flow on the new connection
    src.resume(vm)
    events.wait(VMState.RUNNING, "resumed")
    unsubscribe()


def test_bad_input_is_typed_and_leaves_nothing(guests: Guests, src: LibvirtDriver,
                                               libvirt_env: LibvirtEnv) -> None:
    pool_before = {v.name for v in src.list_volumes()}
    missing_image = guests.new()
    with pytest.raises(NotFound, match="image"):
        src.define(guests.config(missing_image, image=str(libvirt_env.template) + ".missing"))
    missing_kernel = guests.new()
    with pytest.raises(NotFound, match="boot file"):
        src.define(guests.config(missing_kernel, labels={"libvirt.kernel": "/nonexistent"}))
    too_big = guests.new()
    with pytest.raises(NoCapacity):
        src.define(guests.config(too_big, disk_gib=2**30))
    for vm in (missing_image, missing_kernel, too_big):
        with pytest.raises(NotFound):
            src.get(vm)
    assert {v.name for v in src.list_volumes()} == pool_before

    clash = guests.new()
    conn = libvirt.open(SYSTEM_URI)
    foreign = Domain(name=domain_name(clash), uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                     domain_type="qemu")
    conn.defineXML(foreign.to_xml())
    try:
        with pytest.raises(AlreadyExists, match="not NovaCron's"):
            src.define(guests.config(clash))
        assert conn.lookupByName(domain_name(clash)).UUIDString() == foreign.uuid
    finally:
        conn.lookupByName(domain_name(clash)).undefine()
        conn.close()
    assert {v.name for v in src.list_volumes()} == pool_before

"""The simulated hypervisor: real guest processes, real pausing, real dirty pages (no Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import novacron
from novacron.drivers import sim
from novacron.drivers.base import Capability, GuestConfig, driver_class
from novacron.drivers.sim import SimDriver, dirty_pages, read_generations
from novacron.drivers.simguest import DISK_BLOCK, PAGE_SIZE, Phase
from novacron.errors import (
    Conflict,
    GuestError,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    NovaCronError,
    StaleEpoch,
)
from novacron.states import VMState

REPO_ROOT = Path(novacron.__file__).resolve().parent.parent


def make_driver(tmp_path: Path, host: str = "sim-test") -> SimDriver:
    """A driver whose state and memory live under ``tmp_path`` (nothing in /dev/shm)."""
    driver = SimDriver(host, None, {"memory_dir": str(tmp_path / "shm"), "boot_timeout_s": 20},
                       tmp_path / "state")
    driver.connect()
    return driver


def kill_guests(state_dir: Path) -> None:
    """SIGKILL every guest process whose command line names a directory under ``state_dir``."""
    root = os.fsencode(state_dir.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"novacron.drivers.simguest" in argv and any(
                    a.startswith(root) for a in argv):
                os.kill(int(proc.name), signal.SIGKILL)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def guest(vm_id: str, epoch: int = 1, **workload: float) -> GuestConfig:
    return GuestConfig(vm_id=vm_id, name=vm_id, cpus=1, memory_mib=32, disk_gib=1,
                       workload=workload, epoch=epoch)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[SimDriver]:
    d = make_driver(tmp_path)
    yield d
    for info in d.list():
        with contextlib.suppress(NovaCronError):
            d.stop(info.vm_id, force=True)
    kill_guests(tmp_path / "state")


def proc_stat(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def still_alive(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` (clock ticks) still runs."""
    try:
        fields = proc_stat(pid)
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X") and fields[19] == started


def test_registered_under_sim() -> None:
    assert driver_class("sim") is SimDriver


def test_guest_outlives_its_launcher_and_is_reattached(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from novacron.drivers.base import GuestConfig\n"
        "from novacron.drivers.sim import SimDriver\n"
        f"d = SimDriver('sim-test', None, {{'memory_dir': {str(tmp_path / 'shm')!r}}},"
        f" Path({str(tmp_path / 'state')!r}))\n"
        "d.define(GuestConfig(vm_id='vm-orphan', name='o', cpus=1, memory_mib=16, disk_gib=1))\n"
        "sys.stdout.write(d.start('vm-orphan', epoch=1).guest_id or '')\n"
    )
    try:
        launcher = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, timeout=60, check=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        pid = int(launcher.stdout)
        fields = proc_stat(pid)
        assert fields[0] != "Z"
        ppid, pgid, sid, started = int(fields[1]), int(fields[2]), int(fields[3]), fields[19]
        assert ppid != os.getpid()
        assert pgid != os.getpgid(0)
        assert sid != os.getsid(0)
        assert sid != pid  # double-forked: not a session leader, cannot regain a terminal
        fresh = make_driver(tmp_path)
        info = fresh.get("vm-orphan")
        assert info.state == VMState.RUNNING
        assert info.guest_id == str(pid)
        assert fresh.start("vm-orphan", epoch=1).guest_id == str(pid)
        assert fresh.stop("vm-orphan", timeout_s=10).state == VMState.STOPPED
        assert not still_alive(pid, started)
    finally:
        kill_guests(tmp_path / "state")


def test_pidfile_of_another_program_is_not_trusted(driver: SimDriver) -> None:
    driver.define(guest("vm-reuse"))
    driver.memory_paths("vm-reuse").pidfile.write_text(f"{os.getpid()}\n")  # pid "reused"
    info = driver.get("vm-reuse")
    assert info.state == VMState.ERROR
    assert "died" in info.reason
    assert driver.start("vm-reuse", epoch=1).guest_id != str(os.getpid())


def test_pause_really_stops_the_guest(driver: SimDriver) -> None:
    driver.define(guest("vm-pause", dirty_rate_mib_s=4, cpu_busy=0.2))
    pid = int(driver.start("vm-pause", epoch=1).guest_id or 0)
    paths = driver.memory_paths("vm-pause")
    assert driver.pause("vm-pause").state == VMState.PAUSED
    assert proc_stat(pid)[0] == "T"
    before = driver.read_status("vm-pause")
    gens = read_generations(paths.generations)
    cpu = driver.stats("vm-pause").cpu_time_s
    time.sleep(0.2)
    assert driver.read_status("vm-pause").ticks == before.ticks
    assert np.array_equal(read_generations(paths.generations), gens)
    assert driver.stats("vm-pause").cpu_time_s == cpu
    assert driver.pause("vm-pause").state == VMState.PAUSED  # idempotent
    with pytest.raises(InvalidTransition):
        driver.reboot("vm-pause")
    assert driver.resume("vm-pause").state == VMState.RUNNING
    wait_for(lambda: driver.read_status("vm-pause").ticks > before.ticks + 2)
    assert len(dirty_pages(gens, read_generations(paths.generations))) > 0


def test_dirty_rate_moves_generations(driver: SimDriver) -> None:
    rate_mib_s = 2.0
    driver.define(guest("vm-dirty", dirty_rate_mib_s=rate_mib_s))
    driver.start("vm-dirty", epoch=1)
    paths = driver.memory_paths("vm-dirty")
    s0, g0 = driver.read_status("vm-dirty"), read_generations(paths.generations)
    time.sleep(0.5)
    s1, g1 = driver.read_status("vm-dirty"), read_generations(paths.generations)
    writes = s1.pages_dirtied_total - s0.pages_dirtied_total
    expected = rate_mib_s * 256 * (s1.heartbeat_ns - s0.heartbeat_ns) / 1e9
    assert 0.3 * expected <= writes <= 1.5 * expected + 10
    changed = dirty_pages(g0, g1)
    assert 0 < len(changed) <= writes  # locality: some pages are written more than once
    # With the rate at zero the generations settle: all even, nothing dirty.
    driver.set_workload("vm-dirty", dirty_rate_mib_s=0)
    ticks = driver.read_status("vm-dirty").ticks
    wait_for(lambda: driver.read_status("vm-dirty").ticks > ticks + 2)
    g2 = read_generations(paths.generations)
    ticks = driver.read_status("vm-dirty").ticks
    wait_for(lambda: driver.read_status("vm-dirty").ticks > ticks + 5)
    g3 = read_generations(paths.generations)
    assert len(dirty_pages(g2, g3)) == 0
    assert not (g3 & 1).any()
    # Untouched pages are zero; touched ones mix compressible and random content.
    memory = np.fromfile(paths.memory, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    assert not memory[g3 == 0].any()
    assert driver.read_status("vm-dirty").touched_pages == int((g3 != 0).sum())
    ratios = [len(zlib.compress(memory[p].tobytes(), 1)) / PAGE_SIZE
              for p in np.flatnonzero(g3)[:300]]
    assert min(ratios) < 0.25
    assert max(ratios) > 0.9


def test_dirty_pages_adds_the_pending_ones() -> None:
    before = np.array([2, 4, 6, 8, 0, 0], dtype=np.uint32)
    after = np.array([2, 6, 6, 9, 0, 2], dtype=np.uint32)  # 1 and 5 written, 3 being written
    assert dirty_pages(before, after).tolist() == [1, 3, 5]
    pending = np.array([0, 3], dtype=np.intp)
    assert dirty_pages(before, after, pending=pending).tolist() == [0, 1, 3, 5]
    with pytest.raises(InvalidRequest):
        dirty_pages(before, after[:3])


def test_disk_writes_move_disk_generations(driver: SimDriver) -> None:
    driver.define(guest("vm-disk", dirty_rate_mib_s=0, disk_write_mib_s=16))
    driver.start("vm-disk", epoch=1)
    paths = driver.memory_paths("vm-disk")
    head = 1024 * DISK_BLOCK  # its log is written from the start of the disk

    def read_head() -> npt.NDArray[np.uint8]:
        return np.fromfile(paths.disk, dtype=np.uint8, count=head).reshape(-1, DISK_BLOCK)

    g0 = read_generations(paths.disk_generations)  # a snapshot, then the bytes
    blocks = read_head()
    written = driver.read_status("vm-disk").disk_bytes_written
    wait_for(lambda: driver.read_status("vm-disk").disk_bytes_written > written + 2 * 1024**2)
    after = read_head()
    g1 = read_generations(paths.disk_generations)  # the bytes, then a snapshot
    changed = np.flatnonzero((blocks != after).any(axis=1))
    dirty = dirty_pages(g0, g1)
    assert len(changed) > 0
    assert np.isin(changed, dirty).all()  # every block whose bytes changed is dirty
    # With the rate at zero the disk generations settle: all even, nothing dirty.
    driver.set_workload("vm-disk", disk_write_mib_s=0)
    ticks = driver.read_status("vm-disk").ticks
    wait_for(lambda: driver.read_status("vm-disk").ticks > ticks + 2)
    g2 = read_generations(paths.disk_generations)
    ticks = driver.read_status("vm-disk").ticks
    wait_for(lambda: driver.read_status("vm-disk").ticks > ticks + 5)
    assert len(dirty_pages(g2, read_generations(paths.disk_generations))) == 0
    assert not (g2 & 1).any()


def test_set_workload_validates(driver: SimDriver) -> None:
    driver.define(guest("vm-work"))
    with pytest.raises(InvalidTransition):
        driver.set_workload("vm-work", cpu_busy=0.5)  # not running
    driver.start("vm-work", epoch=1)
    with pytest.raises(InvalidRequest):
        driver.set_workload("vm-work", cpu_busy=2)
    with pytest.raises(InvalidRequest):
        driver.set_workload("vm-work", dirty_rate=1)
    status = driver.set_workload("vm-work", throttle_pct=50, cpu_busy=0.1)
    assert (status.throttle_pct, status.cpu_busy) == (50, 0.1)
    with pytest.raises(InvalidRequest):
        driver.define(guest("vm-bad", throttle_pct=10))  # runtime only, not a definition


def test_reboot_keeps_pid_and_bumps_boot_count(driver: SimDriver) -> None:
    driver.define(guest("vm-reboot"))
    pid = driver.start("vm-reboot", epoch=1).guest_id
    assert driver.read_status("vm-reboot").boot_count == 1
    info = driver.reboot("vm-reboot")
    assert (info.state, info.guest_id) == (VMState.RUNNING, pid)
    status = driver.read_status("vm-reboot")
    assert status.boot_count == 2
    assert status.phase == Phase.RUNNING


def test_graceful_stop_force_stop_and_escalation(driver: SimDriver,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    driver.define(guest("vm-stop"))
    log = driver.memory_paths("vm-stop").log
    driver.start("vm-stop", epoch=1)
    driver.pause("vm-stop")  # a paused guest still shuts down cleanly
    assert driver.stop("vm-stop", timeout_s=10).state == VMState.STOPPED
    assert log.read_text().count("stopped cleanly") == 1
    assert not driver.memory_paths("vm-stop").memory.exists()  # RAM is freed

    driver.start("vm-stop", epoch=1)
    assert driver.stop("vm-stop", force=True).state == VMState.STOPPED
    assert log.read_text().count("stopped cleanly") == 1

    # A guest that ignores SIGTERM is killed once the timeout passes.
    real_signal = sim._signal
    monkeypatch.setattr(sim, "_signal", lambda pid, sig: None if sig == signal.SIGTERM
                        else real_signal(pid, sig))
    driver.start("vm-stop", epoch=1)
    started = time.monotonic()
    assert driver.stop("vm-stop", timeout_s=0.3).state == VMState.STOPPED
    assert time.monotonic() - started >= 0.3
    assert log.read_text().count("stopped cleanly") == 1


def test_crashed_guest_is_error_then_restartable(driver: SimDriver) -> None:
    driver.define(guest("vm-crash"))
    pid = int(driver.start("vm-crash", epoch=1).guest_id or 0)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: driver.get("vm-crash").state == VMState.ERROR)
    assert driver.stats("vm-crash").cpu_time_s == 0
    assert driver.start("vm-crash", epoch=1).state == VMState.RUNNING


def test_stale_epoch_is_fenced(driver: SimDriver) -> None:
    driver.define(guest("vm-epoch", epoch=3))
    with pytest.raises(StaleEpoch):
        driver.start("vm-epoch", epoch=2)
    driver.start("vm-epoch", epoch=3)
    assert driver.start("vm-epoch", epoch=5).epoch == 5  # a newer owner takes the running guest
    assert driver.read_status("vm-epoch").epoch == 5
    with pytest.raises(StaleEpoch):
        driver.start("vm-epoch", epoch=4)
    driver.stop("vm-epoch", force=True)
    assert make_driver(driver.state_dir.parent).get("vm-epoch").epoch == 5  # persisted


def test_concurrent_starts_make_one_guest(driver: SimDriver, tmp_path: Path) -> None:
    driver.define(guest("vm-race"))
    other = make_driver(tmp_path)
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda d=d: results.append(d.start("vm-race", 1).guest_id))
               for d in (driver, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert results[0] == results[1] is not None


def test_corrupt_files_give_clear_errors(driver: SimDriver) -> None:
    driver.define(guest("vm-corrupt"))
    driver.define(guest("vm-fine"))
    paths = driver.memory_paths("vm-corrupt")
    paths.config.write_text("{not json")
    with pytest.raises(GuestError, match=r"config\.json is corrupt"):
        driver.get("vm-corrupt")
    with pytest.raises(GuestError, match=str(paths.config)):
        driver.start("vm-corrupt", epoch=1)
    states = {g.vm_id: g.state for g in driver.list()}
    assert states == {"vm-corrupt": VMState.ERROR, "vm-fine": VMState.STOPPED}
    paths.config.write_text(json.dumps({"format": 1, "vm_id": "vm-corrupt"}))
    with pytest.raises(GuestError, match=r"missing|'name'"):
        driver.get("vm-corrupt")
    driver.undefine("vm-corrupt")  # still removable
    fine = driver.memory_paths("vm-fine")
    fine.pidfile.write_text("garbage\n")
    with pytest.raises(GuestError, match=rf"pidfile {fine.pidfile} is corrupt"):
        driver.get("vm-fine")


def test_memory_and_disk_are_sparse(driver: SimDriver) -> None:
    driver.define(guest("vm-sparse", populate_fraction=0.05, dirty_rate_mib_s=0))
    paths = driver.memory_paths("vm-sparse")
    assert paths.disk.stat().st_size == 1024**3
    assert paths.disk.stat().st_blocks * 512 < 1024**2
    driver.start("vm-sparse", epoch=1)
    size = paths.memory.stat().st_size
    assert size == 32 * 1024**2
    touched = driver.stats("vm-sparse").memory_touched_bytes
    assert 0 < touched <= size // 10
    assert paths.memory.stat().st_blocks * 512 <= touched + 1024**2
    assert paths.generations.stat().st_size == size // PAGE_SIZE * 4
    assert paths.disk_generations.stat().st_size == 1024**3 // DISK_BLOCK * 4


def test_undefine_refuses_running_and_keeps_storage_on_request(driver: SimDriver) -> None:
    driver.define(guest("vm-undef"))
    driver.start("vm-undef", epoch=1)
    with pytest.raises(Conflict):
        driver.undefine("vm-undef")
    driver.stop("vm-undef", force=True)
    disk = driver.memory_paths("vm-undef").disk
    driver.undefine("vm-undef", delete_storage=False)
    assert disk.exists()
    with pytest.raises(NotFound):
        driver.get("vm-undef")
    driver.undefine("vm-undef")
    assert not disk.parent.exists()


def test_unknown_and_invalid_guests(driver: SimDriver) -> None:
    for call in (lambda: driver.stop("vm-none"), lambda: driver.pause("vm-none"),
                 lambda: driver.reboot("vm-none"), lambda: driver.memory_paths("vm-none")):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(InvalidRequest):
        driver.define(guest("../escape"))
    driver.define(guest("vm-idle"))
    with pytest.raises(InvalidTransition):
        driver.pause("vm-idle")


def test_host_info_stats_and_capabilities(driver: SimDriver, tmp_path: Path) -> None:
    sized = SimDriver("h2", None, {"capacity": {"cpus": 4, "memory_mib": 8192},
                                   "memory_dir": str(tmp_path / "shm")}, tmp_path / "state")
    info = sized.host_info()
    assert (info.cpus, info.memory_mib, info.disk_gib, info.hypervisor) == (
        4, 8192, 1024, "novacron-sim")
    assert Capability.LIVE_MIGRATION in driver.capabilities
    assert "snapshot" in driver.missing_capabilities()[Capability.SNAPSHOT]
    driver.define(guest("vm-host-a"))
    driver.define(guest("vm-host-b"))
    driver.start("vm-host-a", epoch=1)
    stats = driver.host_stats()
    assert stats.guests == 2
    assert stats.extra["running_guests"] == 1
    assert 0 <= stats.cpu_load <= 1
    assert stats.extra["memory_touched_mib"] > 0


def test_incoming_guest_takes_over_migrated_memory(driver: SimDriver, tmp_path: Path) -> None:
    target = make_driver(tmp_path, host="sim-target")
    driver.define(guest("vm-move"))
    target.define(guest("vm-move"))
    driver.start("vm-move", epoch=1)
    driver.set_workload("vm-move", dirty_rate_mib_s=0, throttle_pct=40)  # auto-converge
    driver.pause("vm-move")
    src, dst = driver.memory_paths("vm-move"), target.prepare_incoming("vm-move")
    waiting = target.get("vm-move")  # started, waiting for the handover
    assert waiting.state == VMState.PAUSED
    assert target.read_status("vm-move").phase == Phase.INCOMING
    gens = read_generations(src.generations)
    source_memory = src.memory.read_bytes()
    with open(src.memory, "rb") as fin, open(dst.memory, "r+b") as fout:
        for page in np.flatnonzero(gens):  # zero pages need no copy
            fin.seek(int(page) * PAGE_SIZE)
            fout.seek(int(page) * PAGE_SIZE)
            fout.write(fin.read(PAGE_SIZE))
    half_done = int(np.flatnonzero(gens)[0])
    gens[half_done] += 1  # as if SIGSTOP caught the guest writing this page: odd
    dst.generations.write_bytes(gens.tobytes())
    dst.control.write_bytes(src.control.read_bytes())
    driver.stop("vm-move", force=True)
    info = target.start_incoming("vm-move", epoch=2)
    assert info.state == VMState.RUNNING
    assert info.guest_id == waiting.guest_id  # the waiting process took over
    status = target.read_status("vm-move")
    assert (status.boot_count, status.epoch, status.pid) == (1, 2, int(info.guest_id or 0))
    assert status.touched_pages == int((gens != 0).sum())  # the source's count, carried on
    assert status.throttle_pct == 0  # a migration's throttle ends with it
    assert target.start_incoming("vm-move", epoch=2).guest_id == info.guest_id  # idempotent
    with pytest.raises(StaleEpoch):
        target.start_incoming("vm-move", epoch=1)  # the handover's epoch was written
    with pytest.raises(InvalidTransition, match="running"):
        target.prepare_incoming("vm-move")  # never over a guest that runs
    assert dst.memory.read_bytes() == source_memory
    adopted = read_generations(dst.generations)
    assert not (adopted & 1).any()  # the half-done write counts as complete
    assert adopted[half_done] == gens[half_done] + 1
    gens[half_done] += 1
    assert np.array_equal(adopted, gens)
    target.stop("vm-move", force=True)
    with pytest.raises(InvalidTransition):
        target.start_incoming("vm-move", epoch=2)  # memory is gone after a stop


def test_a_waiting_incoming_guest_is_replaced_or_stopped(driver: SimDriver) -> None:
    driver.define(guest("vm-wait"))
    driver.prepare_incoming("vm-wait")
    first = driver.get("vm-wait").guest_id
    driver.prepare_incoming("vm-wait")  # a migration that starts again: a fresh one waits
    second = driver.get("vm-wait")
    assert second.state == VMState.PAUSED
    assert second.guest_id != first
    assert not still_alive(int(first or 0), "")
    assert driver.stop("vm-wait").state == VMState.STOPPED  # SIGTERM ends the wait
    assert not driver.memory_paths("vm-wait").incoming.exists()


def test_a_guest_process_its_pidfile_lost_is_killed_too(driver: SimDriver) -> None:
    """A launch whose caller died before the pidfile settled leaves a process nothing tracks:
    preparing again and stopping kill it as well."""
    driver.define(guest("vm-stray"))
    driver.prepare_incoming("vm-stray")
    paths = driver.memory_paths("vm-stray")
    stray = int(driver.get("vm-stray").guest_id or 0)
    started = proc_stat(stray)[19]
    paths.pidfile.unlink()  # as if a second launch had raced it
    driver.prepare_incoming("vm-stray")
    assert not still_alive(stray, started)
    stray = int(driver.get("vm-stray").guest_id or 0)
    started = proc_stat(stray)[19]
    paths.pidfile.unlink()
    driver.stop("vm-stray", force=True)
    assert not still_alive(stray, started)
    driver.undefine("vm-stray")

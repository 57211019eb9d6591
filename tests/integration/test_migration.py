"""Migrations of sim guests between two hosts on the session's Ray: cold and live with byte-equal
memory and disk, cancels, a killed MigrationActor, the limits and the refusals."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from novacron.client import VMHandle
from novacron.drivers.sim import read_generations
from novacron.errors import InvalidRequest, InvalidTransition, NoCapacity, NotFound, NotSupported
from novacron.migration.blocks import file_image_digest
from novacron.migration.pages import memory_digest
from novacron.model import Workload
from novacron.states import MigrationPhase
from tests.integration.conftest import Running
from tests.integration.test_runtime import eventually


def guest_hosts(state_dir: Path, vm_id: str) -> set[str]:
    """The hosts on which a guest process of ``vm_id`` is alive (and not paused)."""
    hosts = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "novacron.drivers.simguest" not in cmd or proc.info["status"] == "zombie":
            continue
        guest_dir = Path(cmd[cmd.index("--dir") + 1])
        if guest_dir.name == vm_id and str(state_dir) in str(guest_dir):
            hosts.add(guest_dir.parent.name)
    return hosts


def make_vm(running: Running, name: str, *, host: str = "h1", dirty: float = 0.0,
            disk_write: float = 0.0, memory_mib: int = 128) -> VMHandle:
    vm = running.nc.vms.create(name, cpus=1, memory_mib=memory_mib, disk_gib=1, host=host,
                               workload=Workload(dirty_rate_mib_s=dirty,
                                                 disk_write_mib_s=disk_write))
    return vm.wait_for("running", timeout=60)


def test_live_migration_moves_memory_and_disk_byte_for_byte(running: Running) -> None:
    nc, state = running.nc, running.settings.state_dir
    vm = make_vm(running, "live", dirty=4.0, disk_write=8.0)
    prediction = nc.migrations.predict("live", to="h2", mode="live")
    assert prediction["converges"]
    assert prediction["bytes"] > 0
    mig = nc.migrations.start("live", to="h2", mode="live",
                              policy={"max_downtime_ms": 300, "bandwidth_mib_s": 200,
                                      "verify": True})
    assert mig.id.startswith("mig-")
    assert nc.hosts.get("h2").allocated.memory_mib == 128  # reserved on the target
    percents = []
    while mig.refresh().phase not in (MigrationPhase.COMPLETED, MigrationPhase.FAILED,
                                      MigrationPhase.ROLLED_BACK):
        percents.append(mig.record.progress.percent)
        time.sleep(0.05)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert percents == sorted(percents)
    out = mig.record.outcome
    assert out["memory_digest"]  # checked equal at switchover by the actor
    assert out["disk_digest"]  # likewise: the disk blocks it wrote were mirrored
    assert out["final_disk_blocks"] < 1024  # only those written during the last pass
    assert out["downtime_ms"] < 5000
    assert mig.record.progress.percent == 100
    record = vm.wait_for("running", timeout=30).record
    assert record.host == "h2"
    assert record.epoch == 2
    assert guest_hosts(state, vm.id) == {"h2"}
    eventually(lambda: _gone(running, f"mig:{mig.id}"), 10, what="migration actor gone")
    assert nc.hosts.get("h1").allocated.memory_mib == 0
    assert nc.hosts.get("h2").allocated.memory_mib == 128
    # the guest really runs on the target: it keeps dirtying the memory it was given
    vm.stop().wait_for("stopped", timeout=30)
    vm.start().wait_for("running", timeout=30)
    assert guest_hosts(state, vm.id) == {"h2"}


def test_cold_and_warm_migrations_with_equal_digests(running: Running) -> None:
    nc, state = running.nc, running.settings.state_dir
    vm = make_vm(running, "cold", disk_write=4.0)
    time.sleep(0.5)
    vm.stop().wait_for("stopped", timeout=30)  # its disk now holds what it wrote
    source_digest = file_image_digest(state / "sim" / "h1" / vm.id / "disk.img").hex()
    mig = nc.migrations.start("cold", to="h2", mode="cold").wait(timeout=60)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert vm.wait_for("stopped", timeout=30).record.host == "h2"
    disk = state / "sim" / "h2" / vm.id / "disk.img"
    assert file_image_digest(disk).hex() == source_digest == mig.record.checkpoint["disk_digest"]
    assert not (state / "sim" / "h1" / vm.id).exists()  # the source is cleaned
    # warm, back to h1: its disk synced while it runs, then stopped there and started here
    vm.start().wait_for("running", timeout=30)
    back = nc.migrations.start("cold", to="h1", mode="warm").wait(timeout=60)
    assert back.phase == MigrationPhase.COMPLETED, back.record.reason
    assert vm.wait_for("running", timeout=30).record.host == "h1"
    assert vm.record.epoch == 3
    assert guest_hosts(state, vm.id) == {"h1"}
    assert back.record.outcome["downtime_ms"] > 0
    assert back.record.outcome["disk_bytes_sent"] > 0


def test_memory_equal_after_switchover(running: Running) -> None:
    """A guest that stops writing: the target's memory is the source's, byte for byte, though
    its pages went zstd-compressed (decoded in the MigrationActor: both hosts share a node)."""
    vm = make_vm(running, "still", memory_mib=64)
    shm = running.settings.state_dir / "shm"
    touched = np.count_nonzero(read_generations(shm / "h1" / f"{vm.id}.gen")) * 4096
    mig = running.nc.migrations.start("still", to="h2", policy={
        "verify": True, "compress": True, "xbzrle": True}).wait(timeout=60)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert 0 < mig.record.outcome["memory_bytes_sent"] < touched / 2
    vm.pause().wait_for("paused", timeout=30)
    # the guest ran on between switchover and pause, but with no workload it wrote nothing
    assert memory_digest(shm / "h2" / f"{vm.id}.mem") == mig.record.outcome["memory_digest"]


def _gone(running: Running, actor: str) -> bool:
    try:
        running.actor(actor)
    except ValueError:
        return True
    return False


def test_force_complete_ends_a_migration_that_does_not_converge(running: Running) -> None:
    vm = make_vm(running, "busy", dirty=60.0, memory_mib=64)
    mig = running.nc.migrations.start("busy", to="h2",
                                      policy={"bandwidth_mib_s": 30, "max_downtime_ms": 1})
    _wait_phase(mig, MigrationPhase.PRECOPY)
    assert mig.force_complete().wait(timeout=60).phase == MigrationPhase.COMPLETED
    assert vm.wait_for("running", timeout=30).record.host == "h2"
    assert guest_hosts(running.settings.state_dir, vm.id) == {"h2"}


def _wait_phase(mig: object, phase: MigrationPhase, timeout: float = 30) -> None:
    eventually(lambda: mig.refresh().phase == phase, timeout,  # type: ignore[attr-defined]
               what=f"phase {phase.value}")


@pytest.mark.parametrize("phase", [MigrationPhase.SYNCING_DISK, MigrationPhase.PRECOPY])
def test_cancel_rolls_back(running: Running, phase: MigrationPhase) -> None:
    nc, state = running.nc, running.settings.state_dir
    vm = make_vm(running, f"cx-{phase.value}", dirty=50.0)
    guest = vm.record.guest_id
    mig = nc.migrations.start(vm.name, to="h2", mode="live",
                              policy={"bandwidth_mib_s": 20, "max_downtime_ms": 1})
    _wait_phase(mig, phase)
    mig.cancel().wait(timeout=30)
    assert mig.phase == MigrationPhase.ROLLED_BACK, mig.record.reason
    assert mig.record.reason == "cancelled"
    vm.wait_for("running", timeout=30)
    assert vm.record.host == "h1"
    assert vm.record.guest_id == guest  # the same guest kept running
    assert guest_hosts(state, vm.id) == {"h1"}
    assert not (state / "sim" / "h2" / vm.id).exists()
    assert nc.hosts.get("h2").allocated.memory_mib == 0
    with pytest.raises(InvalidTransition):
        mig.cancel()


def test_killed_migration_actor_resumes(running: Running) -> None:
    nc, state = running.nc, running.settings.state_dir
    vm = make_vm(running, "phoenix", dirty=20.0, disk_write=8.0)
    mig = nc.migrations.start("phoenix", to="h2", mode="live",
                              policy={"bandwidth_mib_s": 40, "auto_converge": True,
                                      "verify": True})
    _wait_phase(mig, MigrationPhase.PRECOPY)
    ray.kill(running.actor(f"mig:{mig.id}"), no_restart=False)
    mig.wait(timeout=60)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason  # resumed from its record
    assert mig.record.outcome["disk_digest"]  # the disk, synced again, then mirrored: equal
    assert vm.wait_for("running", timeout=30).record.host == "h2"
    eventually(lambda: guest_hosts(state, vm.id) == {"h2"}, 10, what="one guest")


def test_verify_fails_a_migration_whose_disk_copy_differs(running: Running) -> None:
    nc, state = running.nc, running.settings.state_dir
    vm = make_vm(running, "tampered", dirty=20.0)  # it writes no disk: nothing is resent
    mig = nc.migrations.start("tampered", to="h2", mode="live",
                              policy={"bandwidth_mib_s": 20, "verify": True})
    _wait_phase(mig, MigrationPhase.PRECOPY)
    with open(state / "sim" / "h2" / vm.id / "disk.img", "r+b") as disk:
        disk.seek(512 * 1024**2)
        disk.write(b"not the source's bytes")
    mig.wait(timeout=60)
    assert mig.phase == MigrationPhase.FAILED
    assert mig.record.reason == "target disk differs from the paused source's"
    assert vm.wait_for("running", timeout=30).record.host == "h1"  # it resumed there
    assert guest_hosts(state, vm.id) == {"h1"}


def test_refusals_and_limits(running: Running) -> None:
    nc = running.nc
    vm = make_vm(running, "r1", memory_mib=64)
    with pytest.raises(NotFound):
        nc.migrations.start("nope", to="h2")
    with pytest.raises(NotFound):
        nc.migrations.start("r1", to="h9")
    with pytest.raises(InvalidRequest, match="already on h1"):
        nc.migrations.start("r1", to="h1")
    with pytest.raises(NotSupported, match="post_copy"):
        nc.migrations.start("r1", to="h2", policy={"post_copy": True})
    big = nc.vms.create("big", cpus=1, memory_mib=3900, host="h1", start=False)
    big.wait_for("stopped", timeout=30)
    nc.vms.create("fill", cpus=1, memory_mib=200, host="h2", start=False)
    with pytest.raises(NoCapacity):
        nc.migrations.start("big", to="h2", mode="cold")
    vm.stop().wait_for("stopped", timeout=30)
    with pytest.raises(InvalidTransition, match="live migration needs it running"):
        nc.migrations.start("r1", to="h2", mode="live")
    # two outbound per host: the third waits its turn
    others = [make_vm(running, f"q{i}", memory_mib=32, dirty=40.0) for i in range(2)]
    slow = {"bandwidth_mib_s": 10, "max_downtime_ms": 1}
    migs = [nc.migrations.start(v.name, to="h2", policy=slow) for v in others]
    third = nc.migrations.start("r1", to="h2", mode="cold")
    time.sleep(1.0)
    assert third.refresh().phase == MigrationPhase.PENDING
    with pytest.raises(InvalidTransition, match="migrating"):
        nc.vms.get("r1").start()
    for m in migs:
        m.cancel()
    assert third.wait(timeout=60).phase == MigrationPhase.COMPLETED
    assert nc.vms.get("r1").wait_for("stopped", timeout=30).host == "h2"


def test_controller_killed_mid_migration(running: Running) -> None:
    vm = make_vm(running, "steady", dirty=20.0, memory_mib=64)
    mig = running.nc.migrations.start("steady", to="h2",
                                      policy={"bandwidth_mib_s": 20, "max_downtime_ms": 50})
    _wait_phase(mig, MigrationPhase.PRECOPY)
    ray.kill(running.controller, no_restart=False)
    assert mig.wait(timeout=90).phase == MigrationPhase.COMPLETED, mig.record.reason
    assert vm.wait_for("running", timeout=30).record.host == "h2"
    assert guest_hosts(running.settings.state_dir, vm.id) == {"h2"}

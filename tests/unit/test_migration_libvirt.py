"""The libvirt migration path's pure parts: progress and outcome from libvirt's job statistics,
what the path table lets through, and where a target's libvirtd is reached."""

from __future__ import annotations

import pytest

from novacron import migrations as rules
from novacron.errors import InvalidRequest, NotSupported
from novacron.migration.jobstats import completed_stats, job_outcome, job_progress
from novacron.model import MigrationPolicy

MIB = 1024**2

# virDomainGetJobStats of a 128 MiB guest in its second memory pass (as QEMU 7.2 reports it)
RUNNING = {"type": 2, "operation": 5, "time_elapsed": 2680, "data_total": 128 * MIB,
           "data_processed": 40 * MIB, "data_remaining": 32 * MIB,
           "memory_total": 128 * MIB, "memory_processed": 40 * MIB,
           "memory_remaining": 32 * MIB, "memory_bps": 8 * MIB, "memory_dirty_rate": 256,
           "memory_iteration": 2, "memory_page_size": 4096, "disk_total": 0,
           "disk_processed": 0, "disk_remaining": 0, "auto_converge_throttle": 30}
COMPLETED = {"type": 3, "operation": 4, "time_elapsed": 349, "downtime": 17, "setup_time": 1,
             "data_total": 128 * MIB, "data_processed": 88 * MIB, "data_remaining": 0,
             "memory_total": 128 * MIB, "memory_processed": 88 * MIB, "memory_remaining": 0,
             "memory_iteration": 2, "disk_total": 0, "disk_processed": 0,
             "compression_bytes": 0}


def test_progress_of_a_running_job() -> None:
    p = job_progress(RUNNING)
    assert p.phase == "precopy"
    assert p.percent == pytest.approx(5 + 90 * 0.75, abs=0.1)  # a quarter of the data is left
    assert (p.bytes_sent, p.bytes_remaining, p.iteration) == (40 * MIB, 32 * MIB, 2)
    assert p.rate == 8 * MIB
    assert p.dirty_rate == 256 * 4096  # libvirt counts dirtied pages per second
    assert p.eta_s == pytest.approx(4.0)
    assert p.throttle_pct == 30


def test_progress_before_anything_moved_and_while_disks_copy() -> None:
    start = job_progress({"type": 2, "data_total": 0, "memory_bps": 0})
    assert (start.percent, start.eta_s, start.phase) == (5.0, None, "syncing-disk")
    disks = job_progress({"type": 2, "data_total": 1152 * MIB, "data_remaining": 640 * MIB,
                          "data_processed": 512 * MIB, "disk_total": 1024 * MIB,
                          "disk_remaining": 512 * MIB, "disk_bps": 64 * MIB,
                          "memory_processed": 0, "memory_bps": 0})
    assert disks.phase == "syncing-disk"  # copy-storage: disks first, memory not started
    assert disks.rate == 64 * MIB
    assert 5 < disks.percent < 95
    done = job_progress({**RUNNING, "data_remaining": 0})
    assert done.percent == 95.0
    bad = job_progress({"data_total": 10, "data_remaining": 20, "memory_page_size": "?"})
    assert bad.percent == 5.0  # a share out of range is clipped, odd values count as 0


def test_outcome_of_a_completed_job() -> None:
    out = job_outcome(COMPLETED)
    assert out["downtime_ms"] == 17
    assert (out["job_ms"], out["setup_ms"], out["iterations"]) == (349, 1, 2)
    assert out["bytes_sent"] == out["memory_bytes_sent"] == 88 * MIB
    assert out["memory_sent_ratio"] == pytest.approx(88 / 128, abs=0.001)
    assert "postcopy_requests" not in out  # not reported: left out, not zero
    assert job_outcome({"type": 0}) == {}  # no completed job (post-copy on QEMU 7.2)


def test_a_copied_disk_counts_in_the_outcome() -> None:
    # copy-storage: only the source reports the disk mirror; the destination the memory
    last = {**RUNNING, "disk_total": 1024 * MIB, "disk_processed": 1020 * MIB,
            "disk_remaining": 4 * MIB}
    out = job_outcome(completed_stats(COMPLETED, last))
    assert out["disk_bytes_sent"] == 1020 * MIB
    assert out["bytes_sent"] == (88 + 1020) * MIB
    assert out["downtime_ms"] == 17  # the destination's own figures stay
    assert completed_stats(COMPLETED, RUNNING) == COMPLETED  # shared storage: nothing to add
    unseen = job_outcome(completed_stats(COMPLETED, RUNNING, disks_copied=True))
    assert "disk_bytes_sent" not in unseen  # copied too fast to be seen: unknown, not zero
    assert unseen["bytes_sent"] == 88 * MIB


def test_the_path_table_says_what_libvirt_hosts_can_do() -> None:
    assert rules.path_for("libvirt", "libvirt", "live") == "libvirt"
    rules.check_supported("live", MigrationPolicy(compress=True, xbzrle=True, post_copy=True,
                                                  auto_converge=True, bandwidth_mib_s=50,
                                                  max_downtime_ms=100), "libvirt", "libvirt")
    rules.check_supported("live", MigrationPolicy(parallel=4), "libvirt", "libvirt")
    with pytest.raises(NotSupported, match=r"warm migration .* not possible; use live"):
        rules.check_supported("warm", MigrationPolicy(), "libvirt", "libvirt")
    with pytest.raises(NotSupported, match="compress and parallel cannot be combined") as err:
        rules.check_supported("live", MigrationPolicy(parallel=2, compress=True),
                              "libvirt", "libvirt")
    assert err.value.details == {"options": ["compress", "parallel"]}
    with pytest.raises(NotSupported, match="parallel and post_copy"):
        rules.check_supported("live", MigrationPolicy(parallel=2, post_copy=True),
                              "libvirt", "libvirt")
    with pytest.raises(NotSupported, match="from a libvirt host to a sim host"):
        rules.check_supported("live", MigrationPolicy(), "libvirt", "sim")
    with pytest.raises(NotSupported, match="parallel"):
        rules.check_supported("live", MigrationPolicy(parallel=2), "sim", "sim")


def test_where_the_target_libvirtd_is_reached() -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    from novacron.drivers.libvirt import HostConfig, migration_uri

    remote = "qemu+tcp://10.0.0.2/system"
    assert migration_uri(remote, {}) == remote
    assert migration_uri("qemu:///system", {"migration_uri": remote}) == remote
    with pytest.raises(NotSupported, match="set its config migration_uri"):
        migration_uri("qemu:///system", {})
    with pytest.raises(InvalidRequest, match="unsupported libvirt URI"):
        HostConfig.parse({"migration_uri": "http://x"})

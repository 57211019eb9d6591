"""The migration cost model (what dry_run returns)."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest
from novacron.migration.costmodel import Workload, predict
from novacron.migration.precopy import PrecopyPolicy

GB = 1_000_000_000
MB = 1_000_000


def test_cold_moves_the_disk_with_the_guest_down() -> None:
    p = predict("cold", Workload(bandwidth=100 * MB, disk_bytes=10 * GB, compression_ratio=0.5))
    assert p.duration_s == pytest.approx(50.0)
    assert p.downtime_s == p.duration_s
    assert p.bytes == 5 * GB
    assert (p.passes, p.converges) == (1, True)


def test_warm_downtime_is_the_disk_written_meanwhile() -> None:
    w = Workload(bandwidth=100 * MB, disk_bytes=10 * GB, disk_dirty_rate=MB)
    p = predict("warm", w)
    assert p.converges
    assert p.downtime_s <= 0.3
    assert p.passes >= 3
    assert p.duration_s == pytest.approx(100.0, rel=0.02)
    idle = predict("warm", Workload(bandwidth=100 * MB, disk_bytes=GB))
    assert (idle.passes, idle.downtime_s) == (2, 0.0)


def test_live_converges_when_the_guest_dirties_slowly() -> None:
    w = Workload(
        bandwidth=1 * GB,
        disk_bytes=20 * GB,
        memory_bytes=8 * GB,
        memory_dirty_rate=100 * MB,
        device_state_bytes=10 * MB,
    )
    p = predict("live", w)
    assert p.converges
    assert not p.post_copy
    assert p.downtime_s <= 0.3
    assert p.bytes > 28 * GB
    assert p.duration_s == pytest.approx(p.bytes / GB, rel=0.05)


def test_live_hot_guest_needs_auto_converge_or_post_copy() -> None:
    w = Workload(bandwidth=125 * MB, memory_bytes=16 * GB, memory_dirty_rate=200 * MB)
    stuck = predict("live", w)
    assert not stuck.converges
    assert stuck.passes == PrecopyPolicy().max_passes + 1
    throttled = predict("live", w, PrecopyPolicy(auto_converge=True))
    assert throttled.converges
    assert throttled.throttle_pct >= 40
    assert throttled.downtime_s <= 0.3
    post = predict("live", w, PrecopyPolicy(post_copy=True))
    assert post.converges
    assert post.post_copy
    assert post.downtime_s == 0.0
    assert post.duration_s < stuck.duration_s


def test_live_disk_writes_are_sent_with_the_memory_passes() -> None:
    quiet = Workload(bandwidth=1 * GB, disk_bytes=2 * GB, memory_bytes=GB,
                     memory_dirty_rate=50 * MB)
    writing = Workload(bandwidth=1 * GB, disk_bytes=2 * GB, memory_bytes=GB,
                       memory_dirty_rate=50 * MB, disk_dirty_rate=100 * MB)
    base, p = predict("live", quiet), predict("live", writing)
    assert p.converges
    assert p.downtime_s <= 0.3
    # the disk written during the 2 s disk copy (200 MB) goes with the first memory pass
    assert p.bytes - base.bytes >= 200 * MB
    assert p.duration_s > base.duration_s + 0.2
    # a guest writing its disk faster than the link does not converge unless throttled
    flooding = Workload(bandwidth=10 * MB, disk_bytes=GB, disk_dirty_rate=20 * MB)
    assert not predict("live", flooding).converges
    throttled = predict("live", flooding, PrecopyPolicy(auto_converge=True))
    assert throttled.converges
    assert throttled.throttle_pct >= 50


def test_compression_and_bandwidth_scale_the_prediction() -> None:
    base = Workload(bandwidth=100 * MB, memory_bytes=4 * GB, memory_dirty_rate=10 * MB)
    squeezed = Workload(
        bandwidth=100 * MB, memory_bytes=4 * GB, memory_dirty_rate=10 * MB, compression_ratio=0.5
    )
    assert predict("live", squeezed).duration_s < predict("live", base).duration_s
    assert predict("live", squeezed).bytes < predict("live", base).bytes


def test_impossible_workloads_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        Workload(bandwidth=0)
    with pytest.raises(InvalidRequest):
        Workload(bandwidth=10, compression_ratio=0)
    with pytest.raises(InvalidRequest):
        predict("teleport", Workload(bandwidth=10))  # type: ignore[arg-type]

"""The pre-copy planner: stop-and-copy, auto-converge steps, post-copy, abort."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest
from novacron.migration.precopy import (
    Action,
    PassReport,
    PrecopyPolicy,
    PrecopyState,
    decide,
    next_throttle,
)

GB = 1_000_000_000


def test_stops_when_the_rest_fits_the_downtime_limit() -> None:
    # 1 GB in 1 s -> 1 GB/s; 200 MB + 50 MB of device state take 0.25 s <= 0.3 s.
    step = decide(
        PrecopyPolicy(),
        PrecopyState(),
        PassReport(GB, 1.0, 200_000_000),
        device_state_bytes=50_000_000,
    )
    assert step.action is Action.STOP_AND_COPY
    assert step.bandwidth == pytest.approx(GB)
    assert step.expected_downtime_s == pytest.approx(0.25)
    assert step.state.passes == 1


def test_continues_while_the_dirty_set_shrinks() -> None:
    step = decide(PrecopyPolicy(), PrecopyState(), PassReport(GB, 1.0, 400_000_000))
    assert step.action is Action.CONTINUE
    step = decide(PrecopyPolicy(), step.state, PassReport(400_000_000, 0.4, 100_000_000))
    assert step.action is Action.STOP_AND_COPY


def test_dirty_disk_blocks_count_towards_the_downtime() -> None:
    # 100 MB of memory fits 0.3 s at 1 GB/s; with 250 MB of disk blocks written meanwhile the
    # pause would take 0.35 s, so one more pass.
    memory_only = PassReport(GB, 1.0, 100_000_000)
    assert decide(PrecopyPolicy(), PrecopyState(), memory_only).action is Action.STOP_AND_COPY
    with_disk = PassReport(GB, 1.0, 100_000_000, disk_bytes_dirty=250_000_000)
    step = decide(PrecopyPolicy(), PrecopyState(), with_disk)
    assert step.action is Action.CONTINUE
    assert step.expected_downtime_s == pytest.approx(0.35)
    # memory compressed 4x goes at 4 GB/s of guest bytes; the disk blocks still at 1 GB/s
    fast = decide(PrecopyPolicy(), PrecopyState(), with_disk, bandwidth=4 * GB,
                  disk_bandwidth=GB)
    assert fast.expected_downtime_s == pytest.approx(0.275)
    assert fast.action is Action.STOP_AND_COPY
    # a guest that only writes its disk, faster than it is sent, is throttled
    policy = PrecopyPolicy(auto_converge=True)
    disk_hot = PassReport(GB, 1.0, 0, disk_bytes_dirty=800_000_000)
    step = decide(policy, decide(policy, PrecopyState(), disk_hot).state, disk_hot)
    assert step.action is Action.THROTTLE


def test_the_switchover_cost_counts_towards_the_downtime() -> None:
    report = PassReport(GB, 1.0, 250_000_000)  # 0.25 s to send the rest
    assert decide(PrecopyPolicy(), PrecopyState(), report).action is Action.STOP_AND_COPY
    step = decide(PrecopyPolicy(), PrecopyState(), report, switchover_s=0.1)
    assert step.action is Action.CONTINUE
    assert step.expected_downtime_s == pytest.approx(0.35)
    quiet = PassReport(GB, 1.0, 0)  # nothing left: the switchover alone, whatever it costs
    assert decide(PrecopyPolicy(), PrecopyState(), quiet, switchover_s=1.0).action is (
        Action.STOP_AND_COPY)


def test_nothing_dirty_stops_even_with_a_large_device_state() -> None:
    step = decide(PrecopyPolicy(), PrecopyState(), PassReport(GB, 1.0, 0), device_state_bytes=GB)
    assert step.action is Action.STOP_AND_COPY


def test_auto_converge_steps_like_qemu() -> None:
    policy = PrecopyPolicy(auto_converge=True, max_passes=100)
    state, throttles = PrecopyState(), []
    hot = PassReport(GB, 1.0, 800_000_000)  # dirties 80 % of what it sends: never converges
    for _ in range(40):
        step = decide(policy, state, hot)
        state = step.state
        if step.action is Action.THROTTLE:
            throttles.append(state.throttle_pct)
        else:
            assert step.action is Action.CONTINUE
    assert throttles == [20, 30, 40, 50, 60, 70, 80, 90, 99]
    assert [next_throttle(policy, t) for t in (0, 20, 95, 99)] == [20, 30, 99, 99]


def test_a_single_high_pass_does_not_throttle() -> None:
    policy = PrecopyPolicy(auto_converge=True)
    step = decide(policy, PrecopyState(), PassReport(GB, 1.0, 800_000_000))
    assert step.action is Action.CONTINUE
    assert step.state.high_dirty_passes == 1


def test_without_options_a_migration_that_does_not_converge_aborts() -> None:
    policy = PrecopyPolicy(max_passes=3)
    state = PrecopyState()
    actions = []
    for _ in range(3):
        step = decide(policy, state, PassReport(GB, 1.0, GB))
        state = step.state
        actions.append(step.action)
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.ABORT]


def test_post_copy_when_pre_copy_makes_no_progress() -> None:
    policy = PrecopyPolicy(post_copy=True)
    step = decide(policy, PrecopyState(), PassReport(GB, 1.0, 500_000_000))
    assert step.action is Action.CONTINUE
    step = decide(policy, step.state, PassReport(500_000_000, 0.5, 600_000_000))
    assert step.action is Action.POST_COPY


def test_post_copy_waits_for_auto_converge_to_run_out() -> None:
    policy = PrecopyPolicy(auto_converge=True, post_copy=True)
    state = PrecopyState(throttle_pct=50, high_dirty_passes=0)
    step = decide(policy, state, PassReport(GB, 1.0, GB))
    assert step.action is Action.CONTINUE
    step = decide(policy, PrecopyState(throttle_pct=99), PassReport(GB, 1.0, GB))
    assert step.action is Action.POST_COPY
    step = decide(
        PrecopyPolicy(post_copy=True, max_passes=1), PrecopyState(), PassReport(GB, 1.0, 5 * 10**8)
    )
    assert step.action is Action.POST_COPY


def test_bandwidth_must_be_measurable() -> None:
    with pytest.raises(InvalidRequest):
        decide(PrecopyPolicy(), PrecopyState(), PassReport(0, 0.0, 10))
    with pytest.raises(InvalidRequest):
        decide(PrecopyPolicy(), PrecopyState(), PassReport(10, 1.0, 10), bandwidth=-1)
    step = decide(PrecopyPolicy(), PrecopyState(), PassReport(0, 0.0, 10), bandwidth=100.0)
    assert step.action is Action.STOP_AND_COPY


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downtime_limit_s": 0},
        {"max_passes": 0},
        {"throttle_initial_pct": 0},
        {"throttle_max_pct": 100},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest):
        PrecopyPolicy(**kwargs)  # type: ignore[arg-type]

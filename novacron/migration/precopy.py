"""Iterative pre-copy of guest memory: after each pass, decide what the next step is.

The first pass sends every non-zero page; each later pass sends the pages the guest dirtied
meanwhile (its dirty log), and with a disk that is not shared, the disk blocks it wrote meanwhile.
Once what is left of both fits the downtime limit at the measured bandwidth the guest is paused
and the rest, with the device state, is sent (stop-and-copy). The fixed cost of a switchover
(pausing, a checkpoint, starting on the target), which QEMU leaves out of its estimate, can be
counted in, so that the downtime measured, not only the transfer, meets the limit. When the guest
dirties memory faster than it can be sent, two policy options (both off by default) help:
auto-converge throttles the guest's CPU in steps as QEMU does (20 %, then +10 % per step, up to
99 %, each time two passes dirtied more than half of what they sent), and post-copy switches over
at once and lets the target fetch the remaining pages on demand. Without them a migration that
does not converge within ``max_passes`` is aborted and the guest keeps running on its source.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from novacron.errors import InvalidRequest


class Action(enum.StrEnum):
    CONTINUE = "continue"
    THROTTLE = "throttle"
    STOP_AND_COPY = "stop_and_copy"
    POST_COPY = "post_copy"
    ABORT = "abort"


@dataclass(frozen=True)
class PrecopyPolicy:
    """How a live migration converges (defaults as QEMU's, the options off)."""

    downtime_limit_s: float = 0.3
    max_passes: int = 30
    auto_converge: bool = False
    post_copy: bool = False
    throttle_initial_pct: int = 20
    throttle_increment_pct: int = 10
    throttle_max_pct: int = 99
    throttle_trigger: float = 0.5  # dirtied / sent in a pass above which the pass counts as high

    def __post_init__(self) -> None:
        if self.downtime_limit_s <= 0 or self.max_passes < 1 or self.throttle_trigger <= 0:
            raise InvalidRequest("invalid pre-copy policy", details={"policy": repr(self)})
        if not 0 < self.throttle_initial_pct <= self.throttle_max_pct <= 99:
            raise InvalidRequest("throttle steps must lie within 1..99 %")


@dataclass(frozen=True)
class PassReport:
    """What one pass measured: bytes sent (memory and disk), its duration, and the bytes of
    memory and of disk dirty when it ended (what the next pass, or the pause, must send)."""

    bytes_sent: int
    seconds: float
    bytes_dirty: int
    disk_bytes_dirty: int = 0

    @property
    def dirty(self) -> int:
        """Memory and disk bytes dirty when the pass ended."""
        return self.bytes_dirty + self.disk_bytes_dirty


@dataclass(frozen=True)
class PrecopyState:
    """Progress of a pre-copy: passes done, the guest's CPU throttle, high-dirty passes seen."""

    passes: int = 0
    throttle_pct: int = 0
    high_dirty_passes: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    state: PrecopyState
    bandwidth: float
    expected_downtime_s: float
    reason: str


def next_throttle(policy: PrecopyPolicy, current_pct: int) -> int:
    """The next auto-converge step from ``current_pct`` (0: not throttled yet)."""
    if current_pct == 0:
        return policy.throttle_initial_pct
    return min(current_pct + policy.throttle_increment_pct, policy.throttle_max_pct)


def decide(
    policy: PrecopyPolicy,
    state: PrecopyState,
    last: PassReport,
    *,
    device_state_bytes: int = 0,
    bandwidth: float | None = None,
    disk_bandwidth: float | None = None,
    switchover_s: float = 0.0,
) -> Decision:
    """The step after a pass; ``bandwidth`` (bytes/s of memory) defaults to the pass's own
    throughput, ``disk_bandwidth`` (bytes/s of disk blocks, which may travel at another rate:
    uncompressed while memory is compressed) to ``bandwidth``; ``switchover_s``: the downtime a
    switchover takes besides sending the rest."""
    if bandwidth is None:
        if last.seconds <= 0 or last.bytes_sent <= 0:
            raise InvalidRequest("a pass that sent nothing cannot measure the bandwidth")
        bandwidth = last.bytes_sent / last.seconds
    disk_bandwidth = disk_bandwidth or bandwidth
    if min(bandwidth, disk_bandwidth) <= 0:
        raise InvalidRequest("bandwidth must be positive",
                             details={"bandwidth": bandwidth, "disk_bandwidth": disk_bandwidth})
    downtime = ((last.bytes_dirty + device_state_bytes) / bandwidth
                + last.disk_bytes_dirty / disk_bandwidth + switchover_s)
    high = last.dirty > policy.throttle_trigger * last.bytes_sent
    state = replace(
        state,
        passes=state.passes + 1,
        high_dirty_passes=state.high_dirty_passes + (1 if high else 0),
    )

    def decision(action: Action, reason: str, new_state: PrecopyState = state) -> Decision:
        return Decision(action, new_state, bandwidth, downtime, reason)

    if downtime <= policy.downtime_limit_s:
        return decision(Action.STOP_AND_COPY, "the rest fits the downtime limit")
    if last.dirty == 0:
        return decision(Action.STOP_AND_COPY, "nothing left to pre-copy; only the device state")
    throttle_left = policy.auto_converge and state.throttle_pct < policy.throttle_max_pct
    if state.passes >= policy.max_passes:
        if policy.post_copy:
            return decision(Action.POST_COPY, "pass limit reached; the target pulls the rest")
        return decision(Action.ABORT, f"no convergence within {policy.max_passes} passes")
    if throttle_left and state.high_dirty_passes >= 2:
        throttled = replace(
            state, throttle_pct=next_throttle(policy, state.throttle_pct), high_dirty_passes=0
        )
        reason = "the guest dirties memory (or disk) faster than it is sent"
        return decision(Action.THROTTLE, reason, throttled)
    if policy.post_copy and not throttle_left and last.dirty >= last.bytes_sent:
        return decision(Action.POST_COPY, "pre-copy makes no progress; the target pulls the rest")
    return decision(Action.CONTINUE, "send the pages dirtied meanwhile")

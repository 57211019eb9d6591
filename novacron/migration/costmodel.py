"""Predicts a migration's passes, bytes, duration and downtime (what ``dry_run`` returns).

Modes, as NovaCron runs them:

* cold: the guest is stopped; its disk delta moves; the downtime is the whole transfer.
* warm: the disk is copied while the guest runs, then again what it wrote meanwhile, pass after
  pass, until the rest fits the downtime limit (or the passes run out); the guest is then stopped,
  the rest moved, and the guest started on the target (memory is not moved).
* live: the disk copied once while the guest runs, then memory by iterative pre-copy
  (``precopy.decide``, with auto-converge and post-copy as the policy says), each pass also
  sending the disk blocks written meanwhile; the downtime is the last dirty set (pages and disk
  blocks) and the device state.

The model is fluid: a guest dirties ``rate`` distinct bytes per second (scaled down by a CPU
throttle), never more than the memory or disk it has, and the link moves ``bandwidth`` bytes/s
of compressed data (payload throughput = bandwidth / compression_ratio).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from novacron.errors import InvalidRequest
from novacron.migration.precopy import Action, PassReport, PrecopyPolicy, PrecopyState, decide

Mode = Literal["cold", "warm", "live"]


@dataclass(frozen=True)
class Workload:
    """What a migration has to move and how fast.

    ``disk_bytes`` is the disk data that must travel (non-zero blocks the target lacks) and
    ``memory_bytes`` the guest's non-zero memory; rates are bytes/s of distinct data dirtied.
    """

    bandwidth: float
    disk_bytes: int = 0
    memory_bytes: int = 0
    memory_dirty_rate: float = 0.0
    disk_dirty_rate: float = 0.0
    compression_ratio: float = 1.0
    device_state_bytes: int = 0

    def __post_init__(self) -> None:
        values = (self.disk_bytes, self.memory_bytes, self.memory_dirty_rate, self.disk_dirty_rate)
        if self.bandwidth <= 0 or min(values) < 0 or self.device_state_bytes < 0:
            raise InvalidRequest("invalid workload", details={"workload": repr(self)})
        if not 0 < self.compression_ratio <= 1.5:
            raise InvalidRequest("compression ratio must be in (0, 1.5]")

    @property
    def throughput(self) -> float:
        """Payload bytes per second over the link."""
        return self.bandwidth / self.compression_ratio


@dataclass(frozen=True)
class Prediction:
    mode: Mode
    passes: int
    bytes: int
    duration_s: float
    downtime_s: float
    converges: bool
    throttle_pct: int = 0
    post_copy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Precopy:
    passes: int
    payload: float
    seconds: float
    rest: float
    throttle_pct: int
    action: Action


def _iterate(
    first: float,
    rate: float,
    limit_bytes: float,
    throughput: float,
    extra_bytes: int,
    policy: PrecopyPolicy,
) -> _Precopy:
    """Simulate pre-copy passes: ``first`` payload bytes, then whatever ``rate`` dirtied."""
    state = PrecopyState()
    pending, payload, seconds = first, 0.0, 0.0
    while True:
        took = pending / throughput
        payload += pending
        seconds += took
        dirty = min(rate * (1 - state.throttle_pct / 100) * took, limit_bytes)
        step = decide(
            policy,
            state,
            PassReport(int(pending), took, int(dirty)),
            device_state_bytes=extra_bytes,
            bandwidth=throughput,
        )
        state, pending = step.state, dirty
        if step.action not in (Action.CONTINUE, Action.THROTTLE):
            return _Precopy(
                state.passes, payload, seconds, pending, state.throttle_pct, step.action
            )


def predict(mode: Mode, workload: Workload, policy: PrecopyPolicy | None = None) -> Prediction:
    """The predicted cost of migrating ``workload`` in ``mode`` under ``policy``."""
    policy = policy or PrecopyPolicy()
    w = workload
    ratio, tput = w.compression_ratio, w.throughput
    if mode == "cold":
        seconds = w.disk_bytes / tput
        return Prediction(mode, 1, math.ceil(w.disk_bytes * ratio), seconds, seconds, True)
    if mode == "warm":
        disk_policy = PrecopyPolicy(
            downtime_limit_s=policy.downtime_limit_s, max_passes=policy.max_passes
        )
        run = _iterate(w.disk_bytes, w.disk_dirty_rate, w.disk_bytes, tput, 0, disk_policy)
        downtime = run.rest / tput
        payload = run.payload + run.rest
        return Prediction(
            mode,
            run.passes + 1,
            math.ceil(payload * ratio),
            run.seconds + downtime,
            downtime,
            run.action is Action.STOP_AND_COPY,
        )
    if mode != "live":
        raise InvalidRequest("unknown migration mode", details={"mode": mode})
    # Disk first, while the guest runs; then passes of memory and of the disk blocks written
    # meanwhile (those of the disk copy go with the first pass).
    disk_s = w.disk_bytes / tput
    written = w.disk_dirty_rate * disk_s
    run = _iterate(
        w.memory_bytes + written,
        w.memory_dirty_rate + w.disk_dirty_rate,
        w.memory_bytes + max(w.disk_bytes, written),
        tput,
        w.device_state_bytes,
        policy,
    )
    state_s = w.device_state_bytes / w.bandwidth
    if run.action is Action.POST_COPY:
        downtime = state_s
        tail_s = run.rest / tput
    else:
        downtime = run.rest / tput + state_s
        tail_s = downtime
    duration = disk_s + run.seconds + tail_s
    payload = w.disk_bytes + run.payload + run.rest
    return Prediction(
        mode,
        run.passes + 1,
        math.ceil(payload * ratio) + w.device_state_bytes,
        duration,
        downtime,
        run.action is not Action.ABORT,
        run.throttle_pct,
        run.action is Action.POST_COPY,
    )

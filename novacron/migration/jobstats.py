"""A hypervisor's migration job statistics as NovaCron progress and outcome (pure functions).

``stats`` is the mapping libvirt's ``virDomainGetJobStats`` returns, with libvirt's field names
(``data_total``, ``data_processed``, ``data_remaining``, ``memory_*``, ``disk_*``,
``memory_iteration``, ``memory_dirty_rate`` in pages/s, ``downtime``, ``time_elapsed`` ...): the
libvirt migration path (``actors/migration/libvirt.py``) polls it on the source while QEMU
migrates, and reads the completed job's on the destination afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 4096  # when libvirt does not say (``memory_page_size``)


@dataclass(frozen=True)
class JobProgress:
    """Where a running migration job is: NovaCron's phase name and progress fields."""

    phase: str  # "syncing-disk" (setting up, copying disks) until memory moves: "precopy"
    percent: float
    bytes_sent: int
    bytes_remaining: int
    rate: float  # bytes/s, memory and disks
    dirty_rate: float  # bytes/s the guest dirties
    iteration: int  # memory pass (1 = the first full pass)
    eta_s: float | None
    throttle_pct: int  # auto-converge's vCPU throttle


def _int(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def job_progress(stats: Mapping[str, Any], *, low: float = 5.0,
                 high: float = 95.0) -> JobProgress:
    """The progress of a running job. ``percent`` moves from ``low`` to ``high`` as the data
    still to send shrinks against the total (it can grow back when the guest dirties memory
    faster than it goes; the migration record holds the highest percent seen)."""
    total = _int(stats, "data_total")
    remaining = _int(stats, "data_remaining")
    share = 0.0 if total <= 0 else min(1.0, max(0.0, 1.0 - remaining / total))
    rate = float(_int(stats, "memory_bps") + _int(stats, "disk_bps"))
    page = _int(stats, "memory_page_size") or PAGE_SIZE
    memory_moving = _int(stats, "memory_processed") > 0 or _int(stats, "memory_iteration") > 0
    return JobProgress(
        phase="precopy" if memory_moving else "syncing-disk",
        percent=round(low + (high - low) * share, 1),
        bytes_sent=_int(stats, "data_processed"),
        bytes_remaining=remaining,
        rate=rate,
        dirty_rate=float(_int(stats, "memory_dirty_rate") * page),
        iteration=_int(stats, "memory_iteration"),
        eta_s=round(remaining / rate, 2) if rate > 0 else None,
        throttle_pct=_int(stats, "auto_converge_throttle"),
    )


def completed_stats(done: Mapping[str, Any], last: Mapping[str, Any], *,
                    disks_copied: bool = False) -> dict[str, Any]:
    """A completed job's statistics as the destination reports them (``done``: with QEMU's
    downtime), plus the disk copy that only the source reports (``last``: its last running
    job's statistics seen); the data totals then count both. When the disks were copied but
    no statistics of it were seen (a quick copy between two looks), the disk figures are left
    out rather than given as zero."""
    merged = dict(done)
    if _int(done, "disk_total"):
        return merged
    if _int(last, "disk_total"):
        for key in ("disk_total", "disk_processed"):
            merged[key] = _int(last, key)
        merged["disk_remaining"] = 0
        for key, part in (("data_total", "disk_total"), ("data_processed", "disk_processed")):
            merged[key] = _int(done, key) + merged[part]
    elif disks_copied:
        for key in ("disk_total", "disk_processed", "disk_remaining", "disk_bps"):
            merged.pop(key, None)
    return merged


def job_outcome(stats: Mapping[str, Any]) -> dict[str, Any]:
    """What a completed job measured, for a migration's outcome: the downtime (the guest
    paused, as QEMU measured it), the job's duration and the bytes moved, leaving out what
    libvirt did not report."""
    fields = {
        "downtime_ms": "downtime",
        "job_ms": "time_elapsed",
        "setup_ms": "setup_time",
        "bytes_sent": "data_processed",
        "memory_bytes_sent": "memory_processed",
        "disk_bytes_sent": "disk_processed",
        "iterations": "memory_iteration",
        "postcopy_requests": "memory_postcopy_requests",
        "xbzrle_bytes": "compression_bytes",
        "throttle_pct": "auto_converge_throttle",
    }
    outcome: dict[str, Any] = {ours: _int(stats, theirs) for ours, theirs in fields.items()
                               if theirs in stats}
    total = _int(stats, "memory_total")
    if total and "memory_processed" in stats:
        outcome["memory_sent_ratio"] = round(_int(stats, "memory_processed") / total, 3)
    return outcome

"""Tenant quotas and the pure admission check.

A dimension is refused when the request adds to it (``requested > 0``) and ``used + requested``
would pass the limit; a request that adds nothing to an over-quota dimension (say, after a quota
was lowered) is not refused. The caller must check and record usage atomically (the controller
serialises admissions), or two requests can each fit alone and overshoot together.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from novacron.errors import QuotaExceeded

DIMENSIONS = ("vcpus", "memory_mib", "disk_gib", "vms", "volume_bytes")


class Quota(BaseModel):
    """Limits of a tenant; ``None`` is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vcpus: int | None = Field(default=None, ge=0)
    memory_mib: int | None = Field(default=None, ge=0)
    disk_gib: int | None = Field(default=None, ge=0)
    vms: int | None = Field(default=None, ge=0)
    volume_bytes: int | None = Field(default=None, ge=0)


class Usage(BaseModel):
    """An amount of every quota dimension: what a tenant uses, or what a request adds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vcpus: int = Field(default=0, ge=0)
    memory_mib: int = Field(default=0, ge=0)
    disk_gib: int = Field(default=0, ge=0)
    vms: int = Field(default=0, ge=0)
    volume_bytes: int = Field(default=0, ge=0)

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{d: getattr(self, d) + getattr(other, d) for d in DIMENSIONS})

    @classmethod
    def of_vm(cls, cpus: int, memory_mib: int, disk_gib: int) -> Usage:
        """What one VM of this shape counts against a quota."""
        return cls(vcpus=cpus, memory_mib=memory_mib, disk_gib=disk_gib, vms=1)


def check(usage: Usage, request: Usage, quota: Quota, *, tenant: str = "") -> None:
    """Raise QuotaExceeded, naming every exceeded dimension with its numbers, if ``request``
    does not fit in ``quota`` on top of ``usage``."""
    exceeded: dict[str, dict[str, int]] = {}
    for dim in DIMENSIONS:
        limit: int | None = getattr(quota, dim)
        used: int = getattr(usage, dim)
        requested: int = getattr(request, dim)
        if limit is not None and requested > 0 and used + requested > limit:
            exceeded[dim] = {"used": used, "requested": requested, "limit": limit}
    if exceeded:
        parts = "; ".join(f"{dim}: {n['used']} used + {n['requested']} requested > "
                          f"{n['limit']} allowed" for dim, n in exceeded.items())
        where = f" of tenant {tenant}" if tenant else ""
        raise QuotaExceeded(f"quota{where} exceeded: {parts}",
                            details={"tenant": tenant, "exceeded": exceeded})

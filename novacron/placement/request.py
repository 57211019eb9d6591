"""What a placement asks for: :class:`PlacementRequest`, its group policy and weights."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from novacron.errors import InvalidRequest
from novacron.model import Resources

__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHER_NAMES",
    "Affinity",
    "PlacementRequest",
    "resolve_weights",
]

WEIGHER_NAMES: tuple[str, ...] = (
    "binpack", "tetris", "stranded", "spread", "least_loaded", "cost", "group")
"""Every weigher, in the order scores are reported. ``group`` weighs soft (anti-)affinity."""

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "binpack": 1.0,  # best fit: prefer hosts in use, fullest after placement
    "tetris": 0.25,  # demand aligned with free capacity
    "stranded": 0.25,  # no dimension left full while another stays empty
    "spread": 0.02,  # fewer VMs per host (a tie-breaker unless raised)
    "least_loaded": 0.05,  # lower measured CPU load
    "cost": 0.1,  # cheaper per hour
    "group": 2.0,  # soft affinity / anti-affinity of the request's group
}
"""Cluster defaults, tuned for packing; override per engine and per request."""


class Affinity(StrEnum):
    """How the VMs of one group relate to each other."""

    AFFINITY = "affinity"  # together: same host (or same failure domain)
    ANTI_AFFINITY = "anti-affinity"  # apart: different hosts (or different failure domains)


def resolve_weights(base: Mapping[str, float],
                    override: Mapping[str, float] | None = None) -> dict[str, float]:
    """``base`` updated with ``override``; InvalidRequest on an unknown name or a bad value."""
    merged = dict(base)
    for name, value in (override or {}).items():
        if name not in WEIGHER_NAMES:
            raise InvalidRequest(
                f"unknown weigher {name!r}; expected one of {', '.join(WEIGHER_NAMES)}",
                details={"weigher": name})
        if not 0.0 <= value <= 1000.0:
            raise InvalidRequest(f"weight of {name} must be between 0 and 1000, not {value}",
                                 details={"weigher": name, "value": value})
        merged[name] = float(value)
    return merged


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One VM to place.

    ``labels`` selects hosts by label: each key must have the given value (or one of the given
    values). ``group`` names the VM's placement group; ``affinity`` with ``hard`` says whether its
    members must (hard) or should (soft) share or avoid a host, or a failure domain when
    ``domain`` names a host label such as ``rack`` or ``zone``. ``allowed_hosts`` restricts the
    tenant to these hosts; ``exclude_hosts`` rules hosts out (a migration's source).
    """

    resources: Resources
    host: str | None = None
    labels: Mapping[str, str | Collection[str]] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    group: str | None = None
    affinity: Affinity = Affinity.ANTI_AFFINITY
    hard: bool = True
    domain: str | None = None
    tenant: str | None = None
    allowed_hosts: frozenset[str] | None = None
    exclude_hosts: frozenset[str] = frozenset()
    weights: Mapping[str, float] | None = None

    def shape_key(self) -> tuple[object, ...]:
        """The equivalence class of scores: requests with equal keys share one score vector.

        Shape and weights decide the scores; the other constraints become host masks shared by
        their own key (:meth:`constraint_key`) and the group rule is applied on top of both.
        """
        r = self.resources
        return (r.cpus, r.memory_mib, r.disk_gib, r.gpus,
                tuple(sorted(self.weights.items())) if self.weights else None)

    def constraint_key(self) -> tuple[object, ...]:
        """The equivalence class of host constraints (pinned, excluded, tenant, labels,
        capabilities): requests with equal keys share one host mask."""
        return (self.host, self.exclude_hosts, self.tenant, self.allowed_hosts,
                tuple(sorted((k, v if isinstance(v, str) else tuple(sorted(v)))
                             for k, v in self.labels.items())),
                self.capabilities)

"""Optimistic commit of placements against the store's host revisions.

A decision was made against the host's revision the fleet knew; the store takes the new
allocation only if the host is still at that revision, so two placements that raced for the same
free space cannot both land (the loser gets RevisionMismatch, refreshes the host and retries).
The store itself is not touched here: the caller passes ``write`` (a conditional update returning
the new revision) and ``fetch`` (the host's current record).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from novacron.errors import InvalidRequest, RevisionMismatch
from novacron.model import Host, Resources
from novacron.placement.engine import Decision, PlacementEngine
from novacron.placement.request import PlacementRequest

__all__ = ["HostWrite", "commit_batch", "place_and_commit", "plan_commit"]

logger = logging.getLogger("novacron.placement")

WriteHost = Callable[["HostWrite"], int]
"""Conditionally set a host's allocation; returns the new revision or raises RevisionMismatch."""
FetchHost = Callable[[str], Host]
"""The host's current record in the store."""


@dataclass(frozen=True, slots=True)
class HostWrite:
    """Set ``host``'s allocation to ``allocated`` if it is still at ``expected_revision``."""

    host: str
    expected_revision: int
    allocated: Resources
    decisions: tuple[Decision, ...]


def plan_commit(decisions: Sequence[Decision]) -> list[HostWrite]:
    """The conditional writes committing ``decisions``: one per host, in order of appearance.

    Every decision on one host must have been made against the same revision and allocation
    (a single :meth:`~PlacementEngine.place`, or one :meth:`~PlacementEngine.place_batch`).
    """
    by_host: dict[str, list[Decision]] = {}
    for d in decisions:
        by_host.setdefault(d.host, []).append(d)
    writes = []
    for host, group in by_host.items():
        first = group[0]
        if any(d.revision != first.revision or d.base_allocated != first.base_allocated
               for d in group):
            raise InvalidRequest(f"decisions on host {host} were made against different "
                                 "revisions; commit them separately", details={"host": host})
        allocated = first.base_allocated
        for d in group:
            allocated = allocated + d.resources
        writes.append(HostWrite(host, first.revision, allocated, tuple(group)))
    return writes


def place_and_commit(engine: PlacementEngine, request: PlacementRequest, write: WriteHost,
                     fetch: FetchHost, *, attempts: int = 5) -> tuple[Decision, int]:
    """Place ``request`` and commit it, refreshing the host and retrying on RevisionMismatch.

    Returns the decision and the host's new revision; the engine's fleet counts the VM.
    """
    for attempt in range(1, attempts + 1):
        decision = engine.place(request)
        (host_write,) = plan_commit([decision])
        try:
            revision = write(host_write)
        except RevisionMismatch:
            logger.info("host %s changed under placement (attempt %d/%d); retrying",
                        decision.host, attempt, attempts)
            engine.update_host(fetch(decision.host))
            continue
        engine.allocate(decision.host, decision.resources, group=decision.group,
                        revision=revision)
        return decision, revision
    raise RevisionMismatch(f"placement lost {attempts} races for host revisions; giving up",
                           details={"attempts": attempts})


def commit_batch(engine: PlacementEngine, writes: Sequence[HostWrite], write: WriteHost,
                 fetch: FetchHost) -> list[Decision]:
    """Commit a :meth:`~PlacementEngine.place_batch`'s writes; returns the decisions refused.

    Accepted writes record the host's new revision. A refused write releases its reservations
    and refreshes the host from the store; place the returned decisions' requests again.
    """
    refused: list[Decision] = []
    for w in writes:
        try:
            engine.set_revision(w.host, write(w))
        except RevisionMismatch:
            for d in w.decisions:
                engine.release(d.host, d.resources, group=d.group)
            engine.update_host(fetch(w.host))
            refused.extend(w.decisions)
    return refused

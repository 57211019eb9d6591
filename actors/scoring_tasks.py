"""Placement scoring split across Ray tasks, for very large fleets.

The fleet is cut into slices (:meth:`HostFleet.split`) whose static columns go to the object
store once per fleet epoch; the columns allocations change go again only when they changed. Each
task scores one slice for a request with :func:`score_slice` and
:func:`~novacron.placement.merge_shards` picks the best host (or sums the per-filter counts into
one NoCapacity). All Ray calls sit in :class:`ShardedScorer`.

On one machine a plain :meth:`PlacementEngine.place` is faster (a task costs milliseconds); this
pays off when one placement must scan a fleet far larger than one core handles in time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import ray

from novacron.placement import (
    Decision,
    GroupContext,
    HostFleet,
    PlacementEngine,
    PlacementRequest,
    ShardResult,
    merge_shards,
)
from novacron.placement.fleet import Dynamic

__all__ = ["ShardedScorer", "score_slice"]

logger = logging.getLogger("novacron.placement")


def score_slice(fleet: HostFleet, dynamic: Dynamic, request: PlacementRequest,
                group: GroupContext | None, weights: Mapping[str, float],
                cost_reference: float) -> ShardResult:
    """The best host of one slice of the fleet, at the given allocations (the task's body)."""
    fleet.load_dynamic(dynamic)
    engine = PlacementEngine(fleet, weights=weights, cost_reference=cost_reference)
    return engine.score(request, group)


class ShardedScorer:
    """Places requests over ``engine``'s fleet by scoring ``parts`` slices in Ray tasks.

    Decisions are the same as ``engine.place(request, explain=False)``; committing them and
    keeping the fleet current stay with the engine (``allocate``, ``update_host``...).
    """

    def __init__(self, engine: PlacementEngine, parts: int, *, num_cpus: float = 1.0) -> None:
        self.engine = engine
        self.parts = max(1, parts)
        self._task: Any = ray.remote(score_slice).options(num_cpus=num_cpus)
        self._slices: list[Any] = []
        self._dynamic: list[Any] = []
        self._epoch = -1
        self._seq = -1

    def place(self, request: PlacementRequest) -> Decision:
        """The best host for ``request``; NoCapacity with per-filter counts if none fits."""
        fleet = self.engine.fleet
        if fleet.epoch != self._epoch:
            self._slices = [ray.put(part) for part in fleet.split(self.parts)]
            self._epoch, self._seq = fleet.epoch, -1
            logger.debug("shipped %d fleet slices for epoch %d", self.parts, fleet.epoch)
        if fleet.seq != self._seq:
            self._dynamic = [ray.put(fleet.dynamic(lo, hi)) for lo, hi in fleet.bounds(self.parts)]
            self._seq = fleet.seq
        group = self.engine.group_context(request)
        refs = [self._task.remote(part, dynamic, request, group, self.engine.weights,
                                  self.engine.cost_reference)
                for part, dynamic in zip(self._slices, self._dynamic, strict=True)]
        results: list[ShardResult] = ray.get(refs)
        return merge_shards(results, request)

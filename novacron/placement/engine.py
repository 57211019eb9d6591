"""PlacementEngine: filter and weigh every host of a :class:`HostFleet` in a few vector operations.

Equivalence classes, as in Borg and Protean: requests of one shape and weights
(:meth:`PlacementRequest.shape_key`) share one cached score vector, and requests with the same
host constraints (:meth:`PlacementRequest.constraint_key`) share one cached host mask. A score
vector is patched only for the hosts that changed since it was last used (the fleet's change
log; one host at a time in plain floats, equal to the vector result), so a batch of similar VMs
costs one full evaluation, then a patch and an argmax per VM. Group rules are applied on top,
so group members share the vectors of ungrouped VMs of the same shape.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from novacron.errors import NoCapacity
from novacron.model import Host, Resources
from novacron.placement import explain, filters, weighers
from novacron.placement.fleet import (
    BoolArray,
    FloatArray,
    HostFleet,
    InstanceType,
    IntArray,
    VMPlacementInfo,
    demand_vector,
)
from novacron.placement.request import (
    DEFAULT_WEIGHTS,
    WEIGHER_NAMES,
    PlacementRequest,
    resolve_weights,
)

__all__ = ["Decision", "GroupContext", "PlacementEngine", "ShardResult", "merge_shards",
           "select_host"]

logger = logging.getLogger("novacron.placement")

_NEG_INF = -np.inf
_DYNAMIC = ("binpack", "tetris", "stranded", "spread", "least_loaded")
_CACHE_BYTES = 48 * 1024 * 1024  # bound on the memory of cached score vectors
_MASK_BYTES = 16 * 1024 * 1024  # and of cached constraint masks
_UNCONSTRAINED = PlacementRequest(Resources.zero()).constraint_key()
_PATCH_FRACTION = 8  # past N/8 changes since a class was scored, rescore it instead of patching
_SCALAR_PATCH = 16  # up to this many changed hosts, patch one host at a time in plain floats


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes, and what to write to the store to commit it.

    ``revision`` and ``base_allocated`` are the host's store revision and allocation the decision
    was made against (see :func:`novacron.placement.commit.plan_commit`). ``candidates`` counts
    the hosts that passed every filter and ``breakdown`` the chosen host's score per weigher
    (-1 and empty when not explained, as in batches).
    """

    host: str
    score: float
    explanation: str
    resources: Resources
    revision: int
    base_allocated: Resources
    group: str | None = None
    candidates: int = -1
    breakdown: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GroupContext:
    """The members of a request's group, for scoring a slice of the fleet that cannot see them:
    members per host name and per value of the request's failure-domain label."""

    hosts: Mapping[str, int]
    domains: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ShardResult:
    """The best host of one slice of the fleet, or why none fits (``removed``)."""

    host: str | None
    score: float
    revision: int
    allocated: Resources | None
    hosts: int
    removed: Mapping[str, int]


class _Shape:
    """The cached scores of one equivalence class: requests of one shape and weights."""

    __slots__ = ("demand", "demand_list", "epoch", "group_weight", "scores", "seq", "static_term",
                 "weights")

    def __init__(self, demand: FloatArray, weights: tuple[tuple[str, float], ...],
                 group_weight: float, static_term: FloatArray, epoch: int) -> None:
        self.demand = demand
        self.demand_list: list[float] = demand.tolist()
        self.weights = weights
        self.group_weight = group_weight
        self.static_term = static_term  # weighted cost score; -inf if down or no instance fits
        self.scores: FloatArray = static_term
        self.seq = -1
        self.epoch = epoch


class PlacementEngine:
    """Chooses hosts for VMs over a :class:`HostFleet`.

    ``weights`` are the cluster's weigher weights (defaults :data:`DEFAULT_WEIGHTS`); a request's
    own ``weights`` override them. ``cost_reference`` is the hourly price the cost weigher scores
    0.5. :meth:`place` does not change the fleet: call :meth:`allocate` once the store accepted
    the allocation. :meth:`place_batch` reserves each placement in the fleet as it goes.
    """

    def __init__(self, fleet: HostFleet, *, weights: Mapping[str, float] | None = None,
                 cost_reference: float = 1.0) -> None:
        self.fleet = fleet
        self.weights = resolve_weights(DEFAULT_WEIGHTS, weights)
        self.cost_reference = cost_reference
        self._shapes: OrderedDict[tuple[object, ...], _Shape] = OrderedDict()
        self._masks: OrderedDict[tuple[object, ...], tuple[int, FloatArray]] = OrderedDict()
        self._mean_limit_epoch = -1
        self._inv_mean_limit: FloatArray = np.zeros(0)

    @classmethod
    def from_hosts(cls, hosts: Sequence[Host],
                   vms_by_host: Mapping[str, Sequence[VMPlacementInfo]] | None = None, *,
                   weights: Mapping[str, float] | None = None,
                   capabilities: Mapping[str, Collection[str]] | None = None,
                   driver_capabilities: Mapping[str, Collection[str]] | None = None,
                   instance_types: Mapping[str, Sequence[InstanceType]] | None = None,
                   load: Mapping[str, float] | None = None,
                   cost_reference: float = 1.0) -> PlacementEngine:
        """An engine over ``hosts`` (see :class:`HostFleet` for the other arguments)."""
        fleet = HostFleet(hosts, vms_by_host, capabilities=capabilities,
                          driver_capabilities=driver_capabilities,
                          instance_types=instance_types, load=load)
        return cls(fleet, weights=weights, cost_reference=cost_reference)

    # -- keeping the fleet current ----------------------------------------------------------
    def allocate(self, host: str, resources: Resources, *, group: str | None = None,
                 revision: int | None = None) -> None:
        """Count one VM on ``host`` (after the store accepted it at ``revision``)."""
        self.fleet.allocate(host, resources, group=group, revision=revision)

    def release(self, host: str, resources: Resources, *, group: str | None = None,
                revision: int | None = None) -> None:
        """Remove one VM from ``host`` (deleted, moved away, or a reservation the store refused)."""
        self.fleet.release(host, resources, group=group, revision=revision)

    def set_revision(self, host: str, revision: int) -> None:
        """Record that the store accepted a write of ``host`` at ``revision``."""
        self.fleet.set_revision(host, revision)

    def set_load(self, host: str, load: float) -> None:
        """Record ``host``'s measured CPU load (0..1), for the least-loaded weigher."""
        self.fleet.set_load(host, load)

    def update_host(self, host: Host, *, capabilities: Collection[str] | None = None,
                    instance_types: Sequence[InstanceType] | None = None) -> None:
        """Replace (or add) ``host`` with its latest store record."""
        self.fleet.update_host(host, capabilities=capabilities, instance_types=instance_types)

    def remove_host(self, name: str) -> None:
        """Forget host ``name``."""
        self.fleet.remove_host(name)

    # -- placing ----------------------------------------------------------------------------
    def place(self, request: PlacementRequest, *, explain: bool = True) -> Decision:
        """The best host for ``request``; NoCapacity (saying why, per filter) if none fits.

        With ``explain`` the decision also counts the hosts that fit and breaks the chosen
        host's score down by weigher.
        """
        i, score, scores = self._choose(request, None)
        fleet = self.fleet
        name = fleet.names[i]
        if not explain:
            return Decision(name, score, f"{name}: score {score:.3f}", request.resources,
                            int(fleet.revision[i]), fleet.allocated(i), request.group)
        candidates = int(np.count_nonzero(scores > _NEG_INF))
        breakdown = self._breakdown(request, i)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items())
        text = (f"{name}: score {score:.3f}, best of {candidates}/{len(fleet)} hosts that fit"
                f" ({parts})")
        logger.debug("placed %s", text)
        return Decision(name, score, text, request.resources, int(fleet.revision[i]),
                        fleet.allocated(i), request.group, candidates, breakdown)

    def place_batch(self, requests: Sequence[PlacementRequest], *,
                    reorder: bool = True) -> list[Decision | NoCapacity]:
        """Place many VMs, reserving each in the fleet as it goes; one entry per request.

        With ``reorder`` the largest VMs are placed first (better packing), and requests of
        one shape in a row (warm caches); results keep the order of ``requests``. Every
        decision on one host carries the host's revision and allocation from before the batch,
        so :func:`~novacron.placement.commit.plan_commit` makes one write per host. A request
        that cannot be placed gets its NoCapacity error in its slot.
        """
        fleet = self.fleet
        order: Sequence[int] = range(len(requests))
        if reorder:
            order = sorted(order, key=lambda k: self._size_key(requests[k]), reverse=True)
        before: dict[int, tuple[int, Resources]] = {}
        results: list[Decision | NoCapacity | None] = [None] * len(requests)
        for k in order:
            request = requests[k]
            try:
                i, score, _ = self._choose(request, None)
            except NoCapacity as exc:
                results[k] = exc
                continue
            name = fleet.names[i]
            if i not in before:
                before[i] = (int(fleet.revision[i]), fleet.allocated(i))
            revision, base = before[i]
            results[k] = Decision(name, score, f"{name}: score {score:.3f}", request.resources,
                                  revision, base, request.group)
            fleet.allocate(name, request.resources, group=request.group)
        placed = sum(isinstance(r, Decision) for r in results)
        logger.info("batch placed %d of %d VMs (%d refused)", placed, len(requests),
                    len(requests) - placed)
        return [r for r in results if r is not None]

    def group_context(self, request: PlacementRequest) -> GroupContext | None:
        """The members of ``request``'s group as names and domain values (None without one)."""
        if request.group is None:
            return None
        fleet = self.fleet
        members = fleet.group_members(request.group)
        domains: dict[str, int] = {}
        if request.domain is not None:
            for i, count in members.items():
                value = fleet.label_of(i, request.domain)
                if value is not None:
                    domains[value] = domains.get(value, 0) + count
        return GroupContext({fleet.names[i]: c for i, c in members.items()}, domains)

    def score(self, request: PlacementRequest, group: GroupContext | None) -> ShardResult:
        """The best host of this (slice of the) fleet, or the per-filter counts if none fits."""
        try:
            i, best, _ = self._choose(request, group)
        except NoCapacity as exc:
            return ShardResult(None, _NEG_INF, 0, None, len(self.fleet), exc.details["removed"])
        fleet = self.fleet
        return ShardResult(fleet.names[i], best, int(fleet.revision[i]), fleet.allocated(i),
                           len(fleet), {})

    def feasible(self, request: PlacementRequest) -> BoolArray:
        """Which hosts (fleet columns) pass every hard filter for ``request``: state,
        constraints, capacity and a hard group rule; NoCapacity, saying why, if none does."""
        _, _, scores = self._choose(request, None)
        return np.asarray(scores > _NEG_INF)

    # -- internals --------------------------------------------------------------------------
    def _choose(self, request: PlacementRequest,
                group: GroupContext | None) -> tuple[int, float, FloatArray]:
        if not len(self.fleet):
            raise explain.no_capacity(0, {}, request)
        shape = self._shape_for(request)
        scores = shape.scores
        penalty = self._constraints(request)
        if penalty is not None:
            scores = scores + penalty
        members: FloatArray | None = None
        labelled: BoolArray | None = None
        if request.group is not None:
            members, labelled = self._members(request, group)
            if request.hard:
                rule = filters.group(members, request.affinity, labelled)
                scores = np.where(rule, scores, _NEG_INF)
            elif shape.group_weight > 0:
                g = weighers.group(members, request.affinity)
                scores = (scores + shape.group_weight * g) / (1.0 + shape.group_weight)
        i = int(scores.argmax())
        best = float(scores[i])
        if best == _NEG_INF:
            raise self._refusal(request, shape, members, labelled)
        return i, best, scores

    def _shape_for(self, request: PlacementRequest) -> _Shape:
        """The request's class scores, patched for the hosts changed since their last use."""
        key = request.shape_key()
        fleet = self.fleet
        shape = self._shapes.get(key)
        if shape is None or shape.epoch != fleet.epoch:
            shape = self._compile(request)
            self._shapes[key] = shape
            limit = max(8, _CACHE_BYTES // (16 * max(len(fleet), 1)))
            while len(self._shapes) > limit:
                self._shapes.popitem(last=False)
        else:
            self._shapes.move_to_end(key)
        if shape.seq != fleet.seq:
            stale = shape.seq < 0 or (fleet.seq - shape.seq) * _PATCH_FRACTION > len(fleet)
            changed = None if stale else fleet.changes_since(shape.seq)
            if changed is None:
                shape.scores = self._evaluate(shape, None)
            elif len(changed) <= _SCALAR_PATCH:
                for i in changed.tolist():
                    shape.scores[i] = self._score_one(shape, i)
            else:
                shape.scores[changed] = self._evaluate(shape, changed)
            shape.seq = fleet.seq
        return shape

    def _score_one(self, shape: _Shape, i: int) -> float:
        """Host ``i``'s score in plain floats; equal to :meth:`_evaluate`'s, only cheaper."""
        f = self.fleet
        d = shape.demand_list
        free = f.free[:, i].tolist()
        if any(free[k] < d[k] - filters.EPSILON for k in range(len(d))):
            return _NEG_INF
        return weighers.one_host(
            float(shape.static_term[i]), d, shape.weights, alloc=f.alloc[:, i].tolist(),
            inv_limit=f.inv_limit[:, i].tolist(), free_frac=f.free_frac[:, i].tolist(),
            free_norm=float(f.free_norm[i]), absent_big=f.absent_big[:, i].tolist(),
            inv_dims=float(f.inv_dims[i]), in_use=bool(f.in_use[i]), size=float(f.size[i]),
            vm_count=float(f.vm_count[i]), load=float(f.load[i]))

    def _constraints(self, request: PlacementRequest) -> FloatArray | None:
        """0 for the hosts the request's constraints allow, -inf for the others (None: all
        allowed); cached by constraint class."""
        fleet = self.fleet
        key = request.constraint_key()
        if key == _UNCONSTRAINED and not fleet.dedicated.any():
            return None
        cached = self._masks.get(key)
        if cached is not None and cached[0] == fleet.epoch:
            self._masks.move_to_end(key)
            return cached[1]
        mask = np.ones(len(fleet), dtype=np.bool_)
        for _, passes in explain.constraint_chain(fleet, request):
            mask &= passes
        penalty = np.where(mask, 0.0, _NEG_INF)
        self._masks[key] = (fleet.epoch, penalty)
        while len(self._masks) > max(8, _MASK_BYTES // (8 * max(len(fleet), 1))):
            self._masks.popitem(last=False)
        return penalty

    def _compile(self, request: PlacementRequest) -> _Shape:
        fleet = self.fleet
        demand = demand_vector(request.resources)
        w = resolve_weights(self.weights, request.weights)
        total = sum(w[k] for k in WEIGHER_NAMES if k != "group")
        scale = 1.0 / total if total > 0 else 0.0
        up = np.ones(len(fleet), dtype=np.bool_)
        for _, passes in explain.state_chain(fleet) + explain.instance_chain(fleet, demand):
            up &= passes
        static_term = np.where(up, 0.0, _NEG_INF)
        if w["cost"] > 0:
            price = weighers.vm_price(demand, fleet.inv_limit, fleet.cost_per_hour,
                                      fleet.is_cloud, fleet.type_host, fleet.type_size,
                                      fleet.type_price)
            static_term += w["cost"] * scale * weighers.cost(price, self.cost_reference)
        dynamic = tuple((k, w[k] * scale) for k in _DYNAMIC if w[k] > 0)
        group_weight = w["group"] * scale if total > 0 else w["group"]
        return _Shape(demand, dynamic, group_weight, static_term, fleet.epoch)

    def _weigh(self, shape: _Shape, idx: IntArray | None) -> tuple[BoolArray,
                                                                 list[tuple[str, float,
                                                                            FloatArray]]]:
        """Capacity fit and each dynamic weigher's scores, on all hosts or those in ``idx``."""
        f = self.fleet
        if idx is None:
            free, alloc, inv = f.free, f.alloc, f.inv_limit
        else:
            free, alloc, inv = f.free[:, idx], f.alloc[:, idx], f.inv_limit[:, idx]
        d = shape.demand
        ok = filters.capacity(free, d)
        parts: list[tuple[str, float, FloatArray]] = []
        util: FloatArray | None = None
        for name, weight in shape.weights:
            if name in ("binpack", "stranded") and util is None:
                util = weighers.post_utilisation(alloc, inv, d)
            if name == "binpack":
                assert util is not None
                inv_dims, in_use, size = ((f.inv_dims, f.in_use, f.size) if idx is None
                                          else (f.inv_dims[idx], f.in_use[idx], f.size[idx]))
                values = weighers.binpack(util, inv_dims, in_use, size)
            elif name == "stranded":
                assert util is not None
                absent = f.absent_big if idx is None else f.absent_big[:, idx]
                values = weighers.stranded(util, absent)
            elif name == "tetris":
                frac, norm = ((f.free_frac, f.free_norm) if idx is None
                              else (f.free_frac[:, idx], f.free_norm[idx]))
                values = weighers.tetris(d, inv, frac, norm)
            elif name == "spread":
                values = weighers.spread(f.vm_count if idx is None else f.vm_count[idx])
            else:
                values = weighers.least_loaded(f.load if idx is None else f.load[idx])
            parts.append((name, weight, values))
        return ok, parts

    def _evaluate(self, shape: _Shape, idx: IntArray | None) -> FloatArray:
        ok, parts = self._weigh(shape, idx)
        total = (shape.static_term if idx is None else shape.static_term[idx]).copy()
        for _, weight, values in parts:
            total += weight * values
        return np.where(ok, total, _NEG_INF)

    def _breakdown(self, request: PlacementRequest, i: int) -> dict[str, float]:
        """Each weigher's score (not weighted) for host ``i``."""
        shape = self._shape_for(request)
        idx = np.array([i], dtype=np.intp)
        _, parts = self._weigh(shape, idx)
        out = {name: float(values[0]) for name, _, values in parts}
        w = resolve_weights(self.weights, request.weights)
        if w["cost"] > 0:
            total = sum(w[k] for k in WEIGHER_NAMES if k != "group")
            out["cost"] = float(shape.static_term[i]) / (w["cost"] / total)
        return out

    def _members(self, request: PlacementRequest,
                 group: GroupContext | None) -> tuple[FloatArray, BoolArray | None]:
        """Group members on each host (or in its failure domain), and which hosts are labelled."""
        fleet = self.fleet
        n = len(fleet)
        assert request.group is not None
        if group is None:
            own = fleet.group_members(request.group)
            hosts = np.fromiter(own.keys(), dtype=np.intp, count=len(own))
            counts = np.fromiter(own.values(), dtype=np.float64, count=len(own))
        else:
            known = [(fleet.index[h], c) for h, c in group.hosts.items() if h in fleet.index]
            hosts = np.array([i for i, _ in known], dtype=np.intp)
            counts = np.array([c for _, c in known], dtype=np.float64)
        if request.domain is None:
            return filters.host_counts(n, hosts, counts), None
        codes = fleet.label_codes.get(request.domain)
        if codes is None:
            return np.zeros(n), np.zeros(n, dtype=np.bool_)
        if group is None:
            member_codes = codes[hosts].astype(np.intp)
            keep = member_codes >= 0
            member_codes, counts = member_codes[keep], counts[keep]
        else:
            values = fleet.label_values[request.domain]
            known_d = [(values[v], c) for v, c in group.domains.items() if v in values]
            member_codes = np.array([code for code, _ in known_d], dtype=np.intp)
            counts = np.array([c for _, c in known_d], dtype=np.float64)
        return filters.domain_counts(codes, member_codes, counts), codes >= 0

    def _refusal(self, request: PlacementRequest, shape: _Shape, members: FloatArray | None,
                 labelled: BoolArray | None) -> NoCapacity:
        fleet = self.fleet
        chain = explain.static_chain(fleet, request, shape.demand)
        chain += explain.capacity_chain(fleet.free, shape.demand)
        if members is not None and request.hard:
            chain += explain.group_chain(request, members, labelled)
        error = explain.no_capacity(len(fleet), explain.removals(chain, len(fleet)), request)
        logger.debug("no capacity: %s", error.message)
        return error

    def _size_key(self, request: PlacementRequest) -> tuple[float, float, int, int, int]:
        """Sort key of a batch: dominant share of the average host, then the shape."""
        fleet = self.fleet
        if self._mean_limit_epoch != fleet.epoch:
            mean = fleet.limit.mean(axis=1) if len(fleet) else np.zeros(4)
            self._inv_mean_limit = np.divide(1.0, mean, out=np.zeros_like(mean), where=mean > 0)
            self._mean_limit_epoch = fleet.epoch
        r = request.resources
        share = float((demand_vector(r) * self._inv_mean_limit).max())
        return (share, r.cpus, r.memory_mib, r.disk_gib, r.gpus)


def merge_shards(results: Sequence[ShardResult], request: PlacementRequest) -> Decision:
    """The best of several slices' results; NoCapacity (with summed counts) if none fits."""
    hosts = sum(r.hosts for r in results)
    best: ShardResult | None = None
    for r in results:
        if r.host is not None and (best is None or r.score > best.score):
            best = r
    if best is None or best.host is None or best.allocated is None:
        removed: dict[str, int] = {}
        for r in results:
            for reason, count in r.removed.items():
                removed[reason] = removed.get(reason, 0) + count
        raise explain.no_capacity(hosts, removed, request)
    return Decision(best.host, best.score, f"{best.host}: score {best.score:.3f}",
                    request.resources, best.revision, best.allocated, request.group)


def select_host(request: PlacementRequest, hosts: Sequence[Host],
                vms_by_host: Mapping[str, Sequence[VMPlacementInfo]] | None = None) -> Host:
    """The simple case: the best of ``hosts`` for ``request`` (NoCapacity if none fits)."""
    decision = PlacementEngine.from_hosts(hosts, vms_by_host).place(request, explain=False)
    return next(h for h in hosts if h.name == decision.host)

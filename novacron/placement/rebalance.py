"""Rebalancing proposals (DRS-like): which VMs to move so no host runs hot and hosts even out.

Pure: works on a :class:`~novacron.placement.engine.PlacementEngine` built for the purpose (each
proposed move is applied to it, so the next one sees it). ``novacron.rebalancing`` turns the
proposals into migrations.

A host's *utilisation* is its dominant share of CPU and memory: the larger of the two allocated
over its limit (capacity after overcommit). The *score* of the fleet is the variance of the up
hosts' utilisation plus the mean squared excess over ``threshold``, so a move that cools a hot
host gains more than one that only evens two cool ones. A host is a *source* when it is hot (above
``threshold``) or imbalanced (more than ``tolerance`` above the mean). Greedy: each step looks at
the VMs of the hottest sources, asks the engine which hosts their hard filters allow (the source
excluded: capacity, state, labels, tenant, hard group rules), takes the single move that lowers
the score most, applies it and repeats until the budget is spent or no move gains ``min_gain``.
A move never targets a host the hard filters forbid, and the score falls with every move, so
rounds do not undo each other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from novacron.errors import NoCapacity
from novacron.placement.engine import PlacementEngine
from novacron.placement.fleet import BoolArray, FloatArray, HostFleet, demand_vector
from novacron.placement.request import PlacementRequest

__all__ = ["Balance", "Movable", "Move", "Proposal", "RebalanceConfig", "balance", "propose",
           "utilisation"]

log = logging.getLogger("novacron.placement.rebalance")

_CPU, _MEM = 0, 1  # rows of the fleet's resource arrays (fleet.DIMS)


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """When a host needs relief and how much one round may do."""

    threshold: float = 0.85  # a host whose CPU or memory share exceeds this is hot
    tolerance: float = 0.15  # a host more than this above the mean share is imbalanced
    max_moves: int = 4  # moves per round at most
    min_gain: float = 0.001  # a move must lower the score at least this much
    max_sources: int = 4  # hottest hosts looked at per step
    max_candidates: int = 64  # largest VMs looked at per source per step


@dataclass(frozen=True, slots=True)
class Movable:
    """A VM the rebalancer may move: where it is, how it is placed, how it would move."""

    vm_id: str
    name: str
    host: str
    request: PlacementRequest  # its placement rules (hosts it must not go to in exclude_hosts)
    mode: str = "live"


@dataclass(frozen=True, slots=True)
class Move:
    """One proposed migration, why, and the utilisation of both hosts before and after."""

    vm_id: str
    name: str
    source: str
    target: str
    mode: str
    reason: str
    gain: float
    source_share: tuple[float, float]
    target_share: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm_id, "name": self.name, "source": self.source,
                "target": self.target, "mode": self.mode, "reason": self.reason,
                "gain": round(self.gain, 6),
                "source_share": [round(x, 4) for x in self.source_share],
                "target_share": [round(x, 4) for x in self.target_share]}


@dataclass(frozen=True, slots=True)
class Balance:
    """How even the up hosts are: their mean, spread and peak utilisation, the hot ones, and
    the score the rebalancer lowers."""

    hosts: int
    mean: float
    stdev: float
    peak: float
    hot: tuple[str, ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "mean": round(self.mean, 4), "stdev": round(self.stdev, 4),
                "peak": round(self.peak, 4), "hot": list(self.hot),
                "score": round(self.score, 6)}


@dataclass(frozen=True, slots=True)
class Proposal:
    """The moves of one round, the balance before and after them, and notes on what could not
    be done (a hot host whose VMs fit nowhere, an exhausted budget...)."""

    moves: tuple[Move, ...]
    before: Balance
    after: Balance
    notes: tuple[str, ...]


def _shares(alloc: FloatArray, inv_limit: FloatArray) -> FloatArray:
    """Dominant CPU/memory share of each column of ``alloc`` (``(D, N)``)."""
    return np.asarray(np.maximum(alloc[_CPU] * inv_limit[_CPU], alloc[_MEM] * inv_limit[_MEM]))


def utilisation(fleet: HostFleet) -> FloatArray:
    """Each host's dominant share of CPU and memory (0 for a host with neither)."""
    return _shares(fleet.alloc, fleet.inv_limit)


def _scope(fleet: HostFleet, hosts: Collection[str] | None) -> BoolArray:
    """The up hosts among ``hosts`` (every up host when None)."""
    mask = np.asarray(fleet.state == 0)
    if hosts is not None:
        chosen = np.zeros(len(fleet), dtype=np.bool_)
        chosen[[fleet.index[h] for h in hosts if h in fleet.index]] = True
        mask &= chosen
    return mask


def _score(n: int, s1: float, s2: float, p: float) -> float:
    mean = s1 / n
    return max(0.0, s2 / n - mean * mean) + p / n


def balance(fleet: HostFleet, config: RebalanceConfig,
            hosts: Collection[str] | None = None) -> Balance:
    """The balance of the up hosts (of ``hosts`` when given)."""
    scope = _scope(fleet, hosts)
    u = utilisation(fleet)[scope]
    n = int(u.size)
    if n == 0:
        return Balance(0, 0.0, 0.0, 0.0, (), 0.0)
    excess = np.maximum(u - config.threshold, 0.0)
    names = [fleet.names[i] for i in np.flatnonzero(scope)]
    hot = tuple(name for name, x in zip(names, u.tolist(), strict=True) if x > config.threshold)
    score = _score(n, float(u.sum()), float((u * u).sum()), float((excess * excess).sum()))
    return Balance(n, float(u.mean()), float(u.std()), float(u.max()), hot, score)


def _why(fleet: HostFleet, i: int, u: float, mean: float, config: RebalanceConfig) -> str:
    name = fleet.names[i]
    if u > config.threshold:
        cpu = float(fleet.alloc[_CPU, i] * fleet.inv_limit[_CPU, i])
        dim = "cpus" if cpu >= u else "memory"
        return f"{name} is hot: {dim} at {u:.0%} of its limit (threshold {config.threshold:.0%})"
    return (f"{name} is at {u:.0%}, {(u - mean) * 100:.0f} points above the mean {mean:.0%} "
            f"(tolerance {config.tolerance * 100:.0f} points)")


def propose(engine: PlacementEngine, movable: Sequence[Movable], config: RebalanceConfig, *,
            slots: int | None = None, source_slots: Mapping[str, int] | None = None,
            hosts: Collection[str] | None = None) -> Proposal:
    """The moves of one round; each is applied to ``engine`` (pass one built for this).

    ``slots`` caps the moves (besides ``config.max_moves``), ``source_slots`` the moves out of
    each host (hosts not named: no cap), ``hosts`` the hosts balanced (default: all up hosts).
    """
    fleet = engine.fleet
    scope = _scope(fleet, hosts)
    before = balance(fleet, config, hosts)
    budget = min(config.max_moves, config.max_moves if slots is None else slots)
    left = dict(source_slots or {})
    by_host: dict[str, list[Movable]] = {}
    for m in movable:
        by_host.setdefault(m.host, []).append(m)
    notes: dict[str, str] = {}
    moves: list[Move] = []
    moved: set[str] = set()
    n = int(scope.sum())
    if n < 2:
        return Proposal((), before, before, (f"nothing to balance: {n} up host(s)",))
    while len(moves) < budget:
        u = utilisation(fleet)
        us = u[scope]
        mean = float(us.mean())
        hot = scope & ((u > config.threshold) | (u > mean + config.tolerance))
        sources = sorted(np.flatnonzero(hot).tolist(), key=lambda i: -u[i])
        if not sources:
            if not moves:
                notes["*"] = (f"balanced: no host above {config.threshold:.0%} or more than "
                              f"{config.tolerance * 100:.0f} points above the mean ({mean:.0%})")
            break
        excess = np.maximum(u - config.threshold, 0.0)
        s1, s2 = float(us.sum()), float((us * us).sum())
        p = float((excess[scope] ** 2).sum())
        score = _score(n, s1, s2, p)
        best: tuple[float, Movable, int, int, float, float] | None = None
        looked = 0
        for i in sources:
            name = fleet.names[i]
            if left.get(name, budget) <= 0:
                notes.setdefault(name, f"{name}: no migration slot free out of it")
                continue
            candidates = [m for m in by_host.get(name, ()) if m.vm_id not in moved]
            if not candidates:
                notes.setdefault(name, f"{name}: no VM that may move (running or stopped, "
                                       "settled, not migrating, not opted out)")
                continue
            looked += 1
            if looked > config.max_sources:
                break
            candidates.sort(key=lambda m: -float((demand_vector(m.request.resources)
                                                  * fleet.inv_limit[:, i]).max()))
            for m in candidates[:config.max_candidates]:
                request = dataclasses.replace(
                    m.request, exclude_hosts=m.request.exclude_hosts | {name})
                try:
                    ok = engine.feasible(request) & scope
                except NoCapacity as exc:
                    notes.setdefault(name, f"{name}: {m.name} fits nowhere else: {exc.message}")
                    continue
                if not ok.any():
                    continue
                d = demand_vector(m.request.resources)
                src_after = float(_shares(fleet.alloc[:, i:i + 1] - d[:, None],
                                          fleet.inv_limit[:, i:i + 1])[0])
                tgt_after = _shares(fleet.alloc + d[:, None], fleet.inv_limit)
                ex = excess[i]
                ex_after = max(src_after - config.threshold, 0.0)
                tgt_ex_after = np.maximum(tgt_after - config.threshold, 0.0)
                s1n = s1 - u[i] + src_after - u + tgt_after
                s2n = s2 - u[i] ** 2 + src_after ** 2 - u * u + tgt_after * tgt_after
                pn = p - ex ** 2 + ex_after ** 2 - excess * excess + tgt_ex_after * tgt_ex_after
                mean_n = s1n / n
                gain = score - (np.maximum(s2n / n - mean_n * mean_n, 0.0) + pn / n)
                gain = np.where(ok, gain, -np.inf)
                t = int(gain.argmax())
                if best is None or gain[t] > best[0]:
                    best = (float(gain[t]), m, i, t, src_after, float(tgt_after[t]))
        if best is None or best[0] < config.min_gain:
            if best is not None:
                notes["*"] = (f"no further move lowers the imbalance score by at least "
                              f"{config.min_gain:g} (best: {best[0]:.4g})")
            break
        gain, m, i, t, src_after, tgt_after_t = best
        source, target = fleet.names[i], fleet.names[t]
        moves.append(Move(m.vm_id, m.name, source, target, m.mode,
                          _why(fleet, i, float(u[i]), mean, config), gain,
                          (float(u[i]), src_after), (float(u[t]), tgt_after_t)))
        engine.release(source, m.request.resources, group=m.request.group)
        engine.allocate(target, m.request.resources, group=m.request.group)
        moved.add(m.vm_id)
        left[source] = left.get(source, budget) - 1
        log.debug("proposed: %s %s -> %s (gain %.4g)", m.name, source, target, gain)
    if len(moves) >= budget:
        u = utilisation(fleet)
        mean = float(u[scope].mean())
        if (scope & ((u > config.threshold) | (u > mean + config.tolerance))).any():
            notes["*"] = (f"stopped at this round's budget of {budget} move(s); the next round "
                          "may do more")
    after = balance(fleet, config, hosts)
    return Proposal(tuple(moves), before, after, tuple(notes.values()))

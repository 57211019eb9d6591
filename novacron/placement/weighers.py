"""Weighers: pure functions scoring every host in [0, 1] (higher is better) for one request.

Each score depends only on the host itself and the request, never on the other hosts, so cached
scores stay valid for every host that did not change. The engine combines them as a weighted mean
(:data:`novacron.placement.request.DEFAULT_WEIGHTS`). :func:`one_host` is the same arithmetic for
a single host in plain floats (bit-for-bit equal), to patch a cached vector cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from novacron.placement.filters import EPSILON
from novacron.placement.fleet import BoolArray, FloatArray, IntArray
from novacron.placement.request import Affinity

_BALANCED = [0, 1, 3]  # cpus, memory, gpus: the dimensions the stranded weigher balances

__all__ = [
    "binpack",
    "cost",
    "group",
    "least_loaded",
    "one_host",
    "post_utilisation",
    "spread",
    "stranded",
    "tetris",
    "vm_price",
]


def post_utilisation(alloc: FloatArray, inv_limit: FloatArray, demand: FloatArray) -> FloatArray:
    """``(D, N)``: each host's utilisation of each dimension once ``demand`` is placed on it
    (0 for a dimension the host lacks)."""
    return np.asarray((alloc + demand[:, None]) * inv_limit)


def binpack(util: FloatArray, inv_dims: FloatArray, in_use: BoolArray,
            size: FloatArray) -> FloatArray:
    """Best fit: hosts in use first, the fullest after placement; else the largest empty host.

    Hosts in use score 0.5 to 1 (0.5 plus half their mean utilisation after placement;
    ``inv_dims`` is 1 / the number of dimensions the host has), so an empty host is opened only
    when no host in use fits. Empty hosts score half their ``size`` relative to the fleet's
    largest (0 to 0.5): the largest is opened first, which leaves the fewest hosts in use.
    """
    return np.asarray(np.where(in_use, 0.5 + 0.5 * util.sum(axis=0) * inv_dims, 0.5 * size))


def tetris(demand: FloatArray, inv_limit: FloatArray, free_frac: FloatArray,
           free_norm: FloatArray) -> FloatArray:
    """Tetris alignment: cosine between the demand and the free capacity, both as fractions of
    the host's limit, so a CPU-heavy VM goes where mostly CPU is free."""
    want = demand[:, None] * inv_limit
    dot = (want * free_frac).sum(axis=0)
    norm = np.sqrt((want * want).sum(axis=0)) * free_norm
    return np.asarray(dot / (norm + EPSILON))


def stranded(util: FloatArray, absent_big: FloatArray) -> FloatArray:
    """Stranded-resource avoidance (Borg): don't leave one dimension full and another empty.

    1 minus the gap between the most and the least used of CPU, memory and GPUs after placement
    (a GPU host filled with CPU-only VMs strands its GPUs). Disk is left out: hosts often carry
    far more of it than VMs ask for, and it would then count as stranded on every host.
    ``absent_big`` is 0 for the dimensions a host has and >1 for those it lacks.
    """
    u = util[_BALANCED]
    return np.asarray(1.0 - (u.max(axis=0) - (u + absent_big[_BALANCED]).min(axis=0)))


def spread(vm_count: FloatArray) -> FloatArray:
    """Spread: hosts running fewer VMs first."""
    return np.asarray(1.0 / (1.0 + vm_count))


def least_loaded(load: FloatArray) -> FloatArray:
    """Least loaded: hosts with the lowest measured CPU load (0..1) first."""
    return np.asarray(1.0 - load)


def vm_price(demand: FloatArray, inv_limit: FloatArray, cost_per_hour: FloatArray,
             is_cloud: BoolArray, type_host: IntArray, type_size: FloatArray,
             type_price: FloatArray) -> FloatArray:
    """Hourly price of running ``demand`` on each host.

    On a cloud host the cheapest instance type that fits (inf if none); elsewhere the host's
    hourly cost times the VM's dominant share of the host. Instance types are listed host by
    host (``type_host`` grouped), as :class:`~novacron.placement.fleet.HostFleet` keeps them.
    """
    share = (demand[:, None] * inv_limit).max(axis=0)
    price = cost_per_hour * share
    if len(type_host):
        fits = (type_size >= demand[[0, 1, 3], None] - EPSILON).all(axis=0)
        starts = np.flatnonzero(np.r_[True, type_host[1:] != type_host[:-1]])
        cheapest = np.full(price.shape, np.inf)
        cheapest[type_host[starts]] = np.minimum.reduceat(np.where(fits, type_price, np.inf),
                                                          starts)
        price = np.where(is_cloud, cheapest, price)
    return np.asarray(price)


def cost(price: FloatArray, reference: float) -> FloatArray:
    """Cloud cost: ``reference / (reference + price)``, 1 for a free host, 0.5 at the reference
    hourly price, 0 where the VM cannot run (inf). Fixed scale, so slices of a fleet agree."""
    return np.asarray(np.where(np.isfinite(price), reference / (reference + price), 0.0))


def group(members: FloatArray, affinity: Affinity) -> FloatArray:
    """Soft group rule, from the members on each host (or in its domain).

    Anti-affinity: 1 / (1 + members). Affinity: 1 where members are, else 0 (all 1 while the
    group is empty).
    """
    if affinity is Affinity.ANTI_AFFINITY:
        return np.asarray(1.0 / (1.0 + members))
    if members.any():
        return np.asarray((members > 0).astype(np.float64))
    return np.ones(members.shape)


def one_host(total: float, demand: Sequence[float], weights: Sequence[tuple[str, float]], *,
             alloc: Sequence[float], inv_limit: Sequence[float], free_frac: Sequence[float],
             free_norm: float, absent_big: Sequence[float], inv_dims: float, in_use: bool,
             size: float, vm_count: float, load: float) -> float:
    """``total`` plus each weighted dynamic weigher for one host (its columns as floats).

    Every operation mirrors the vector functions above in the same order, so the result equals
    the vector one exactly; the engine relies on that when it patches a cached score vector.
    """
    dims = range(len(demand))
    util = [(alloc[k] + demand[k]) * inv_limit[k] for k in dims]
    for name, weight in weights:
        if name == "binpack":
            value = (0.5 + 0.5 * sum(util) * inv_dims) if in_use else 0.5 * size
        elif name == "stranded":
            value = 1.0 - (max(util[k] for k in _BALANCED)
                           - min(util[k] + absent_big[k] for k in _BALANCED))
        elif name == "tetris":
            want = [demand[k] * inv_limit[k] for k in dims]
            dot = sum(want[k] * free_frac[k] for k in dims)
            norm = math.sqrt(sum(w * w for w in want)) * free_norm
            value = dot / (norm + EPSILON)
        elif name == "spread":
            value = 1.0 / (1.0 + vm_count)
        else:
            value = 1.0 - load
        total += weight * value
    return total

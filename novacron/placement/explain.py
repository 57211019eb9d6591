"""Why hosts were ruled out: the filters in the order they run, each with the reason it gives.

A refused placement counts, for each reason, the hosts that filter removed among those every
earlier filter let through, so each host is counted once and the counts add up to the fleet::

    0/5000 hosts fit: 3120 insufficient memory, 1700 anti-affinity, 180 draining
"""

from __future__ import annotations

import numpy as np

from novacron.errors import NoCapacity
from novacron.placement import filters
from novacron.placement.fleet import STATES, BoolArray, FloatArray, HostFleet, IntArray
from novacron.placement.request import PlacementRequest

__all__ = [
    "Chain",
    "capacity_chain",
    "constraint_chain",
    "format_refusal",
    "group_chain",
    "instance_chain",
    "no_capacity",
    "removals",
    "state_chain",
    "static_chain",
]

Chain = list[tuple[str, BoolArray]]
"""Filters in order: (the reason a host fails it, which hosts pass)."""

_DIM_REASONS = ("insufficient cpus", "insufficient memory", "insufficient disk",
                "insufficient gpus")


def _indices(fleet: HostFleet, names: frozenset[str]) -> IntArray:
    return np.array(sorted(fleet.index[h] for h in names if h in fleet.index), dtype=np.intp)


def state_chain(fleet: HostFleet) -> Chain:
    """Hosts that are not up, one reason per state."""
    return [(STATES[c].value, filters.not_in_state(fleet.state, c)) for c in range(1, len(STATES))]


def constraint_chain(fleet: HostFleet, request: PlacementRequest) -> Chain:
    """The request's host constraints: excluded or pinned hosts, tenant, labels, capabilities."""
    n = len(fleet)
    chain: Chain = []
    if request.exclude_hosts:
        chain.append(("excluded", filters.excluded(n, _indices(fleet, request.exclude_hosts))))
    if request.host is not None:
        chain.append(("not the requested host", filters.pinned(n, fleet.index.get(request.host))))
    if request.allowed_hosts is not None or fleet.dedicated.any():
        accepting = fleet.tenant_hosts.get(request.tenant or "", np.empty(0, dtype=np.intp))
        allowed = (None if request.allowed_hosts is None
                   else _indices(fleet, request.allowed_hosts))
        chain.append(("tenant restriction", filters.tenant(fleet.dedicated, accepting, allowed)))
    if request.labels:
        chain.append(("label selector", filters.label_selector(
            fleet.label_codes, fleet.label_values, request.labels, n)))
    if request.capabilities:
        chain.append(("missing capability", filters.capabilities(
            fleet.capability_masks, request.capabilities, n)))
    return chain


def instance_chain(fleet: HostFleet, demand: FloatArray) -> Chain:
    """Cloud hosts offering no instance type that fits ``demand``."""
    if not fleet.is_cloud.any():
        return []
    return [("no instance type fits", filters.instance_type(
        fleet.is_cloud, fleet.type_host, fleet.type_size, demand))]


def static_chain(fleet: HostFleet, request: PlacementRequest, demand: FloatArray) -> Chain:
    """Every filter that does not depend on allocations, in order."""
    return state_chain(fleet) + constraint_chain(fleet, request) + instance_chain(fleet, demand)


def capacity_chain(free: FloatArray, demand: FloatArray) -> Chain:
    """One filter per dimension: enough of it free after overcommit."""
    by_dim = filters.capacity_by_dimension(free, demand)
    return [(reason, by_dim[d]) for d, reason in enumerate(_DIM_REASONS)]


def group_chain(request: PlacementRequest, members: FloatArray,
                labelled: BoolArray | None) -> Chain:
    """The hard group rule: hosts lacking the failure-domain label, then (anti-)affinity."""
    chain: Chain = []
    if labelled is not None:
        chain.append((f"missing {request.domain} label", labelled))
    chain.append((request.affinity.value, filters.group(members, request.affinity, None)))
    return chain


def removals(chain: Chain, n: int) -> dict[str, int]:
    """Hosts each filter removed among those the earlier ones let through (zeros omitted)."""
    alive = np.ones(n, dtype=np.bool_)
    removed: dict[str, int] = {}
    for reason, passes in chain:
        count = int(np.count_nonzero(alive & ~passes))
        if count:
            removed[reason] = removed.get(reason, 0) + count
            alive &= passes
    return removed


def format_refusal(hosts: int, removed: dict[str, int]) -> str:
    """``'0/5000 hosts fit: 3120 insufficient memory, 1700 anti-affinity, 180 draining'``."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in
                        sorted(removed.items(), key=lambda item: (-item[1], item[0])))
    return f"0/{hosts} hosts fit: {reasons or 'the fleet is empty'}"


def no_capacity(hosts: int, removed: dict[str, int], request: PlacementRequest) -> NoCapacity:
    """The NoCapacity error for a refused request."""
    r = request.resources
    return NoCapacity(format_refusal(hosts, removed), details={
        "hosts": hosts, "removed": dict(sorted(removed.items(), key=lambda item: -item[1])),
        "request": {"cpus": r.cpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib,
                    "gpus": r.gpus, "host": request.host, "group": request.group}})

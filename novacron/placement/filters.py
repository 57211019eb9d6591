"""Filters: pure functions from host columns to a mask of the hosts that pass (True = may host).

Each works on whole arrays (one entry per host) so a placement is a few vector operations; the
order they run in and the reason each gives live in :mod:`novacron.placement.explain`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from numpy.typing import NDArray

from novacron.placement.fleet import BoolArray, FloatArray, IntArray
from novacron.placement.request import Affinity

__all__ = [
    "EPSILON",
    "capabilities",
    "capacity",
    "capacity_by_dimension",
    "domain_counts",
    "excluded",
    "group",
    "host_counts",
    "instance_type",
    "label_selector",
    "not_in_state",
    "pinned",
    "tenant",
]

EPSILON = 1e-9
"""Slack in capacity comparisons, so float sums of fractional CPUs never refuse an exact fit."""


def not_in_state(state: NDArray[np.int8], code: int) -> BoolArray:
    """Hosts whose state is not the one coded ``code`` (codes: :data:`fleet.STATES`)."""
    return np.asarray(state != code)


def pinned(n: int, index: int | None) -> BoolArray:
    """Only host ``index`` passes; no host does when the requested host is unknown (None)."""
    mask = np.zeros(n, dtype=np.bool_)
    if index is not None:
        mask[index] = True
    return mask


def excluded(n: int, indices: IntArray) -> BoolArray:
    """Every host but ``indices``."""
    mask = np.ones(n, dtype=np.bool_)
    mask[indices] = False
    return mask


def tenant(dedicated: BoolArray, accepting: IntArray, allowed: IntArray | None) -> BoolArray:
    """Hosts the tenant may use: shared hosts and those dedicated to it (``accepting``), and,
    when the tenant is restricted to ``allowed`` hosts, only those."""
    mask = ~dedicated
    mask[accepting] = True
    if allowed is not None:
        only = np.zeros_like(mask)
        only[allowed] = True
        mask &= only
    return mask


def label_selector(codes: Mapping[str, NDArray[np.int32]], values: Mapping[str, Mapping[str, int]],
                   selector: Mapping[str, str | Collection[str]], n: int) -> BoolArray:
    """Hosts whose label ``key`` has the selected value (or one of them) for every key.

    ``codes[key]`` holds each host's value code (-1 when unlabelled); ``values[key]`` maps a
    value to its code.
    """
    mask = np.ones(n, dtype=np.bool_)
    for key, wanted in selector.items():
        known = values.get(key, {})
        want = [known[v] for v in ([wanted] if isinstance(wanted, str) else wanted) if v in known]
        if not want:
            return np.zeros(n, dtype=np.bool_)
        mask &= np.isin(codes[key], want)
    return mask


def capabilities(masks: Mapping[str, BoolArray], required: Collection[str], n: int) -> BoolArray:
    """Hosts whose driver has every ``required`` capability (``masks[cap]``: hosts having it)."""
    mask = np.ones(n, dtype=np.bool_)
    for cap in required:
        have = masks.get(cap)
        if have is None:
            return np.zeros(n, dtype=np.bool_)
        mask &= have
    return mask


def instance_type(is_cloud: BoolArray, type_host: IntArray, type_size: FloatArray,
                  demand: FloatArray) -> BoolArray:
    """Non-cloud hosts, and cloud hosts offering an instance type at least as big as ``demand``.

    ``type_size`` is ``(3, M)``: cpus, memory_mib and gpus of each of the M instance types;
    ``type_host`` the host offering each.
    """
    mask = ~is_cloud
    fits = (type_size >= demand[[0, 1, 3], None] - EPSILON).all(axis=0)
    mask[type_host[fits]] = True
    return mask


def capacity(free: FloatArray, demand: FloatArray) -> BoolArray:
    """Hosts with at least ``demand`` free in every dimension (``free`` is ``(D, N)``)."""
    return np.asarray((free >= demand[:, None] - EPSILON).all(axis=0))


def capacity_by_dimension(free: FloatArray, demand: FloatArray) -> BoolArray:
    """``(D, N)``: whether each host has enough of each dimension free."""
    return np.asarray(free >= demand[:, None] - EPSILON)


def host_counts(n: int, hosts: IntArray, counts: FloatArray) -> FloatArray:
    """Group members per host, from the hosts holding members and how many each holds."""
    per_host = np.zeros(n)
    per_host[hosts] = counts
    return per_host


def domain_counts(codes: NDArray[np.int32], member_codes: IntArray,
                  counts: FloatArray) -> FloatArray:
    """Group members in each host's failure domain (0 for unlabelled hosts, code -1)."""
    per_code = np.zeros(int(max(codes.max(initial=-1), member_codes.max(initial=-1))) + 2)
    np.add.at(per_code, member_codes, counts)
    return per_code[codes]  # code -1 reads the last slot, which stays 0


def group(members: FloatArray, affinity: Affinity, labelled: BoolArray | None) -> BoolArray:
    """Hard group rule, given the group's members on each host (or in each host's domain).

    Anti-affinity: hosts (domains) holding no member. Affinity: hosts (domains) holding one, or
    every host while the group has no member yet. With a failure domain, only labelled hosts.
    """
    if affinity is Affinity.ANTI_AFFINITY:
        mask = members == 0
    elif members.any():
        mask = members > 0
    else:
        mask = np.ones(members.shape, dtype=np.bool_)
    if labelled is not None:
        mask &= labelled
    return np.asarray(mask)

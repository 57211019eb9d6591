"""Each placement filter on its own: pure functions over host arrays."""

from __future__ import annotations

import numpy as np
import pytest

from novacron.placement import filters
from novacron.placement.request import Affinity


def ix(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.intp)


def test_not_in_state_removes_hosts_of_that_state() -> None:
    state = np.array([0, 1, 2, 3, 1], dtype=np.int8)
    assert filters.not_in_state(state, 1).tolist() == [True, False, True, True, False]


def test_pinned_keeps_only_the_requested_host_or_none_when_unknown() -> None:
    assert filters.pinned(3, 1).tolist() == [False, True, False]
    assert not filters.pinned(3, None).any()


def test_excluded_removes_the_listed_hosts() -> None:
    assert filters.excluded(4, ix(0, 2)).tolist() == [False, True, False, True]
    assert filters.excluded(2, ix()).all()


def test_tenant_keeps_shared_hosts_and_hosts_dedicated_to_the_tenant() -> None:
    dedicated = np.array([False, True, True, False])
    assert filters.tenant(dedicated, ix(2), None).tolist() == [True, False, True, True]
    assert filters.tenant(dedicated, ix(), None).tolist() == [True, False, False, True]


def test_tenant_restricted_to_allowed_hosts() -> None:
    dedicated = np.array([False, True, False, False])
    assert filters.tenant(dedicated, ix(), ix(1, 3)).tolist() == [False, False, False, True]


def test_label_selector_matches_values_and_value_sets() -> None:
    codes = {"zone": np.array([0, 1, 0, -1], dtype=np.int32),
             "ssd": np.array([0, 0, -1, 0], dtype=np.int32)}
    values = {"zone": {"a": 0, "b": 1}, "ssd": {"true": 0}}
    assert filters.label_selector(codes, values, {"zone": "a"}, 4).tolist() == [
        True, False, True, False]
    assert filters.label_selector(codes, values, {"zone": ["a", "b"], "ssd": "true"},
                                  4).tolist() == [True, True, False, False]


@pytest.mark.parametrize("selector", [{"zone": "nowhere"}, {"rack": "r1"}, {"zone": []}])
def test_label_selector_with_unknown_key_or_value_matches_nothing(
        selector: dict[str, object]) -> None:
    codes = {"zone": np.array([0, 1], dtype=np.int32)}
    values = {"zone": {"a": 0, "b": 1}}
    assert not filters.label_selector(codes, values, selector, 2).any()  # type: ignore[arg-type]


def test_capabilities_requires_every_capability() -> None:
    masks = {"live_migration": np.array([True, False, True]),
             "snapshot": np.array([True, True, False])}
    assert filters.capabilities(masks, {"live_migration", "snapshot"}, 3).tolist() == [
        True, False, False]
    assert filters.capabilities(masks, set(), 3).all()
    assert not filters.capabilities(masks, {"teleport"}, 3).any()


def test_instance_type_checks_cloud_hosts_only() -> None:
    is_cloud = np.array([False, True, True])
    type_host = ix(1, 1, 2)
    type_size = np.array([[2, 16, 4], [8192, 65536, 16384], [0, 0, 0]], dtype=np.float64)
    small = np.array([2.0, 4096, 10, 0])
    big = np.array([8.0, 32768, 10, 0])
    gpu = np.array([2.0, 4096, 10, 1])
    assert filters.instance_type(is_cloud, type_host, type_size, small).tolist() == [
        True, True, True]
    assert filters.instance_type(is_cloud, type_host, type_size, big).tolist() == [
        True, True, False]
    assert filters.instance_type(is_cloud, type_host, type_size, gpu).tolist() == [
        True, False, False]


def test_capacity_needs_every_dimension_and_accepts_an_exact_fit() -> None:
    free = np.array([[4.0, 4.0, 0.1 + 0.2], [1024, 512, 1024], [10, 10, 10], [0, 0, 0]])
    demand = np.array([4.0, 1024, 10, 0])
    assert filters.capacity(free, demand).tolist() == [True, False, False]
    assert filters.capacity(free, np.array([0.3, 1024, 10, 0])).tolist() == [True, False, True]
    by_dim = filters.capacity_by_dimension(free, demand)
    assert by_dim[:, 1].tolist() == [True, False, True, True]


def test_host_and_domain_counts() -> None:
    assert filters.host_counts(4, ix(1, 3), np.array([2.0, 1.0])).tolist() == [0, 2, 0, 1]
    codes = np.array([0, 1, 0, -1, 2], dtype=np.int32)
    counts = filters.domain_counts(codes, ix(0), np.array([3.0]))
    assert counts.tolist() == [3, 0, 3, 0, 0]


def test_group_anti_affinity_avoids_members() -> None:
    members = np.array([0.0, 1.0, 0.0])
    assert filters.group(members, Affinity.ANTI_AFFINITY, None).tolist() == [True, False, True]
    labelled = np.array([True, True, False])
    assert filters.group(members, Affinity.ANTI_AFFINITY, labelled).tolist() == [
        True, False, False]


def test_group_affinity_joins_members_or_goes_anywhere_first() -> None:
    assert filters.group(np.array([0.0, 2.0, 0.0]), Affinity.AFFINITY, None).tolist() == [
        False, True, False]
    assert filters.group(np.zeros(3), Affinity.AFFINITY, None).all()

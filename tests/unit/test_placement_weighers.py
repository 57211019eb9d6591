"""Each placement weigher on its own: pure functions over host arrays, scores in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.placement import weighers
from novacron.placement.request import Affinity

DIMS = 4


def columns(limit: Sequence[Sequence[float]],
            alloc: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """The derived columns the engine keeps, for hosts given as rows of (cpus, mem, disk, gpus)."""
    lim = np.array(limit, dtype=np.float64).T
    al = np.array(alloc, dtype=np.float64).T
    present = lim > 0
    inv = np.divide(1.0, lim, out=np.zeros_like(lim), where=present)
    free_frac = (lim - al) * inv
    return {"limit": lim, "alloc": al, "inv": inv, "free_frac": free_frac,
            "free_norm": np.sqrt((free_frac * free_frac).sum(axis=0)),
            "absent": np.where(present, 0.0, 2.0),
            "inv_dims": 1.0 / np.maximum(present.sum(axis=0), 1)}


def test_post_utilisation_counts_the_new_vm() -> None:
    c = columns([[10, 100, 10, 0]], [[5, 50, 0, 0]])
    util = weighers.post_utilisation(c["alloc"], c["inv"], np.array([1.0, 10, 5, 0]))
    assert util[:, 0].tolist() == pytest.approx([0.6, 0.6, 0.5, 0.0])


def test_binpack_prefers_hosts_in_use_then_the_fullest_then_the_largest_empty() -> None:
    c = columns([[10, 100, 10, 0]] * 3 + [[20, 200, 20, 0]],
                [[8, 80, 8, 0], [2, 20, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    d = np.array([1.0, 10, 1, 0])
    util = weighers.post_utilisation(c["alloc"], c["inv"], d)
    in_use = np.array([True, True, False, False])
    size = np.array([0.5, 0.5, 0.5, 1.0])
    score = weighers.binpack(util, c["inv_dims"], in_use, size)
    assert score[0] > score[1] > score[3] > score[2]
    assert ((score >= 0) & (score <= 1)).all()


def test_tetris_prefers_free_capacity_aligned_with_the_demand() -> None:
    # Host 0 has mostly CPU free, host 1 mostly memory: a CPU-heavy VM aligns with host 0.
    c = columns([[10, 100, 10, 0]] * 2, [[1, 90, 5, 0], [9, 10, 5, 0]])
    score = weighers.tetris(np.array([4.0, 5, 0, 0]), c["inv"], c["free_frac"], c["free_norm"])
    assert score[0] > score[1]
    assert score.min() >= 0
    assert score.max() <= 1 + 1e-9


def test_stranded_prefers_balanced_use_and_ignores_dimensions_a_host_lacks() -> None:
    c = columns([[10, 100, 10, 0], [10, 100, 10, 0]], [[5, 50, 5, 0], [9, 10, 1, 0]])
    util = weighers.post_utilisation(c["alloc"], c["inv"], np.array([1.0, 10, 1, 0]))
    score = weighers.stranded(util, c["absent"])
    assert score[0] == pytest.approx(1.0)  # all three dimensions at 60%, no GPUs to strand
    assert score[1] == pytest.approx(1.0 - (1.0 - 0.2))


def test_stranded_penalises_leaving_gpus_idle() -> None:
    c = columns([[10, 100, 10, 4]], [[8, 80, 8, 0]])
    util = weighers.post_utilisation(c["alloc"], c["inv"], np.array([1.0, 10, 1, 0]))
    assert weighers.stranded(util, c["absent"])[0] == pytest.approx(0.1)


def test_spread_and_least_loaded() -> None:
    assert weighers.spread(np.array([0.0, 1.0, 3.0])).tolist() == [1.0, 0.5, 0.25]
    assert weighers.least_loaded(np.array([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]


def test_vm_price_uses_dominant_share_on_premises_and_cheapest_fitting_instance_in_cloud() -> None:
    c = columns([[10, 100, 10, 0], [64, 256, 100, 0], [64, 256, 100, 0]], [[0] * 4] * 3)
    price = weighers.vm_price(
        np.array([2.0, 50, 1, 0]), c["inv"], np.array([4.0, 0.0, 0.0]),
        is_cloud=np.array([False, True, True]), type_host=np.array([1, 1, 2], dtype=np.intp),
        type_size=np.array([[2, 4, 1], [64, 128, 32], [0, 0, 0]], dtype=np.float64),
        type_price=np.array([0.5, 0.2, 0.1]))
    assert price.tolist() == pytest.approx([4.0 * 0.5, 0.2, np.inf])


def test_cost_is_scaled_by_the_reference_price() -> None:
    score = weighers.cost(np.array([0.0, 1.0, 3.0, np.inf]), 1.0)
    assert score.tolist() == [1.0, 0.5, 0.25, 0.0]


def test_group_soft_scores() -> None:
    members = np.array([0.0, 1.0, 3.0])
    assert weighers.group(members, Affinity.ANTI_AFFINITY).tolist() == [1.0, 0.5, 0.25]
    assert weighers.group(members, Affinity.AFFINITY).tolist() == [0.0, 1.0, 1.0]
    assert weighers.group(np.zeros(2), Affinity.AFFINITY).tolist() == [1.0, 1.0]


WEIGHTS = (("binpack", 0.5), ("tetris", 0.2), ("stranded", 0.15), ("spread", 0.1),
           ("least_loaded", 0.05))
amount = st.floats(min_value=0, max_value=1e6)
capacity = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e6))


@settings(max_examples=150, deadline=None)
@given(limit=st.lists(capacity, min_size=DIMS, max_size=DIMS),
       used=st.lists(st.floats(0, 1), min_size=DIMS, max_size=DIMS),
       demand=st.lists(amount, min_size=DIMS, max_size=DIMS),
       in_use=st.booleans(), size=st.floats(0, 1), vm_count=st.integers(0, 50),
       load=st.floats(0, 1), static=st.floats(-1, 1))
def test_one_host_equals_the_vector_weighers_exactly(
        limit: list[float], used: list[float], demand: list[float], in_use: bool, size: float,
        vm_count: int, load: float, static: float) -> None:
    c = columns([limit], [[lim * u for lim, u in zip(limit, used, strict=True)]])
    d = np.array(demand)
    util = weighers.post_utilisation(c["alloc"], c["inv"], d)
    vector = {
        "binpack": weighers.binpack(util, c["inv_dims"], np.array([in_use]), np.array([size])),
        "tetris": weighers.tetris(d, c["inv"], c["free_frac"], c["free_norm"]),
        "stranded": weighers.stranded(util, c["absent"]),
        "spread": weighers.spread(np.array([float(vm_count)])),
        "least_loaded": weighers.least_loaded(np.array([load])),
    }
    total = np.array([static])
    for name, weight in WEIGHTS:
        total += weight * vector[name]
    scalar = weighers.one_host(
        static, demand, WEIGHTS, alloc=c["alloc"][:, 0].tolist(),
        inv_limit=c["inv"][:, 0].tolist(), free_frac=c["free_frac"][:, 0].tolist(),
        free_norm=float(c["free_norm"][0]), absent_big=c["absent"][:, 0].tolist(),
        inv_dims=float(c["inv_dims"][0]), in_use=in_use, size=size, vm_count=float(vm_count),
        load=load)
    assert scalar == float(total[0])

"""PCK: closed-form cases, aggregation by hand, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scot_ot.datasets import Pair
from scot_ot.evaluation import (
    DEFAULT_ALPHAS,
    PCKAccumulator,
    keypoint_errors,
    pck_per_pair,
    summarize_pck,
)


def test_default_alphas():
    assert DEFAULT_ALPHAS == (0.05, 0.10, 0.15)


def test_exact_prediction_is_all_correct():
    gt = np.array([[10.0, 20.0], [30.0, 40.0], [0.0, 0.0]])
    assert pck_per_pair(gt.copy(), gt, threshold=50.0) == {0.05: 1.0, 0.10: 1.0, 0.15: 1.0}


def test_just_inside_and_just_outside_threshold():
    # threshold 100, alpha 0.1 -> radius 10 exactly (0.1 * 100 == 10.0 in float64)
    gt = np.zeros((2, 2))
    inside = np.array([[10.0, 0.0], [0.0, np.nextafter(10.0, 0.0)]])
    outside = np.array([[np.nextafter(10.0, 20.0), 0.0], [0.0, 10.5]])
    assert pck_per_pair(inside, gt, 100.0, alphas=[0.1]) == {0.1: 1.0}
    assert pck_per_pair(outside, gt, 100.0, alphas=[0.1]) == {0.1: 0.0}


def test_distance_is_euclidean_and_fractions_per_alpha():
    gt = np.zeros((4, 2))
    pred = np.array([[3.0, 4.0], [6.0, 8.0], [9.0, 12.0], [30.0, 40.0]])  # distances 5, 10, 15, 50
    np.testing.assert_array_equal(keypoint_errors(pred, gt), [5.0, 10.0, 15.0, 50.0])
    got = pck_per_pair(pred, gt, threshold=100.0)
    assert got == {0.05: 0.25, 0.10: 0.5, 0.15: 0.75}
    assert pck_per_pair(pred, gt, threshold=100.0, alphas=[0.5, 0.01]) == {0.5: 1.0, 0.01: 0.0}


def test_accepts_torch_tensors():
    gt = torch.zeros(2, 2)
    pred = torch.tensor([[1.0, 0.0], [5.0, 0.0]], requires_grad=True)
    assert pck_per_pair(pred, gt, threshold=20.0, alphas=[0.1]) == {0.1: 0.5}


@pytest.mark.parametrize(
    "pred, gt, threshold, match",
    [
        (np.zeros((3,)), np.zeros((3, 2)), 1.0, "pred must have shape"),
        (np.zeros((3, 2)), np.zeros((3, 3)), 1.0, "gt must have shape"),
        (np.zeros((3, 2)), np.zeros((2, 2)), 1.0, "same shape"),
        (np.zeros((0, 2)), np.zeros((0, 2)), 1.0, "pred holds no keypoint"),
        (np.full((1, 2), np.nan), np.zeros((1, 2)), 1.0, "pred holds NaN"),
        (np.zeros((1, 2)), np.array([[0.0, np.inf]]), 1.0, "gt holds NaN or infinite"),
        (np.zeros((1, 2)), np.zeros((1, 2)), 0.0, "threshold must be a positive"),
        (np.zeros((1, 2)), np.zeros((1, 2)), float("nan"), "threshold must be a positive"),
    ],
)
def test_validation(pred, gt, threshold, match):
    with pytest.raises(ValueError, match=match):
        pck_per_pair(pred, gt, threshold)


def test_alpha_validation():
    with pytest.raises(ValueError, match="at least one"):
        pck_per_pair(np.zeros((1, 2)), np.zeros((1, 2)), 1.0, alphas=[])
    with pytest.raises(ValueError, match="positive"):
        pck_per_pair(np.zeros((1, 2)), np.zeros((1, 2)), 1.0, alphas=[-0.1])
    with pytest.raises(ValueError, match="distinct"):
        PCKAccumulator(alphas=[0.1, 0.1])


def test_accumulator_means_by_hand():
    acc = PCKAccumulator(alphas=[0.1, 0.2])
    gt = np.zeros((4, 2))
    d = lambda *xs: np.array([[x, 0.0] for x in xs])  # noqa: E731  points at distances xs from gt
    # threshold 100: radii 10 and 20
    assert acc.add(d(0, 0, 0, 0), gt, 100.0, "car") == {0.1: 1.0, 0.2: 1.0}
    assert acc.add(d(15, 15, 30, 0), gt, 100.0, "car") == {0.1: 0.25, 0.2: 0.75}
    assert acc.add(d(30, 30, 30, 30), gt, 100.0, "duck") == {0.1: 0.0, 0.2: 0.0}
    assert len(acc) == 3
    s = acc.summary()
    assert s.n_pairs == 3 and s.n_pairs_per_category == {"car": 2, "duck": 1}
    assert s.mean == pytest.approx({0.1: 1.25 / 3, 0.2: 1.75 / 3})
    assert s.per_category["car"] == pytest.approx({0.1: 0.625, 0.2: 0.875})
    assert s.per_category["duck"] == {0.1: 0.0, 0.2: 0.0}
    assert s.category_mean == pytest.approx({0.1: 0.3125, 0.2: 0.4375})
    assert list(s.per_category) == ["car", "duck"]


def test_add_pair_uses_target_keypoints_and_threshold():
    src = np.array([[0.0, 0.0], [1.0, 1.0]])
    trg = np.array([[0.0, 0.0], [0.0, 20.0]])  # box 0 x 20 -> threshold 20
    pair = Pair("p1", "duck(S)", "a.png", "b.png", src, trg, threshold_box=(0, 0, 0, 20))
    acc = PCKAccumulator()
    got = acc.add_pair(pair, trg + [[1.5, 0.0], [2.5, 0.0]])  # radii 1, 2, 3
    assert got == {0.05: 0.0, 0.10: 0.5, 0.15: 1.0}
    assert acc.records[0].pair_id == "p1" and acc.records[0].category == "duck(S)"


def test_summarize_errors():
    with pytest.raises(ValueError, match="no per-pair result"):
        summarize_pck([])
    with pytest.raises(ValueError, match="lacks alphas"):
        summarize_pck([("c", {0.05: 1.0})])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summarize_pck([("c", {0.1: 1.5})], alphas=[0.1])


points = st.integers(min_value=1, max_value=8).flatmap(
    lambda k: st.tuples(
        arrays(np.int64, (k, 2), elements=st.integers(-500, 500)),
        arrays(np.int64, (k, 2), elements=st.integers(-500, 500)),
    )
)


@settings(max_examples=60, deadline=None)
@given(pg=points, threshold=st.floats(1.0, 1000.0), a1=st.floats(0.001, 1.0), a2=st.floats(0.001, 1.0))
def test_monotone_in_alpha(pg, threshold, a1, a2):
    pred, gt = pg
    lo, hi = sorted((a1, a2))
    if lo == hi:
        hi = np.nextafter(hi, 2.0)
    got = pck_per_pair(pred, gt, threshold, alphas=[lo, hi])
    assert got[lo] <= got[hi]


@settings(max_examples=60, deadline=None)
@given(
    pg=points,
    shift=st.tuples(st.integers(-10_000, 10_000), st.integers(-10_000, 10_000)),
    threshold=st.floats(1.0, 1000.0),
)
def test_invariant_to_common_translation_and_order(pg, shift, threshold):
    pred, gt = pg
    base = pck_per_pair(pred, gt, threshold)
    t = np.array(shift, dtype=np.float64)  # integer shifts keep the differences exact
    assert pck_per_pair(pred + t, gt + t, threshold) == base
    perm = np.random.default_rng(0).permutation(len(gt))
    assert pck_per_pair(pred[perm], gt[perm], threshold) == base

"""Percentage of correct keypoints (PCK), as SCOT and HPF compute it.

For one pair with predicted target keypoints :math:`\\hat p_k` and ground truth
:math:`p_k` (:math:`k = 1..K`, original target image frame) and the pair's threshold
:math:`\\tau` (``Pair.pck_threshold()``: max side of the target keypoint box for
PF-WILLOW, of the target image for PF-PASCAL, of the target object box for SPair-71k):

.. math::

    \\mathrm{PCK}_\\alpha = \\frac{1}{K} \\sum_{k=1}^{K}
        \\big[\\, \\lVert \\hat p_k - p_k \\rVert_2 \\le \\alpha \\, \\tau \\,\\big]

The dataset score is the mean of the per-pair PCK over pairs (HPF's ``Average``);
per-category scores are the same mean over the pairs of each category.
:attr:`PCKSummary.category_mean` is the mean of the per-category scores, which some
papers report instead.

Evaluating at a resized resolution gives the same numbers when predictions, ground
truth and threshold are all scaled by the same ratio: SCOT and HPF score
:math:`\\lVert \\hat p'_k - r p_k \\rVert \\le \\alpha r \\tau` in the resized target, with
:math:`r` the one resize ratio of the target (``trg_intratio``) on both axes. Here
everything stays in the original frame: :meth:`scot_ot.matching.Correspondence.transfer`
divides its predictions by that same :math:`r`, which gives the same decisions
(``tests/test_fidelity.py::test_pck_threshold_scales_like_the_keypoints``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

DEFAULT_ALPHAS: Tuple[float, ...] = (0.05, 0.10, 0.15)


def _as_points(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, on any device
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (K, 2) of (x, y) points, got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} holds no keypoint (K = 0)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return arr


def _as_threshold(threshold: Any) -> float:
    value = float(threshold)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"threshold must be a positive finite number of pixels, got {value}")
    return value


def _as_alphas(alphas: Sequence[float]) -> Tuple[float, ...]:
    out = tuple(float(a) for a in alphas)
    if not out:
        raise ValueError("alphas must hold at least one value")
    if not all(math.isfinite(a) and a > 0 for a in out):
        raise ValueError(f"alphas must be positive and finite, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"alphas must be distinct, got {out}")
    return out


def keypoint_errors(pred: Any, gt: Any) -> np.ndarray:
    """Euclidean distances ``||pred_k - gt_k||_2`` (K,) between ``(K, 2)`` point sets."""
    p, g = _as_points(pred, "pred"), _as_points(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must have the same shape")
    d = p - g  # (K, 2)
    return np.hypot(d[:, 0], d[:, 1])  # (K,)


def pck_per_pair(
    pred: Any, gt: Any, threshold: float, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> Dict[float, float]:
    """PCK of one pair at each alpha: ``{alpha: fraction of k with ||pred_k - gt_k|| <= alpha * threshold}``.

    ``pred`` and ``gt`` are ``(K, 2)`` xy points (numpy or torch) in the original target
    frame; ``threshold`` is the pair's PCK threshold in pixels (> 0).
    """
    dist = keypoint_errors(pred, gt)  # (K,)
    tau = _as_threshold(threshold)
    return {a: float(np.mean(dist <= a * tau)) for a in _as_alphas(alphas)}


@dataclass(frozen=True)
class PCKSummary:
    """Aggregate PCK: mean over pairs per alpha, overall and per category."""

    alphas: Tuple[float, ...]
    mean: Dict[float, float]
    per_category: Dict[str, Dict[float, float]]
    n_pairs: int
    n_pairs_per_category: Dict[str, int]

    @property
    def category_mean(self) -> Dict[float, float]:
        """Mean over categories of the per-category PCK (each category weighs the same)."""
        cats = list(self.per_category.values())
        return {a: sum(c[a] for c in cats) / len(cats) for a in self.alphas}


def summarize_pck(
    results: Iterable[Tuple[str, Mapping[float, float]]], alphas: Sequence[float] = DEFAULT_ALPHAS
) -> PCKSummary:
    """Aggregate ``(category, {alpha: pck})`` per-pair results into a :class:`PCKSummary`.

    Every result must hold every alpha in ``alphas``. ``ValueError`` when there is no result.
    """
    alphas = _as_alphas(alphas)
    totals: Dict[float, float] = {a: 0.0 for a in alphas}
    cat_totals: Dict[str, Dict[float, float]] = {}
    cat_counts: Dict[str, int] = {}
    n = 0
    for category, pck in results:
        missing = [a for a in alphas if a not in pck]
        if missing:
            raise ValueError(f"a result for category {category!r} lacks alphas {missing}")
        bucket = cat_totals.setdefault(category, {a: 0.0 for a in alphas})
        for a in alphas:
            value = float(pck[a])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PCK must lie in [0, 1], got {value} for category {category!r}")
            totals[a] += value
            bucket[a] += value
        cat_counts[category] = cat_counts.get(category, 0) + 1
        n += 1
    if n == 0:
        raise ValueError("no per-pair result to summarize")
    return PCKSummary(
        alphas=alphas,
        mean={a: totals[a] / n for a in alphas},
        per_category={
            c: {a: cat_totals[c][a] / cat_counts[c] for a in alphas} for c in sorted(cat_totals)
        },
        n_pairs=n,
        n_pairs_per_category=dict(sorted(cat_counts.items())),
    )


@dataclass(frozen=True)
class PairPCK:
    """One evaluated pair, as kept by :class:`PCKAccumulator`."""

    pair_id: Optional[str]
    category: str
    pck: Dict[float, float]


class PCKAccumulator:
    """Collects per-pair PCK over an evaluation run, then summarizes it.

    >>> acc = PCKAccumulator()
    >>> acc.add(pred, gt, threshold=120.0, category="car(G)")       # doctest: +SKIP
    >>> acc.add_pair(pair, pred)        # a scot_ot.datasets.Pair     # doctest: +SKIP
    >>> acc.summary().mean[0.10]                                     # doctest: +SKIP
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS):
        self.alphas = _as_alphas(alphas)
        self.records: List[PairPCK] = []

    def __len__(self) -> int:
        return len(self.records)

    def add(
        self, pred: Any, gt: Any, threshold: float, category: str, pair_id: Optional[str] = None
    ) -> Dict[float, float]:
        """Score one pair (see :func:`pck_per_pair`), record it, return its ``{alpha: pck}``."""
        pck = pck_per_pair(pred, gt, threshold, self.alphas)
        self.records.append(PairPCK(pair_id, category, pck))
        return pck

    def add_pair(self, pair: Any, pred: Any) -> Dict[float, float]:
        """Score ``pred`` (K, 2) against a dataset ``Pair``'s target keypoints and threshold."""
        return self.add(pred, pair.trg_kps, pair.pck_threshold(), pair.category, pair.pair_id)

    def summary(self) -> PCKSummary:
        """Mean PCK over the recorded pairs, overall and per category."""
        return summarize_pck(((r.category, r.pck) for r in self.records), self.alphas)

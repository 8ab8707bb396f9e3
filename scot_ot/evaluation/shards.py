"""Shards of an evaluation: which pairs ``--shard K/N`` (or torchrun rank ``r`` of ``W``) evaluates.

A split of ``M`` pairs is put in *grouped order*, then cut into ``N`` contiguous
runs of nearly equal length; shard ``K`` (1-based) takes run ``K``:

.. math::

    \\text{shard}_K = \\text{order}\\big[\\lfloor (K-1) M / N \\rfloor \\,:\\, \\lfloor K M / N \\rfloor\\big],
    \\qquad |\\text{shard}_K| \\in \\{\\lfloor M/N \\rfloor, \\lceil M/N \\rceil\\}

so the ``N`` shards are disjoint, together hold every pair once, and differ in size
by at most one pair.

Grouped order sorts the pairs by ``(category, source image name, target image name,
position in the split)``, then reverses the targets of every other source image in a
category (a "snake"): the pairs of one source image are adjacent, the images of one
category (the targets of its pairs) recur only inside that category's run, and the
targets last used are the first used again. A shard therefore sees few distinct
images, and the per-image LRU feature cache
(:class:`~scot_ot.evaluation.run.FeatureCache`) serves most lookups, even when it is
smaller than a category (PF-WILLOW-dev, a cache of 8 images: 82 % hits in snake order,
52 % in plain sorted order). The key uses file *names*, never full paths, so that
machines that keep the dataset under different folders agree on the shards.

Shards nest: torchrun's rank ``r`` of ``W`` inside ``--shard K/N`` evaluates shard
``r + 1`` of ``W`` of the pairs of shard ``K``. A plan is the list of these levels,
``[(K, N), (r + 1, W)]``; :func:`plan_shard` applies them one after the other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import groupby
from typing import Dict, List, Sequence, Tuple

import numpy as np

Level = Tuple[int, int]  # (K, N), 1 <= K <= N

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str, flag: str = "--shard") -> Level:
    """``"K/N"`` -> ``(K, N)``; ``ValueError`` naming ``flag`` unless ``1 <= K <= N``."""
    m = _SPEC.match(str(text))
    if not m:
        raise ValueError(f"{flag}: expected K/N (shard K of N, K counted from 1), got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"{flag}: N must be >= 1, got {text!r}")
    if not 1 <= k <= n:
        hint = (" (K counts from 1: with a 0-based array index use $((SLURM_ARRAY_TASK_ID + 1)))"
                if k == 0 else "")
        raise ValueError(f"{flag}: K must lie in 1..{n}, got {text!r}{hint}")
    return k, n


def format_levels(levels: Sequence[Level]) -> str:
    """``[(2, 3), (1, 2)]`` -> ``"2/3 > 1/2"`` (``"all"`` for no level)."""
    return " > ".join(f"{k}/{n}" for k, n in levels) if levels else "all"


def grouped_order(pairs: Sequence) -> List[int]:
    """Positions of ``pairs`` sorted so that pairs sharing images are adjacent (see the module doc).

    Sorted by ``(category, source name, target name, position)``; inside a category,
    every other source image runs through its targets backwards, so that the targets
    used last are used again first (a plain cyclic sweep is the worst case of an LRU
    cache smaller than the category).
    """
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].category, pairs[i].src_path.name,
                                                     pairs[i].trg_path.name, i))
    out: List[int] = []
    for _, in_category in groupby(order, key=lambda i: pairs[i].category):
        for j, (_, run) in enumerate(groupby(in_category, key=lambda i: pairs[i].src_path.name)):
            run = list(run)
            out += run[::-1] if j % 2 else run
    return out


def split_run(order: Sequence[int], k: int, n: int) -> List[int]:
    """Run ``k`` of ``n`` (1-based) of ``order``: ``order[(k-1) M // n : k M // n]``, M = len(order)."""
    m = len(order)
    return list(order[(k - 1) * m // n: k * m // n])


def pairs_digest(pairs: Sequence) -> str:
    """SHA-256 of what defines the pairs (ids, categories, image names, keypoints, thresholds), in order.

    Shards agree on the pair list only if their digests agree; folders (roots) do not
    enter it.
    """
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.pair_id}\0{p.category}\0{p.src_path.name}\0{p.trg_path.name}\0"
                 f"{p.threshold_box!r}\0".encode())
        h.update(np.ascontiguousarray(p.src_kps, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(p.trg_kps, dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """The pairs one process evaluates.

    levels: the nested ``(K, N)`` shard levels (empty: every pair);
    order: positions in the whole split, in evaluation (grouped) order;
    n_all: pairs in the whole split; digest: :func:`pairs_digest` of the whole split.
    """

    levels: Tuple[Level, ...]
    order: Tuple[int, ...]
    n_all: int
    digest: str

    @property
    def spec(self) -> str:
        return format_levels(self.levels)

    def record(self, pairs: Sequence) -> dict:
        """What a results file stores to be merged: levels, the planned pairs (split order) and their positions."""
        positions = sorted(self.order)
        return {"levels": [list(lv) for lv in self.levels], "spec": self.spec,
                "pair_ids": [pairs[i].pair_id for i in positions], "positions": positions,
                "n_pairs_all": self.n_all, "pairs_digest": self.digest}


def plan_shard(pairs: Sequence, levels: Sequence[Level]) -> ShardPlan:
    """The :class:`ShardPlan` of ``levels`` over ``pairs`` (the whole split, in its order).

    Each level cuts the grouped order of the previous level's pairs; with no level,
    the plan is every pair in grouped order.
    """
    order = grouped_order(pairs)
    for k, n in levels:
        order = split_run(order, k, n)
    return ShardPlan(tuple((int(k), int(n)) for k, n in levels), tuple(order), len(pairs), pairs_digest(pairs))


def simulate_cache(pairs: Sequence, capacity: int = 64) -> Dict[str, int]:
    """The :class:`~scot_ot.evaluation.run.FeatureCache` counters of evaluating ``pairs`` in this order.

    The real cache class, with its LRU capacity policy, is driven by a stand-in model
    that returns the image path instead of running the network (``batch_size=1``, the
    CPU default: no prefetch), so hit rates of shard plans cost no feature extraction.
    """
    from .run import FeatureCache

    class _Paths:
        def hyperpixels(self, path, name="image"):
            return path

    cache = FeatureCache(_Paths(), capacity=capacity, batch_size=1)
    for p in pairs:
        cache.get(p.src_path)
        cache.get(p.trg_path)
    return cache.counters()

"""SPair-71k (Min et al., "SPair-71k: A Large-scale Benchmark for Semantic
Correspondence", arXiv 1908.10543).

On disk::

    root/Layout/large/{trn,val,test}.txt      one pair a line: 000001-2008_002719-2008_004100:aeroplane
    root/PairAnnotation/<split>/<line>.json   src_imname, trg_imname, category, src_kps, trg_kps,
                                              src_bndbox, trg_bndbox, viewpoint_variation, ...
    root/JPEGImages/<category>/<imname>

``pair_id`` is the layout line. Keys of the json besides the ones above (variation
and occlusion flags, poses, ``kps_ids``, image sizes) go to ``Pair.extra``.

PCK threshold (SCOT, HPF): ``max(w, h)`` of the target object box ``trg_bndbox``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .pair import (
    LoadResult,
    Pair,
    PathLike,
    ProblemLog,
    as_box,
    check_file,
    check_root,
    check_split,
    common_keypoints,
    missing_images,
)

NAME = "spair"
SPLITS = ("trn", "val", "test")
REQUIRED_KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox")
_LAYOUT = "Layout/large/<split>.txt, PairAnnotation/<split>/ and JPEGImages/<category>/ under the root"


def _frozen(value: Any) -> Any:
    """Lists -> tuples, recursively, so ``Pair.extra`` cannot be changed in place."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _kps(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be a list of [x, y], got shape {arr.shape}")
    return arr


def _parse(ann: Dict[str, Any], root: Path, pair_id: str, category: str, origin=None) -> Pair:
    """One annotation -> Pair; ``ValueError`` with the reason when malformed."""
    missing = [k for k in REQUIRED_KEYS if k not in ann]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if ann["category"] != category:
        raise ValueError(f"category {ann['category']!r} differs from the layout's {category!r}")
    try:
        src_all = _kps(ann["src_kps"], "src_kps")  # (K, 2)
        trg_all = _kps(ann["trg_kps"], "trg_kps")  # (K, 2)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad keypoints: {exc}") from None
    src, trg = common_keypoints(src_all, trg_all)
    if src.shape[0] == 0:
        raise ValueError("no keypoint annotated in both images")
    trg_bbox = as_box(ann["trg_bndbox"], "trg_bndbox")
    image_dir = root / "JPEGImages" / category
    extra = {k: _frozen(v) for k, v in ann.items() if k not in REQUIRED_KEYS}
    return Pair(
        pair_id=pair_id,
        category=category,
        src_path=image_dir / ann["src_imname"],
        trg_path=image_dir / ann["trg_imname"],
        src_kps=src,
        trg_kps=trg,
        threshold_box=trg_bbox,
        src_bbox=as_box(ann["src_bndbox"], "src_bndbox"),
        trg_bbox=trg_bbox,
        extra=extra,
        origin=origin,
    )


def load_spair(root: PathLike, split: str = "test", strict: bool = False) -> LoadResult:
    """Read the pairs listed in ``root/Layout/large/<split>.txt``.

    A malformed layout line, a missing or malformed annotation, or a missing image is
    skipped and listed in :attr:`LoadResult.skipped` (layout file and line, or the json
    file and its line where the json does not parse), or raises :class:`DatasetError`
    when ``strict``.
    """
    check_split(split, SPLITS, NAME)
    root = check_root(root, NAME, _LAYOUT)
    layout = check_file(
        root / "Layout" / "large" / f"{split}.txt",
        NAME,
        "one pair a line, e.g. 000001-2008_002719-2008_004100:aeroplane",
    )
    ann_dir = root / "PairAnnotation" / split
    problems = ProblemLog(strict)
    pairs: List[Pair] = []
    with open(layout) as fh:
        for line, text in enumerate(fh, start=1):
            pair_id = text.strip()
            if not pair_id:
                continue  # blank line
            name, sep, category = pair_id.rpartition(":")
            if not sep or not name or not category:
                problems.report(layout, line, f"malformed line {pair_id!r}: expected <id>-<src>-<trg>:<category>")
                continue
            ann_path = ann_dir / f"{pair_id}.json"
            if not ann_path.is_file():
                problems.report(layout, line, f"annotation not found: {ann_path}")
                continue
            try:
                with open(ann_path) as af:
                    ann = json.load(af)
            except json.JSONDecodeError as exc:
                problems.report(ann_path, exc.lineno, f"malformed json ({exc.msg}), listed at {layout}:{line}")
                continue
            try:
                if not isinstance(ann, dict):
                    raise ValueError("top level is not an object")
                pair = _parse(ann, root, pair_id, category, origin=(layout, line))
            except ValueError as exc:
                problems.report(ann_path, None, f"malformed annotation: {exc} (listed at {layout}:{line})")
                continue
            reason = missing_images(pair.src_path, pair.trg_path)
            if reason is not None:
                problems.report(layout, line, reason)
                continue
            pairs.append(pair)
    return problems.result(NAME, split, root, pairs)

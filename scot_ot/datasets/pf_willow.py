"""PF-WILLOW (Ham et al., "Proposal Flow", CVPR 2016).

On disk::

    root/test_pairs.csv               imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10
    root/PF-WILLOW/<subclass>/*.png   e.g. PF-WILLOW/car(G)/Cars_006a.png

Image paths in the csv are relative to ``root``. HPF's layout, where ``root`` is the
``PF-WILLOW`` folder itself (``root/car(G)/Cars_006a.png``), is also found: a path whose
first part is ``PF-WILLOW`` is looked up without it when ``root/<path>`` is absent.

category: the subclass folder (``car(G)``). PCK threshold (SCOT, HPF):
``max(w, h)`` of the box spanned by the target keypoints.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional

import numpy as np

from .pair import (
    DatasetError,
    LoadResult,
    Pair,
    PathLike,
    ProblemLog,
    check_file,
    check_root,
    check_split,
    common_keypoints,
    keypoint_box,
    missing_images,
)

NAME = "pf-willow"
SPLITS = ("test",)
N_KPS = 10
_BLOCKS = ("XA", "YA", "XB", "YB")
HEADER = ["imageA", "imageB"] + [f"{block}{k}" for block in _BLOCKS for k in range(1, N_KPS + 1)]
_LAYOUT = "test_pairs.csv and PF-WILLOW/<subclass>/<image>.png under the root"


def _resolve(root: Path, rel: str) -> Path:
    path = root / rel
    parts = Path(rel).parts
    if not path.exists() and len(parts) > 1 and parts[0] == "PF-WILLOW":
        alt = root.joinpath(*parts[1:])
        if alt.exists():
            return alt
    return path


def _parse_row(row: List[str], root: Path, index: int, origin=None) -> Pair:
    """One csv row -> Pair; ``ValueError`` with the reason when malformed."""
    if len(row) != len(HEADER):
        raise ValueError(f"expected {len(HEADER)} columns, got {len(row)}")
    src_rel, trg_rel = row[0].strip(), row[1].strip()
    category = Path(src_rel).parent.name
    if not category:
        raise ValueError(f"imageA {src_rel!r} has no subclass folder")
    if Path(trg_rel).parent.name != category:
        raise ValueError(f"imageA {src_rel!r} and imageB {trg_rel!r} are in different subclasses")
    try:
        coords = np.array([float(c) for c in row[2:]], dtype=np.float64)  # (4K,)
    except ValueError as exc:
        raise ValueError(f"non-numeric coordinate: {exc}") from None
    xa, ya, xb, yb = coords.reshape(4, N_KPS)  # 4 x (K,)
    src, trg = common_keypoints(np.stack([xa, ya], 1), np.stack([xb, yb], 1))  # (K', 2) each
    if src.shape[0] == 0:
        raise ValueError("no keypoint annotated in both images")
    src_path, trg_path = _resolve(root, src_rel), _resolve(root, trg_rel)
    pair_id = f"{index:06d}-{Path(src_rel).stem}-{Path(trg_rel).stem}:{category}"
    return Pair(
        pair_id=pair_id,
        category=category,
        src_path=src_path,
        trg_path=trg_path,
        src_kps=src,
        trg_kps=trg,
        threshold_box=keypoint_box(trg),
        origin=origin,
    )


def load_pf_willow(root: PathLike, split: str = "test", strict: bool = False) -> LoadResult:
    """Read ``root/<split>_pairs.csv`` (PF-WILLOW has only ``test``).

    A malformed row or a missing image is skipped and listed in
    :attr:`LoadResult.skipped` with the csv line, or raises :class:`DatasetError`
    when ``strict``.
    """
    check_split(split, SPLITS, NAME)
    root = check_root(root, NAME, _LAYOUT)
    csv_path = check_file(root / f"{split}_pairs.csv", NAME, "a csv with header " + ",".join(HEADER[:3]) + ",...")
    problems = ProblemLog(strict)
    pairs: List[Pair] = []
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header: Optional[List[str]] = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise DatasetError(
                f"header must be {','.join(HEADER[:3])},...,{HEADER[-1]} ({len(HEADER)} columns)",
                file=csv_path,
                line=1,
            )
        index = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            index += 1
            line = reader.line_num
            try:
                pair = _parse_row(row, root, index, origin=(csv_path, line))
            except ValueError as exc:
                problems.report(csv_path, line, f"malformed row: {exc}")
                continue
            reason = missing_images(pair.src_path, pair.trg_path)
            if reason is not None:
                problems.report(csv_path, line, reason)
                continue
            pairs.append(pair)
    return problems.result(NAME, split, root, pairs)

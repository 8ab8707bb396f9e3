"""PF-PASCAL (Ham et al., "Proposal Flow: Semantic Correspondences from Object Proposals",
TPAMI 2018), in the layout HPF and SCOT use.

On disk::

    root/{trn,val,test}_pairs.csv
    root/JPEGImages/<name>.jpg
    root/Annotations/<class>/<name>.mat     kps (K, 2) with NaN rows where unannotated,
                                             bbox (1, 4) x0, y0, x1, y1

Two csv variants are read, told apart by their header:

- HPF/SCOT: ``source_image,target_image,class[,flip]``; keypoints and boxes come from
  the ``.mat`` annotations.
- inline: ``source_image,target_image,class,XA,YA,XB,YB`` where each of the last four
  cells holds ``;``-separated numbers; ``Annotations/`` is not read (no object boxes).

Image paths in the csv (``PF-dataset-PASCAL/JPEGImages/2009_002416.jpg``) are resolved
by basename under ``root/JPEGImages``. ``class`` is 1..20 in VOC order
(:data:`PF_PASCAL_CLASSES`); a class name is accepted too. ``flip`` (training split) is
kept in ``Pair.extra["flip"]``; keypoints stay in the frame of the image on disk
(HPF flips images and keypoints together as a training augmentation).

PCK threshold (SCOT, HPF): ``max(H, W)`` of the target image, i.e. threshold box
``(0, 0, W, H)``. The size is read from the image header (``PIL.Image.open(p).size``
does not decode the pixels).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import scipy.io
from PIL import Image

from .pair import (
    Box,
    DatasetError,
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

NAME = "pf-pascal"
SPLITS = ("trn", "val", "test")
PF_PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
BASE_COLUMNS = ("source_image", "target_image", "class")
INLINE_COLUMNS = ("XA", "YA", "XB", "YB")
_LAYOUT = "{trn,val,test}_pairs.csv, JPEGImages/ and Annotations/<class>/ under the root"


def _category(cell: str) -> str:
    text = cell.strip()
    if text in PF_PASCAL_CLASSES:
        return text
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"class {text!r} is neither 1..20 nor a VOC class name") from None
    if not 1 <= number <= len(PF_PASCAL_CLASSES):
        raise ValueError(f"class {number} is outside 1..{len(PF_PASCAL_CLASSES)}")
    return PF_PASCAL_CLASSES[number - 1]


def _floats(cell: str, name: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in cell.strip().strip(";").split(";")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{name} is not a ';'-separated list of numbers: {cell.strip()[:40]!r}") from None


def _inline_kps(cells: Dict[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    xa, ya, xb, yb = (_floats(cells[c], c) for c in INLINE_COLUMNS)  # 4 x (K,)
    if not len(xa) == len(ya) == len(xb) == len(yb):
        raise ValueError(f"XA, YA, XB, YB hold {len(xa)}, {len(ya)}, {len(xb)}, {len(yb)} numbers")
    return np.stack([xa, ya], 1), np.stack([xb, yb], 1)  # (K, 2) each


class _Annotations:
    """``.mat`` reads, cached per file (an image appears in many pairs)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cache: Dict[Path, Tuple[np.ndarray, Box]] = {}

    def read(self, category: str, image_name: str) -> Tuple[np.ndarray, Box]:
        path = self.folder / category / (Path(image_name).stem + ".mat")
        if path not in self.cache:
            if not path.is_file():
                raise ValueError(f"annotation not found: {path}")
            try:
                mat = scipy.io.loadmat(str(path))
            except Exception as exc:  # scipy raises several unrelated types on bad files
                raise ValueError(f"cannot read {path}: {exc}") from None
            if "kps" not in mat or "bbox" not in mat:
                raise ValueError(f"{path} lacks 'kps' or 'bbox'")
            kps = np.asarray(mat["kps"], dtype=np.float64)
            if kps.ndim != 2 or kps.shape[1] != 2:
                raise ValueError(f"{path}: kps must be (K, 2), got {kps.shape}")
            self.cache[path] = (kps, as_box(mat["bbox"], f"{path}: bbox"))
        return self.cache[path]


class _ImageSizes:
    """``(W, H)`` from image headers, cached per file."""

    def __init__(self) -> None:
        self.cache: Dict[Path, Tuple[int, int]] = {}

    def size(self, path: Path) -> Tuple[int, int]:
        if path not in self.cache:
            try:
                with Image.open(path) as im:
                    self.cache[path] = im.size
            except OSError as exc:
                raise ValueError(f"cannot read image {path}: {exc}") from None
        return self.cache[path]


def load_pf_pascal(root: PathLike, split: str = "test", strict: bool = False) -> LoadResult:
    """Read ``root/<split>_pairs.csv`` with its images and annotations.

    A malformed row, a missing image or annotation, or a pair with no keypoint
    annotated in both images is skipped and listed in :attr:`LoadResult.skipped`
    with the csv line, or raises :class:`DatasetError` when ``strict``.
    """
    check_split(split, SPLITS, NAME)
    root = check_root(root, NAME, _LAYOUT)
    csv_path = check_file(
        root / f"{split}_pairs.csv", NAME, "a csv with header " + ",".join(BASE_COLUMNS) + "[,flip | ,XA,YA,XB,YB]"
    )
    image_dir = root / "JPEGImages"
    annotations = _Annotations(root / "Annotations")
    sizes = _ImageSizes()
    problems = ProblemLog(strict)
    pairs: List[Pair] = []
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in (next(reader, None) or [])]
        if not set(BASE_COLUMNS) <= set(header):
            raise DatasetError(f"header must contain {', '.join(BASE_COLUMNS)}; got {header}", file=csv_path, line=1)
        inline = set(INLINE_COLUMNS) <= set(header)
        index = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            index += 1
            line = reader.line_num
            if len(row) != len(header):
                problems.report(csv_path, line, f"malformed row: expected {len(header)} columns, got {len(row)}")
                continue
            cells = dict(zip(header, row))
            src_path = image_dir / Path(cells["source_image"].strip()).name
            trg_path = image_dir / Path(cells["target_image"].strip()).name
            try:
                category = _category(cells["class"])
                extra: Dict[str, Any] = {}
                if "flip" in cells:
                    extra["flip"] = bool(int(cells["flip"]))
                if inline:
                    src_all, trg_all = _inline_kps(cells)
                    src_box: Optional[Box] = None
                    trg_box: Optional[Box] = None
                else:
                    src_all, src_box = annotations.read(category, src_path.name)
                    trg_all, trg_box = annotations.read(category, trg_path.name)
                src, trg = common_keypoints(src_all, trg_all)  # (K, 2) each
                if src.shape[0] == 0:
                    raise ValueError("no keypoint annotated in both images")
            except ValueError as exc:
                problems.report(csv_path, line, f"malformed row: {exc}")
                continue
            reason = missing_images(src_path, trg_path)
            if reason is not None:
                problems.report(csv_path, line, reason)
                continue
            try:
                width, height = sizes.size(trg_path)
                pair = Pair(
                    pair_id=f"{index:06d}-{src_path.stem}-{trg_path.stem}:{category}",
                    category=category,
                    src_path=src_path,
                    trg_path=trg_path,
                    src_kps=src,
                    trg_kps=trg,
                    threshold_box=(0.0, 0.0, float(width), float(height)),
                    src_bbox=src_box,
                    trg_bbox=trg_box,
                    extra=extra,
                    origin=(csv_path, line),
                )
            except ValueError as exc:
                problems.report(csv_path, line, str(exc))
                continue
            pairs.append(pair)
    return problems.result(NAME, split, root, pairs)

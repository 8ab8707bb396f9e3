"""One pair record for every benchmark, and the shared machinery of the loaders.

Conventions
-----------
- Keypoints are ``(K, 2)`` float64 arrays of ``(x, y)`` pixel coordinates in the
  *original* image (no resizing, no flipping). Row ``k`` of ``src_kps`` corresponds to
  row ``k`` of ``trg_kps``; only keypoints annotated in both images are kept.
- The PCK threshold of a pair is the longer side of ``threshold_box``, a box
  ``(x0, y0, x1, y1)`` in the target image frame:

  .. math::

      \\tau = \\max(x_1 - x_0,\\; y_1 - y_0),
      \\qquad \\text{keypoint } k \\text{ correct} \\iff
      \\lVert \\hat p_k - p_k \\rVert_2 \\le \\alpha \\, \\tau

  Each dataset differs only in the box it supplies (as in SCOT and HPF):
  PF-WILLOW the box spanned by the target keypoints, PF-PASCAL the whole target
  image ``(0, 0, W, H)``, SPair-71k the annotated target object box.

Problems with the files on disk never disappear silently: a loader either skips the
pair and records a :class:`SkippedPair` (file, line, reason) in its
:class:`LoadResult`, or, with ``strict=True``, raises :class:`DatasetError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

Box = Tuple[float, float, float, float]
PathLike = Union[str, Path]


class DatasetError(ValueError):
    """A dataset on disk is missing or does not have the expected format.

    ``file`` and ``line`` (1-based, ``None`` where a line does not apply) locate the
    problem; both also appear in the message.
    """

    def __init__(self, reason: str, file: Optional[PathLike] = None, line: Optional[int] = None):
        self.reason = reason
        self.file = None if file is None else Path(file)
        self.line = line
        super().__init__(_locate(self.file, line) + reason)


def _locate(file: Optional[Path], line: Optional[int]) -> str:
    if file is None:
        return ""
    return f"{file}:{line}: " if line is not None else f"{file}: "


@dataclass(frozen=True)
class SkippedPair:
    """A pair a loader left out: where (``file``, 1-based ``line`` or ``None``) and why."""

    file: Path
    line: Optional[int]
    reason: str

    def __str__(self) -> str:
        return _locate(self.file, self.line) + self.reason


def as_box(values: Any, name: str) -> Box:
    """``(x0, y0, x1, y1)`` as floats; ``ValueError`` naming ``name`` unless finite with x1 >= x0, y1 >= y0."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (4,):
        raise ValueError(f"{name} must hold 4 numbers (x0, y0, x1, y1), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    x0, y0, x1, y1 = (float(v) for v in arr)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{name} must satisfy x1 >= x0 and y1 >= y0, got {arr.tolist()}")
    return (x0, y0, x1, y1)


def keypoint_box(kps: np.ndarray) -> Box:
    """The box ``(min x, min y, max x, max y)`` spanned by ``(K, 2)`` keypoints."""
    lo, hi = kps.min(axis=0), kps.max(axis=0)  # (2,), (2,)
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def common_keypoints(src: np.ndarray, trg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``(K, 2)`` ``src``/``trg`` where both are annotated (no NaN in either)."""
    if src.shape != trg.shape:
        raise ValueError(
            f"source and target hold different numbers of keypoints: {src.shape[0]} vs {trg.shape[0]}"
        )
    both = ~(np.isnan(src).any(axis=1) | np.isnan(trg).any(axis=1))  # (K,)
    return src[both], trg[both]


def _as_kps(values: Any, name: str) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)  # copy: the record owns its arrays
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (K, 2), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} holds no keypoint")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (drop unannotated keypoints first)")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Pair:
    """One source/target image pair with corresponding keypoints.

    Fields
    ------
    pair_id: unique within one split of one dataset.
    category: class name (``"car(G)"``, ``"aeroplane"``, ...), the key of per-category PCK.
    src_path, trg_path: image files.
    src_kps, trg_kps: ``(K, 2)`` float64 ``(x, y)`` pixels in the original images,
        read-only, finite, ``K >= 1``, row ``k`` of one matching row ``k`` of the other.
    threshold_box: ``(x0, y0, x1, y1)`` in the target frame whose longer side is the
        PCK threshold (:meth:`pck_threshold`); must not be degenerate.
    src_bbox, trg_bbox: annotated object boxes ``(x0, y0, x1, y1)`` where the dataset has them.
    extra: read-only dataset-specific metadata (SPair-71k's variation flags, PF-PASCAL's
        training ``flip``, ...).
    origin: ``(file, line)`` the loader read the pair from (1-based line, ``None`` where a
        line does not apply), so that a pair skipped later (an image that does not
        decode, a keypoint outside its image) is reported where it was written.

    Equality is identity (the record holds arrays).
    """

    pair_id: str
    category: str
    src_path: Path
    trg_path: Path
    src_kps: np.ndarray = field(repr=False)
    trg_kps: np.ndarray = field(repr=False)
    threshold_box: Box
    src_bbox: Optional[Box] = None
    trg_bbox: Optional[Box] = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    origin: Optional[Tuple[Path, Optional[int]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "src_path", Path(self.src_path))
        put(self, "trg_path", Path(self.trg_path))
        src = _as_kps(self.src_kps, "src_kps")
        trg = _as_kps(self.trg_kps, "trg_kps")
        if src.shape != trg.shape:
            raise ValueError(f"src_kps {src.shape} and trg_kps {trg.shape} must have the same shape")
        put(self, "src_kps", src)
        put(self, "trg_kps", trg)
        box = as_box(self.threshold_box, "threshold_box")
        if max(box[2] - box[0], box[3] - box[1]) <= 0:
            raise ValueError(f"threshold_box {box} is degenerate (PCK threshold 0)")
        put(self, "threshold_box", box)
        for name in ("src_bbox", "trg_bbox"):
            value = getattr(self, name)
            if value is not None:
                put(self, name, as_box(value, name))
        put(self, "extra", MappingProxyType(dict(self.extra)))
        if self.origin is not None:
            file, line = self.origin
            put(self, "origin", (Path(file), None if line is None else int(line)))

    def where(self) -> str:
        """``file:line: pair <id>`` (or ``pair <id>`` without an origin), the prefix of messages about this pair."""
        if self.origin is None:
            return f"pair {self.pair_id}"
        return _locate(*self.origin) + f"pair {self.pair_id}"

    @property
    def n_kps(self) -> int:
        """Number of corresponding keypoints ``K``."""
        return int(self.src_kps.shape[0])

    def pck_threshold(self) -> float:
        """The PCK threshold ``max(x1 - x0, y1 - y0)`` of :attr:`threshold_box`, in target pixels."""
        x0, y0, x1, y1 = self.threshold_box
        return max(x1 - x0, y1 - y0)


@dataclass(frozen=True)
class LoadResult:
    """What every loader returns: the pairs read and those left out (with file, line, reason)."""

    dataset: str
    split: str
    root: Path
    pairs: Tuple[Pair, ...]
    skipped: Tuple[SkippedPair, ...]

    @property
    def categories(self) -> Tuple[str, ...]:
        """Categories present among :attr:`pairs`, sorted."""
        return tuple(sorted({p.category for p in self.pairs}))


class ProblemLog:
    """Collects per-pair problems: records them, or raises at the first one when ``strict``."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: List[SkippedPair] = []

    def report(self, file: PathLike, line: Optional[int], reason: str) -> None:
        if self.strict:
            raise DatasetError(reason, file=file, line=line)
        self.items.append(SkippedPair(Path(file), line, reason))

    def result(self, dataset: str, split: str, root: Path, pairs: Sequence[Pair]) -> LoadResult:
        if self.items:
            logger.warning(
                "%s/%s: skipped %d pair(s), first: %s", dataset, split, len(self.items), self.items[0]
            )
        return LoadResult(dataset, split, root, tuple(pairs), tuple(self.items))


def check_root(root: PathLike, dataset: str, expected: str) -> Path:
    """``root`` as a Path; :class:`DatasetError` naming it and the expected layout if it is not a folder."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{dataset} root folder {path} does not exist; expected {expected}")
    return path


def check_split(split: str, splits: Sequence[str], dataset: str) -> None:
    if split not in splits:
        raise DatasetError(f"{dataset} has no split {split!r}; available: {', '.join(splits)}")


def check_file(path: Path, dataset: str, expected: str) -> Path:
    """``path`` itself; :class:`DatasetError` naming it and what it should hold if it is not a file."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: missing {path}; expected {expected}")
    return path


def missing_images(*paths: Path) -> Optional[str]:
    """A reason naming the first image in ``paths`` that is not a file, else ``None``."""
    for path in paths:
        if not path.is_file():
            return f"image not found: {path}"
    return None


"""Benchmark pairs for semantic correspondence: PF-WILLOW, PF-PASCAL, SPair-71k.

Every loader returns a :class:`LoadResult` of :class:`Pair` records with the same
conventions (``(K, 2)`` xy keypoints in the original images, a PCK threshold box in
the target frame); datasets are found by name through :func:`load_pairs`::

    result = load_pairs("pf-willow", "/data/PF-WILLOW")
    for pair in result.pairs:
        ...  # pair.src_kps, pair.trg_kps, pair.pck_threshold()
    for s in result.skipped:
        print(s)  # file:line: reason
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from .pair import DatasetError, LoadResult, Pair, PathLike, SkippedPair
from .pf_pascal import PF_PASCAL_CLASSES, load_pf_pascal
from .pf_willow import load_pf_willow
from .spair import load_spair

Loader = Callable[..., LoadResult]

_LOADERS: Dict[str, Loader] = {
    "pf-willow": load_pf_willow,
    "pf-pascal": load_pf_pascal,
    "spair": load_spair,
}


def available_datasets() -> Tuple[str, ...]:
    """Names :func:`load_pairs` accepts."""
    return tuple(sorted(_LOADERS))


def load_pairs(dataset_name: str, root: PathLike, split: str = "test", strict: bool = False) -> LoadResult:
    """Load one split of a dataset by name (see :func:`available_datasets`).

    Pairs with a malformed row, a missing image or annotation are skipped and listed in
    ``LoadResult.skipped`` (file, line, reason); ``strict=True`` raises
    :class:`DatasetError` at the first one instead. A missing root folder or pair list
    raises :class:`DatasetError` naming the path and the expected layout.
    """
    try:
        loader = _LOADERS[dataset_name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {dataset_name!r}; available: {', '.join(available_datasets())}"
        ) from None
    return loader(root, split=split, strict=strict)


__all__ = [
    "DatasetError",
    "LoadResult",
    "PF_PASCAL_CLASSES",
    "Pair",
    "SkippedPair",
    "available_datasets",
    "load_pairs",
    "load_pf_pascal",
    "load_pf_willow",
    "load_spair",
]

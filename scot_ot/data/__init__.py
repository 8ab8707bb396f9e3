"""Real sample images bundled with the package (from PF-WILLOW, for the demo and tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch

SAMPLES = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class SamplePair:
    name: str
    src_path: Path
    trg_path: Path
    src_kps: torch.Tensor  # (K, 2) xy, original pixels
    trg_kps: torch.Tensor  # (K, 2)

    @property
    def threshold(self) -> float:
        """PF-WILLOW's PCK threshold: max side of the box spanned by the target keypoints."""
        span = self.trg_kps.max(0).values - self.trg_kps.min(0).values
        return float(span.max())


def sample_pairs() -> List[SamplePair]:
    """The bundled pairs (see ``samples/keypoints.json`` for their source)."""
    meta = json.loads((SAMPLES / "keypoints.json").read_text())
    out = []
    for src, trg in meta["pairs"]:
        kps = [torch.tensor(meta["images"][n]["keypoints"], dtype=torch.float32) for n in (src, trg)]
        out.append(SamplePair(f"{Path(src).stem} -> {Path(trg).stem}", SAMPLES / src, SAMPLES / trg, *kps))
    return out


def sample_pair(index: int = 0) -> SamplePair:
    return sample_pairs()[index]

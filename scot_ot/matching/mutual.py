"""Soft mutual nearest-neighbour filtering of the final match scores.

Many source hyperpixels piling onto one target is SCOT's main failure mode
(docs/many-to-one.md). The soft mutual filter of NCNet (Rocco et al., NeurIPS 2018)
rescores every candidate match by how close it is to being the best of its row
*and* of its column:

.. math:: S'_{ij} = S_{ij} \\cdot \\frac{S_{ij}}{\\max_k S_{ik}} \\cdot \\frac{S_{ij}}{\\max_k S_{kj}}
    = \\frac{S_{ij}^3}{r_i \\, c_j}

for scores ``S >= 0`` with row maxima ``r`` and column maxima ``c``. A mutual nearest
neighbour keeps its score (:math:`S_{ij} = r_i = c_j`); a target that some other
source matches more strongly is discounted, so the row's argmax
(:math:`\\arg\\max_j S_{ij}^2 / c_j`) moves to targets it does not have to share. Unlike
bidirectional matching it needs no second OT problem: two reductions and three
passes over the scores.
"""

from __future__ import annotations

import torch


def soft_mutual_filter(scores: torch.Tensor) -> torch.Tensor:
    """:math:`S_{ij}^3 / (r_i c_j)` of (N, M) scores >= 0, **in place**; an all-zero row or column stays 0.

    Computed as :math:`(S_{ij} / (r_i c_j)^{1/3})^3`, so no intermediate exceeds the
    scores' own range.
    """
    tiny = torch.finfo(scores.dtype).tiny
    r = scores.amax(dim=1).clamp_min_(tiny).pow_(1 / 3)  # (N,)
    c = scores.amax(dim=0).clamp_min_(tiny).pow_(1 / 3)  # (M,)
    return scores.div_(r[:, None]).div_(c[None, :]).pow_(3)  # (N, M)

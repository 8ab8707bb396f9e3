"""Class activation maps (CAM) and SCOT's staircase weights for the marginals.

For an image at scale ``s`` the backbone gives final features ``F`` (C, h, w) and
classifier weights ``W`` (1000, C). For each of the ``top_k`` predicted classes ``c``

.. math:: M_c = \\mathrm{up}(W_c^\\top F), \\qquad
    \\hat M_c = (M_c - \\min M_c) / \\max (M_c - \\min M_c)

upsampled (bilinear) to the image size; the map at scale ``s`` is ``max_c hat M_c``,
maps are summed over scales and divided by their maximum. Scales whose area would
exceed 1200 x 800 pixels are skipped, as in SCOT's code.

Reference: Zhou et al., *Learning Deep Features for Discriminative Localization*,
CVPR 2016; Liu et al., *Semantic Correspondence as an Optimal Transport Problem*,
CVPR 2020 (multi-scale, top-2 variant).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: SCOT's staircase: weight 0.5 below 0.4, then 0.8 / 0.9 / 1.0 above 0.4 / 0.5 / 0.6
STAIRCASE_THRESHOLDS = (0.4, 0.5, 0.6)
STAIRCASE_WEIGHTS = (0.5, 0.8, 0.9, 1.0)


def cam_for_scale(final: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                  size: Sequence[int], top_k: int) -> torch.Tensor:
    """Max over the ``top_k`` classes of normalised CAMs, upsampled to ``size`` (H, W)."""
    logits = final.mean(dim=(-2, -1)) @ fc_weight.T + fc_bias  # (1000,)
    classes = logits.topk(top_k).indices  # (top_k,)
    maps = torch.einsum("kc,chw->khw", fc_weight[classes], final)  # (top_k, h, w)
    maps = F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=True)[0]
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return maps.max(dim=0).values  # (H, W)


def staircase(values: torch.Tensor, thresholds: Sequence[float] = STAIRCASE_THRESHOLDS,
              weights: Sequence[float] = STAIRCASE_WEIGHTS) -> torch.Tensor:
    """Piecewise-constant weights: ``weights[k]`` where ``values`` exceeds ``k`` thresholds."""
    if len(weights) != len(thresholds) + 1:
        raise ValueError("weights: need one more weight than thresholds")
    level = torch.bucketize(values, torch.tensor(thresholds, dtype=values.dtype, device=values.device))
    return torch.tensor(weights, dtype=values.dtype, device=values.device)[level]

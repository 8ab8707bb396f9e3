r"""Class activation maps (CAM) and SCOT's staircase weights for the marginals.

Exactly as SCOT's code (``SCOT_CAM.get_CAM_multi``). For an image at scale ``s`` the
backbone gives final features ``F`` (C, h, w) (after the last ReLU) and the classifier
``W`` (1000, C), ``b`` (1000,). The classes are the ``top_k`` (2) of
``softmax(W avgpool(F) + b)``; for each class ``c``

.. math:: M_c = \mathrm{up}(W_c^\top F), \qquad
    \hat M_c = \frac{M_c - \min M_c}{\max M_c}

(no bias; ``up``: bilinear, ``align_corners=True``, to the scale-1 image size
``(H, W)``). Note the denominator: the maximum of the *unshifted* map, not
``max - min``, so ``hat M_c`` peaks at ``1 - min / max``, not at 1. The map of scale
``s`` is ``max_c hat M_c``, and

.. math:: \mathrm{CAM} = \frac{\sum_s \max_c \hat M_c^{(s)}}
    {\max \sum_s \max_c \hat M_c^{(s)} + 10^{-5}}.

Scales 1, 1.5, 2: the image of scale ``s > 1`` is the *previous* scale's image resized
(bilinear, ``align_corners=True``) to ``(int(s H), int(s W))``, not the original
image. A scale with ``s^2 H W > 800^2`` (:data:`CAM_MAX_AREA`) is skipped: SCOT's
fallback for that case refers to undefined names (it never runs at its 300-px image
side, where ``4 H W <= 360000``), so we choose to leave the scale out; the chain then
continues from the last image computed. One departure, in a degenerate case only: a
class map whose maximum is exactly 0 is not divided (SCOT would divide by zero).

Reference: Zhou et al., *Learning Deep Features for Discriminative Localization*,
CVPR 2016; Liu et al., *Semantic Correspondence as an Optimal Transport Problem*,
CVPR 2020 (multi-scale, top-2 variant).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F

#: SCOT's staircase: weight 0.5 below 0.4, then 0.8 / 0.9 / 1.0 above 0.4 / 0.5 / 0.6
STAIRCASE_THRESHOLDS = (0.4, 0.5, 0.6)
STAIRCASE_WEIGHTS = (0.5, 0.8, 0.9, 1.0)

#: SCOT's CAM scales and number of classes
CAM_SCALES = (1.0, 1.5, 2.0)
CAM_TOP_K = 2
#: a CAM scale ``s`` with ``s * s * H * W`` above this many pixels is skipped (SCOT: 800 x 800)
CAM_MAX_AREA = 800 * 800
#: added to the maximum of the sum over scales (SCOT's 1e-5)
CAM_EPS = 1e-5


def cam_for_scale(final: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                  size: Sequence[int], top_k: int = CAM_TOP_K) -> torch.Tensor:
    """Max over the ``top_k`` classes of SCOT-normalised CAMs, upsampled to ``size`` (H, W).

    ``final``: (B, C, h, w) final features; returns (B, H, W).
    """
    logits = final.mean(dim=(-2, -1)) @ fc_weight.T + fc_bias  # (B, 1000)
    classes = logits.softmax(dim=-1).topk(top_k, dim=-1).indices  # (B, top_k)
    maps = torch.einsum("bkc,bchw->bkhw", fc_weight[classes], final)  # (B, top_k, h, w), no bias
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=True)  # (B, top_k, H, W)
    low = maps.amin(dim=(-2, -1), keepdim=True)  # (B, top_k, 1, 1)
    peak = maps.amax(dim=(-2, -1), keepdim=True)  # (B, top_k, 1, 1), of the unshifted map
    maps = (maps - low) / torch.where(peak == 0, torch.ones_like(peak), peak)
    return maps.amax(dim=1)  # (B, H, W)


def cam_scale_sizes(hw: Tuple[int, int], scales: Sequence[float] = CAM_SCALES,
                    max_area: float = CAM_MAX_AREA) -> list:
    """``(s, (int(s H), int(s W)))`` for the scales SCOT computes; scale 1 keeps ``(H, W)``."""
    H, W = hw
    out = []
    for s in scales:
        if s == 1.0:
            out.append((s, (H, W)))
        elif s * s * H * W <= max_area:
            out.append((s, (int(s * H), int(s * W))))
    return out


def multiscale_cam(imgs: torch.Tensor, final: torch.Tensor,
                   final_features: Callable[[torch.Tensor], torch.Tensor],
                   fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                   scales: Sequence[float] = CAM_SCALES, top_k: int = CAM_TOP_K,
                   max_area: float = CAM_MAX_AREA) -> torch.Tensor:
    """SCOT's multi-scale CAM (see the module docstring), (B, H, W).

    ``imgs``: (B, 3, H, W) at scale 1; ``final``: their final features;
    ``final_features``: images -> final features, for the other scales.
    """
    B, _, H, W = imgs.shape
    total = torch.zeros(B, H, W, dtype=final.dtype, device=final.device)
    img = imgs
    for s, size in cam_scale_sizes((H, W), scales, max_area):
        if s != 1.0:
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=True)  # from the previous scale
            final = final_features(img)
        total += cam_for_scale(final, fc_weight, fc_bias, (H, W), top_k)
    peak = total.flatten(1).amax(dim=1)  # (B,)
    return total / (peak + CAM_EPS)[:, None, None]


def staircase(values: torch.Tensor, thresholds: Sequence[float] = STAIRCASE_THRESHOLDS,
              weights: Sequence[float] = STAIRCASE_WEIGHTS) -> torch.Tensor:
    """Piecewise-constant weights: ``weights[k]`` where ``values`` exceeds ``k`` thresholds."""
    if len(weights) != len(thresholds) + 1:
        raise ValueError("weights: need one more weight than thresholds")
    level = torch.bucketize(values, torch.tensor(thresholds, dtype=values.dtype, device=values.device))
    return torch.tensor(weights, dtype=values.dtype, device=values.device)[level]

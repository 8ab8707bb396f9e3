"""Hyperpixels: multi-layer CNN features on one grid, with image-space boxes.

The chosen layers' feature maps are resized (bilinear) to the grid of the first
chosen layer and concatenated along channels (Min et al., *Hyperpixel Flow*, ICCV
2019). Hyperpixel ``(y, x)`` of that grid has the centre and receptive-field box of
that layer's cell, computed from the architecture
(:mod:`scot_ot.features.receptive_field`): centre ``o + jump * (x, y)``, box
``centre -+ rf / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cam import cam_for_scale, staircase

#: SCOT skips CAM scales whose image area would exceed this (pixels)
CAM_MAX_AREA = 1200 * 800


@dataclass(frozen=True)
class Hyperpixels:
    """Features and geometry of one image's hyperpixels (N = h * w).

    feats: (N, D) L2-normalised; boxes: (N, 4) x0 y0 x1 y1 and centres: (N, 2) xy,
    in pixels of the resized image; grid: (h, w); size: resized image (W, H);
    scale: (sx, sy) from original to resized pixels; weights: (N,) foreground
    weights (CAM staircase or ones), not normalised; cam: (H, W) map or None.
    """

    feats: torch.Tensor
    boxes: torch.Tensor
    centres: torch.Tensor
    grid: Tuple[int, int]
    size: Tuple[int, int]
    scale: Tuple[float, float]
    weights: torch.Tensor
    cam: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.feats.shape[0]


def hyperpixel_features(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate (1, C_k, h_k, w_k) maps on the first map's grid; (h*w, sum C_k), L2-normalised."""
    h, w = maps[0].shape[-2:]
    resized = [m if m.shape[-2:] == (h, w) else
               F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True) for m in maps]
    feats = torch.cat(resized, dim=1)[0].flatten(1).T  # (N, D)
    return F.normalize(feats, dim=1)


class HyperpixelExtractor:
    """Backbone + chosen layers + CAM settings: image in, :class:`Hyperpixels` out."""

    def __init__(self, backbone, layers: Sequence[int], use_cam: bool = True,
                 cam_scales: Sequence[float] = (1.0, 1.5, 2.0), cam_top_k: int = 2):
        self.backbone = backbone
        self.layers = tuple(layers)
        self.use_cam = use_cam
        self.cam_scales = tuple(cam_scales)
        self.cam_top_k = cam_top_k

    @torch.no_grad()
    def __call__(self, img: torch.Tensor, scale: Tuple[float, float],
                 mask: Optional[torch.Tensor] = None) -> Hyperpixels:
        """``img``: resized (3, H, W) in [0, 1]; ``mask``: optional (H, W) foreground in [0, 1]."""
        H, W = img.shape[-2:]
        maps, final = self.backbone.forward_features(img[None], self.layers)
        feats = hyperpixel_features(maps)
        h, w = maps[0].shape[-2:]
        rf = self.backbone.receptive_field(self.layers[0], (H, W))
        centres, boxes = rf.centres(h, w, feats.device), rf.boxes(h, w, feats.device)
        cam = None
        if mask is not None:
            cam = mask.to(feats)
        elif self.use_cam:
            cam = self.class_activation_map(img, final)
        if cam is None:
            weights = torch.ones(len(feats), dtype=feats.dtype, device=feats.device)
        else:
            cx = centres[:, 0].long().clamp(0, W - 1)
            cy = centres[:, 1].long().clamp(0, H - 1)
            weights = staircase(cam[cy, cx])
        return Hyperpixels(feats, boxes, centres, (h, w), (W, H), scale, weights, cam)

    def class_activation_map(self, img: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """Multi-scale top-k CAM (see :mod:`scot_ot.matching.cam`), (H, W) in [0, 1]."""
        H, W = img.shape[-2:]
        fc_w, fc_b = self.backbone.classifier()
        total = torch.zeros(H, W, dtype=final.dtype, device=final.device)
        for s in self.cam_scales:
            if s != 1.0:
                if s * s * H * W > CAM_MAX_AREA:
                    break
                big = F.interpolate(img[None], size=(round(H * s), round(W * s)), mode="bilinear",
                                    align_corners=True)
                _, final = self.backbone.forward_features(big, self.layers)
            total += cam_for_scale(final[0], fc_w, fc_b, (H, W), self.cam_top_k)
        return total / total.max().clamp_min(1e-12)

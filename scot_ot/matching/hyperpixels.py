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
from typing import List, Optional, Sequence, Tuple

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

    def __call__(self, img: torch.Tensor, scale: Tuple[float, float],
                 mask: Optional[torch.Tensor] = None) -> Hyperpixels:
        """``img``: resized (3, H, W) in [0, 1]; ``mask``: optional (H, W) foreground in [0, 1]."""
        return self.extract(img[None], [scale], [mask])[0]

    @torch.no_grad()
    def extract(self, imgs: torch.Tensor, scales: Sequence[Tuple[float, float]],
                masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[Hyperpixels]:
        """Hyperpixels of a batch of equally sized images: one backbone pass per CAM scale.

        ``imgs``: (B, 3, H, W) in [0, 1]; ``scales``: B original-to-resized scales;
        ``masks``: B optional (H, W) foreground maps (a mask replaces that image's CAM).
        Each image's result equals its unbatched one up to float rounding.
        """
        B, _, H, W = imgs.shape
        masks = [None] * B if masks is None else list(masks)
        maps, final = self.backbone.forward_features(imgs, self.layers)
        h, w = maps[0].shape[-2:]
        rf = self.backbone.receptive_field(self.layers[0], (H, W))
        centres, boxes = rf.centres(h, w, imgs.device), rf.boxes(h, w, imgs.device)
        cams = (self.class_activation_maps(imgs, final)
                if self.use_cam and any(m is None for m in masks) else [None] * B)
        cx = centres[:, 0].long().clamp(0, W - 1)  # CAM pixel under each hyperpixel centre
        cy = centres[:, 1].long().clamp(0, H - 1)
        out = []
        for k in range(B):
            feats = hyperpixel_features([m[k:k + 1] for m in maps])
            cam = masks[k].to(feats) if masks[k] is not None else cams[k]
            if cam is None:
                weights = torch.ones(len(feats), dtype=feats.dtype, device=feats.device)
            else:
                weights = staircase(cam[cy, cx])
            out.append(Hyperpixels(feats, boxes, centres, (h, w), (W, H), tuple(scales[k]), weights, cam))
        return out

    def class_activation_maps(self, imgs: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """Multi-scale top-k CAMs (see :mod:`scot_ot.matching.cam`), (B, H, W) in [0, 1].

        ``final``: the backbone's final features of ``imgs`` at scale 1.
        """
        B, _, H, W = imgs.shape
        fc_w, fc_b = self.backbone.classifier()
        total = torch.zeros(B, H, W, dtype=final.dtype, device=final.device)
        for s in self.cam_scales:
            if s != 1.0:
                if s * s * H * W > CAM_MAX_AREA:
                    break
                big = F.interpolate(imgs, size=(round(H * s), round(W * s)), mode="bilinear",
                                    align_corners=True)
                _, final = self.backbone.forward_features(big, self.layers)
            for k in range(B):
                total[k] += cam_for_scale(final[k], fc_w, fc_b, (H, W), self.cam_top_k)
        peak = total.flatten(1).amax(dim=1).clamp_min(1e-12)  # (B,)
        return total / peak[:, None, None]

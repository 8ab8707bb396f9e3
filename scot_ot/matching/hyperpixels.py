r"""Hyperpixels: multi-layer CNN features on one grid, with image-space boxes.

The chosen layers' feature maps are resized (bilinear) to the grid of the first
chosen layer and concatenated along channels (Min et al., *Hyperpixel Flow*, ICCV
2019), then L2-normalised, so the cosine of two hyperpixels is

.. math:: \cos(x, y) = \frac{\sum_g \langle x_g, y_g \rangle}{\|x\| \, \|y\|}

over the groups ``g`` of channels. Two options change the groups' weights:

- ``norm="layer"``: each layer's features are L2-normalised first (then the
  whole vector), so the cosine is the mean of the per-layer cosines,
  :math:`\frac1L \sum_l \cos(x_l, y_l)`; ``norm="joint"`` (SCOT) lets layers with
  larger activations weigh more;
- companion backbones (an ensemble): their layers' maps (each backbone's default
  layers, or the ids given for it) are resized to the same grid.
  With ``"joint"`` each backbone's features are normalised on their own, so the
  cosine is the mean of the backbones' cosines; with ``"layer"`` it is the mean over
  all layers of all backbones. Geometry and CAM come from the first backbone only.

Hyperpixel ``(y, x)`` of that grid has the centre and receptive-field box of
that layer's cell, computed from the architecture
(:mod:`scot_ot.features.receptive_field`): centre ``o + jump * (x, y)``, box
``centre -+ rf // 2`` (SCOT's integer half-width). Foreground weights are SCOT's
staircase of the CAM (:mod:`.cam`) read at ``(int(cy), int(cx))``, the pixel under
each centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cam import CAM_MAX_AREA, CAM_SCALES, CAM_TOP_K, multiscale_cam, staircase


@dataclass(frozen=True)
class Hyperpixels:
    """Features and geometry of one image's hyperpixels (N = h * w).

    feats: (N, D) L2-normalised; boxes: (N, 4) x0 y0 x1 y1 and centres: (N, 2) xy,
    in pixels of the resized image; grid: (h, w); size: resized image (W, H);
    scale: (sx, sy) from original to resized pixels (SCOT's one ratio: sx == sy);
    weights: (N,) foreground weights (CAM staircase or ones), not normalised;
    cam: (H, W) map or None.
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


#: how the layers of one backbone are weighed in the hyperpixel cosine (see the module docstring)
HYPERPIXEL_NORMS = ("joint", "layer")


def hyperpixel_features(maps: Sequence[torch.Tensor], groups: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate (1, C_k, h_k, w_k) maps on the first map's grid; (h*w, sum C_k), L2-normalised.

    ``groups``: how many consecutive maps form each normalisation group (None: one
    group, SCOT). Each group's concatenation is L2-normalised before the whole, so
    every group weighs the same in the cosine: :math:`\\cos = \\frac1G \\sum_g \\cos_g`.
    """
    h, w = maps[0].shape[-2:]
    resized = [m if m.shape[-2:] == (h, w) else
               F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True) for m in maps]
    feats = torch.cat(resized, dim=1)[0].flatten(1).T  # (N, D)
    if groups is not None and len(groups) > 1:
        if sum(groups) != len(maps):
            raise ValueError(f"groups: {list(groups)} do not add up to the {len(maps)} maps")
        widths = [sum(m.shape[1] for m in resized[sum(groups[:g]):sum(groups[:g + 1])])
                  for g in range(len(groups))]
        feats = torch.cat([F.normalize(part, dim=1) for part in feats.split(widths, dim=1)], dim=1)
    return F.normalize(feats, dim=1)


class HyperpixelExtractor:
    """Backbone + chosen layers + CAM settings: image in, :class:`Hyperpixels` out."""

    def __init__(self, backbone, layers: Sequence[int], use_cam: bool = True,
                 cam_scales: Sequence[float] = CAM_SCALES, cam_top_k: int = CAM_TOP_K,
                 cam_max_area: float = CAM_MAX_AREA, norm: str = "joint", companions: Sequence = (),
                 companion_layers: Optional[Sequence[Sequence[int]]] = None):
        """``norm``: one of :data:`HYPERPIXEL_NORMS`; ``companions``: more backbones whose
        layers join the hyperpixels (an ensemble; each backbone normalised apart):
        ``companion_layers[i]`` for ``companions[i]`` (default: their default layers)."""
        if norm not in HYPERPIXEL_NORMS:
            raise ValueError(f"norm: expected one of {', '.join(HYPERPIXEL_NORMS)}, got {norm!r}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.norm = norm
        self.companions = tuple(companions)
        if companion_layers is None:
            companion_layers = [b.default_layers for b in self.companions]
        if len(companion_layers) != len(self.companions):
            raise ValueError(f"companion_layers: one id list per companion backbone ({len(self.companions)}), "
                             f"got {len(companion_layers)}")
        self.companion_layers = tuple(b.check_layer_ids(ids) for b, ids in zip(self.companions, companion_layers))
        self.use_cam = use_cam
        self.cam_scales = tuple(float(s) for s in cam_scales)
        if not self.cam_scales or any(s <= 0 for s in self.cam_scales):
            raise ValueError(f"cam_scales: need positive scales, got {cam_scales!r}")
        self.cam_top_k = cam_top_k
        self.cam_max_area = cam_max_area

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
        maps = list(maps)
        groups = [len(maps)]
        for other, ids in zip(self.companions, self.companion_layers):
            maps += other.forward_features(imgs, ids).maps
            groups.append(len(ids))
        if self.norm == "layer":
            groups = [1] * len(maps)
        h, w = maps[0].shape[-2:]
        rf = self.backbone.receptive_field(self.layers[0], (H, W))
        centres, boxes = rf.centres(h, w, imgs.device), rf.boxes(h, w, imgs.device)
        cams = (self.class_activation_maps(imgs, final)
                if self.use_cam and any(m is None for m in masks) else [None] * B)
        cx = centres[:, 0].long().clamp(0, W - 1)  # CAM pixel under each hyperpixel centre
        cy = centres[:, 1].long().clamp(0, H - 1)
        out = []
        for k in range(B):
            feats = hyperpixel_features([m[k:k + 1] for m in maps], groups)
            cam = masks[k].to(feats) if masks[k] is not None else cams[k]
            if cam is None:
                weights = torch.ones(len(feats), dtype=feats.dtype, device=feats.device)
            else:
                weights = staircase(cam[cy, cx])
            out.append(Hyperpixels(feats, boxes, centres, (h, w), (W, H), tuple(scales[k]), weights, cam))
        return out

    def class_activation_maps(self, imgs: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """SCOT's multi-scale top-k CAMs (:func:`scot_ot.matching.cam.multiscale_cam`), (B, H, W).

        ``final``: the backbone's final features of ``imgs`` at scale 1.
        """
        fc_w, fc_b = self.backbone.classifier()
        return multiscale_cam(imgs, final, lambda x: self.backbone.forward_features(x, self.layers).final,
                              fc_w, fc_b, self.cam_scales, self.cam_top_k, self.cam_max_area)

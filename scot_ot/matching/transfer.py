"""Keypoint transfer through hyperpixel matches (SCOT / HPF rule).

For a source keypoint ``k``, let ``S(k)`` be the source receptive-field boxes that
contain it and ``j(i)`` the matched target hyperpixel of source hyperpixel ``i``.
Then

.. math:: \\hat k = \\frac{1}{|S(k)|} \\sum_{i \\in S(k)}
    \\big(\\mathrm{corner}^t_{j(i)} + k - \\mathrm{corner}^s_i\\big)

with ``corner`` the top-left corner of a box. A keypoint that no box contains
(possible only at the very border with small receptive fields) uses the box whose
centre is nearest instead.
"""

from __future__ import annotations

import torch


def transfer_keypoints(
    kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor
) -> torch.Tensor:
    """Transfer (K, 2) xy keypoints; boxes are (N, 4)/(M, 4) x0 y0 x1 y1, ``matches`` (N,) target ids."""
    kx, ky = kps[:, 0:1], kps[:, 1:2]  # (K, 1)
    inside = (
        (kx >= src_boxes[None, :, 0]) & (ky >= src_boxes[None, :, 1])
        & (kx <= src_boxes[None, :, 2]) & (ky <= src_boxes[None, :, 3])
    )  # (K, N)
    centres = (src_boxes[:, :2] + src_boxes[:, 2:]) / 2  # (N, 2)
    nearest = torch.cdist(kps, centres).argmin(dim=1)  # (K,)
    none = ~inside.any(dim=1)
    inside[none, nearest[none]] = True
    w = inside.to(kps.dtype)  # (K, N)
    shift = trg_boxes[matches, :2] - src_boxes[:, :2]  # (N, 2): target corner - source corner
    return kps + (w @ shift) / w.sum(dim=1, keepdim=True)  # (K, 2)

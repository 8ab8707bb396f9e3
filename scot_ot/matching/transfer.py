"""Keypoint transfer through hyperpixel matches: SCOT's rule and two refinements.

For a source keypoint ``k``, let ``S(k)`` be the source receptive-field boxes that
contain it and ``j(i)`` the matched target hyperpixel of source hyperpixel ``i``.
Every box in ``S(k)`` votes for a position, and the votes are averaged:

.. math:: \\hat k = \\frac{\\sum_{i \\in S(k)} w_i \\big(\\mathrm{corner}^t_{j(i)} + \\delta_i
    + k - \\mathrm{corner}^s_i\\big)}{\\sum_{i \\in S(k)} w_i}

with ``corner`` the top-left corner of a box. The rules (:data:`TRANSFER_RULES`):

- ``"scot"`` (SCOT / HPF): equal votes :math:`w_i = 1`, no refinement :math:`\\delta_i = 0`;
- ``"weighted"``: each vote weighs its match's score, :math:`w_i = s_{i j(i)}` (the
  confidence after RHM), so unsure matches count less; a keypoint whose boxes all
  have score 0 falls back to equal votes;
- ``"soft"``: ``"weighted"`` plus a sub-hyperpixel refinement :math:`\\delta_i`, the
  kernel soft-argmax of row ``i`` of the scores over the 3 x 3 target cells around
  :math:`j(i)` (:func:`soft_offsets`).

A keypoint that no box contains (possible only at the very border with small
receptive fields) uses the box whose centre is nearest instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

#: the keypoint transfer rules :meth:`scot_ot.matching.Correspondence.transfer` knows
TRANSFER_RULES = ("scot", "weighted", "soft")


def transfer_keypoints(
    kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor,
    weights: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Transfer (K, 2) xy keypoints; boxes are (N, 4)/(M, 4) x0 y0 x1 y1, ``matches`` (N,) target ids.

    ``weights`` (N,) >= 0: each source's vote (None: equal votes, SCOT's rule);
    ``offsets`` (N, 2): the refinement :math:`\\delta_i` added to each matched target
    position (None: none).
    """
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
    if weights is not None:
        weighted = w * weights.to(kps.dtype)[None, :]
        w = torch.where(weighted.sum(dim=1, keepdim=True) > 0, weighted, w)  # all-zero votes: equal votes
    shift = trg_boxes[matches, :2] - src_boxes[:, :2]  # (N, 2): target corner - source corner
    if offsets is not None:
        shift = shift + offsets.to(shift.dtype)
    return kps + (w @ shift) / w.sum(dim=1, keepdim=True)  # (K, 2)


def soft_offsets(scores: torch.Tensor, matches: torch.Tensor, trg_centres: torch.Tensor,
                 trg_grid: Tuple[int, int], radius: int = 1) -> torch.Tensor:
    """(N, 2) kernel soft-argmax refinements of each match, in target pixels.

    For source ``i`` with match ``j = j(i)`` at grid cell ``(r, c)``, over the target
    cells ``W(j)`` within ``radius`` rows and columns of it (clipped to the grid):

    .. math:: \\delta_i = \\frac{\\sum_{j' \\in W(j)} s_{ij'} (c_{j'} - c_j)}{\\sum_{j' \\in W(j)} s_{ij'}}

    with scores ``s >= 0`` and centres ``c``: the score-weighted mean position around
    the best match, minus the match itself (0 where the window's scores sum to 0).
    """
    h, w = trg_grid
    r, c = matches // w, matches % w  # (N,)
    d = torch.arange(-radius, radius + 1, device=matches.device)
    dr, dc = torch.meshgrid(d, d, indexing="ij")
    rr, cc = r[:, None] + dr.reshape(1, -1), c[:, None] + dc.reshape(1, -1)  # (N, (2r+1)^2)
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    cells = (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1))  # (N, (2r+1)^2) target ids
    s = torch.gather(scores, 1, cells).clamp_min(0) * valid  # (N, (2r+1)^2)
    rel = trg_centres[cells] - trg_centres[matches][:, None, :]  # (N, (2r+1)^2, 2)
    total = s.sum(dim=1, keepdim=True)  # (N, 1)
    mean = (s[..., None] * rel).sum(dim=1) / total.clamp_min(torch.finfo(s.dtype).tiny)
    return torch.where(total > 0, mean, torch.zeros_like(mean))

r"""Keypoint transfer through hyperpixel matches: SCOT's rule and its refinements.

For a source keypoint ``k``, let ``S(k)`` be the source boxes that contain it and
``j(i)`` the matched target hyperpixel of source hyperpixel ``i``. Every box in
``S(k)`` votes for the position :math:`v_i = \mathrm{corner}^t_{j(i)} + \delta_i + k -
\mathrm{corner}^s_i` (``corner``: the top-left corner of a box), and the votes are
averaged:

.. math:: \hat k = \frac{\sum_{i \in S(k)} w_i v_i}{\sum_{i \in S(k)} w_i}

The rules (:data:`TRANSFER_RULES`):

- ``"scot"`` (SCOT / HPF): equal votes :math:`w_i = 1`, no refinement :math:`\delta_i = 0`;
- ``"weighted"``: each vote weighs its match's score, :math:`w_i = s_{i j(i)}` (the
  confidence after RHM), so unsure matches count less; a keypoint whose boxes all
  have score 0 falls back to equal votes;
- ``"soft"``: ``"weighted"`` plus a sub-hyperpixel refinement :math:`\delta_i`, the
  kernel soft-argmax of row ``i`` of the scores over the 3 x 3 target cells around
  :math:`j(i)` (:func:`soft_offsets`);
- ``"median"``: equal votes, no refinement, and the coordinate-wise median of the
  votes instead of their mean, :math:`\hat k_x = \mathrm{median}_{i \in S(k)} v_{i,x}`
  (the same for ``y``; the mean of the two middle votes for an even count): while
  fewer than half of the boxes are matched to a wrong part, the wrong votes cannot
  pull the keypoint off the others (:func:`median_transfer`);
- ``"consensus"``: the median locates, the mean refines: the median vote of the boxes
  scaled by ``2 box_scale`` gives :math:`m(k)`; the keypoint is the mean of the votes of
  the boxes scaled by ``box_scale`` that lie within those boxes' half-width of
  :math:`m(k)` (:func:`consensus_transfer`). The median rejects wrong matches, the mean
  of the agreeing votes keeps the sub-hyperpixel precision the median's one vote loses;
- ``"median-soft"``, ``"consensus-soft"``: the same with every vote refined by
  :math:`\delta_i` as in ``"soft"``. A mean of many votes averages the 4 px grid of the
  matches away; a median returns one vote, on that grid, unless the votes are refined.

The boxes are the hyperpixels' receptive fields (SCOT), scaled about their centres
by ``box_scale`` (:func:`voters`): above 1 more, farther hyperpixels vote, below 1
fewer and nearer ones. A keypoint that no box contains (at the very border, or any
keypoint with ``box_scale = 0``) uses the box whose centre is nearest instead: scale 0
is the nearest-hyperpixel transfer.

After any rule, ``transfer_refine = R > 0`` cells moves each transferred keypoint by
appearance (:func:`refine_keypoints`): to the target hyperpixel, among those within
``R`` grid cells of it, whose features are most like the source features at the
keypoint itself. The votes place a keypoint by where its neighbourhood went; the
refinement asks where the keypoint's own features are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def voters(kps: torch.Tensor, src_boxes: torch.Tensor, box_scale: float = 1.0) -> torch.Tensor:
    """(K, N) bool: ``S(k)``, the source boxes (scaled by ``box_scale`` about their centres) containing each keypoint.

    A box ``x0 y0 x1 y1`` with centre ``c`` scaled by ``s`` is ``c -+ s (x1 - x0, y1 - y0) / 2``,
    borders included. A keypoint in no box gets the box whose centre is nearest (on a tie,
    the first).
    """
    centres = (src_boxes[:, :2] + src_boxes[:, 2:]) / 2  # (N, 2)
    half = box_scale * (src_boxes[:, 2:] - src_boxes[:, :2]) / 2  # (N, 2)
    lo, hi = centres - half, centres + half
    kx, ky = kps[:, 0:1], kps[:, 1:2]  # (K, 1)
    inside = (kx >= lo[None, :, 0]) & (ky >= lo[None, :, 1]) & (kx <= hi[None, :, 0]) & (ky <= hi[None, :, 1])
    nearest = torch.cdist(kps, centres).argmin(dim=1)  # (K,)
    none = ~inside.any(dim=1)
    inside[none, nearest[none]] = True
    return inside


def _shifts(kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor,
            offsets: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, 2) :math:`d_i = \\mathrm{corner}^t_{j(i)} + \\delta_i - \\mathrm{corner}^s_i` in the keypoints' dtype."""
    shift = (trg_boxes[matches, :2] - src_boxes[:, :2]).to(kps.dtype)  # (N, 2)
    return shift if offsets is None else shift + offsets.to(kps.dtype)


def transfer_keypoints(
    kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor,
    weights: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None, box_scale: float = 1.0,
) -> torch.Tensor:
    """Transfer (K, 2) xy keypoints by the weighted mean of the votes; boxes are (N, 4)/(M, 4)
    x0 y0 x1 y1, ``matches`` (N,) target ids.

    ``weights`` (N,) >= 0: each source's vote (None: equal votes, SCOT's rule);
    ``offsets`` (N, 2): the refinement :math:`\\delta_i` added to each matched target
    position (None: none); ``box_scale``: the voting boxes (:func:`voters`).
    """
    w = voters(kps, src_boxes, box_scale).to(kps.dtype)  # (K, N)
    if weights is not None:
        weighted = w * weights.to(kps.dtype)[None, :]
        w = torch.where(weighted.sum(dim=1, keepdim=True) > 0, weighted, w)  # all-zero votes: equal votes
    shift = _shifts(kps, src_boxes, trg_boxes, matches, offsets)  # (N, 2)
    return kps + (w @ shift) / w.sum(dim=1, keepdim=True)  # (K, 2)


#: at most this many entries per :func:`torch.nanquantile` call (its input has a size limit)
MEDIAN_BLOCK = 1 << 22


def median_transfer(kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor,
                    box_scale: float = 1.0, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Transfer (K, 2) xy keypoints by the coordinate-wise median of the votes (the ``"median"`` rule).

    :math:`\\hat k = k + \\mathrm{median}_{i \\in S(k)} d_i` per coordinate, with
    :math:`d_i = \\mathrm{corner}^t_{j(i)} + \\delta_i - \\mathrm{corner}^s_i` (``offsets``:
    :math:`\\delta`, None: 0); the median of an even count is the mean of the two middle votes.
    """
    return kps + _median_shift(voters(kps, src_boxes, box_scale), _shifts(kps, src_boxes, trg_boxes, matches, offsets))


def _median_shift(inside: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(K, 2): per keypoint (row of ``inside``, (K, N) bool) the coordinate-wise median of its voters' (N, 2) shifts."""
    step = max(1, MEDIAN_BLOCK // (2 * len(shift)))
    out = []
    for start in range(0, len(inside), step):
        mask = inside[start:start + step, :, None]  # (k, N, 1)
        votes = torch.where(mask, shift[None], torch.full((), float("nan"), dtype=shift.dtype))  # (k, N, 2)
        out.append(torch.nanquantile(votes, 0.5, dim=1))  # (k, 2)
    return torch.cat(out)


def consensus_transfer(kps: torch.Tensor, src_boxes: torch.Tensor, trg_boxes: torch.Tensor, matches: torch.Tensor,
                       box_scale: float = 1.0, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Transfer (K, 2) xy keypoints by the mean of the votes that agree with a median (the ``"consensus"`` rule).

    With shifts :math:`d_i = \\mathrm{corner}^t_{j(i)} + \\delta_i - \\mathrm{corner}^s_i`, scale ``s``
    and :math:`\\bar d(k)` the coordinate-wise median shift of the boxes scaled by ``2s``:

    .. math:: A(k) = \\{ i \\in S_s(k) : \\lVert d_i - \\bar d(k) \\rVert \\le s\\,r_i \\},
        \\qquad \\hat k = k + \\frac{1}{|A(k)|} \\sum_{i \\in A(k)} d_i

    with ``r_i`` half the larger side of box ``i`` (SCOT's boxes: 9 px at stride 4). A
    keypoint with no agreeing vote keeps the median, :math:`\\hat k = k + \\bar d(k)`.
    """
    shift = _shifts(kps, src_boxes, trg_boxes, matches, offsets)  # (N, 2)
    located = _median_shift(voters(kps, src_boxes, 2 * box_scale), shift)  # (K, 2)
    radius = box_scale * (src_boxes[:, 2:] - src_boxes[:, :2]).amax(dim=1).to(kps.dtype) / 2  # (N,)
    agree = voters(kps, src_boxes, box_scale) & (torch.cdist(located, shift) <= radius[None, :])  # (K, N)
    w = agree.to(kps.dtype)
    count = w.sum(dim=1, keepdim=True)  # (K, 1)
    mean = (w @ shift) / count.clamp_min(1)
    return kps + torch.where(count > 0, mean, located)


def window_cells(rows: torch.Tensor, cols: torch.Tensor, grid: Tuple[int, int],
                 radius: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cells within ``radius`` rows and columns of each cell ``(rows, cols)`` (K,) of a row-major
    ``grid`` (h, w): their flat ids (K, (2 radius + 1)^2), clamped onto the grid, and whether each
    lies on it (the same shape, bool)."""
    h, w = grid
    d = torch.arange(-radius, radius + 1, device=rows.device)
    dr, dc = torch.meshgrid(d, d, indexing="ij")
    rr, cc = rows[:, None] + dr.reshape(1, -1), cols[:, None] + dc.reshape(1, -1)
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    return rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1), valid


def soft_offsets(scores: torch.Tensor, matches: torch.Tensor, trg_centres: torch.Tensor,
                 trg_grid: Tuple[int, int], radius: int = 1) -> torch.Tensor:
    """(N, 2) kernel soft-argmax refinements of each match, in target pixels.

    For source ``i`` with match ``j = j(i)`` at grid cell ``(r, c)``, over the target
    cells ``W(j)`` within ``radius`` rows and columns of it (clipped to the grid):

    .. math:: \\delta_i = \\frac{\\sum_{j' \\in W(j)} s_{ij'} (c_{j'} - c_j)}{\\sum_{j' \\in W(j)} s_{ij'}}

    with scores ``s >= 0`` and centres ``c``: the score-weighted mean position around
    the best match, minus the match itself (0 where the window's scores sum to 0).
    """
    w = trg_grid[1]
    cells, valid = window_cells(matches // w, matches % w, trg_grid, radius)  # (N, (2r+1)^2) target ids
    s = torch.gather(scores, 1, cells).clamp_min(0) * valid  # (N, (2r+1)^2)
    rel = trg_centres[cells] - trg_centres[matches][:, None, :]  # (N, (2r+1)^2, 2)
    total = s.sum(dim=1, keepdim=True)  # (N, 1)
    mean = (s[..., None] * rel).sum(dim=1) / total.clamp_min(torch.finfo(s.dtype).tiny)
    return torch.where(total > 0, mean, torch.zeros_like(mean))


def _grid_position(points: torch.Tensor, centres: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(K, 2) xy ``points`` in grid units of a regular grid of (N, 2) ``centres`` (row-major, ``grid`` = (h, w)):
    centre ``(x, y)`` of cell ``(r, c)`` is ``o + jump * (c, r)``, so a point is ``(p - o) / jump``."""
    h, w = grid
    origin = centres[0]
    jump = torch.stack([centres[min(1, w - 1), 0] - origin[0] if w > 1 else centres.new_tensor(1.0),
                        centres[w * min(1, h - 1), 1] - origin[1] if h > 1 else centres.new_tensor(1.0)])
    return (points - origin) / jump


def sample_features(feats: torch.Tensor, centres: torch.Tensor, grid: Tuple[int, int],
                    points: torch.Tensor) -> torch.Tensor:
    """(K, D) L2-normalised features at (K, 2) xy ``points``: bilinear between the four nearest cells.

    With the point at grid position :math:`(u, v)` (clamped to the grid), cells
    :math:`(\\lfloor v \\rfloor + a, \\lfloor u \\rfloor + b)` for :math:`a, b \\in \\{0, 1\\}`
    weigh :math:`(1 - |v - r|)(1 - |u - c|)`; at a cell centre the result is that cell's
    features. ``feats`` (N, D) are the hyperpixels' features on the grid (row-major).
    """
    h, w = grid
    uv = _grid_position(points.to(centres.dtype), centres, grid)
    u = uv[:, 0].clamp(0, w - 1)
    v = uv[:, 1].clamp(0, h - 1)
    c0, r0 = u.floor().long().clamp(max=max(w - 2, 0)), v.floor().long().clamp(max=max(h - 2, 0))
    out = torch.zeros(len(points), feats.shape[1], dtype=torch.float32)
    for a in (0, 1):
        for b in (0, 1):
            r, c = (r0 + a).clamp(max=h - 1), (c0 + b).clamp(max=w - 1)
            weight = (1 - (v - r).abs()).clamp_min(0) * (1 - (u - c).abs()).clamp_min(0)  # (K,)
            out += weight[:, None] * feats[r * w + c].float()
    return F.normalize(out, dim=1)


def refine_keypoints(kps: torch.Tensor, moved: torch.Tensor, src_feats: torch.Tensor, src_centres: torch.Tensor,
                     src_grid: Tuple[int, int], trg_feats: torch.Tensor, trg_centres: torch.Tensor,
                     trg_grid: Tuple[int, int], radius: int) -> torch.Tensor:
    """Move (K, 2) transferred keypoints ``moved`` to the most similar target hyperpixel within ``radius`` cells.

    With :math:`f(k)` the source features at the source keypoint ``k``
    (:func:`sample_features`), :math:`n(\\hat k)` the target cell nearest the transferred
    keypoint and :math:`W` the cells within ``radius`` rows and columns of it (clipped to
    the grid):

    .. math:: \\hat k' = c_{j^*}, \\qquad j^* = \\arg\\max_{j \\in W} \\langle f(k), f^t_j \\rangle

    (``c``: target centres; features L2-normalised, so the cosine). ``radius = 0``
    returns ``moved`` unchanged. Points in resized pixels of each image.
    """
    if radius == 0:
        return moved
    h, w = trg_grid
    f = sample_features(src_feats, src_centres, src_grid, kps)  # (K, D)
    cell = _grid_position(moved.to(trg_centres.dtype), trg_centres, trg_grid).round().long()  # (K, 2) = (c, r)
    cells, valid = window_cells(cell[:, 1].clamp(0, h - 1), cell[:, 0].clamp(0, w - 1), trg_grid, radius)
    sim = torch.einsum("kwd,kd->kw", trg_feats[cells].float(), f)  # (K, (2R+1)^2)
    sim = sim.masked_fill(~valid, float("-inf"))
    best = cells.gather(1, sim.argmax(dim=1, keepdim=True))[:, 0]  # (K,)
    return trg_centres[best].to(moved.dtype)


@dataclass(frozen=True)
class TransferRule:
    """A keypoint transfer rule: how the votes are combined, and what each vote carries."""

    vote: Callable[..., torch.Tensor]  #: ``vote(kps, src_boxes, trg_boxes, matches, box_scale=, offsets=[, weights=])``
    weighted: bool = False  #: each vote weighs its match's score (mean votes only)
    refined: bool = False  #: each vote moves by its match's soft-argmax offset (:func:`soft_offsets`)


#: the keypoint transfer rules :meth:`scot_ot.matching.Correspondence.transfer` knows, by name
TRANSFER_RULES: Dict[str, TransferRule] = {
    "scot": TransferRule(transfer_keypoints),
    "weighted": TransferRule(transfer_keypoints, weighted=True),
    "soft": TransferRule(transfer_keypoints, weighted=True, refined=True),
    "median": TransferRule(median_transfer),
    "median-soft": TransferRule(median_transfer, refined=True),
    "consensus": TransferRule(consensus_transfer),
    "consensus-soft": TransferRule(consensus_transfer, refined=True),
}

"""Regularised Hough matching (RHM): geometric consensus on the transport plan.

Every candidate match (i, j) between a source box centre ``s_i`` and a target box
centre ``t_j`` votes, with its appearance score ``V_ij``, for the offset

.. math:: o_{ij} = (W_s, H_s) - s_i + t_j

(shifted by the source image size so it is non-negative) in a Hough space of cells of
side ``sqrt((W_s + W_t)(H_s + H_t) / ncells)``. The vote map is smoothed by a
7 x 7 Gaussian (sigma = 7 / 2 / 2.354) and each match is rescored by the votes
of its own cell:

.. math:: V'_{ij} = V_{ij} \\cdot (G * h)\\big(\\mathrm{cell}(o_{ij})\\big),
    \\qquad h(c) = \\sum_{(i,j):\\,\\mathrm{cell}(o_{ij}) = c} V_{ij}

Reference: Min et al., *Hyperpixel Flow*, ICCV 2019 (the form used by SCOT).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def gaussian_filter(side: int = 7) -> torch.Tensor:
    """Normalised ``side x side`` Gaussian with sigma = side / 2 / 2.354."""
    sigma = side / 2 / 2.354
    r = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    g = torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma**2))
    return g / g.sum()


def hough_bins(
    src_centres: torch.Tensor,
    trg_centres: torch.Tensor,
    src_grid: Tuple[int, int],
    trg_grid: Tuple[int, int],
    src_size: Tuple[int, int],
    trg_size: Tuple[int, int],
    ncells: int = 8192,
) -> Tuple[torch.Tensor, int, int]:
    """Flat Hough-cell index of every offset (N, M), and the Hough grid size (ny, nx).

    Centres (N, 2)/(M, 2) xy lie on row-major (h, w) grids, so the cell of an offset
    is ``row(y_i, y_j) * nx + col(x_i, x_j)``: two small tables, one broadcast add.
    ``src_size``/``trg_size`` are image (W, H).
    """
    hs_w = src_size[0] + trg_size[0]
    hs_h = src_size[1] + trg_size[1]
    cell = math.sqrt(hs_w * hs_h / ncells)
    nx, ny = int(hs_w / cell) + 1, int(hs_h / cell) + 1
    (hs, ws), (ht, wt) = src_grid, trg_grid
    sx, sy = src_centres[:ws, 0], src_centres[::ws, 1]  # (ws,), (hs,)
    tx, ty = trg_centres[:wt, 0], trg_centres[::wt, 1]  # (wt,), (ht,)
    col = torch.div(src_size[0] - sx[:, None] + tx[None, :], cell, rounding_mode="floor")  # (ws, wt)
    row = torch.div(src_size[1] - sy[:, None] + ty[None, :], cell, rounding_mode="floor")  # (hs, ht)
    col = col.long().clamp_(0, nx - 1)
    row = row.long().clamp_(0, ny - 1) * nx
    bins = row[:, None, :, None] + col[None, :, None, :]  # (hs, ws, ht, wt)
    return bins.reshape(hs * ws, ht * wt), ny, nx


def regularized_hough_matching(
    votes: torch.Tensor,
    src_centres: torch.Tensor,
    trg_centres: torch.Tensor,
    src_grid: Tuple[int, int],
    trg_grid: Tuple[int, int],
    src_size: Tuple[int, int],
    trg_size: Tuple[int, int],
    ncells: int = 8192,
    filter_side: int = 7,
) -> torch.Tensor:
    """Rescore the (N, M) match scores ``votes`` by smoothed Hough consensus, **in place**
    (one N x M buffer fewer than a new result: the caller's scores are a fresh buffer)."""
    bins, ny, nx = hough_bins(src_centres, trg_centres, src_grid, trg_grid, src_size, trg_size, ncells)
    return rescore(votes, bins, (ny, nx), filter_side)


def rescore(votes: torch.Tensor, bins: torch.Tensor, shape: Tuple[int, int], filter_side: int = 7) -> torch.Tensor:
    """:math:`V \\leftarrow V \\cdot (G * h)(\\mathrm{cell})` in place, given each match's Hough cell
    ``bins`` (N, M) on a Hough grid of ``shape`` (ny, nx) (:func:`hough_bins`)."""
    ny, nx = shape
    space = torch.zeros(ny * nx, dtype=votes.dtype, device=votes.device)
    space.index_add_(0, bins.reshape(-1), votes.reshape(-1))  # h
    kernel = gaussian_filter(filter_side).to(votes)
    space = F.conv2d(space.view(1, 1, ny, nx), kernel[None, None], padding=filter_side // 2)  # G * h
    return votes.mul_(torch.take(space.view(-1), bins))  # (N, M)

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


#: the most matches whose Hough cells exist at once in :func:`regularized_hough_matching`
#: (int64: 8 MB; all of a 400 px pair's would take 360 MB)
BLOCK_ENTRIES = 1 << 20


def hough_tables(
    src_centres: torch.Tensor,
    trg_centres: torch.Tensor,
    src_grid: Tuple[int, int],
    trg_grid: Tuple[int, int],
    src_size: Tuple[int, int],
    trg_size: Tuple[int, int],
    ncells: int = 8192,
) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """The two small tables every Hough cell is made of, and the Hough grid size (ny, nx).

    Centres (N, 2)/(M, 2) xy lie on row-major (h, w) grids, so the cell of an offset
    is ``row(y_i, y_j) + col(x_i, x_j)`` with ``row`` (hs, ht) already multiplied by
    ``nx`` and ``col`` (ws, wt). ``src_size``/``trg_size`` are image (W, H).
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
    return row.long().clamp_(0, ny - 1) * nx, col.long().clamp_(0, nx - 1), ny, nx


def cells(row: torch.Tensor, col: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Flat Hough cells (R * ws, M) of the matches of the source grid rows ``rows``: one broadcast add."""
    r = row[rows]  # (R, ht)
    return (r[:, None, :, None] + col[None, :, None, :]).reshape(r.shape[0] * col.shape[0], -1)  # (R, ws, ht, wt)


def hough_bins(*geometry, ncells: int = 8192) -> Tuple[torch.Tensor, int, int]:
    """Flat Hough-cell index of every offset (N, M), and the Hough grid size (ny, nx);
    ``geometry`` is :func:`hough_tables`'s (centres, grids, image sizes). For a cache of
    one pair's cells (:func:`rescore`)."""
    row, col, ny, nx = hough_tables(*geometry, ncells=ncells)
    return cells(row, col), ny, nx


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
    """Rescore the (N, M) match scores ``votes`` by smoothed Hough consensus, **in place**.

    Both passes (votes into the Hough space, then the smoothed space back onto the
    matches) go through blocks of source grid rows, each making only its own cells
    (at most :data:`BLOCK_ENTRIES` of them): the same result as :func:`rescore` on
    :func:`hough_bins` (the votes are added in the same order), without the N x M table
    of cells and the N x M factor, whose fresh pages cost more time than the work
    (0.10 against 0.21 s for a 6700 x 6700 pair on the study machine).
    """
    row, col, ny, nx = hough_tables(src_centres, trg_centres, src_grid, trg_grid, src_size, trg_size, ncells)
    hs, ws = src_grid
    step = max(1, BLOCK_ENTRIES // (ws * votes.shape[1]))
    blocks = [slice(r, min(r + step, hs)) for r in range(0, hs, step)]
    space = torch.zeros(ny * nx, dtype=votes.dtype, device=votes.device)
    for rows in blocks:
        space.index_add_(0, cells(row, col, rows).reshape(-1), votes[rows.start * ws:rows.stop * ws].reshape(-1))
    space = smooth(space, (ny, nx), filter_side)
    for rows in blocks:
        votes[rows.start * ws:rows.stop * ws].mul_(torch.take(space, cells(row, col, rows)))
    return votes


def smooth(space: torch.Tensor, shape: Tuple[int, int], filter_side: int = 7) -> torch.Tensor:
    """``G * h``: the flat Hough space (ny * nx,) convolved with the Gaussian of :func:`gaussian_filter`."""
    ny, nx = shape
    kernel = gaussian_filter(filter_side).to(space)
    return F.conv2d(space.view(1, 1, ny, nx), kernel[None, None], padding=filter_side // 2).view(-1)


def rescore(votes: torch.Tensor, bins: torch.Tensor, shape: Tuple[int, int], filter_side: int = 7) -> torch.Tensor:
    """:math:`V \\leftarrow V \\cdot (G * h)(\\mathrm{cell})` in place, given each match's Hough cell
    ``bins`` (N, M) on a Hough grid of ``shape`` (ny, nx) (:func:`hough_bins`, cached by callers
    that rescore one pair many times)."""
    space = torch.zeros(shape[0] * shape[1], dtype=votes.dtype, device=votes.device)
    space.index_add_(0, bins.reshape(-1), votes.reshape(-1))  # h
    return votes.mul_(torch.take(smooth(space, shape, filter_side), bins))  # (N, M)

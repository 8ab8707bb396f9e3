"""Figures (matplotlib, the ``plot`` extra). Files are written atomically, in the format of their extension."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def pyplot():
    """matplotlib.pyplot with the Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'scot_ot[plot]'") from None
    return plt


def save_figure(fig, out: os.PathLike) -> Path:
    """Save ``fig`` to ``out`` atomically, in the format its extension names (PNG without one).

    Written through :func:`scot_ot.outputs.atomic_write`: a temporary file in the same
    folder, renamed when complete, with the permissions the user's umask gives.
    """
    from .outputs import atomic_write

    out = Path(out)
    fmt = out.suffix.lower().lstrip(".") or "png"
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=fmt))
    finally:
        pyplot().close(fig)


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def _points(kps) -> torch.Tensor:
    """(K, 2) float32 CPU tensor of keypoints given as a tensor or an array (copied: datasets hand out read-only arrays)."""
    if isinstance(kps, torch.Tensor):
        return kps.detach().cpu().float()
    return torch.from_numpy(np.array(kps, dtype=np.float32))


def _canvas(src_img: torch.Tensor, trg_img: torch.Tensor):
    """Both (3, H, W) images side by side on one white (H_max, W_s + W_t, 3) array; returns (canvas, x offset of trg)."""
    a, b = _hwc(src_img), _hwc(trg_img)
    H = max(a.shape[0], b.shape[0])
    canvas = np.ones((H, a.shape[1] + b.shape[1], 3))
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    return canvas, a.shape[1]


def draw_side_by_side(ax, src_img: torch.Tensor, trg_img: torch.Tensor) -> int:
    """Show both (3, H, W) images on ``ax``, the target right of the source; returns the target's x offset."""
    canvas, dx = _canvas(src_img, trg_img)
    ax.imshow(canvas)
    ax.axis("off")
    return dx


def _pair_figure(src_img: torch.Tensor, trg_img: torch.Tensor):
    """An empty (fig, ax) sized for both images side by side (60 image pixels per inch)."""
    H = max(src_img.shape[-2], trg_img.shape[-2])
    W = src_img.shape[-1] + trg_img.shape[-1]
    return pyplot().subplots(figsize=(W / 60, H / 60))


def side_by_side(src_img: torch.Tensor, trg_img: torch.Tensor):
    """Figure with both (3, H, W) images on one canvas; returns (fig, ax, x offset of trg)."""
    fig, ax = _pair_figure(src_img, trg_img)
    return fig, ax, draw_side_by_side(ax, src_img, trg_img)


def trusted_matches(corr, top: int = 60, cam_threshold: float = 0.5):
    """The source hyperpixels whose matches :func:`plot_matches` draws, best first, and what they are.

    A source ``i`` qualifies when it is foreground (the CAM, or the mask that replaced
    it, at its centre exceeds ``cam_threshold``; every source when the hyperpixels
    carry neither) and its match is
    mutual (``i`` is also the best-scoring source of its target ``m(i)``). Of those,
    the ``top`` with the highest score. Returns ``(indices (<= top,), description)``.
    """
    from .diagnostics import cam_mask

    scores = corr.scores.detach().cpu()
    matches = corr.matches.cpu()
    n = scores.shape[0]
    mutual = scores.argmax(dim=0)[matches] == torch.arange(n)  # (N,)
    if corr.src.cam is not None:
        fg = cam_mask(corr.src, cam_threshold).cpu()
        where = f"foreground (CAM, or mask when given, > {cam_threshold:g}) sources"
    else:
        fg = torch.ones(n, dtype=torch.bool)
        where = "sources"
    idx = torch.nonzero(mutual & fg).flatten()
    idx = idx[torch.argsort(corr.confidences.cpu()[idx], descending=True)][:top]
    text = (f"the {len(idx)} most confident mutual matches of {where} "
            f"({int((mutual & fg).sum())} of {int(fg.sum())} are mutual)")
    return idx, text


# ------------------------------------------------------------------ matches
def draw_matches(ax, corr, src_img: torch.Tensor, trg_img: torch.Tensor, top: int = 60,
                 src_kps: Optional[torch.Tensor] = None, pred_kps: Optional[torch.Tensor] = None,
                 gt_kps: Optional[torch.Tensor] = None, title: str = "") -> None:
    """Draw on ``ax``: both images, the trusted matches (:func:`trusted_matches`) as coloured
    lines, and the keypoints when given, with a legend below saying what each mark is.

    Images are the resized ones (``corr.src.size``); keypoints (K, 2) xy are in
    original pixels and are scaled here by ``corr.src.scale`` / ``corr.trg.scale``.
    ``pred_kps`` (transferred) and ``gt_kps`` (ground truth) are target keypoints; a
    white line joins each prediction to its ground truth (the error).
    """
    from matplotlib.lines import Line2D

    plt = pyplot()
    dx = draw_side_by_side(ax, src_img, trg_img)
    order, what = trusted_matches(corr, top)
    s = corr.src.centres.cpu()[order]
    t = corr.trg.centres.cpu()[corr.matches.cpu()[order]]
    colours = plt.cm.hsv(np.linspace(0, 1, max(len(order), 1), endpoint=False))
    for (x0, y0), (x1, y1), c in zip(s.tolist(), t.tolist(), colours):
        ax.plot([x0, x1 + dx], [y0, y1], "-", color=c, lw=0.8, alpha=0.8)
        ax.plot([x0, x1 + dx], [y0, y1], "o", color=c, ms=2)
    handles = [Line2D([0], [0], color="grey", lw=0.8, marker="o", ms=2, label=f"coloured lines: {what}")]
    sxs, sxt = torch.tensor(corr.src.scale), torch.tensor(corr.trg.scale)
    if src_kps is not None:
        k = _points(src_kps) * sxs
        handles.append(ax.scatter(k[:, 0], k[:, 1], s=40, c="yellow", edgecolors="black", marker="o",
                                  zorder=5, label="source keypoints"))
    if pred_kps is not None:
        k = _points(pred_kps) * sxt
        handles.append(ax.scatter(k[:, 0] + dx, k[:, 1], s=40, c="yellow", edgecolors="black", marker="o",
                                  zorder=5, label="transferred keypoints"))
    if gt_kps is not None:
        k = _points(gt_kps) * sxt
        handles.append(ax.scatter(k[:, 0] + dx, k[:, 1], s=50, c="lime", marker="x", zorder=6,
                                  label="ground truth (white: error)"))
        if pred_kps is not None:
            p = _points(pred_kps) * sxt
            for (x0, y0), (x1, y1) in zip(p.tolist(), k.tolist()):
                ax.plot([x0 + dx, x1 + dx], [y0, y1], "-", color="white", lw=0.8)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=8)


def plot_matches(corr, src_img: torch.Tensor, trg_img: torch.Tensor, out: os.PathLike,
                 top: int = 60, src_kps: Optional[torch.Tensor] = None,
                 pred_kps: Optional[torch.Tensor] = None, gt_kps: Optional[torch.Tensor] = None,
                 title: str = "") -> Path:
    """:func:`draw_matches` on a figure of its own, saved to ``out`` (:func:`save_figure`)."""
    fig, ax = _pair_figure(src_img, trg_img)
    draw_matches(ax, corr, src_img, trg_img, top, src_kps=src_kps, pred_kps=pred_kps, gt_kps=gt_kps,
                 title=title)
    return save_figure(fig, out)


# ------------------------------------------------------------------ in-degree
def _grid_overlay(ax, values: np.ndarray, size, dx: float = 0.0, **kwargs):
    """Draw an (h, w) grid of values over an image of ``size`` (W, H) placed at x offset ``dx``."""
    W, H = size
    return ax.imshow(values, extent=(dx, dx + W, H, 0), interpolation="nearest", **kwargs)


def draw_in_degree(ax, corr, trg_img: torch.Tensor, title: str = ""):
    """Draw on ``ax`` the target image and, over it, the heat map of the in-degree
    :math:`d_j = |\\{i : m(i) = j\\}|` of each target hyperpixel ``j`` (targets no source
    hits are left clear). Returns the heat map's image, for a colour bar."""
    from .diagnostics import in_degree

    h, w = corr.trg.grid
    d = in_degree(corr.matches.cpu(), len(corr.trg)).reshape(h, w).numpy()  # (h, w)
    img = _hwc(trg_img)
    ax.imshow(img)
    masked = np.ma.masked_where(d == 0, d)
    im = _grid_overlay(ax, masked, corr.trg.size, cmap="inferno", alpha=0.75, vmin=1,
                       vmax=max(int(d.max()), 2))
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)
    ax.axis("off")
    ax.set_title(title or f"target in-degree, max {int(d.max())}", fontsize=8)
    return im


def plot_in_degree(corr, trg_img: torch.Tensor, out: os.PathLike, title: str = "") -> Path:
    """Heat map of the target in-degree ``d_j`` (sources matched to target hyperpixel j) over the target image
    (:func:`draw_in_degree` with a colour bar, saved to ``out``)."""
    plt = pyplot()
    H, W = trg_img.shape[-2:]
    fig, ax = plt.subplots(figsize=(W / 50, H / 50))
    im = draw_in_degree(ax, corr, trg_img, title)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="in-degree (0: not drawn)")
    return save_figure(fig, out)


# ------------------------------------------------------------------ background matches
def draw_background_matches(ax, corr, src_img: torch.Tensor, trg_img: torch.Tensor, foreground,
                            max_lines: int = 200, title: str = "") -> float:
    """Draw on ``ax``: both images with their foreground tinted blue; foreground sources
    matched into the target background as red lines, into the target foreground as thin
    green lines (at most ``max_lines`` of each, evenly subsampled).

    ``foreground``: a :class:`scot_ot.diagnostics.Foreground`. Returns the share of
    foreground sources matched into the background (0 when the source has no foreground).
    """
    plt = pyplot()
    dx = draw_side_by_side(ax, src_img, trg_img)
    tint = lambda m, grid: np.ma.masked_where(~m.reshape(grid).numpy(), np.ones(grid))  # noqa: E731
    blue = plt.cm.colors.ListedColormap(["#3060ff"])
    _grid_overlay(ax, tint(foreground.src.cpu(), corr.src.grid), corr.src.size, cmap=blue, alpha=0.35)
    _grid_overlay(ax, tint(foreground.trg.cpu(), corr.trg.grid), corr.trg.size, dx, cmap=blue, alpha=0.35)
    matches = corr.matches.cpu()
    src_fg = foreground.src.cpu().bool()
    into_bg = src_fg & ~foreground.trg.cpu().bool()[matches]  # (N,)
    into_fg = src_fg & ~into_bg
    s, t = corr.src.centres.cpu(), corr.trg.centres.cpu()[matches]
    for sel, colour, lw in ((into_fg, "lime", 0.4), (into_bg, "red", 0.7)):
        idx = torch.nonzero(sel).flatten()
        if len(idx) > max_lines:
            idx = idx[torch.linspace(0, len(idx) - 1, max_lines).long()]
        for i in idx.tolist():
            ax.plot([s[i, 0], t[i, 0] + dx], [s[i, 1], t[i, 1]], "-", color=colour, lw=lw, alpha=0.7)
    rate = float(into_bg.sum()) / max(int(src_fg.sum()), 1)
    ax.set_title(title or f"foreground ({foreground.method}) matched into background: {rate:.1%}",
                 fontsize=8)
    return rate


def plot_background_matches(corr, src_img: torch.Tensor, trg_img: torch.Tensor, foreground,
                            out: os.PathLike, max_lines: int = 200, title: str = "") -> Path:
    """:func:`draw_background_matches` on a figure of its own, saved to ``out`` (:func:`save_figure`)."""
    fig, ax = _pair_figure(src_img, trg_img)
    draw_background_matches(ax, corr, src_img, trg_img, foreground, max_lines, title)
    return save_figure(fig, out)

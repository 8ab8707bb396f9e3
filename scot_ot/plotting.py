"""PNG figures (matplotlib, the ``plot`` extra). Files are written atomically."""

from __future__ import annotations

import os
import tempfile
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
    """Save ``fig`` as PNG via a temporary file in the same folder, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        pyplot().close(fig)
    return out


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def side_by_side(src_img: torch.Tensor, trg_img: torch.Tensor):
    """Figure with both (3, H, W) images on one canvas; returns (fig, ax, x offset of trg)."""
    plt = pyplot()
    a, b = _hwc(src_img), _hwc(trg_img)
    H = max(a.shape[0], b.shape[0])
    canvas = np.ones((H, a.shape[1] + b.shape[1], 3))
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 60, canvas.shape[0] / 60))
    ax.imshow(canvas)
    ax.axis("off")
    return fig, ax, a.shape[1]


def plot_matches(corr, src_img: torch.Tensor, trg_img: torch.Tensor, out: os.PathLike,
                 top: int = 60, src_kps: Optional[torch.Tensor] = None,
                 pred_kps: Optional[torch.Tensor] = None, gt_kps: Optional[torch.Tensor] = None,
                 title: str = "") -> Path:
    """The ``top`` most confident matches as coloured lines; keypoints when given.

    Images are the resized ones (``corr.src.size``); keypoints are in original pixels
    and are scaled here.
    """
    plt = pyplot()
    fig, ax, dx = side_by_side(src_img, trg_img)
    order = torch.argsort(corr.confidences, descending=True)[:top].cpu()
    s = corr.src.centres.cpu()[order]
    t = corr.trg.centres.cpu()[corr.matches.cpu()[order]]
    colours = plt.cm.hsv(np.linspace(0, 1, len(order), endpoint=False))
    for (x0, y0), (x1, y1), c in zip(s.tolist(), t.tolist(), colours):
        ax.plot([x0, x1 + dx], [y0, y1], "-", color=c, lw=0.8, alpha=0.8)
        ax.plot([x0, x1 + dx], [y0, y1], "o", color=c, ms=2)
    sxs, sxt = torch.tensor(corr.src.scale), torch.tensor(corr.trg.scale)
    if src_kps is not None:
        k = torch.as_tensor(src_kps, dtype=torch.float32) * sxs
        ax.scatter(k[:, 0], k[:, 1], s=40, c="yellow", edgecolors="black", marker="o", zorder=5)
    if pred_kps is not None:
        k = torch.as_tensor(pred_kps, dtype=torch.float32) * sxt
        ax.scatter(k[:, 0] + dx, k[:, 1], s=40, c="yellow", edgecolors="black", marker="o", zorder=5,
                   label="transferred")
    if gt_kps is not None:
        k = torch.as_tensor(gt_kps, dtype=torch.float32) * sxt
        ax.scatter(k[:, 0] + dx, k[:, 1], s=50, c="lime", edgecolors="black", marker="x", zorder=6,
                   label="ground truth")
        if pred_kps is not None:
            p = torch.as_tensor(pred_kps, dtype=torch.float32) * sxt
            for (x0, y0), (x1, y1) in zip(p.tolist(), k.tolist()):
                ax.plot([x0 + dx, x1 + dx], [y0, y1], "-", color="white", lw=0.8)
    if pred_kps is not None or gt_kps is not None:
        ax.legend(loc="lower right", fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return save_figure(fig, out)

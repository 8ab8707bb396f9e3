"""Receptive fields of a layer, computed by walking the convolutions and pools before it.

For each layer on the path (kernel ``k``, stride ``s``, dilation ``d``, padding
``p_before`` in front), per spatial dimension:

.. math::

    j_l = j_{l-1} s, \\qquad
    r_l = r_{l-1} + d (k - 1) j_{l-1}, \\qquad
    o_l = o_{l-1} + j_{l-1} \\big(d (k - 1) / 2 - p_\\text{before}\\big)

with ``j_0 = r_0 = 1``, ``o_0 = 0``. ``j`` is the jump (input pixels between two
neighbouring cells), ``r`` the receptive field side, ``o`` the centre of cell 0.

Coordinate convention: pixel-index coordinates of the network input, pixel ``(i, j)``
centred at ``(y, x) = (i, j)``. Cell ``(y, x)`` of the layer is centred at
``(o_y + j y, o_x + j x)``; its box is that centre ``± (r // 2)`` (integer division,
SCOT's ``rfsz // 2``: a 27-px field gives ``[c - 13, c + 13]``, which for the odd
fields of these networks is exactly the pixels the field covers), not clipped to the
image. Add 0.5 to go to coordinates where pixel ``i`` spans
``[i, i + 1)``. Symmetric padding (torchvision's ResNets) gives ``o = 0``, the
convention of HPF/SCOT (centre ``= j x``); TF "SAME" padding (EfficientNet-Lite) pads
after rather than before, so ``o > 0`` and depends on the input size.

Only the main path matters: a residual branch (identity or strided 1x1) sees a subset
of the main path's receptive field.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn


class ReceptiveField(NamedTuple):
    """Geometry of one layer's cells for a given input size (see the module docstring)."""

    jump: float  # input pixels between neighbouring cells
    size: float  # side of the (square) receptive field, in input pixels
    offset: Tuple[float, float]  # (y, x) centre of cell (0, 0)

    def centres(self, h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Cell centres (h * w, 2) as (x, y), row-major over the (h, w) grid."""
        ys = self.offset[0] + self.jump * torch.arange(h, device=device, dtype=torch.float32)  # (h,)
        xs = self.offset[1] + self.jump * torch.arange(w, device=device, dtype=torch.float32)  # (w,)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)  # (h*w, 2)

    def boxes(self, h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Receptive-field boxes (h * w, 4) as (x0, y0, x1, y1) = centre ∓ (size // 2).

        The integer half-width is SCOT's (``geometry.receptive_fields``); the box
        centre ``x0 + (x1 - x0) // 2`` is the cell centre.
        """
        c = self.centres(h, w, device)  # (h*w, 2)
        half = self.size // 2
        return torch.cat([c - half, c + half], dim=-1)  # (h*w, 4)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _step(m: nn.Module, dim: int, size: int) -> Tuple[int, int, int, int, int]:
    """(kernel, stride, dilation, padding before, output size) of ``m`` along ``dim``."""
    if callable(getattr(m, "same_pad", None)):  # dynamic TF "SAME" padding (Conv2dSame)
        k, s, d = m.kernel_size[dim], m.stride[dim], m.dilation[dim]
        return k, s, d, m.same_pad(size, dim)[0], -(-size // s)
    if isinstance(m, nn.Conv2d):
        k, s, d = m.kernel_size[dim], m.stride[dim], m.dilation[dim]
        if m.padding == "valid":
            p = 0
        elif m.padding == "same":  # stride 1 only; PyTorch puts the odd pixel after
            p = d * (k - 1) // 2
        else:
            p = m.padding[dim]
        return k, s, d, p, (size + 2 * p - d * (k - 1) - 1) // s + 1
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(m.kernel_size)[dim], _pair(m.stride)[dim], _pair(m.padding)[dim]
        d = _pair(getattr(m, "dilation", 1))[dim]
        span = size + 2 * p - d * (k - 1) - 1
        if m.ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= size + p:  # last window must start inside the input
                out -= 1
        else:
            out = span // s + 1
        return k, s, d, p, out
    raise TypeError(f"receptive field: no geometry for layer type {type(m).__name__}")


def walk_receptive_field(layers: Sequence[nn.Module], input_hw: Tuple[int, int]) -> ReceptiveField:
    """Receptive field after ``layers`` (the main path, in order) for an (H, W) input."""
    jump, size, offset = [], [], []
    for dim in (0, 1):
        j, r, o, n = 1, 1, 0.0, int(input_hw[dim])
        for m in layers:
            k, s, d, p, n = _step(m, dim, n)
            o += j * (d * (k - 1) / 2 - p)
            r += d * (k - 1) * j
            j *= s
        jump.append(j)
        size.append(r)
        offset.append(o)
    # Every layer we meet is square, so both dimensions agree on jump and size.
    assert jump[0] == jump[1] and size[0] == size[1], (jump, size)
    return ReceptiveField(float(jump[0]), float(size[0]), (offset[0], offset[1]))


__all__ = ["ReceptiveField", "walk_receptive_field"]

"""Triton kernels of the ``fused`` solver: one streaming pass over the cost per half-iteration.

The update
----------
With the potentials of :mod:`scot_ot.ot.result` (``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``)
and ``tau = rho / (rho + eps)`` (1 for a hard marginal), one Sinkhorn iteration of
:mod:`scot_ot.ot.torch_log` is

.. math::

    L^{c}_j = \\log \\sum_i \\exp\\big(\\log a_i + (f_i - C_{ij})/\\varepsilon\\big),
    \\qquad g_j \\leftarrow -\\tau_b \\varepsilon L^{c}_j

    L^{r}_i = \\log \\sum_j \\exp\\big(\\log b_j + (g_j - C_{ij})/\\varepsilon\\big),
    \\qquad f_i \\leftarrow -\\tau_a \\varepsilon L^{r}_i

The kernels work in base 2 (``exp2``/``log2`` are the native instructions): with
``s = log2(e) / eps``

.. math::

    \\sigma_{ij} = \\underbrace{\\log_2(e)\\log b_j + s\\, g_j}_{\\beta_j} - s\\, C_{ij},
    \\qquad L^{r}_i = \\ln 2 \\cdot \\log_2 \\sum_j 2^{\\sigma_{ij}}

and the same with ``alpha_i = log2(e) log a_i + s f_i`` for the columns. Each
log-sum-exp is taken *online* over tiles: a running maximum ``M`` and a running
sum ``S`` of ``2^(sigma - M)``; a new tile with maximum ``M'`` rescales
``S <- S 2^(M - M') + sum 2^(sigma - M')``. Nothing overflows whatever ``eps`` is;
entries with zero weight (``log a_i = -inf``) or outside the matrix contribute 0.

Passes over ``C`` (row-major ``(B, n, m)``, ``C[b, i, j]`` at ``b*s_b + i*s_n + j``)
-------------------------------------------------------------------------------
- row half-step (:class:`HalfStep` ``"row"``): program ``(r, k, b)`` owns ``BLOCK_N``
  rows and the ``k``-th chunk of columns; it walks that chunk in
  ``(BLOCK_N, BLOCK_M)`` tiles (loads contiguous along ``m``) and keeps ``(M, S)``
  per row.
- column half-step (``"col"``): program ``(c, k, b)`` owns ``BLOCK_M`` columns and
  the ``k``-th chunk of rows; it walks the chunk in the same ``(BLOCK_N, BLOCK_M)``
  tiles, loads contiguous along ``m`` (not one program per column with strided
  reads), and keeps ``(M, S)`` per column.
- with more than one chunk (``split > 1``) each program writes partial ``(M, S)``
  to a ``(B, split, L)`` buffer and :func:`_combine_kernel` merges them (reading
  ``2 * split * L`` floats, nothing of ``C``); with ``split == 1`` the pass writes
  its results directly.
- loads: whole tiles are loaded without a mask, so they compile to 16-byte
  vector loads (``VEC`` elements, a hint the launcher sets when it divides the
  strides and the address, so ``m = 4200`` vectorises too). Rows past ``n`` read
  row ``n - 1`` and are never stored (row pass) or get weight ``-inf`` (column
  pass); only the last partial column tile is masked.

Every pass writes both the new potential and the log-sum-exp ``L`` itself: the
solver turns ``L`` into the marginals of the current plan for the convergence
check (``row_i = a_i exp(f_i/eps + L^r_i)``), so the check needs no pass of its own.

Precision: the cost is read as float32, bfloat16 or float16 and converted to
float32 in registers; potentials, scores and the (M, S) accumulators are float32.

Import this module only where triton is installed; whether its kernels run on the
GPU or in the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) is fixed
when it is first imported (:data:`INTERPRETED`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

#: the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
if INTERPRETED != isinstance(tl.zeros, InterpretedFunction):
    # triton decorates its own library (tl.zeros, tl.max, ...) when it is first imported
    raise RuntimeError(
        "TRITON_INTERPRET changed after triton was imported (TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET')!r} now, {'not ' if INTERPRETED else ''}set then); set it "
        "before anything imports triton"
    )

#: cost dtypes the kernels read
COST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LOG2E = 1.4426950408889634  # log2(e); the kernels spell it (and ln 2) as literals


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _row_tiles(mx, sm, c_rows, pot_ptr, logw_ptr, start, stop, scale,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """Fold the column tiles ``[start, stop)`` into the running (max, sum) of each row.

    ``c_rows`` (BLOCK_N, 1) points at the rows of C; ``pot_ptr``/``logw_ptr`` at g, log b.
    Unmasked tiles (all columns inside) compile to vector loads.
    """
    for j in range(start, stop, BLOCK_M):
        cols = j + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        if MASKED:
            ok = cols < stop
            w = tl.load(logw_ptr + cols, mask=ok, other=float("-inf"))
            p = tl.load(pot_ptr + cols, mask=ok, other=0.0)
            c = tl.load(c_rows + cols[None, :], mask=ok[None, :], other=0.0)
        else:
            w = tl.load(logw_ptr + cols)
            p = tl.load(pot_ptr + cols)
            c = tl.load(c_rows + cols[None, :])
        beta = w * 1.4426950408889634 + p * scale  # (BLOCK_M,)  log2(e) (log b_j + g_j/eps)
        sigma = beta[None, :] - c.to(tl.float32) * scale  # (BLOCK_N, BLOCK_M)
        new_mx = tl.maximum(mx, tl.max(sigma, axis=1))  # (BLOCK_N,)
        safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        sm = sm * tl.exp2(mx - safe) + tl.sum(tl.exp2(sigma - safe[:, None]), axis=1)
        mx = new_mx
    return mx, sm


@triton.jit
def _row_kernel(
    C_ptr, pot_ptr, logw_ptr,  # C (B, n, m); g (B, m); log b (B, m)
    part_max_ptr, part_sum_ptr,  # (B, split, n) partials, used when not FINAL
    out_pot_ptr, out_lse_ptr,  # (B, n) new f and L^r, used when FINAL
    n, m, chunk, split,
    stride_cb, stride_cn,
    scale, neg_tau_eps,  # log2(e)/eps, -tau_a*eps
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr, FINAL: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < n
    # rows past n read row n - 1 (never stored): no row mask, so full tiles load as vectors;
    # VEC (set by the launcher) divides the strides and the base address
    row_off = tl.multiple_of(tl.minimum(rows, n - 1).to(tl.int64) * stride_cn, VEC)  # (BLOCK_N,)
    c_rows = C_ptr + tl.multiple_of(pid_b * stride_cb, VEC) + row_off[:, None]  # (BLOCK_N, 1)
    j0 = pid_k * chunk
    j1 = tl.minimum(j0 + chunk, m)
    j_full = j0 + (j1 - j0) // BLOCK_M * BLOCK_M  # whole tiles in [j0, j_full), then one partial
    mx = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK_N], tl.float32)
    mx, sm = _row_tiles(mx, sm, c_rows, pot_ptr + pid_b * m, logw_ptr + pid_b * m, j0, j_full, scale,
                        BLOCK_M, False)
    mx, sm = _row_tiles(mx, sm, c_rows, pot_ptr + pid_b * m, logw_ptr + pid_b * m, j_full, j1, scale,
                        BLOCK_M, True)
    if FINAL:
        # epilogue: base-2 (max, sum) -> natural L; lanes outside hold sm = 0 (log2(1) there, never stored)
        lse = (mx + tl.log2(tl.where(row_ok, sm, 1.0))) * 0.6931471805599453  # ln 2
        tl.store(out_lse_ptr + pid_b * n + rows, lse, mask=row_ok)
        tl.store(out_pot_ptr + pid_b * n + rows, neg_tau_eps * lse, mask=row_ok)  # -tau eps L
    else:
        at = (pid_b * split + pid_k) * n + rows
        tl.store(part_max_ptr + at, mx, mask=row_ok)
        tl.store(part_sum_ptr + at, sm, mask=row_ok)


@triton.jit
def _col_tiles(mx, sm, c_cols, pot_ptr, logw_ptr, start, stop, n, stride_cn, col_ok, scale,
               BLOCK_N: tl.constexpr, VEC: tl.constexpr, MASK_COLS: tl.constexpr):
    """Fold the row tiles ``[start, stop)`` into the running (max, sum) of each column.

    ``c_cols`` (1, BLOCK_M) points at the columns of C; ``pot_ptr``/``logw_ptr`` at f, log a.
    Rows past ``stop`` get weight ``-inf`` (and read row n - 1), so only a partial
    column tile (``MASK_COLS``) needs a load mask.
    """
    for i in range(start, stop, BLOCK_N):
        rows = i + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        ok = rows < stop
        w = tl.load(logw_ptr + rows, mask=ok, other=float("-inf"))
        p = tl.load(pot_ptr + rows, mask=ok, other=0.0)
        alpha = w * 1.4426950408889634 + p * scale  # (BLOCK_N,)  log2(e) (log a_i + f_i/eps)
        row_off = tl.multiple_of(tl.minimum(rows, n - 1).to(tl.int64) * stride_cn, VEC)
        if MASK_COLS:
            c = tl.load(c_cols + row_off[:, None], mask=col_ok[None, :], other=0.0)
        else:
            c = tl.load(c_cols + row_off[:, None])
        sigma = alpha[:, None] - c.to(tl.float32) * scale  # (BLOCK_N, BLOCK_M)
        new_mx = tl.maximum(mx, tl.max(sigma, axis=0))  # (BLOCK_M,)
        safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        sm = sm * tl.exp2(mx - safe) + tl.sum(tl.exp2(sigma - safe[None, :]), axis=0)
        mx = new_mx
    return mx, sm


@triton.jit
def _col_kernel(
    C_ptr, pot_ptr, logw_ptr,  # C (B, n, m); f (B, n); log a (B, n)
    part_max_ptr, part_sum_ptr,  # (B, split, m) partials, used when not FINAL
    out_pot_ptr, out_lse_ptr,  # (B, m) new g and L^c, used when FINAL
    n, m, chunk, split,
    stride_cb, stride_cn,
    scale, neg_tau_eps,  # log2(e)/eps, -tau_b*eps
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr, FINAL: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    cols = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    col_ok = cols < m
    c_cols = C_ptr + tl.multiple_of(pid_b * stride_cb, VEC) + cols[None, :]  # (1, BLOCK_M)
    i0 = pid_k * chunk
    i1 = tl.minimum(i0 + chunk, n)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK_M], tl.float32)
    if (pid_c + 1) * BLOCK_M <= m:  # a whole column tile: vector loads
        mx, sm = _col_tiles(mx, sm, c_cols, pot_ptr + pid_b * n, logw_ptr + pid_b * n, i0, i1, n,
                            stride_cn, col_ok, scale, BLOCK_N, VEC, False)
    else:
        mx, sm = _col_tiles(mx, sm, c_cols, pot_ptr + pid_b * n, logw_ptr + pid_b * n, i0, i1, n,
                            stride_cn, col_ok, scale, BLOCK_N, VEC, True)
    if FINAL:
        # epilogue: base-2 (max, sum) -> natural L; lanes outside hold sm = 0 (log2(1) there, never stored)
        lse = (mx + tl.log2(tl.where(col_ok, sm, 1.0))) * 0.6931471805599453  # ln 2
        tl.store(out_lse_ptr + pid_b * m + cols, lse, mask=col_ok)
        tl.store(out_pot_ptr + pid_b * m + cols, neg_tau_eps * lse, mask=col_ok)  # -tau eps L
    else:
        at = (pid_b * split + pid_k) * m + cols
        tl.store(part_max_ptr + at, mx, mask=col_ok)
        tl.store(part_sum_ptr + at, sm, mask=col_ok)


@triton.jit
def _combine_kernel(
    part_max_ptr, part_sum_ptr,  # (B, split, L)
    out_pot_ptr, out_lse_ptr,  # (B, L)
    L, split, neg_tau_eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < L
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    sm = tl.zeros([BLOCK], tl.float32)
    for k in range(0, split):
        at = (pid_b * split + k) * L + idx
        pm = tl.load(part_max_ptr + at, mask=ok, other=float("-inf"))
        ps = tl.load(part_sum_ptr + at, mask=ok, other=0.0)
        new_mx = tl.maximum(mx, pm)
        safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        sm = sm * tl.exp2(mx - safe) + ps * tl.exp2(pm - safe)
        mx = new_mx
    # epilogue: base-2 (max, sum) -> natural L; lanes outside hold sm = 0 (log2(1) there, never stored)
    lse = (mx + tl.log2(tl.where(ok, sm, 1.0))) * 0.6931471805599453  # ln 2
    tl.store(out_lse_ptr + pid_b * L + idx, lse, mask=ok)
    tl.store(out_pot_ptr + pid_b * L + idx, neg_tau_eps * lse, mask=ok)  # -tau eps L


# ---------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class Tiling:
    """Tile shape ``(block_n, block_m)`` and number of chunks along the reduced axis."""

    block_n: int
    block_m: int
    split: int
    num_warps: int = 4


@functools.lru_cache(maxsize=256)
def default_tiling(side: str, B: int, n: int, m: int, dtype: torch.dtype, device: torch.device) -> Tiling:
    """Heuristic tiles, not yet tuned on a GPU (``benchmarks/gpu_solvers.py --sweep`` times others).

    On CUDA, ``BLOCK_M`` spans 512 bytes of a row of C (a warp issues 16-byte
    vector loads) and the split comes from :func:`auto_split`. The interpreter
    runs programs one after the other, so there: one program per 64 x 64 block.
    """
    if device.type != "cuda" or INTERPRETED:
        return Tiling(block_n=64, block_m=64, split=1)
    block_m = 128 if dtype == torch.float32 else 256
    block_n = 16 if side == "row" else 32
    return Tiling(block_n, block_m, auto_split(side, B, n, m, block_n, block_m, device))


def auto_split(side: str, B: int, n: int, m: int, block_n: int, block_m: int, device: torch.device,
               programs_per_sm: int = 8) -> int:
    """Chunks along the reduced axis: about ``programs_per_sm`` programs per SM, >= 4 tiles per chunk.

    Many resident programs are what keeps enough loads in flight to stream C at
    full bandwidth; the partial results cost ``2 * split * L`` floats, tiny next to C.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if side == "row":
        tiles_out, tiles_red = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    else:
        tiles_out, tiles_red = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(programs_per_sm * sms, tiles_out * B), tiles_red // 4))


def vector_width(C: torch.Tensor) -> int:
    """Elements per 16-byte load that divide C's row and batch strides and its address (1 to 16 / itemsize)."""
    item = C.element_size()
    v = 16 // item
    while v > 1 and (C.stride(1) % v or (C.shape[0] > 1 and C.stride(0) % v) or C.data_ptr() % (v * item)):
        v //= 2
    return v


# ---------------------------------------------------------------------------- launchers
class HalfStep:
    """One half-step on a fixed cost, validated once and launched many times.

    ``HalfStep("row", C, log_b)(g, eps, tau)`` returns ``(f, L^r)`` and
    ``HalfStep("col", C, log_a)(f, eps, tau)`` returns ``(g, L^c)``:

    .. math::

        L^r_i = \\log \\sum_j b_j e^{(g_j - C_{ij})/\\varepsilon},\\quad f_i = -\\tau \\varepsilon L^r_i;
        \\qquad
        L^c_j = \\log \\sum_i a_i e^{(f_i - C_{ij})/\\varepsilon},\\quad g_j = -\\tau \\varepsilon L^c_j

    C : (B, n, m) float32 / bfloat16 / float16, contiguous along m, on CUDA (or
        on CPU when :data:`INTERPRETED`).
    logw : log-weights of the reduced side, (B, m) for "row", (B, n) for "col",
        float32, contiguous (``-inf`` for zero weights).
    The potential passed at each call has logw's shape, dtype and device; both
    outputs are new (B, n) (row) or (B, m) (col) float32 tensors.
    """

    def __init__(self, side: str, C: torch.Tensor, logw: torch.Tensor, tiling: Optional[Tiling] = None):
        if side not in ("row", "col"):
            raise ValueError(f"side: expected 'row' or 'col', got {side!r}")
        if not isinstance(C, torch.Tensor) or C.dim() != 3:
            raise ValueError(f"C: expected a (B, n, m) tensor, got {getattr(C, 'shape', type(C).__name__)}")
        if C.dtype not in COST_DTYPES:
            raise ValueError(f"C: dtype {C.dtype} is not read by the fused kernels; use one of "
                             f"{', '.join(str(d) for d in COST_DTYPES)}")
        if not (C.device.type == "cuda" or (INTERPRETED and C.device.type == "cpu")):
            raise RuntimeError(
                f"C: the fused kernels need a CUDA tensor, got one on {C.device}; to run them on a CPU "
                "tensor in the (slow) Triton interpreter, set TRITON_INTERPRET=1 before triton is imported")
        B, n, m = C.shape
        if B * n * m == 0:
            raise ValueError(f"C: empty cost of shape {tuple(C.shape)}")
        if C.stride(2) != 1:
            raise ValueError(f"C: must be contiguous along its last axis, got strides {C.stride()}")
        if max(n, m) >= 2**31:
            raise ValueError(f"C: dimension too large for int32 indices: {tuple(C.shape)}")
        self.side, self.C = side, C
        self.out_len, self.red_len = (n, m) if side == "row" else (m, n)
        self._check_vector("logw", logw)
        self.logw = logw
        t = tiling or default_tiling(side, B, n, m, C.dtype, C.device)
        for name in ("block_n", "block_m", "num_warps"):
            v = getattr(t, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"tiling.{name}: must be a power of two, got {v!r}")
        if not isinstance(t.split, int) or t.split < 1:
            raise ValueError(f"tiling.split: must be an integer >= 1, got {t.split!r}")
        self.tiling = t
        block_red, block_out = (t.block_m, t.block_n) if side == "row" else (t.block_n, t.block_m)
        # chunk of the reduced axis per program: whole tiles, `split` chunks at most
        self.chunk = triton.cdiv(triton.cdiv(self.red_len, t.split), block_red) * block_red
        self.split = triton.cdiv(self.red_len, self.chunk)
        self.grid = (triton.cdiv(self.out_len, block_out), self.split, B)
        self.kernel = _row_kernel if side == "row" else _col_kernel
        self.vec = vector_width(C)
        if self.split > 1:
            self.part_max = torch.empty(B, self.split, self.out_len, dtype=torch.float32, device=C.device)
            self.part_sum = torch.empty_like(self.part_max)
            self.combine_block = 1024 if INTERPRETED else 256
            self.combine_grid = (triton.cdiv(self.out_len, self.combine_block), B)

    def _check_vector(self, name: str, x: torch.Tensor) -> None:
        want = (self.C.shape[0], self.red_len)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise ValueError(f"{name}: expected a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape) != want or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape {want}, got "
                             f"{tuple(x.shape)} (contiguous={x.is_contiguous()})")
        if x.device != self.C.device:
            raise ValueError(f"{name}: device {x.device} differs from the cost's {self.C.device}")

    def __call__(self, pot: torch.Tensor, eps: float, tau: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_vector("pot", pot)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")
        if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
            raise ValueError(f"tau: must be in (0, 1], got {tau!r}")
        C, t = self.C, self.tiling
        B = C.shape[0]
        out_pot = torch.empty(B, self.out_len, dtype=torch.float32, device=C.device)
        out_lse = torch.empty(B, self.out_len, dtype=torch.float32, device=C.device)
        scale, neg_tau_eps = LOG2E / eps, -tau * eps
        final = self.split == 1
        part_max, part_sum = (out_pot, out_lse) if final else (self.part_max, self.part_sum)
        self.kernel[self.grid](
            C, pot, self.logw, part_max, part_sum, out_pot, out_lse,
            C.shape[1], C.shape[2], self.chunk, self.split, C.stride(0), C.stride(1),
            scale, neg_tau_eps,
            BLOCK_N=t.block_n, BLOCK_M=t.block_m, VEC=self.vec, FINAL=final, num_warps=t.num_warps)
        if not final:
            _combine_kernel[self.combine_grid](
                self.part_max, self.part_sum, out_pot, out_lse, self.out_len, self.split, neg_tau_eps,
                BLOCK=self.combine_block)
        return out_pot, out_lse


def row_update(C: torch.Tensor, g: torch.Tensor, log_b: torch.Tensor, eps: float, tau: float = 1.0,
               tiling: Optional[Tiling] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One row half-step ``(f, L^r)`` (see :class:`HalfStep`); g, log_b : (B, m) float32."""
    return HalfStep("row", C, log_b, tiling)(g, eps, tau)


def col_update(C: torch.Tensor, f: torch.Tensor, log_a: torch.Tensor, eps: float, tau: float = 1.0,
               tiling: Optional[Tiling] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One column half-step ``(g, L^c)`` (see :class:`HalfStep`); f, log_a : (B, n) float32."""
    return HalfStep("col", C, log_a, tiling)(f, eps, tau)

"""``fused``: log-domain Sinkhorn whose half-steps are single streaming passes of a Triton kernel.

The iteration is that of :mod:`scot_ot.ot.torch_log` (``tau = rho / (rho + eps)``):

.. math::

    g_j \\leftarrow -\\tau_b\\, \\varepsilon \\log \\sum_i a_i
        e^{(f_i - C_{ij})/\\varepsilon}, \\qquad
    f_i \\leftarrow -\\tau_a\\, \\varepsilon \\log \\sum_j b_j
        e^{(g_j - C_{ij})/\\varepsilon}

but each half-step reads ``C`` once, tile by tile, with an online log-sum-exp
in float32 (:mod:`scot_ot.ot.fused.kernels`); no (B, n, m) temporary is ever
allocated and the plan is not materialised (``result.plan`` is built from the
potentials on first access).

Which plan the error refers to
------------------------------
After iteration ``k`` the state holds ``(f_k, g_k)``; the error reported at a
check is the common metric (:func:`scot_ot.ot.result.marginal_error`) of
``P_k = a b exp((f_k + g_k - C)/eps)``, the plan of the returned potentials:

- row marginal: the row pass that produced ``f_k`` computed
  ``L^r = log sum_j b_j exp((g_k - C)/eps)``, so ``P_k 1 = a exp(f_k/eps + L^r)``;
- column marginal: the column pass of iteration ``k + 1`` computes
  ``L^c = log sum_i a_i exp((f_k - C)/eps)``, so ``P_k^T 1 = b exp(g_k/eps + L^c)``,
  and its ``g_{k+1}`` is kept for the next iteration.

So a check costs no pass over ``C``: a run of ``K`` iterations makes ``K`` row
passes and ``K + 1`` column passes (the last one only to measure the error at
stop), and the host reads one number per check.

Options
-------
init : the row potential ``f`` to start from, shape (n,) or (B, n) (e.g. ``result.f``
    of an earlier run; :mod:`scot_ot.ot.start`). Running ``k`` iterations, then ``k``
    more from the result's ``f``, gives the ``2k`` iterates (no eps schedule).
    Without it the solver starts from SCOT's ``u = 1/n``, like every entropic solver.
eps_schedule : ``(eps_start, factor)`` with ``0 < factor < 1``: iteration ``t``
    (counted from 0 in each call) runs with ``max(eps, eps_start * factor**t)``
    and its ``tau``, so eps decreases geometrically to the problem's eps over the
    first ``ceil(log(eps / eps_start) / log(factor))`` iterations, then stays
    there (eps-scaling as in Schmitzer 2019; the potentials carry over). Errors
    are always those of the problem's eps; a check that falls while eps is still
    above it costs one extra row and column pass. Default None (off).
cost_dtype : None keeps C's dtype (float32, bfloat16 or float16; a float64 cost
    is refused, see below); ``torch.bfloat16`` / ``torch.float16`` store a rounded
    copy ``C_hat`` of C for the kernels (half the bytes read per iteration);
    ``torch.float32`` stores a float32 copy of a float64 cost.

Precision
---------
Scores, log-sum-exp accumulators and potentials are float32 whatever the cost
dtype. For a float32 cost the iterates agree with float64 ``torch-log`` to about
``1e-6`` relative. A stored cost ``C_hat != C`` (``cost_dtype`` narrower than
C) is the problem that is solved: ``result.problem`` carries ``C_hat`` with
``a, b`` in its working dtype (float32, as :meth:`OTProblem.create` would make
them for ``C_hat``), so ``result.plan``, ``result.cost`` and the reported errors
all refer to ``C_hat``. Its distance to the plan of C is governed by
``delta = max |C_hat - C|`` (``<= 2^-8 max|C|`` for bfloat16, ``2^-11 max|C|`` for
float16): the log-plan moves by ``O(delta / eps)``. Measured (docs/fused-sinkhorn.md),
the converged potential sums ``f_i + g_j`` move by at most ``1.9 delta`` and the
plan by at most ``0.19 delta / eps`` in L1; the tests hold them to ``4 delta`` and
``delta / eps``. A float64 problem needs ``cost_dtype=torch.float32`` (it is
then solved for the float32-rounded cost, potentials returned as float64); use
``torch-log`` for a float64 solve. Potentials and plans come back in float32
(the precision they were computed in), whatever the cost's dtype.

Gradients: none (the kernels have no backward); ``scot_ot.solve`` refuses a cost
or marginal that requires grad.

Devices
-------
CUDA; from the second check on, the iterations between two checks replay a
CUDA graph (:class:`FusedScheme`). On a machine without CUDA the solver refuses
unless ``TRITON_INTERPRET=1`` was set before triton was first imported; the
kernels then run in the Triton interpreter on CPU tensors (slow: for tests).

References: Peyré & Cuturi, *Computational Optimal Transport* (2019), §4.4;
B. Schmitzer, *Stabilized sparse scaling algorithms for entropy regularized
transport problems*, SIAM J. Sci. Comput. 2019 (eps-scaling); Dao et al.,
*FlashAttention* (2022) (online log-sum-exp over tiles).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Set, Tuple

import torch

from ..iterate import iterate
from ..memory import fused_bytes
from ..errors import SolverUnavailableError
from ..problem import OTProblem, real_scalar
from ..registry import (INIT, Compute, Devices, Domain, Dtypes, Family, Marginals, Option, SolverInfo,
                        problem_kind, quoted, register, suggest)
from ..result import OTResult, marginal_error
from ..start import check_init, start_potential

#: dtypes the kernels can read C in (kept equal to ``kernels.COST_DTYPES``)
COST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def cpu_solvers(kind: Marginals = Marginals.BALANCED) -> str:
    """The registered solvers that solve a problem of this kind on the CPU, finite at any eps."""
    return quoted(suggest("fused", {kind}, stable=True, device_type="cpu"))


def load_kernels(device: torch.device, kind: Marginals = Marginals.BALANCED):
    """Import the Triton kernels on first use; refuse (:class:`SolverUnavailableError`) a device
    they cannot run on, or a missing triton, naming the CPU solvers of problems of ``kind``.

    On CPU the kernels run only in the Triton interpreter, which triton enables
    when ``TRITON_INTERPRET=1`` is set before it is first imported.
    """
    imported = sys.modules.get(__name__.rsplit(".", 1)[0] + ".kernels")
    cpu_ok = imported.INTERPRETED if imported is not None else os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not cpu_ok:
        raise SolverUnavailableError(
            f"solver 'fused': its Triton kernels need a CUDA device, the cost is on {device}. "
            f"On CPU use {cpu_solvers(kind)}; to run the kernels in the (slow) Triton interpreter "
            "instead, set TRITON_INTERPRET=1 before triton is first imported."
        )
    try:
        from . import kernels
    except ImportError as err:
        raise SolverUnavailableError(
            f"solver 'fused' needs triton ({err}); install it, or use {cpu_solvers(kind)}"
        ) from err
    return kernels


def storage_dtype(problem: OTProblem, cost_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the kernels read C in, checked against the problem."""
    dtype = problem.C.dtype if cost_dtype is None else cost_dtype
    if cost_dtype is not None and cost_dtype not in COST_DTYPES:
        raise ValueError(
            f"cost_dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, got {cost_dtype!r}"
        )
    if dtype == torch.float64:
        raise ValueError(
            "cost_dtype: the cost is float64 but the fused kernels compute in float32; pass "
            "cost_dtype=torch.float32 to solve the float32-rounded problem (potentials to ~1e-6 "
            "relative), or use solver='torch-log' for a float64 solve"
        )
    if dtype not in COST_DTYPES:
        raise ValueError(f"C: dtype {dtype} is not supported by 'fused'")
    if dtype == torch.float16 and problem.C.dtype != torch.float16:
        big = float(problem.C.abs().max())
        if big > torch.finfo(torch.float16).max:
            raise ValueError(
                f"cost_dtype: float16 cannot hold the cost (max |C| = {big:.6g} > 65504); "
                "use torch.bfloat16 or rescale C (and eps) first"
            )
    return dtype


def check_schedule(eps_schedule) -> Optional[Tuple[float, float]]:
    """Validate ``eps_schedule = (eps_start, factor)`` (None: no schedule)."""
    if eps_schedule is None:
        return None
    bad = ValueError("eps_schedule: expected (eps_start, factor) with eps_start > 0 and "
                     f"0 < factor < 1, got {eps_schedule!r}")
    if not (isinstance(eps_schedule, (tuple, list)) and len(eps_schedule) == 2):
        raise bad
    start, factor = (real_scalar("eps_schedule", x) for x in eps_schedule)
    if not (math.isfinite(start) and start > 0 and 0 < factor < 1):
        raise bad
    return start, factor


@dataclass
class FusedState:
    f: torch.Tensor  # (B, n) float32, f_k
    g: torch.Tensor  # (B, m) float32, g_k
    done: int  # iterations run so far in this solve
    lse_row: Optional[torch.Tensor] = None  # (B, n) log sum_j b_j exp((g_k - C)/eps), problem's eps
    lse_col: Optional[torch.Tensor] = None  # (B, m) log sum_i a_i exp((f_k - C)/eps), problem's eps
    g_next: Optional[torch.Tensor] = None  # (B, m) g_{k+1}, computed by the error check


class FusedScheme:
    """The :class:`scot_ot.ot.iterate.Scheme` of ``fused``.

    ``tiling=(row, col)`` overrides the kernels' tiles (tests, benchmarks).

    On CUDA, a run of ``k`` iterations at the problem's eps is replayed from a
    CUDA graph: the first call with a given ``k`` launches the kernels one by one
    (and compiles them), the second captures them, later ones replay (one launch
    instead of ``4k``; the host cost of launching would otherwise exceed the GPU
    time of a pass for ``n`` up to several thousand). Replays compute exactly
    what the launches do. If a capture fails, the scheme warns and keeps
    launching kernels one by one.
    """

    def __init__(self, kernels, cost_dtype: torch.dtype, init=None,
                 eps_schedule: Optional[Tuple[float, float]] = None, tiling=(None, None)):
        self.K = kernels
        self.cost_dtype = cost_dtype
        self.init = init
        self.schedule = eps_schedule
        self.row_tiling, self.col_tiling = tiling
        self.graphs: Dict[int, tuple] = {}  # k -> (graph, static g input, (f, g, L^r) outputs)
        self.launched: Set[int] = set()  # the k run once without a graph

    # ------------------------------------------------------------------ helpers
    def eps_at(self, t: int) -> float:
        """The eps of iteration ``t`` (0-based)."""
        eps = self.problem.eps
        if self.schedule is None:
            return eps
        start, factor = self.schedule
        return max(eps, start * factor**t)

    def tau(self, side: int, eps: float) -> float:
        rho = self.problem.reg_m[side]
        return 1.0 if math.isinf(rho) else rho / (rho + eps)

    def col(self, f: torch.Tensor, eps: float):
        """``(g, L^c)`` from ``f``: one pass over C."""
        return self.col_step(f, eps, self.tau(1, eps))

    def row(self, g: torch.Tensor, eps: float):
        """``(f, L^r)`` from ``g``: one pass over C."""
        return self.row_step(g, eps, self.tau(0, eps))

    # ------------------------------------------------------------------ Scheme
    def start(self, problem: OTProblem) -> FusedState:
        B, _, m = problem.shape
        self.problem = problem
        self.C = problem.C.to(self.cost_dtype).contiguous()  # (B, n, m), one copy at most
        self.log_a = torch.log(problem.a.float()).contiguous()  # (B, n), -inf for zero weights
        self.log_b = torch.log(problem.b.float()).contiguous()  # (B, m)
        self.row_step = self.K.HalfStep("row", self.C, self.log_b, self.row_tiling)
        self.col_step = self.K.HalfStep("col", self.C, self.log_a, self.col_tiling)
        self.out_dtype = problem.dtype  # float32 for the problems the solver hands over
        f = start_potential(problem, self.init).float().contiguous()  # (B, n), SCOT's start or init
        g = torch.zeros(B, m, dtype=torch.float32, device=problem.C.device)  # recomputed from f first
        self.use_graphs = problem.C.device.type == "cuda" and not self.K.INTERPRETED
        return FusedState(f, g, 0)

    def advance(self, s: FusedState, k: int) -> FusedState:
        eps = self.problem.eps
        if self.use_graphs and self.eps_at(s.done) == eps:  # (then every later iteration is at eps)
            if k in self.graphs or (k in self.launched and self.capture(k)):
                return self.replay(s, k)
            self.launched.add(k)
        return self.launch(s, k)

    def launch(self, s: FusedState, k: int) -> FusedState:
        """``k`` iterations, kernel by kernel."""
        f, g, g_next, lse_row = s.f, s.g, s.g_next, s.lse_row
        eps_t = None
        for t in range(s.done, s.done + k):
            eps_t = self.eps_at(t)
            if g_next is not None:  # the column pass of this iteration ran at the last check
                g, g_next = g_next, None
            else:
                g, _ = self.col(f, eps_t)  # (B, m)
            f, lse_row = self.row(g, eps_t)  # (B, n), (B, n)
        exact = eps_t == self.problem.eps
        return FusedState(f, g, s.done + k, lse_row=lse_row if exact else None)

    def capture(self, k: int) -> bool:
        """Record ``k`` iterations at the problem's eps, from the first iteration's g, as a CUDA graph."""
        eps, (B, _, m) = self.problem.eps, self.problem.shape
        g_in = torch.zeros(B, m, dtype=torch.float32, device=self.C.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                g = g_in
                f, lse_row = self.row(g, eps)
                for _ in range(k - 1):
                    g, _ = self.col(f, eps)
                    f, lse_row = self.row(g, eps)
        except Exception as err:  # noqa: BLE001  (any failure: fall back to launching, loudly)
            warnings.warn(f"solver 'fused': CUDA graph capture failed ({err}); launching the kernels "
                          "one by one instead", RuntimeWarning, stacklevel=2)
            self.use_graphs = False
            return False
        self.graphs[k] = (graph, g_in, (f, g, lse_row))
        return True

    def replay(self, s: FusedState, k: int) -> FusedState:
        graph, g_in, outputs = self.graphs[k]
        # the first iteration's column pass: done by the last check, or here
        g_in.copy_(s.g_next if s.g_next is not None else self.col(s.f, self.problem.eps)[0])
        graph.replay()
        f, g, lse_row = (x.clone() for x in outputs)  # the next replay overwrites the outputs
        return FusedState(f, g, s.done + k, lse_row=lse_row)

    def residual(self, s: FusedState) -> torch.Tensor:
        eps = self.problem.eps
        if s.lse_col is None:
            g_new, s.lse_col = self.col(s.f, eps)
            if self.eps_at(s.done) == eps:
                s.g_next = g_new  # = the next iteration's column half-step
        if s.lse_row is None:  # only while an eps schedule is running
            _, s.lse_row = self.row(s.g, eps)
        f, g = self.potentials(s)
        dt = self.out_dtype
        row = self.problem.a.to(dt) * torch.exp(f / eps + s.lse_row.to(dt))  # (B, n) P_k 1
        col = self.problem.b.to(dt) * torch.exp(g / eps + s.lse_col.to(dt))  # (B, m) P_k^T 1
        return marginal_error(self.problem, row, col, f, g)

    def potentials(self, s: FusedState) -> Tuple[torch.Tensor, torch.Tensor]:
        return s.f.to(self.out_dtype), s.g.to(self.out_dtype)

    def plan(self, s: FusedState) -> Optional[torch.Tensor]:
        return None


@register
class FusedSinkhorn:
    """Fused log-domain Sinkhorn in Triton (see the module docstring for the options)."""

    name = "fused"
    info = SolverInfo(
        summary="log-domain Sinkhorn in Triton: two streaming passes over C per iteration, "
                "float32/bf16/fp16 cost",
        family=Family.ENTROPIC,
        marginals={Marginals.BALANCED, Marginals.KL_UNBALANCED, Marginals.SEMI_RELAXED},
        domain=Domain.LOG,
        devices=Devices(("cuda", "cpu"), cpu_interpreter_only=True),
        dtypes=Dtypes(COST_DTYPES, Compute.FLOAT32),  # a float64 cost needs cost_dtype=torch.float32
        finite_at_any_eps=True,
        options=(INIT,
                 Option("eps_schedule", "(eps_start, factor), 0 < factor < 1: eps decreases geometrically "
                                        "to the problem's eps (default None)"),
                 Option("cost_dtype", "the dtype the kernels read C in: None (C's), torch.float32, "
                                      "torch.bfloat16 or torch.float16")),
        memory=fused_bytes,
    )

    @staticmethod
    def check_device(device: torch.device) -> None:
        """Refuse, before any work, a device the kernels cannot run on here (:func:`load_kernels`)."""
        load_kernels(device)

    def solve(self, problem: OTProblem, *, max_iter: int, tol: float, check_every: int,
              init=None, eps_schedule=None, cost_dtype=None) -> OTResult:
        init = check_init(problem, init)
        schedule = check_schedule(eps_schedule)
        dtype = storage_dtype(problem, cost_dtype)
        kernels = load_kernels(problem.C.device, problem_kind(problem))
        if dtype != problem.C.dtype:
            # the problem solved is the one with the stored (rounded) cost, and its marginals in
            # that cost's working dtype: what OTProblem.create(C_hat, a, b) would build
            problem = dataclasses.replace(problem, C=problem.C.to(dtype), a=problem.a.float(),
                                          b=problem.b.float())
            init = None if init is None else init.float()
        scheme = FusedScheme(kernels, dtype, init, schedule)
        return iterate(self.name, scheme, problem, max_iter, tol, check_every)

"""One result type for every solver, and the one error metric they are measured in.

Potential convention (all entropic solvers)
-------------------------------------------
.. math::

    P_{ij} = a_i \\, b_j \\, \\exp\\big((f_i + g_j - C_{ij}) / \\varepsilon\\big)

so that ``f, g`` are the dual potentials of the problem in
:mod:`scot_ot.ot.problem` (POT's scalings convert as ``f = eps * (log u - log a)``,
``g = eps * (log v - log b)``). Every entropic solver starts from SCOT's (and POT's)
``u = 1/n``, i.e. ``f_i = -eps log(n a_i)`` (:mod:`scot_ot.ot.start`), so after
``k`` iterations all of them hold the same iterate. For the exact solver ``f, g``
are the Kantorovich potentials (``f_i + g_j <= C_ij``, equality on the support of
the plan).

For balanced problems the dual is invariant under ``(f + c, g - c)``: runs started
differently (a warm start, another library) reach the same plan with potentials
that may differ by such a constant, so compare ``f_i + g_j`` (or the plans), not
``f`` alone.

Dtypes: potentials and plans are in the problem's working dtype (float32 for a
float16/bfloat16 cost, else the cost's dtype; :func:`scot_ot.ot.problem.working_dtype`).

Error metric (all solvers)
--------------------------
.. math::

    \\mathrm{err} = \\big\\| P\\mathbf 1 - a \\odot e^{-f/\\rho_a} \\big\\|_1
                  + \\big\\| P^\\top \\mathbf 1 - b \\odot e^{-g/\\rho_b} \\big\\|_1

For balanced problems (``rho = inf``) this is the L1 marginal violation
``||P1 - a||_1 + ||P^T 1 - b||_1``. For KL-relaxed sides, ``P1 = a exp(-f/rho)`` is
the first-order optimality condition of the dual, so the metric is zero exactly at
the optimum and is measured in the same units (mass). Batched problems report the
largest error over the batch; ``tol`` is compared with that number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Tuple

import torch

from .problem import OTProblem


def target_marginal(mass: torch.Tensor, pot: torch.Tensor, rho: float) -> torch.Tensor:
    """``mass * exp(-pot / rho)``, the marginal the plan must meet on one side."""
    return mass if math.isinf(rho) else mass * torch.exp(-pot / rho)


def marginal_error(
    problem: OTProblem,
    row: torch.Tensor,
    col: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
) -> torch.Tensor:
    """Per-batch residual (B,) from the plan's marginals ``row = P1`` (B, n), ``col = P^T 1`` (B, m)."""
    ra = (row - target_marginal(problem.a, f, problem.reg_m[0])).abs().sum(-1)  # (B,)
    rb = (col - target_marginal(problem.b, g, problem.reg_m[1])).abs().sum(-1)  # (B,)
    return ra + rb


def log_kernel(C: torch.Tensor, eps: float, row: Optional[torch.Tensor],
               col: Optional[torch.Tensor]) -> torch.Tensor:
    """``row_i + col_j - C_ij / eps`` (B, n, m) in one new buffer; ``row`` (B, n) and ``col``
    (B, m) may be None (zero). Callers finish in place (``exp_``, ...), so a dense step
    holds one n x m temporary besides the cost instead of three or four."""
    if col is not None:
        out = torch.sub(col[:, None, :], C, alpha=1.0 / eps)
        return out if row is None else out.add_(row[:, :, None])
    if row is not None:
        return torch.sub(row[:, :, None], C, alpha=1.0 / eps)
    return C.mul(-1.0 / eps)


def grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an operation on any of ``tensors`` (then no in-place ops on
    values that backward needs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def plan_from_potentials(problem: OTProblem, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Dense plan ``a_i b_j exp((f_i + g_j - C_ij)/eps)`` (B, n, m) from (B, n), (B, m) potentials,
    in the potentials' dtype (float32 for a half-precision cost)."""
    eps, a, b = problem.eps, problem.a[:, :, None], problem.b[:, None, :]
    scores = log_kernel(problem.C, eps, f / eps, g / eps)  # (B, n, m)
    if grad_needed(problem.C, problem.a, problem.b, f, g):
        return torch.exp(scores) * a * b  # out of place: autograd keeps exp's output
    return scores.exp_().mul_(a).mul_(b)


@dataclass(frozen=True)
class OTResult:
    """What every solver returns.

    Tensors are batched (B, ...) internally; the public properties drop the batch
    axis when the problem was not batched. ``errors[k]`` is the metric above after
    iteration ``error_iters[k]``; ``errors[-1]`` is the error at stop.
    """

    problem: OTProblem = field(repr=False)
    f_batched: torch.Tensor = field(repr=False)
    g_batched: torch.Tensor = field(repr=False)
    errors: Tuple[float, ...]
    error_iters: Tuple[int, ...]
    n_iters: int
    converged: bool
    solver: str
    time_s: float
    stored_plan: Optional[torch.Tensor] = field(default=None, repr=False)

    # ------------------------------------------------------------------ tensors
    @cached_property
    def plan_batched(self) -> torch.Tensor:
        """(B, n, m) plan; built from the potentials on first access when not stored."""
        if self.stored_plan is not None:
            return self.stored_plan
        return plan_from_potentials(self.problem, self.f_batched, self.g_batched)

    @property
    def plan(self) -> torch.Tensor:
        return self.problem.unbatch(self.plan_batched)

    @property
    def f(self) -> torch.Tensor:
        return self.problem.unbatch(self.f_batched)

    @property
    def g(self) -> torch.Tensor:
        return self.problem.unbatch(self.g_batched)

    @property
    def row_marginal(self) -> torch.Tensor:
        """``P 1``, shape (n,) or (B, n)."""
        return self.plan.sum(-1)

    @property
    def col_marginal(self) -> torch.Tensor:
        """``P^T 1``, shape (m,) or (B, m)."""
        return self.plan.sum(-2)

    @property
    def cost(self) -> torch.Tensor:
        """Transport cost ``<C, P>``, a scalar tensor or (B,)."""
        return self.problem.unbatch((self.problem.C * self.plan_batched).sum((-2, -1)))

    @property
    def error(self) -> float:
        """The error at stop (``errors[-1]``)."""
        return self.errors[-1]

    @property
    def time_per_iter_s(self) -> float:
        return self.time_s / max(self.n_iters, 1)

"""``torch-log``: log-domain Sinkhorn in plain torch, the reference every solver is tested against.

With ``tau_a = rho_a / (rho_a + eps)`` (1 for a hard constraint), one iteration is

.. math::

    g_j \\leftarrow -\\tau_b\\, \\varepsilon \\log \\sum_i a_i
        \\exp\\big((f_i - C_{ij})/\\varepsilon\\big), \\qquad
    f_i \\leftarrow -\\tau_a\\, \\varepsilon \\log \\sum_j b_j
        \\exp\\big((g_j - C_{ij})/\\varepsilon\\big)

(the block-coordinate ascent of the dual of :mod:`scot_ot.ot.problem`), each
log-sum-exp taken with its maximum subtracted, so no value overflows whatever
``eps`` is. It starts from SCOT's ``u = 1/n`` (:mod:`scot_ot.ot.start`) or from
``init`` (a row potential ``f``). Balanced, KL-unbalanced per side, semi-relaxed,
batched, any device. Cost: one dense (B, n, m) temporary, overwritten in place,
and one ``exp`` per entry per half-iteration.

Dtypes: float64 (the reference) and float32 iterate in their own dtype; a
float16/bfloat16 cost is read as stored and every temporary, potential and plan is
float32 (the working dtype of :mod:`scot_ot.ot.problem`).

Gradients: when autograd records (the cost or a marginal requires grad) the
iterations run out of place, so ``torch.autograd`` differentiates through the
unrolled loop; otherwise the log-sum-exp overwrites its temporary.

References: Peyré & Cuturi, *Computational Optimal Transport* (2019), §4.4;
Séjourné et al., *Sinkhorn divergences for unbalanced OT* (2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .iterate import iterate
from .memory import dense_buffers
from .problem import OTProblem
from .registry import INIT, Domain, Family, Marginals, SolverInfo, register
from .result import OTResult, grad_needed, log_kernel, marginal_error
from .start import check_init, start_potential


def logsumexp_(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim`` with the maximum subtracted, overwriting ``scores``.

    Same value as ``torch.logsumexp`` without its n x m temporaries; a slice that is
    all ``-inf`` gives ``-inf``. When autograd records ``scores``, ``torch.logsumexp``
    (out of place) is used instead.
    """
    if grad_needed(scores):
        return torch.logsumexp(scores, dim=dim)
    top = scores.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return scores.sub_(top).exp_().sum(dim=dim).log_().add_(top.squeeze(dim))


def lse_rows(problem: OTProblem, g: torch.Tensor) -> torch.Tensor:
    """``log sum_j b_j exp((g_j - C_ij)/eps)``, shape (B, n)."""
    col = g / problem.eps + torch.log(problem.b)  # (B, m)
    return logsumexp_(log_kernel(problem.C, problem.eps, None, col), dim=2)  # (B, n)


def lse_cols(problem: OTProblem, f: torch.Tensor) -> torch.Tensor:
    """``log sum_i a_i exp((f_i - C_ij)/eps)``, shape (B, m)."""
    row = f / problem.eps + torch.log(problem.a)  # (B, n)
    return logsumexp_(log_kernel(problem.C, problem.eps, row, None), dim=1)  # (B, m)


@dataclass
class LogState:
    problem: OTProblem
    f: torch.Tensor  # (B, n)
    g: Optional[torch.Tensor]  # (B, m); None before the first column update


class LogDomainScheme:
    """``init``: a row potential (B, n) checked by :func:`scot_ot.ot.start.check_init`,
    or None for SCOT's start."""

    def __init__(self, init: Optional[torch.Tensor] = None):
        self.init = init

    def start(self, problem: OTProblem) -> LogState:
        return LogState(problem, start_potential(problem, self.init), None)

    def advance(self, s: LogState, k: int) -> LogState:
        p, eps = s.problem, s.problem.eps
        ta, tb = p.tau(0), p.tau(1)
        f, g = s.f, s.g
        for _ in range(k):
            g = -tb * eps * lse_cols(p, f)  # (B, m)
            f = -ta * eps * lse_rows(p, g)  # (B, n)
        return LogState(p, f, g)

    def residual(self, s: LogState) -> torch.Tensor:
        p, eps = s.problem, s.problem.eps
        # P1_i = a_i exp(f_i/eps) sum_j b_j exp((g_j - C_ij)/eps)
        row = p.a * torch.exp(s.f / eps + lse_rows(p, s.g))  # (B, n)
        col = p.b * torch.exp(s.g / eps + lse_cols(p, s.f))  # (B, m)
        return marginal_error(p, row, col, s.f, s.g)

    def potentials(self, s: LogState):
        return s.f, s.g

    def plan(self, s: LogState):
        return None


@register
class TorchLogSinkhorn:
    name = "torch-log"
    info = SolverInfo(
        summary="reference log-domain Sinkhorn in plain torch (float64-capable)",
        family=Family.ENTROPIC,
        marginals={Marginals.BALANCED, Marginals.KL_UNBALANCED, Marginals.SEMI_RELAXED},
        domain=Domain.LOG,
        differentiable=True,  # autograd through the unrolled iterations
        finite_at_any_eps=True,
        options=(INIT,),
        memory=dense_buffers(2),  # one log-kernel step (the log-sum-exp runs in it), then the plan
    )

    def solve(self, problem, *, max_iter, tol, check_every, init=None) -> OTResult:
        return iterate(self.name, LogDomainScheme(check_init(problem, init)), problem, max_iter, tol,
                       check_every)

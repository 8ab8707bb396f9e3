"""``torch-log``: log-domain Sinkhorn in plain torch, the reference every solver is tested against.

With ``tau_a = rho_a / (rho_a + eps)`` (1 for a hard constraint), one iteration is

.. math::

    g_j \\leftarrow -\\tau_b\\, \\varepsilon \\log \\sum_i a_i
        \\exp\\big((f_i - C_{ij})/\\varepsilon\\big), \\qquad
    f_i \\leftarrow -\\tau_a\\, \\varepsilon \\log \\sum_j b_j
        \\exp\\big((g_j - C_{ij})/\\varepsilon\\big)

(the block-coordinate ascent of the dual of :mod:`scot_ot.ot.problem`), each
log-sum-exp taken with its maximum subtracted, so no value overflows whatever
``eps`` is. Balanced, KL-unbalanced per side, semi-relaxed, batched, any device,
any float dtype (float64 for reference use). Cost: one dense (B, n, m)
temporary, overwritten in place, and one ``exp`` per entry per half-iteration.

References: Peyré & Cuturi, *Computational Optimal Transport* (2019), §4.4;
Séjourné et al., *Sinkhorn divergences for unbalanced OT* (2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .iterate import iterate
from .problem import OTProblem, all_finite
from .registry import SolverInfo
from .result import OTResult, log_kernel, marginal_error


def logsumexp_(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim`` with the maximum subtracted, overwriting ``scores``.

    Same value as ``torch.logsumexp`` without its n x m temporaries; a slice that is
    all ``-inf`` gives ``-inf``.
    """
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
    g: torch.Tensor  # (B, m)


class LogDomainScheme:
    def __init__(self, init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.init = init

    def start(self, problem: OTProblem) -> LogState:
        B, n, m = problem.shape
        if self.init is None:
            f = torch.zeros(B, n, dtype=problem.C.dtype, device=problem.C.device)
            g = torch.zeros(B, m, dtype=problem.C.dtype, device=problem.C.device)
        else:
            f, g = (x.to(problem.C).reshape(B, -1) for x in self.init)
        return LogState(problem, f, g)

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


def check_init(problem: OTProblem, init) -> None:
    """Validate a warm start ``(f, g)`` against the problem."""
    if init is None:
        return
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ValueError("init: expected a pair of tensors (f, g)")
    B, n, m = problem.shape
    for name, x, size in (("init[0] (f)", init[0], n), ("init[1] (g)", init[1], m)):
        if not isinstance(x, torch.Tensor) or x.numel() != B * size:
            raise ValueError(f"{name}: expected a tensor with {B * size} entries matching the cost")
        if not all_finite(x):
            raise ValueError(f"{name}: the potential contains NaN or inf")


class TorchLogSinkhorn:
    name = "torch-log"
    options = ("init",)
    info = SolverInfo(
        domain="log",
        unbalanced=True,
        devices="cpu, cuda",
        exact=False,
        batched="native",
        summary="reference log-domain Sinkhorn in plain torch (float64-capable)",
    )

    def solve(self, problem, *, max_iter, tol, check_every, init=None) -> OTResult:
        check_init(problem, init)
        return iterate(self.name, LogDomainScheme(init), problem, max_iter, tol, check_every)

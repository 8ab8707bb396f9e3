"""``dual-softmax``: the one-shot matching rule of LoFTR-style matchers. Not an OT solver.

.. math::

    P = \\frac{|a|}{Z}\\, \\mathrm{softmax}_j(-C/\\varepsilon) \\odot
        \\mathrm{softmax}_i(-C/\\varepsilon), \\qquad
    P_{ij} = \\frac{|a|}{Z}\\, \\frac{e^{-2 C_{ij}/\\varepsilon}}{R_i\\, Q_j}

with ``R_i = sum_j exp(-C_ij/eps)``, ``Q_j = sum_i exp(-C_ij/eps)`` and ``Z`` the sum that
scales the plan to the total mass ``|a| = |b|``. The marginals ``a, b`` enter only through
that total: their shape is not enforced, so ``P1 != a`` in general. The result is honest
about it: ``errors = (err,)`` is the common marginal error
``||P1 - a||_1 + ||P^T 1 - b||_1`` of this plan, ``n_iters = 1``, ``converged`` only if
``err <= tol``. The plan is not of the library's Gibbs form at this ``eps`` (it is one at
``eps / 2``), so the potentials ``f, g`` are NaN. Computed in the log domain
(``-2C/eps - log R_i - log Q_j``), finite at any ``eps``; one n x m buffer besides the
temporaries of two log-sum-exps.

Reference: J. Sun, Z. Shen, Y. Wang, H. Bao, X. Zhou, *LoFTR: Detector-free local
feature matching with transformers*, CVPR 2021, §3.3 (after Rocco et al., NeurIPS
2018); the issue that added it: SCOT's failure modes (many-to-one, background).
"""

from __future__ import annotations

import time

import torch

from .iterate import validate_loop_args
from .problem import OTProblem
from .registry import Domain, Family, SolverInfo, Stopping, register
from .result import OTResult, marginal_error


def one_shot_result(name: str, problem: OTProblem, plan: torch.Tensor, n_iters: int, tol: float,
                    t0: float) -> OTResult:
    """The result of a non-iterative rule: its plan, NaN potentials, the honest marginal error."""
    B, n, m = problem.shape
    nan = lambda k: torch.full((B, k), float("nan"), dtype=plan.dtype, device=plan.device)  # noqa: E731
    f, g = nan(n), nan(m)
    # balanced problems only (info.marginals is empty: reg_m is refused): the potentials do not enter the error
    err = float(marginal_error(problem, plan.sum(-1), plan.sum(-2), f, g).max())
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    return OTResult(problem=problem, f_batched=f, g_batched=g, errors=(err,), error_iters=(n_iters,),
                    n_iters=n_iters, converged=err <= tol, solver=name,
                    time_s=time.perf_counter() - t0, stored_plan=plan)


@register
class DualSoftmax:
    """``dual-softmax``: LoFTR's dual softmax scaled to the total mass (module docstring)."""

    name = "dual-softmax"
    info = SolverInfo(
        summary="not OT: one-shot dual softmax (LoFTR), marginals not enforced; error is its "
                "marginal violation",
        family=Family.HEURISTIC,
        solves_ot=False,
        marginals=frozenset(),
        domain=Domain.LOG,
        stopping=Stopping.DIRECT,
        finite_at_any_eps=True,  # computed in the log domain
    )

    def solve(self, problem, *, max_iter, tol, check_every) -> OTResult:
        max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)
        t0 = time.perf_counter()
        L = problem.C.to(problem.dtype, copy=True).mul_(-1.0 / problem.eps)  # (B, n, m)  -C/eps
        log_r = torch.logsumexp(L, dim=2)  # (B, n)
        log_q = torch.logsumexp(L, dim=1)  # (B, m)
        P = L.mul_(2.0).sub_(log_r[:, :, None]).sub_(log_q[:, None, :]).exp_()  # (B, n, m)
        P.mul_((problem.a.sum(-1) / P.sum((-2, -1)))[:, None, None])  # total mass |a|
        return one_shot_result(self.name, problem, P, 1, tol, t0)

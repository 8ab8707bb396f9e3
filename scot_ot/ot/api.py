"""``solve``: cost and marginals in, :class:`OTResult` out, solver chosen by name."""

from __future__ import annotations

from typing import Optional

import torch

from .iterate import validate_loop_args
from .memory import check_memory
from .problem import OTProblem, RegM
from .registry import BALANCED_NEED, Marginals, SolverInfo, get_solver, problem_kind, quoted, suggest
from .result import OTResult


def check_supported(solver: str, info: SolverInfo, problem: OTProblem) -> None:
    """``ValueError`` unless ``info`` declares the problem's kind (a KL-relaxed side needs
    ``KL_UNBALANCED`` or ``SEMI_RELAXED`` in ``info.marginals``) and, when the cost or a
    marginal requires grad, ``info.differentiable``. The messages name the registered
    solvers that can (:func:`scot_ot.ot.registry.suggest`)."""
    if problem.requires_grad and not info.differentiable:
        can = suggest(solver, info.marginals or BALANCED_NEED, differentiable=True)
        use = f"use {quoted(can)} (autograd through the iterations), or " if can else ""
        raise ValueError(
            f"solver {solver!r} is not differentiable, but the cost or a marginal requires grad; "
            f"{use}detach the inputs (or call it under torch.no_grad())"
        )
    kind = problem_kind(problem)
    if kind is not Marginals.BALANCED and kind not in info.marginals:
        solves = " and ".join(m.value for m in Marginals if m in info.marginals)
        what = f"solves {solves} OT only" if solves else "is not an OT solver and takes reg_m=None only"
        can = suggest(solver, {kind})
        raise ValueError(f"reg_m: solver {solver!r} {what}; "
                         + (f"use {quoted(can)} for {kind.value} problems" if can else
                            f"no registered solver handles {kind.value} problems"))


def solve(
    C: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    solver: str = "torch-log",
    eps: float = 0.05,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    reg_m: RegM = None,
    **options,
) -> OTResult:
    """Solve one (or a batch of) OT problems with the named solver.

    Parameters
    ----------
    C : (n, m) or (B, n, m) float tensor, the cost.
    a, b : (n,), (m,) (or (B, n), (B, m)) marginals; uniform when None.
    solver : a name from :func:`available_solvers`.
    eps : entropic regularisation (ignored by exact solvers).
    max_iter : iterations to run at most, honoured exactly (``1`` runs one).
    tol : stop at the first check where the marginal error is <= tol.
    check_every : iterations between two error checks.
    reg_m : None (balanced), a number (KL penalty on both marginals) or a pair
        ``(rho_a, rho_b)``; ``inf`` on one side is semi-relaxed.
    **options : solver-specific options (each solver's ``info.options``, ``scot-ot solvers``); an
        option the solver does not take raises ``ValueError``. The solvers whose
        ``info.takes_init`` (the Sinkhorn solvers) take ``init``, the row potential
        ``f`` to start from (shape like ``a``; default SCOT's ``u = 1/n``, see
        :mod:`scot_ot.ot.start`).

    ``eps``, ``tol``, ``reg_m``, ``max_iter`` and ``check_every`` may be Python
    numbers, numpy scalars or 0-d tensors (not booleans).

    The result is on C's device, in the problem's working dtype (C's dtype;
    float32 for a float16/bfloat16 cost). A solver that cannot produce a finite,
    non-zero plan raises :class:`scot_ot.ot.errors.NumericalError`. The solvers
    whose ``info.differentiable`` (``scot-ot solvers``, column "autograd") are
    differentiable (autograd through the iterations); the others raise
    ``ValueError`` when C, a or b requires grad, and so does a solver asked for a
    KL-relaxed problem (``reg_m``) its ``info.marginals`` does not declare.
    """
    impl = get_solver(solver)
    takes = impl.info.option_names
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(
            f"solver {solver!r} does not take option(s) {', '.join(unknown)}; its options: "
            f"{', '.join(takes) or 'none'}"
        )
    problem = OTProblem.create(C, a, b, eps=eps, reg_m=reg_m)
    check_supported(solver, impl.info, problem)
    max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)  # for every solver
    check_memory(impl, problem, **options)  # SolverMemoryError before allocating what cannot fit
    return impl.solve(problem, max_iter=max_iter, tol=tol, check_every=check_every, **options)

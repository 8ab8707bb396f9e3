"""``solve``: cost and marginals in, :class:`OTResult` out, solver chosen by name."""

from __future__ import annotations

from typing import Optional

import torch

from .problem import OTProblem, RegM
from .registry import get_solver
from .result import OTResult


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
    **options : solver-specific options (see each solver's ``options``); an
        option the solver does not take raises ``TypeError``.

    The result keeps C's dtype and device.
    """
    impl = get_solver(solver)
    unknown = sorted(set(options) - set(impl.options))
    if unknown:
        takes = ", ".join(impl.options) or "none"
        raise TypeError(
            f"solver {solver!r} does not take option(s) {', '.join(unknown)}; its options: {takes}"
        )
    problem = OTProblem.create(C, a, b, eps=eps, reg_m=reg_m)
    if not problem.balanced and not impl.info.unbalanced:
        raise ValueError(
            f"reg_m: solver {solver!r} solves balanced OT only; use 'torch-log', "
            "'torch-absorb' or 'pot-unbalanced' for unbalanced problems"
        )
    return impl.solve(problem, max_iter=max_iter, tol=tol, check_every=check_every, **options)

"""The convergence loop shared by every iterative solver.

A solver supplies a :class:`Scheme`: how to start, how to advance ``k`` full
iterations without looking at the error, how to measure the common error metric
(:func:`scot_ot.ot.result.marginal_error`) and how to hand back potentials.
The loop here decides when to stop, so ``max_iter``, ``tol`` and ``check_every``
mean the same for all solvers:

- one *iteration* is a column update (``g``) followed by a row update (``f``),
  the order of POT's ``sinkhorn`` and of SCOT's official code;
- exactly ``max_iter`` iterations run unless the error falls to ``tol`` or below
  at a check; checks happen after every ``check_every`` iterations and after the
  last one (so ``errors[-1]`` is always the error at stop);
- the host reads the error only at checks;
- a non-finite error at a check, or non-finite potentials at stop (on rows and
  columns of positive weight), raise :class:`scot_ot.ot.errors.NumericalError`:
  no solver returns NaN or inf. A finite result that did not reach ``tol`` is
  returned with ``converged=False`` and its last error;
- the error is measured without autograd (``torch.no_grad``); the iterations
  themselves are recorded when the problem requires grad.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Protocol, Tuple

import torch

from .errors import NumericalError
from .problem import OTProblem, int_scalar, real_scalar
from .result import OTResult


class Scheme(Protocol):
    def start(self, problem: OTProblem) -> Any: ...

    def advance(self, state: Any, k: int) -> Any: ...

    def residual(self, state: Any) -> torch.Tensor:  # (B,)
        ...

    def potentials(self, state: Any) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def plan(self, state: Any) -> Optional[torch.Tensor]:
        """A plan the scheme already holds, or None to build it from the potentials."""
        ...


def validate_loop_args(max_iter, tol, check_every) -> Tuple[int, float, int]:
    """``(max_iter, tol, check_every)`` as Python numbers (numpy and 0-d torch scalars pass,
    booleans raise ``TypeError``), checked: ``max_iter, check_every >= 1``, ``tol >= 0``."""
    max_iter, check_every = int_scalar("max_iter", max_iter), int_scalar("check_every", check_every)
    tol = real_scalar("tol", tol)
    if max_iter < 1:
        raise ValueError(f"max_iter: must be an integer >= 1, got {max_iter!r}")
    if check_every < 1:
        raise ValueError(f"check_every: must be an integer >= 1, got {check_every!r}")
    if math.isnan(tol) or tol < 0:
        raise ValueError(f"tol: must be a number >= 0, got {tol!r}")
    return max_iter, tol, check_every


def check_potentials(name: str, problem: OTProblem, f: torch.Tensor, g: torch.Tensor, n_done: int) -> None:
    """Raise :class:`NumericalError` unless ``f``, ``g`` are finite wherever ``a``, ``b`` are > 0
    (a zero-weight row's potential carries no mass; POT leaves it NaN)."""
    for side, pot, w in (("f", f, problem.a), ("g", g, problem.b)):
        bad = ~torch.isfinite(pot) & (w > 0)
        if bool(bad.any()):
            raise NumericalError(name, problem.eps, problem.C.dtype,
                                 f"{int(bad.sum())} entries of the potential {side} are NaN or inf "
                                 f"after {n_done} iterations")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iterate(
    name: str, scheme: Scheme, problem: OTProblem, max_iter: int, tol: float, check_every: int
) -> OTResult:
    """Run ``scheme`` on ``problem`` under the common stopping rule."""
    max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)
    device = problem.C.device
    _sync(device)
    t0 = time.perf_counter()
    state = scheme.start(problem)
    n_done, errors, iters, converged = 0, [], [], False
    while n_done < max_iter:
        k = min(check_every, max_iter - n_done)
        state = scheme.advance(state, k)
        n_done += k
        with torch.no_grad():
            err = float(scheme.residual(state).max())  # the one host sync per check
        if not math.isfinite(err):
            raise NumericalError(name, problem.eps, problem.C.dtype,
                                 f"the marginal error became {err} after {n_done} iterations")
        errors.append(err)
        iters.append(n_done)
        if err <= tol:
            converged = True
            break
    f, g = scheme.potentials(state)
    check_potentials(name, problem, f, g, n_done)
    plan = scheme.plan(state)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return OTResult(
        problem=problem,
        f_batched=f,
        g_batched=g,
        errors=tuple(errors),
        error_iters=tuple(iters),
        n_iters=n_done,
        converged=converged,
        solver=name,
        time_s=elapsed,
        stored_plan=plan,
    )

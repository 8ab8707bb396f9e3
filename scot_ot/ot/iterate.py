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
- the host reads the error only at checks.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional, Protocol, Tuple

import torch

from .problem import OTProblem
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


def validate_loop_args(max_iter: int, tol: float, check_every: int) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter: must be an integer >= 1, got {max_iter!r}")
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every: must be an integer >= 1, got {check_every!r}")
    if not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
        raise ValueError(f"tol: must be a number >= 0, got {tol!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iterate(
    name: str, scheme: Scheme, problem: OTProblem, max_iter: int, tol: float, check_every: int
) -> OTResult:
    """Run ``scheme`` on ``problem`` under the common stopping rule."""
    validate_loop_args(max_iter, tol, check_every)
    device = problem.C.device
    _sync(device)
    t0 = time.perf_counter()
    state = scheme.start(problem)
    n_done, errors, iters, converged = 0, [], [], False
    while n_done < max_iter:
        k = min(check_every, max_iter - n_done)
        state = scheme.advance(state, k)
        n_done += k
        err = float(scheme.residual(state).max())  # the one host sync per check
        errors.append(err)
        iters.append(n_done)
        if not math.isfinite(err):
            warnings.warn(
                f"solver {name!r}: the marginal error became {err} after {n_done} iterations "
                f"(eps={problem.eps:g} is too small for this scheme); stopping. "
                "The log-domain solvers ('torch-log', 'pot-sinkhorn-log') stay finite.",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        if err <= tol:
            converged = True
            break
    f, g = scheme.potentials(state)
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

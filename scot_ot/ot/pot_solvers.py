"""POT's solvers behind the common interface.

POT computes its own stopping error every 10 iterations, in another norm (L2 of
one marginal, or a relative change of the scalings for unbalanced OT), and
cannot be asked for ours. To measure every solver in the same metric we call
POT in *chunks* of ``check_every`` iterations with ``stopThr=0``, warm-starting
each chunk from the scalings the previous one returned. For all four wrapped
entropic solvers a warm start continues the iteration exactly: each POT
iteration recomputes one scaling from the other only, and the stabilised
solver's re-initialised ``u = 1/n`` is compensated by the next ``v`` (when the
re-initialisation falls on a chunk's last iteration, the wrapper undoes it on the
plan it returns, see ``_call_sinkhorn_stabilized``). The
common error is then measured on the plan POT returns.

Overhead of the chunking, per chunk (that is, once per ``check_every``
iterations): POT rebuilds its kernel ``exp(-C/eps)`` (or ``-C/eps`` in the log
domain) and the dense plan, i.e. about two extra passes over the cost. With the
default ``check_every = 10`` that is up to ~20 % of the time of a kernel-domain
run; ``benchmarks/solvers.py`` reports per-iteration times with
``check_every = max_iter`` (no chunking) next to the chunked ones.

Potentials are converted to the library's convention
``P = a b exp((f + g - C)/eps)``:

- ``ot.sinkhorn`` / ``sinkhorn_log`` / ``sinkhorn_stabilized`` (entropy
  regulariser ``-H(P)``, same optimal plan as ``KL(P | a b)`` when balanced):
  ``P = u K v`` with ``K = exp(-C/eps)``, so ``f = eps (log u - log a)``,
  ``g = eps (log v - log b)``;
- ``ot.unbalanced.sinkhorn_unbalanced`` with ``reg_type="kl"``: ``K`` already
  holds ``a b``, so ``f = eps log u``, ``g = eps log v``. It updates ``u`` before
  ``v`` in each iteration, the reverse of the balanced solvers.

POT works on one problem at a time: batches are solved one after the other.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .iterate import iterate
from .problem import OTProblem
from .registry import SolverInfo
from .result import OTResult, marginal_error

# (a, b, C, eps, reg_m, n_iter, warm) -> (plan, log_u, log_v, iterations POT completed)
PotCall = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


def _quiet(fn, *args, **kwargs):
    """Run a POT solver with its own convergence warnings off (we judge convergence)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    numerical = any("umerical errors" in str(w.message) for w in caught)
    return out, numerical


def _call_sinkhorn(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    (P, log), bad = _quiet(
        ot.bregman.sinkhorn_knopp, a, b, C, eps, numItermax=n_iter, stopThr=0.0,
        log=True, warn=False, warmstart=warm,
    )
    done = -1 if bad else n_iter
    return P, torch.log(log["u"]), torch.log(log["v"]), done


def _call_sinkhorn_log(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    (P, log), _ = _quiet(
        ot.bregman.sinkhorn_log, a, b, C, eps, numItermax=n_iter, stopThr=0.0,
        log=True, warn=False, warmstart=warm,
    )
    return P, log["log_u"], log["log_v"], n_iter


def _call_sinkhorn_stabilized(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    # POT takes absorbed potentials (alpha, beta) = eps * (log u, log v) as warm start.
    alpha_beta = None if warm is None else (eps * warm[0], eps * warm[1])
    (P, log), bad = _quiet(
        ot.bregman.sinkhorn_stabilized, a, b, C, eps, numItermax=n_iter, stopThr=0.0,
        log=True, warn=False, warmstart=alpha_beta,
    )
    log_u, log_v = log["logu"], log["logv"]
    # When POT absorbs (u, v) into (alpha, beta) it resets u = 1/n, v = 1/m; the next
    # iteration compensates, but if the absorption fell on the chunk's last iteration the
    # returned plan and scalings are the iterate divided by n*m. After the u update P1 = a
    # exactly, so the plan's mass tells the two cases apart: undo the reset.
    n, m = C.shape
    ratio = float(P.sum() / a.sum())
    reset = 0 < ratio < math.inf and abs(math.log(ratio * n * m)) < abs(math.log(ratio))
    if not bad and n * m > 1 and reset:
        P, log_u, log_v = P * (n * m), log_u + math.log(n), log_v + math.log(m)
    return P, log_u, log_v, (-1 if bad else n_iter)


def _call_unbalanced(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    (P, log), bad = _quiet(
        ot.unbalanced.sinkhorn_unbalanced, a, b, C, eps, list(reg_m), method="sinkhorn",
        reg_type="kl", numItermax=n_iter, stopThr=0.0, log=True, warmstart=warm,
    )
    return P, log["logu"], log["logv"], (-1 if bad else n_iter)


def _stack(xs: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` without the copy of a single problem's (n, m) plan."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


@dataclass
class PotState:
    problem: OTProblem
    plans: List[torch.Tensor]  # B x (n, m)
    log_u: List[Optional[torch.Tensor]]
    log_v: List[Optional[torch.Tensor]]
    failed: bool = False


class PotChunkScheme:
    """Advance POT by chunks of iterations, warm-starting from its own scalings."""

    def __init__(self, call: PotCall, kl_convention: bool):
        self.call = call
        self.kl_convention = kl_convention

    def start(self, p: OTProblem) -> PotState:
        B = p.shape[0]
        return PotState(p, [None] * B, [None] * B, [None] * B)

    def advance(self, s: PotState, k: int) -> PotState:
        p = s.problem
        out = PotState(p, [], [], [], s.failed)
        for i in range(p.shape[0]):
            warm = None if s.log_u[i] is None else (s.log_u[i], s.log_v[i])
            P, lu, lv, done = self.call(p.a[i], p.b[i], p.C[i], p.eps, p.reg_m, k, warm)
            out.plans.append(P)
            out.log_u.append(lu)
            out.log_v.append(lv)
            out.failed = out.failed or done != k
        return out

    def potentials(self, s: PotState):
        p, eps = s.problem, s.problem.eps
        lu, lv = _stack(s.log_u), _stack(s.log_v)  # (B, n), (B, m)
        if self.kl_convention:
            return eps * lu, eps * lv
        return eps * (lu - torch.log(p.a)), eps * (lv - torch.log(p.b))

    def residual(self, s: PotState) -> torch.Tensor:
        p = s.problem
        if s.failed:  # POT hit over/underflow and rolled back: report it, do not hide it
            return torch.full((p.shape[0],), math.nan, dtype=p.C.dtype, device=p.C.device)
        P = _stack(s.plans)  # (B, n, m)
        f, g = self.potentials(s)
        return marginal_error(p, P.sum(-1), P.sum(-2), f, g)

    def plan(self, s: PotState):
        return _stack(s.plans)


class PotSolver:
    """One POT entropic solver, run in warm-started chunks (see module docstring)."""

    options: Tuple[str, ...] = ()

    def __init__(self, name: str, call: PotCall, info: SolverInfo, kl_convention: bool = False):
        self.name, self.call, self.info, self.kl_convention = name, call, info, kl_convention

    def solve(self, problem, *, max_iter, tol, check_every) -> OTResult:
        scheme = PotChunkScheme(self.call, self.kl_convention)
        return iterate(self.name, scheme, problem, max_iter, tol, check_every)


def pot_sinkhorn() -> PotSolver:
    return PotSolver(
        "pot-sinkhorn", _call_sinkhorn,
        SolverInfo("kernel", False, "cpu, cuda", False, "loop",
                   "POT ot.sinkhorn (Sinkhorn-Knopp scalings); SCOT's official solver"),
    )


def pot_sinkhorn_log() -> PotSolver:
    return PotSolver(
        "pot-sinkhorn-log", _call_sinkhorn_log,
        SolverInfo("log", False, "cpu, cuda", False, "loop", "POT ot.bregman.sinkhorn_log"),
    )


def pot_sinkhorn_stabilized() -> PotSolver:
    return PotSolver(
        "pot-sinkhorn-stabilized", _call_sinkhorn_stabilized,
        SolverInfo("kernel+absorption", False, "cpu, cuda", False, "loop",
                   "POT ot.bregman.sinkhorn_stabilized (Schmitzer 2019)"),
    )


def pot_unbalanced() -> PotSolver:
    return PotSolver(
        "pot-unbalanced", _call_unbalanced,
        SolverInfo("kernel", True, "cpu, cuda", False, "loop",
                   "POT ot.unbalanced.sinkhorn_unbalanced, KL marginal penalties"),
        kl_convention=True,
    )


class PotEMD:
    """``pot-emd``: exact OT by POT's network simplex, on the CPU in float64.

    .. math:: \\min_{P \\ge 0,\\ P1 = a,\\ P^T 1 = b} \\langle C, P \\rangle

    ``eps``, ``max_iter``, ``tol`` and ``check_every`` do not apply: the result
    reports one iteration, and ``converged`` is POT's own success flag. Masses are
    renormalised to be exactly equal in float64 (POT requires it). ``f, g`` are
    the Kantorovich potentials (``f_i + g_j <= C_ij``). The plan returns to the
    cost's dtype and device.
    """

    name = "pot-emd"
    options = ("num_iter_max",)
    info = SolverInfo("exact (network simplex)", False, "cpu (returns to input device)", True,
                      "loop", "POT ot.emd, exact; float64 on the CPU")

    def solve(self, problem, *, max_iter, tol, check_every, num_iter_max=1_000_000) -> OTResult:
        import time

        import ot

        from .iterate import validate_loop_args

        validate_loop_args(max_iter, tol, check_every)
        t0 = time.perf_counter()
        plans, fs, gs, ok = [], [], [], True
        for i in range(problem.shape[0]):
            a = problem.a[i].detach().double().cpu().numpy()
            b = problem.b[i].detach().double().cpu().numpy()
            b = b * (a.sum() / b.sum())
            C = problem.C[i].detach().double().cpu().numpy()
            P, log = ot.emd(a, b, C, numItermax=int(num_iter_max), log=True)
            ok = ok and log["result_code"] == 1
            plans.append(P)
            fs.append(log["u"])
            gs.append(log["v"])
        like = problem.C
        to = lambda xs: torch.as_tensor(np.stack(xs)).to(dtype=like.dtype, device=like.device)  # noqa: E731
        P, f, g = to(plans), to(fs), to(gs)
        err = float(marginal_error(problem, P.sum(-1), P.sum(-2), f, g).max())
        if like.device.type == "cuda":
            torch.cuda.synchronize(like.device)
        return OTResult(
            problem=problem, f_batched=f, g_batched=g, errors=(err,), error_iters=(1,),
            n_iters=1, converged=bool(ok), solver=self.name,
            time_s=time.perf_counter() - t0, stored_plan=P,
        )

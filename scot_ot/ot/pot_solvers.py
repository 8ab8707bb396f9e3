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
  ``v`` in each iteration, the reverse of the balanced solvers, so the wrapper
  hands it the transposed problem ``(C^T, b, a)``: each of its iterations is then
  ours (column update, then row update).

Start: the first chunk is warm-started from :mod:`scot_ot.ot.start` (SCOT's
``u = 1/n``, which is also POT's own default for the balanced solvers, or the
``init`` option): ``log u = f/eps + log a``. So iteration ``k`` of every wrapper is
iteration ``k`` of ``torch-log``.

Dtypes: POT runs in the problem's working dtype; a float16/bfloat16 cost is cast
to float32 per problem (one float32 copy of that problem's cost), and plans and
potentials are float32.

Failures are read from values, never from POT's warning text: POT's iteration
count (``sinkhorn_knopp`` and ``sinkhorn_stabilized`` stop and roll back to the
previous scalings when one over/underflows; a roll-back on a chunk's very last
iteration cannot be told from a normal end, but leaves the plan of the previous
iteration, which is checked like any other), a row or column of positive weight
with no mass in the returned plan (an underflowed kernel), and a non-finite
error. Each raises :class:`scot_ot.ot.errors.NumericalError`. POT's own warnings
are not filtered: its convergence warnings are off by argument (``warn=False``;
``stopThr`` is never met) and its "numerical errors" warning is let through
before the ``NumericalError``.

Gradients: none (POT's iterations are not recorded); ``scot_ot.solve`` refuses a
cost or marginal that requires grad.

POT works on one problem at a time: batches are solved one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .errors import NumericalError
from .iterate import iterate
from .memory import dense_buffers, emd_bytes
from .problem import OTProblem
from .registry import (INIT, Batching, Compute, Devices, Domain, Dtypes, Family, Marginals, Option,
                       SolverInfo, Stopping, register)
from .result import OTResult, marginal_error
from .start import check_init, start_potential

# (a, b, C, eps, reg_m, n_iter, warm) -> (plan, log_u, log_v, iterations POT completed)
# warm = (log_u, log_v) in the solver's own convention; log_v is recomputed by the first
# iteration and never used.
PotCall = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]

#: the option of the network-simplex solvers (``pot-emd``, ``pot-partial``)
NUM_ITER_MAX = Option("num_iter_max", "POT's iteration limit of the network simplex (default 1e6)")


def _call_sinkhorn(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    P, log = ot.bregman.sinkhorn_knopp(a, b, C, eps, numItermax=n_iter, stopThr=0.0, log=True,
                                       warn=False, warmstart=warm)
    # "niter" is the last iteration index; POT breaks at index ii (and rolls back to the
    # previous u, v) when a scaling over/underflows, so fewer iterations completed
    done = n_iter if log["niter"] == n_iter - 1 else log["niter"]
    return P, torch.log(log["u"]), torch.log(log["v"]), done


def _call_sinkhorn_log(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    P, log = ot.bregman.sinkhorn_log(a, b, C, eps, numItermax=n_iter, stopThr=0.0, log=True,
                                     warn=False, warmstart=warm)
    return P, log["log_u"], log["log_v"], n_iter  # (no roll-back: failures show as NaN)


def _call_sinkhorn_stabilized(a, b, C, eps, reg_m, n_iter, warm):
    import ot

    # POT's warm start is the absorbed (alpha, beta), with u = 1/n, v = 1/m on top: the
    # effective log u is alpha/eps - log n. (A zero weight's log u = -inf would make a zero
    # row of POT's kernel and 0/0 in its next update: it gets POT's default alpha = 0.)
    n, m = C.shape
    alpha, beta = (torch.where(torch.isfinite(lw), eps * (lw + math.log(size)), torch.zeros_like(lw))
                   for lw, size in ((warm[0], n), (warm[1], m)))
    # stopThr=-1: POT stops at err <= stopThr, and a converged iterate can have err == 0
    P, log = ot.bregman.sinkhorn_stabilized(a, b, C, eps, numItermax=n_iter, stopThr=-1.0, log=True,
                                            warn=False, warmstart=(alpha, beta))
    log_u, log_v = log["logu"], log["logv"]
    done = n_iter if log["n_iter"] == n_iter - 1 else log["n_iter"]  # as in _call_sinkhorn
    # When POT absorbs (u, v) into (alpha, beta) it resets u = 1/n, v = 1/m; the next
    # iteration compensates, but if the absorption fell on the chunk's last iteration the
    # returned plan and scalings are the iterate divided by n*m. After the u update P1 = a
    # exactly, so the plan's mass tells the two cases apart: undo the reset.
    ratio = float(P.sum() / a.sum())
    reset = 0 < ratio < math.inf and abs(math.log(ratio * n * m)) < abs(math.log(ratio))
    if done == n_iter and n * m > 1 and reset:
        P, log_u, log_v = P * (n * m), log_u + math.log(n), log_v + math.log(m)
    return P, log_u, log_v, done


def _call_unbalanced(a, b, C, eps, reg_m, n_iter, warm):
    """POT's unbalanced Sinkhorn on the *transposed* problem: POT updates its ``u`` before its
    ``v``, so with ``(C^T, b, a)`` its ``u`` is our column scaling and each POT iteration is
    ours (column update, then row update). Scalings and plan come back in our orientation."""
    import ot

    P, log = ot.unbalanced.sinkhorn_unbalanced(
        b, a, C.T, eps, [reg_m[1], reg_m[0]], method="sinkhorn", reg_type="kl", numItermax=n_iter,
        stopThr=0.0, log=True, warmstart=(warm[1], warm[0]))
    # one "err" entry per completed iteration (appended after POT's over/underflow roll-back)
    return P.T, log["logv"], log["logu"], len(log["err"])


def _stack(xs: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` without the copy of a single problem's (n, m) plan."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


@dataclass
class PotState:
    problem: OTProblem
    plans: List[Optional[torch.Tensor]]  # B x (n, m)
    log_u: List[torch.Tensor]  # B x (n,)
    log_v: List[torch.Tensor]  # B x (m,)
    stopped: Optional[str] = None  # why POT stopped early in the last chunk, if it did


class PotChunkScheme:
    """Advance POT by chunks of iterations, warm-starting from its own scalings.

    The first chunk starts from :func:`scot_ot.ot.start.start_potential` (SCOT's
    ``u = 1/n``, or ``init``): ``log u = f/eps + log a`` (``f/eps`` in the KL
    convention). Failures are read from values: POT's iteration count (it stops
    early and rolls back when a scaling over/underflows), a row or column of
    positive weight with no mass in the returned plan (its scaling is infinite), or
    a non-finite error; each raises :class:`scot_ot.ot.errors.NumericalError`.
    """

    def __init__(self, name: str, call: PotCall, kl_convention: bool, init=None):
        self.name, self.call, self.kl_convention, self.init = name, call, kl_convention, init

    def start(self, p: OTProblem) -> PotState:
        B, _, m = p.shape
        lu = start_potential(p, self.init) / p.eps  # (B, n)
        lv = torch.zeros(B, m, dtype=p.dtype, device=p.C.device)  # (B, m) placeholder
        if not self.kl_convention:
            lu, lv = lu + torch.log(p.a), lv - math.log(m)  # POT's v = 1/m, as a placeholder
        return PotState(p, [None] * B, list(lu), list(lv))

    def advance(self, s: PotState, k: int) -> PotState:
        p = s.problem
        out = PotState(p, [], [], [])
        for i in range(p.shape[0]):
            C = p.C[i].to(p.dtype)  # a half-precision cost is solved in float32
            P, lu, lv, done = self.call(p.a[i], p.b[i], C, p.eps, p.reg_m, k, (s.log_u[i], s.log_v[i]))
            out.plans.append(P)
            out.log_u.append(lu)
            out.log_v.append(lv)
            if done != k and out.stopped is None:
                out.stopped = (f"POT stopped after {done} of the {k} iterations of a chunk "
                               f"(problem {i}): a scaling over- or underflowed")
        return out

    def potentials(self, s: PotState):
        p, eps = s.problem, s.problem.eps
        lu, lv = _stack(s.log_u), _stack(s.log_v)  # (B, n), (B, m)
        if self.kl_convention:
            return eps * lu, eps * lv
        # a zero weight's scaling is 0 (log -inf): its potential is undefined, reported as 0
        f = torch.where(p.a > 0, eps * (lu - torch.log(p.a)), torch.zeros_like(lu))
        g = torch.where(p.b > 0, eps * (lv - torch.log(p.b)), torch.zeros_like(lv))
        return f, g

    def residual(self, s: PotState) -> torch.Tensor:
        p = s.problem
        if s.stopped is not None:
            raise NumericalError(self.name, p.eps, p.C.dtype, s.stopped)
        P = _stack(s.plans)  # (B, n, m)
        row, col = P.sum(-1), P.sum(-2)  # (B, n), (B, m)
        for side, mass, w in (("row", row, p.a), ("column", col, p.b)):
            empty = (mass == 0) & (w > 0)
            if bool(empty.any()):
                raise NumericalError(
                    self.name, p.eps, p.C.dtype,
                    f"the plan has {int(empty.sum())} {side}(s) of positive weight and zero mass "
                    "(the kernel exp(-C/eps) underflowed there)")
        f, g = self.potentials(s)
        return marginal_error(p, row, col, f, g)

    def plan(self, s: PotState):
        return _stack(s.plans)


def _import_pot() -> None:
    """Import POT when the solver is resolved (``get_solver``), not inside the first timed solve:
    ``import ot`` takes ~1 s, which a pipeline's OT timing must not include."""
    import ot  # noqa: F401


def _pot_info(summary: str, domain: Domain, marginals=frozenset({Marginals.BALANCED}), *,
              finite_at_any_eps: bool = False, buffers: int) -> SolverInfo:
    """What the four wrapped entropic solvers share: POT on the cost's device and dtype, one
    problem after the other, warm-started chunks in the common loop, ``init``, no gradients."""
    return SolverInfo(summary=summary, family=Family.ENTROPIC, marginals=marginals, domain=domain,
                      batching=Batching.LOOP, finite_at_any_eps=finite_at_any_eps, options=(INIT,),
                      memory=dense_buffers(buffers))


class PotSolver:
    """One POT entropic solver, run in warm-started chunks (see module docstring). A subclass
    sets ``name``, ``info``, ``call`` (a :data:`PotCall`) and ``kl_convention``."""

    name: str
    info: SolverInfo
    call: PotCall
    kl_convention: bool = False

    def __init__(self):
        _import_pot()

    def solve(self, problem, *, max_iter, tol, check_every, init=None) -> OTResult:
        scheme = PotChunkScheme(self.name, self.call, self.kl_convention, check_init(problem, init))
        return iterate(self.name, scheme, problem, max_iter, tol, check_every)


# Buffers of the memory estimate (scot_ot.ot.memory): POT's kernel (or -C/eps), its temporaries
# and plan, the previous chunk's plan.
@register
class PotSinkhorn(PotSolver):
    name = "pot-sinkhorn"
    call = staticmethod(_call_sinkhorn)
    info = _pot_info("POT ot.sinkhorn (Sinkhorn-Knopp scalings); SCOT's official solver", Domain.KERNEL,
                     buffers=6)


@register
class PotSinkhornLog(PotSolver):
    name = "pot-sinkhorn-log"
    call = staticmethod(_call_sinkhorn_log)
    info = _pot_info("POT ot.bregman.sinkhorn_log", Domain.LOG, finite_at_any_eps=True, buffers=4)


@register
class PotSinkhornStabilized(PotSolver):
    name = "pot-sinkhorn-stabilized"
    call = staticmethod(_call_sinkhorn_stabilized)
    # (not finite at any eps: POT builds its first kernel exp(-C/eps) before any absorption)
    info = _pot_info("POT ot.bregman.sinkhorn_stabilized (Schmitzer 2019)", Domain.KERNEL_ABSORPTION,
                     buffers=6)


@register
class PotUnbalanced(PotSolver):
    name = "pot-unbalanced"
    call = staticmethod(_call_unbalanced)
    kl_convention = True
    info = _pot_info("POT ot.unbalanced.sinkhorn_unbalanced, KL marginal penalties", Domain.KERNEL,
                     {Marginals.BALANCED, Marginals.KL_UNBALANCED, Marginals.SEMI_RELAXED}, buffers=7)


@register
class PotEMD:
    """``pot-emd``: exact OT by POT's network simplex, on the CPU in float64.

    .. math:: \\min_{P \\ge 0,\\ P1 = a,\\ P^T 1 = b} \\langle C, P \\rangle

    ``eps``, ``max_iter``, ``tol`` and ``check_every`` do not apply: the result
    reports one iteration, and ``converged`` is POT's own success flag. Masses are
    renormalised to be exactly equal in float64 (POT requires it). ``f, g`` are
    the Kantorovich potentials (``f_i + g_j <= C_ij``). The plan returns to the
    cost's device, in the working dtype (the cost's, float32 for a half-precision
    cost). Not differentiable.
    """

    name = "pot-emd"
    info = SolverInfo(
        summary="POT ot.emd, exact; float64 on the CPU",
        family=Family.EXACT,
        marginals={Marginals.BALANCED},
        domain=Domain.NETWORK_SIMPLEX,
        devices=Devices(computes_on_cpu=True),
        dtypes=Dtypes(compute=Compute.FLOAT64),
        batching=Batching.LOOP,
        stopping=Stopping.DIRECT,
        finite_at_any_eps=True,  # eps is not used
        options=(NUM_ITER_MAX,),
        memory=emd_bytes,
    )

    def __init__(self):
        _import_pot()

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
        # back in the working dtype (float32 for a half-precision cost), on the cost's device
        to = lambda xs: torch.as_tensor(np.stack(xs)).to(dtype=problem.dtype, device=like.device)  # noqa: E731
        P, f, g = to(plans), to(fs), to(gs)
        err = float(marginal_error(problem, P.sum(-1), P.sum(-2), f, g).max())
        if like.device.type == "cuda":
            torch.cuda.synchronize(like.device)
        return OTResult(
            problem=problem, f_batched=f, g_batched=g, errors=(err,), error_iters=(1,),
            n_iters=1, converged=bool(ok), solver=self.name,
            time_s=time.perf_counter() - t0, stored_plan=P,
        )

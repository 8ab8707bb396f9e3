"""POT's partial OT solvers behind the common interface: ``pot-partial``, ``pot-partial-entropic``.

Both move a total mass ``0 < m <= min(|a|, |b|)`` (option ``mass``, validated by
:func:`scot_ot.ot.partial.check_mass`) and are measured in the partial solvers'
common residual :func:`scot_ot.ot.partial.partial_residual`.

``pot-partial``: exact, ``ot.partial.partial_wasserstein`` (Chapel et al. 2020):

.. math::

    \\min_{P \\ge 0} \\langle C, P \\rangle \\quad \\text{s.t.} \\quad
    P\\mathbf 1 \\le a,\\; P^\\top \\mathbf 1 \\le b,\\; \\mathbf 1^\\top P \\mathbf 1 = m,

solved as a balanced EMD on the problem augmented with a dummy row of mass
``|b| - m`` and a dummy column of mass ``|a| - m`` (zero cost to the real points, cost
``2 max C`` between the dummies), on the CPU in float64 like ``pot-emd`` (and, like it,
with ``num_iter_max = 10^6`` network-simplex iterations by default: POT's 10^5 fail
on SCOT's problems of ~2000 points). ``eps``,
``tol`` and ``check_every`` do not apply; the result reports one iteration,
``converged`` is the EMD's success flag, the error is the feasibility violation (the
residual with zero multipliers), and ``f, g`` are the Kantorovich potentials of the
augmented problem restricted to the real points.

``pot-partial-entropic``: ``ot.partial.entropic_partial_wasserstein`` (Benamou et al.
2015, §5.1): Dykstra's iterative Bregman projections for

.. math::

    \\min_{P \\ge 0} \\langle C, P \\rangle + \\varepsilon \\sum_{ij} P_{ij} \\log P_{ij}
    \\quad \\text{s.t. the same constraints.}

Note the entropy: ``sum P log P`` (``KL(P | 1)``), not the library's ``KL(P | a ⊗ b)``;
for uniform marginals the two problems have the same plan, in general
``pot-partial-entropic(C) = partial(C + eps log a_i + eps log b_j)`` (see
:mod:`scot_ot.ot.partial`). POT's function cannot be warm-started (its state is three
n x m Dykstra correction matrices it does not return), so the wrapper cannot check
the error between chunks: it runs POT once for exactly ``max_iter`` iterations
(``stopThr=-1``: POT's own test never stops it) and measures the common residual once,
at the end (``check_every`` does not apply; ``converged`` is ``error <= tol``). Each POT
iteration multiplies by dense ``diag(.)`` matrices (``nx.dot(nx.diag(x), K)``), i.e. two
O(n^2 m) products: it is slow for large n by construction. A kernel that under- or
overflows (small ``eps``) raises :class:`scot_ot.ot.errors.NumericalError`. POT does not return the dual variables; the
wrapper recovers them from the plan, which is exactly ``exp((f_i + g_j + lam - C_ij)/eps)``
with ``f, g <= 0``: ``F_i + G_j = eps log P_ij + C_ij`` is fitted by row and column means,
and the multipliers are normalised to ``max f = max g = 0`` (their value at the optimum
whenever some row and some column keep slack). POT works on one problem at a time:
batches are solved one after the other.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .iterate import validate_loop_args
from .memory import emd_bytes
from .errors import NumericalError
from .problem import OTProblem, all_finite
from .registry import (Batching, Compute, Devices, Domain, Dtypes, Family, Marginals, SolverInfo,
                       Stopping, register)
from .result import OTResult
from .partial import MASS, check_mass, partial_residual
from .pot_solvers import NUM_ITER_MAX


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_gibbs_potentials(P: torch.Tensor, C: torch.Tensor, eps: float):
    """``(F, G)`` with ``P_ij = exp((F_i + G_j - C_ij)/eps)`` on the positive entries of the (n, m) plan.

    Row means, then column means, of ``eps log P + C`` over the finite entries (float64);
    exact when ``P`` is a diagonal scaling of ``exp(-C/eps)``. Rows or columns without
    a positive entry get 0 (any value gives the same plan there).
    """
    L = torch.log(P.double()) * eps + C.double()  # (n, m)  F_i + G_j where P > 0
    ok = torch.isfinite(L)
    Lz = torch.where(ok, L, torch.zeros_like(L))
    rows, cols = ok.sum(1), ok.sum(0)
    F = Lz.sum(1) / rows.clamp(min=1)  # (n,)
    G = torch.where(ok, L - F[:, None], torch.zeros_like(L)).sum(0) / cols.clamp(min=1)  # (m,)
    return torch.where(rows > 0, F, torch.zeros_like(F)), torch.where(cols > 0, G, torch.zeros_like(G))


def _result(name, problem, plans, fs, gs, mass, errors_from, n_iters, converged, tol, t0) -> OTResult:
    like = dict(dtype=problem.dtype, device=problem.C.device)  # the working dtype
    P = torch.stack(plans).to(**like)  # (B, n, m)
    f = torch.stack(fs).to(**like)
    g = torch.stack(gs).to(**like)
    mult_f, mult_g = errors_from
    err = float(partial_residual(problem, mass, P.sum(-1), P.sum(-2),
                                 mult_f.to(P), mult_g.to(P)).max())
    _sync(problem.C.device)
    return OTResult(
        problem=problem, f_batched=f, g_batched=g, errors=(err,), error_iters=(n_iters,),
        n_iters=n_iters, converged=bool(converged if converged is not None else err <= tol),
        solver=name, time_s=time.perf_counter() - t0, stored_plan=P,
    )


@register
class PotPartial:
    """``pot-partial``: exact partial OT, POT ``ot.partial.partial_wasserstein`` (module docstring)."""

    name = "pot-partial"
    info = SolverInfo(
        summary="POT ot.partial.partial_wasserstein, exact partial OT of mass m (network simplex on the "
                "dummy-augmented problem); float64 on the CPU",
        family=Family.EXACT,
        marginals={Marginals.PARTIAL_MASS},
        domain=Domain.NETWORK_SIMPLEX,
        devices=Devices(computes_on_cpu=True),
        dtypes=Dtypes(compute=Compute.FLOAT64),
        batching=Batching.LOOP,
        stopping=Stopping.DIRECT,
        finite_at_any_eps=True,  # eps is not used
        options=(MASS, NUM_ITER_MAX),
        memory=emd_bytes,  # a balanced EMD one row and column larger
    )

    def solve(self, problem: OTProblem, *, max_iter, tol, check_every, mass=None,
              num_iter_max=1_000_000) -> OTResult:
        import ot

        max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)
        m = check_mass(problem, mass)
        t0 = time.perf_counter()
        plans, fs, gs, ok = [], [], [], True
        for i in range(problem.shape[0]):
            a = problem.a[i].detach().double().cpu().numpy()
            b = problem.b[i].detach().double().cpu().numpy()
            C = problem.C[i].detach().double().cpu().numpy()
            mi = min(float(m[i]), float(a.sum()), float(b.sum()))  # POT compares exactly
            P, log = ot.partial.partial_wasserstein(a, b, C, m=mi, log=True, numItermax=int(num_iter_max))
            ok = ok and log["result_code"] == 1
            plans.append(torch.as_tensor(np.asarray(P)))
            fs.append(torch.as_tensor(np.asarray(log["u"])))
            gs.append(torch.as_tensor(np.asarray(log["v"])))
        zeros = (torch.zeros_like(problem.a), torch.zeros_like(problem.b))
        return _result(self.name, problem, plans, fs, gs, m, zeros, 1, ok, tol, t0)


def entropic_partial_bytes(problem: OTProblem, **options):
    """``pot-partial-entropic``, counted from POT's code, not measured: per problem K, K1, K2,
    their previous values, three Dykstra matrices and the dense ``diag(.)`` factors (n x n,
    m x m); the float64 fit of the potentials (3 buffers); the plans kept and stacked (2 per
    problem)."""
    B, n, m = problem.shape
    s = torch.empty((), dtype=problem.dtype).element_size()
    once = n * m * (9 * s + 3 * 8) + (n * n + m * m) * s
    return {problem.C.device: once + 2 * B * n * m * s}


@register
class PotPartialEntropic:
    """``pot-partial-entropic``: POT ``ot.partial.entropic_partial_wasserstein`` (module docstring)."""

    name = "pot-partial-entropic"
    info = SolverInfo(
        summary="POT ot.partial.entropic_partial_wasserstein (Dykstra, entropy sum P log P)",
        family=Family.ENTROPIC,
        marginals={Marginals.PARTIAL_MASS},
        domain=Domain.KERNEL,
        batching=Batching.LOOP,
        stopping=Stopping.FIXED,  # POT's function runs max_iter iterations; one check at the end
        options=(MASS,),
        memory=entropic_partial_bytes,
    )

    def solve(self, problem: OTProblem, *, max_iter, tol, check_every, mass=None) -> OTResult:
        import contextlib
        import io
        import warnings

        import ot

        max_iter, tol, check_every = validate_loop_args(max_iter, tol, check_every)
        m = check_mass(problem, mass)
        eps = problem.eps
        _sync(problem.C.device)
        t0 = time.perf_counter()
        plans, fs, gs, mf, mg = [], [], [], [], []
        for i in range(problem.shape[0]):
            a, b, C = problem.a[i], problem.b[i], problem.C[i].to(problem.dtype)
            mi = min(float(m[i]), float(a.sum()), float(b.sum()))  # POT compares exactly
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as said:
                warnings.simplefilter("ignore")
                # stopThr=-1: POT's own test (err > stopThr, err = 0 once K stops changing) never stops it
                P = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mi, numItermax=max_iter,
                                                            stopThr=-1.0)
            if "numerical errors" in said.getvalue() or not all_finite(P):
                raise NumericalError(self.name, eps, C.dtype,
                                     "POT's kernel exp(-C/eps) under- or overflowed and its plan is not "
                                     "finite; the solver 'partial' (log-domain absorption) stays finite")
            F, G = fit_gibbs_potentials(P, C, eps)  # POT's own convention, lam inside
            plans.append(P)
            mf.append(F - F.max())  # the multipliers f, g <= 0 (module docstring)
            mg.append(G - G.max())
            # library convention P = a b exp((f + g - C)/eps)
            fs.append(F - eps * torch.log(a.double()))
            gs.append(G - eps * torch.log(b.double()))
        fs = [torch.where(torch.isfinite(x), x, torch.zeros_like(x)) for x in fs]  # a_i = 0: any value
        gs = [torch.where(torch.isfinite(x), x, torch.zeros_like(x)) for x in gs]
        mults = (torch.stack(mf), torch.stack(mg))
        return _result(self.name, problem, plans, fs, gs, m, mults, max_iter, None, tol, t0)

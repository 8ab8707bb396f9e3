"""``partial``: entropic partial OT, our batched solver (dual ascent, kernel domain with absorption).

Partial OT moves only a total mass ``0 < m <= min(|a|, |b|)``, so that part of each
side may stay unmatched (Caffarelli & McCann 2010; Chapel et al. 2020). Its entropic
version, with the library's entropy term (:mod:`scot_ot.ot.problem`):

.. math::

    \\min_{P \\ge 0} \\; \\langle C, P \\rangle
        + \\varepsilon\\, \\mathrm{KL}(P \\,\\|\\, a \\otimes b)
    \\quad \\text{s.t.} \\quad P \\mathbf 1 \\le a, \\quad P^\\top \\mathbf 1 \\le b,
    \\quad \\mathbf 1^\\top P \\mathbf 1 = m .

**Dual.** With multipliers ``f <= 0`` (rows), ``g <= 0`` (columns) and a free ``lam``
(the mass), the optimal plan is

.. math::

    P_{ij} = a_i b_j \\exp\\big((f_i + g_j + \\lambda - C_{ij})/\\varepsilon\\big),

maximising the concave dual
``<f, a> + <g, b> + lam m - eps sum_ij P_ij`` over ``f <= 0, g <= 0``. Each block has a
closed-form maximiser, and one **iteration** is the block coordinate ascent, columns
first as in every solver of the library (:mod:`scot_ot.ot.iterate`):

.. math::

    g_j &\\leftarrow \\min\\Big(0,\\; -\\varepsilon \\log \\sum_i a_i
        e^{(f_i + \\lambda - C_{ij})/\\varepsilon}\\Big) \\\\
    f_i &\\leftarrow \\min\\Big(0,\\; -\\varepsilon \\log \\sum_j b_j
        e^{(g_j + \\lambda - C_{ij})/\\varepsilon}\\Big) \\\\
    \\lambda &\\leftarrow \\lambda + \\varepsilon \\log\\big(m / \\textstyle\\sum_{ij} P_{ij}\\big)

A row whose free row sum stays below ``a_i`` keeps ``f_i = 0`` (slack); otherwise ``f_i``
scales it down to ``a_i`` exactly. Block coordinate ascent on this dual is Dykstra's
algorithm for the KL projection onto the three constraint sets, i.e. the iteration
of POT's ``ot.partial.entropic_partial_wasserstein`` (Benamou et al. 2015, §5.1),
written on O(n + m) dual variables instead of POT's three n x m correction
matrices (POT also updates rows before columns). It starts from the library's
``u = 1/n``, ``f_i = -eps log(n a_i)`` (:func:`scot_ot.ot.start.scot_start`; only
``f + lam`` enters the first column update, so the start need not satisfy ``f <= 0``),
with the ``lam`` that gives the starting plan the mass ``m``: for uniform marginals
(``f = 0``) that is POT's start ``K m / sum K``.

**Relation to POT's entropy.** POT regularises with ``sum P log P`` (``KL(P | 1)``),
the library with ``KL(P | a ⊗ b)``. On the set ``sum P = m`` the two differ by the linear
term ``-eps sum_ij P_ij log(a_i b_j)``, which is constant only when ``a`` and ``b`` are
uniform. Hence, exactly, ``partial(C, a, b) = POT(C - eps log a_i - eps log b_j, a, b)``;
with uniform marginals the two plans coincide (tested in ``tests/test_new_solvers.py``).
With ``m = |a| = |b|`` every constraint is tight and the plan is the balanced one.

**Why not the dummy-point reformulation.** Chapel et al. (2020) add a dummy row and
column with masses ``|b| - m`` and ``|a| - m`` and cost ``A`` on the dummy-dummy entry; for
exact OT (``pot-partial``) this is equivalent to partial OT. With entropy, the
augmented balanced problem also regularises the slack entries ``a - P1`` and
``b - P^T 1`` and leaks mass ``~ e^{-A/eps}`` through the dummy-dummy entry: a different
problem, equal only as ``eps -> 0``. The dual ascent above solves the entropic
partial problem itself at the same cost per iteration as balanced Sinkhorn.

**Kernel domain with absorption** (as ``torch-absorb``, Schmitzer 2019). Write
``f = f0 + eps log u``, ``g = g0 + eps log v``, ``lam = lam0 + eps log kappa`` and keep
``K~ = exp((f0_i + g0_j + lam0 - C_ij)/eps)``, so ``P = kappa diag(a u) K~ diag(b v)``.
An iteration is two BLAS mat-vecs and O(n + m) work:

.. math::

    v = \\min\\big(e^{-g^0/\\varepsilon},\\; 1 / (\\kappa\\, \\tilde K^\\top (a u))\\big), \\quad
    u = \\min\\big(e^{-f^0/\\varepsilon},\\; 1 / (\\kappa\\, \\tilde K (b v))\\big), \\quad
    \\kappa = m \\,/\\, \\textstyle\\sum_i a_i u_i (\\tilde K (b v))_i .

The first iteration runs in the log domain; a scaling or ``kappa`` outside
``[e^{-L}, e^{L}]`` redoes the iteration in the log domain and absorbs it into
``f0, g0, lam0`` (one ``exp`` pass to rebuild ``K~``). The absorption test reads one number
on the host per iteration (``torch-absorb`` reads two). Batched, any device
(plain torch), any cost dtype (half precision iterates in float32), differentiable
(autograd through the unrolled iterations, as ``torch-absorb``).

**Error.** The balanced marginal violation is not zero at the partial optimum, so the
partial solvers share the KKT residual of this problem, in units of mass
(:func:`partial_residual`):

.. math::

    \\mathrm{err} = \\sum_i \\big| r_i - \\min(a_i, r_i e^{-f_i/\\varepsilon}) \\big|
                  + \\sum_j \\big| c_j - \\min(b_j, c_j e^{-g_j/\\varepsilon}) \\big|
                  + \\big| \\textstyle\\sum_i r_i - m \\big|

with ``r = P1``, ``c = P^T 1`` and the multipliers ``f, g <= 0``. ``r_i e^{-f_i/eps}`` is the row
sum the row would have without its multiplier, so a term vanishes exactly when the
row meets ``r_i <= a_i`` with complementary slackness (``f_i = 0`` or ``r_i = a_i``). With
``f = g = 0`` (the exact solver) it is the feasibility violation
``||(P1 - a)_+||_1 + ||(P^T 1 - b)_+||_1 + |1^T P 1 - m|``.

The result's potentials follow the library's convention ``P = a b exp((f + g - C)/eps)``
with the mass multiplier folded into the row potential (``f + lam``, ``g``).

References: J.-D. Benamou, G. Carlier, M. Cuturi, L. Nenna, G. Peyré, *Iterative
Bregman projections for regularized transportation problems*, SIAM J. Sci. Comput.
2015, §5.1; L. Chapel, M. Alaya, G. Gasso, *Partial optimal transport with
applications on positive-unlabeled learning*, NeurIPS 2020; B. Schmitzer,
*Stabilized sparse scaling algorithms for entropy regularized transport problems*,
SIAM J. Sci. Comput. 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .iterate import iterate
from .problem import MASS_RTOL, OTProblem, real_scalar
from .registry import Devices, Domain, Family, Marginals, Option, SolverInfo, register
from .result import OTResult, grad_needed, log_kernel
from .start import scot_start
from .torch_absorb import BOUNDS
from .torch_log import lse_cols, lse_rows


# ------------------------------------------------------------------ shared by the partial solvers
def check_mass(problem: OTProblem, mass) -> torch.Tensor:
    """Validate the option ``mass`` against the problem: the mass to move per problem, (B,).

    ``0 < mass <= min(|a|, |b|)`` (up to the relative tolerance of the balanced mass
    check, within which it is clipped to ``min(|a|, |b|)``); anything else raises a
    ``ValueError`` naming the option (a ``TypeError`` for a non-number).
    """
    if mass is None:
        raise ValueError(
            "mass: the partial solvers need the mass to transport, 0 < mass <= min(sum a, sum b); "
            "pass mass=... (e.g. solver_options={'mass': 0.8}, or --solver partial:mass=0.8)"
        )
    mass = real_scalar("mass", mass)  # TypeError for booleans and non-numbers, as for eps
    cap = torch.minimum(problem.a.double().sum(-1), problem.b.double().sum(-1))  # (B,)
    if not math.isfinite(mass) or mass <= 0:
        raise ValueError(f"mass: must be a finite number > 0, got {mass!r}")
    if mass > float(cap.min()) * (1 + MASS_RTOL):
        raise ValueError(
            f"mass: {mass:g} exceeds min(sum a, sum b) = {float(cap.min()):.6g}; "
            "partial OT cannot move more mass than the smaller side holds"
        )
    return cap.clamp(max=mass).to(problem.dtype)


def partial_residual(problem: OTProblem, mass: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                     f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """KKT residual (B,) of the partial problem (module docstring).

    ``row = P1`` (B, n), ``col = P^T 1`` (B, m), ``mass`` (B,); ``f`` (B, n), ``g`` (B, m) the
    multipliers of ``P1 <= a``, ``P^T 1 <= b`` (``<= 0``; zeros for an exact plan).
    """
    eps = problem.eps

    def side(marg: torch.Tensor, cap: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
        # min(cap, marg e^{-pot/eps}) (marg e^{-pot/eps}: the sum without its multiplier),
        # taken in the log domain so that a large e^{-pot/eps} cannot overflow
        target = torch.exp(torch.minimum(torch.log(marg) - pot / eps, torch.log(cap)))
        return (marg - target).abs().sum(-1)  # (B,)

    return side(row, problem.a, f) + side(col, problem.b, g) + (row.sum(-1) - mass).abs()


# ------------------------------------------------------------------ the scheme
@dataclass
class PartialFresh:
    """Before the first iteration: the start's row potential only."""

    problem: OTProblem
    mass: torch.Tensor  # (B,)
    f: torch.Tensor  # (B, n)


@dataclass
class PartialState:
    problem: OTProblem
    mass: torch.Tensor  # (B,)
    f0: torch.Tensor  # (B, n) absorbed multipliers (<= 0)
    g0: torch.Tensor  # (B, m)
    lam0: torch.Tensor  # (B,)
    K: torch.Tensor  # (B, n, m) exp((f0 + g0 + lam0 - C)/eps)
    u_cap: torch.Tensor  # (B, n) exp(-f0/eps): u <= u_cap is f <= 0
    v_cap: torch.Tensor  # (B, m)
    u: torch.Tensor  # (B, n)
    v: torch.Tensor  # (B, m)
    kappa: torch.Tensor  # (B,)


def _log_total(p: OTProblem, f_lam: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``log sum_ij P_ij`` (B,) from ``f + lam`` (B, n) and ``R = lse_rows(g)`` (B, n)."""
    return torch.logsumexp(torch.log(p.a) + f_lam / p.eps + R, dim=-1)


def _log_iteration(p: OTProblem, mass: torch.Tensor, f: torch.Tensor, lam: Optional[torch.Tensor]):
    """One exact iteration (g, f, lam) in the log domain. ``lam=None`` (the start): first the
    ``lam`` that gives ``a b exp((f + lam - C)/eps)`` the mass ``m`` (POT's start ``K m / sum K``),
    read off the same column pass."""
    eps = p.eps
    if lam is None:
        Lc = lse_cols(p, f)  # (B, m)  log sum_i a_i exp((f_i - C_ij)/eps)
        lam = eps * (torch.log(mass) - torch.logsumexp(torch.log(p.b) + Lc, dim=-1))  # (B,)
        g = torch.clamp(-eps * Lc - lam[:, None], max=0.0)  # (B, m)
    else:
        g = torch.clamp(-eps * lse_cols(p, f + lam[:, None]), max=0.0)  # (B, m)
    R = lse_rows(p, g)  # (B, n)  log sum_j b_j exp((g_j - C_ij)/eps)
    f = torch.clamp(-lam[:, None] - eps * R, max=0.0)  # (B, n)
    lam = lam + eps * (torch.log(mass) - _log_total(p, f + lam[:, None], R))  # (B,)
    return f, g, lam


def _absorbed(p: OTProblem, mass, f, g, lam) -> PartialState:
    eps = p.eps
    scores = log_kernel(p.C, eps, (f + lam[:, None]) / eps, g / eps)  # (B, n, m), working dtype
    K = torch.exp(scores) if grad_needed(scores) else scores.exp_()
    return PartialState(p, mass, f, g, lam, K, torch.exp(-f / eps), torch.exp(-g / eps),
                        torch.ones_like(f), torch.ones_like(g), torch.ones_like(lam))


def _inside(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x > lo) & (x < hi)).all()


class PartialScheme:
    def __init__(self, mass: torch.Tensor):
        self.mass = mass

    def start(self, p: OTProblem) -> PartialFresh:
        return PartialFresh(p, self.mass, scot_start(p))  # (B, n)  SCOT's u = 1/n (0 for uniform a)

    def advance(self, s, k: int) -> PartialState:
        if isinstance(s, PartialFresh):
            s = _absorbed(s.problem, s.mass, *_log_iteration(s.problem, s.mass, s.f, None))
            k -= 1
        p, eps = s.problem, s.problem.eps
        L = BOUNDS[p.dtype]
        lo, hi = math.exp(-L), math.exp(L)
        for _ in range(k):
            Ktu = torch.bmm((p.a * s.u)[:, None, :], s.K)[:, 0, :]  # (B, m)  K~^T (a u)
            v = torch.minimum(s.v_cap, (s.kappa[:, None] * Ktu).reciprocal_())  # (B, m)
            Kv = torch.bmm(s.K, (p.b * v)[:, :, None])[:, :, 0]  # (B, n)  K~ (b v)
            u = torch.minimum(s.u_cap, (s.kappa[:, None] * Kv).reciprocal_())  # (B, n)
            kappa = s.mass / (p.a * u * Kv).sum(-1)  # (B,)  total mass -> m
            ok = _inside(u, lo, hi) & _inside(v, lo, hi) & _inside(kappa, lo, hi)
            if bool(ok):  # one host read
                s = PartialState(p, s.mass, s.f0, s.g0, s.lam0, s.K, s.u_cap, s.v_cap, u, v, kappa)
            else:  # redo this iteration in the log domain and absorb
                f = s.f0 + eps * torch.log(s.u)
                lam = s.lam0 + eps * torch.log(s.kappa)
                s = _absorbed(p, s.mass, *_log_iteration(p, s.mass, f, lam))
        return s

    def multipliers(self, s: PartialState):
        """``(f, g, lam)``: the multipliers of the rows, columns and mass."""
        eps = s.problem.eps
        return s.f0 + eps * torch.log(s.u), s.g0 + eps * torch.log(s.v), s.lam0 + eps * torch.log(s.kappa)

    def residual(self, s: PartialState) -> torch.Tensor:
        p = s.problem
        kau = s.kappa[:, None] * p.a * s.u  # (B, n)
        row = kau * torch.bmm(s.K, (p.b * s.v)[:, :, None])[:, :, 0]  # (B, n)
        col = p.b * s.v * torch.bmm(kau[:, None, :], s.K)[:, 0, :]  # (B, m)
        f, g, _ = self.multipliers(s)
        return partial_residual(p, s.mass, row, col, f, g)

    def potentials(self, s: PartialState):
        f, g, lam = self.multipliers(s)
        return f + lam[:, None], g  # library convention: P = a b exp((f + g - C)/eps)

    def plan(self, s: PartialState):
        return None  # built lazily from the potentials when asked for


#: the option of every partial solver
MASS = Option("mass", "the mass to transport, 0 < mass <= min(sum a, sum b)", required=True, example=0.6)


@register
class PartialSinkhorn:
    """``partial``: entropic partial OT of mass ``mass`` (see the module docstring)."""

    name = "partial"
    info = SolverInfo(
        summary="entropic partial OT, moves mass m <= min(sum a, sum b): POT's Dykstra iteration as dual "
                "ascent, BLAS mat-vecs with log-domain absorption",
        family=Family.ENTROPIC,
        marginals={Marginals.PARTIAL_MASS},
        domain=Domain.KERNEL_ABSORPTION,
        devices=Devices(host_read_per_iteration=True),  # the absorption test
        differentiable=True,  # autograd through the unrolled iterations (log steps out of place)
        finite_at_any_eps=True,
        options=(MASS,),
    )

    def solve(self, problem, *, max_iter, tol, check_every, mass=None) -> OTResult:
        m = check_mass(problem, mass)
        return iterate(self.name, PartialScheme(m), problem, max_iter, tol, check_every)

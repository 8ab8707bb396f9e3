"""``torch-absorb``: kernel-domain Sinkhorn with log-domain absorption, our fast CPU solver.

Write the potentials as absorbed parts plus scalings,
``f = f0 + eps log u`` and ``g = g0 + eps log v``, and keep the stabilised kernel

.. math::

    \\tilde K_{ij} = \\exp\\big((f^0_i + g^0_j - C_{ij})/\\varepsilon\\big), \\qquad
    P = \\mathrm{diag}(a \\odot u)\\, \\tilde K\\, \\mathrm{diag}(b \\odot v).

The log-domain updates of :mod:`scot_ot.ot.torch_log` then become two
matrix-vector products per iteration (no ``exp`` on the n x m grid):

.. math::

    v \\leftarrow e^{(\\tau_b - 1) g^0/\\varepsilon}\\,
        \\big(\\tilde K^\\top (a \\odot u)\\big)^{-\\tau_b}, \\qquad
    u \\leftarrow e^{(\\tau_a - 1) f^0/\\varepsilon}\\,
        \\big(\\tilde K (b \\odot v)\\big)^{-\\tau_a}.

When a scaling leaves ``[e^{-L}, e^{L}]`` (``L`` = 50 in float64, 20 in
float32) or a product under- or overflows, the step is redone in the log
domain and everything is absorbed into ``f0, g0`` (one ``exp`` pass to rebuild
``K~``). The first iteration always runs in the log domain (from SCOT's start
``u = 1/n`` or from ``init``, :mod:`scot_ot.ot.start`), so ``K~`` starts from
potentials that already balance the rows: this is what keeps small ``eps``
(1e-3 on costs in [0, 2]) finite, where plain kernel scaling underflows to 0.
Each iteration's iterates are those of ``torch-log`` up to rounding.

Dtypes: float64 and float32 costs iterate in their own dtype. A float16 or
bfloat16 cost is read as stored, but ``K~``, the scalings and the potentials are
float32 (the working dtype of :mod:`scot_ot.ot.problem`): float16 could not hold
``e^{20}`` (its largest value is 65504 ~ e^{11.1}) and neither half type has the
mantissa to iterate. So ``L`` is that of float32.

Gradients: the kernel-domain steps are differentiable as written (no in-place op
on a value autograd keeps); the log-domain steps use the out-of-place
log-sum-exp of :mod:`scot_ot.ot.torch_log` when autograd records. The absorption
test reads values, so the path taken is that of the forward pass.

The absorption test reads two numbers per half-iteration on the host: cheap on
the CPU this solver is meant for; on CUDA prefer ``fused`` or ``torch-log``.

Reference: B. Schmitzer, *Stabilized sparse scaling algorithms for entropy
regularized transport problems*, SIAM J. Sci. Comput. 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .iterate import iterate
from .memory import dense_buffers
from .problem import OTProblem
from .registry import INIT, Devices, Domain, Family, Marginals, SolverInfo, register
from .result import OTResult, grad_needed, log_kernel, marginal_error
from .start import check_init, start_potential
from .torch_log import lse_cols, lse_rows

#: absorption bound ``L`` per working dtype (half-precision costs iterate in float32)
BOUNDS = {torch.float64: 50.0, torch.float32: 20.0}


def _bound(dtype: torch.dtype) -> float:
    return BOUNDS[dtype]


@dataclass
class AbsorbState:
    problem: OTProblem
    f0: torch.Tensor  # (B, n) absorbed potentials
    g0: torch.Tensor  # (B, m)
    K: torch.Tensor  # (B, n, m) stabilised kernel exp((f0 + g0 - C)/eps)
    u: torch.Tensor  # (B, n) scalings
    v: torch.Tensor  # (B, m)


def _kernel(p: OTProblem, f0: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    scores = log_kernel(p.C, p.eps, f0 / p.eps, g0 / p.eps)  # (B, n, m), working dtype
    return torch.exp(scores) if grad_needed(scores) else scores.exp_()


def _ok(x: torch.Tensor, log_bound: float) -> bool:
    """All entries inside [e^-L, e^L] (NaN fails): one host read."""
    return bool(((x > math.exp(-log_bound)) & (x < math.exp(log_bound))).all())


@dataclass
class Fresh:
    """Before the first iteration: the start's row potential only, no kernel yet."""

    problem: OTProblem
    f: torch.Tensor  # (B, n)


def _log_iteration(p: OTProblem, f: torch.Tensor):
    """One exact log-domain iteration from ``f`` (the update of torch-log)."""
    g = -p.tau(1) * p.eps * lse_cols(p, f)  # (B, m)
    return -p.tau(0) * p.eps * lse_rows(p, g), g  # (B, n), (B, m)


def _absorbed(p: OTProblem, f: torch.Tensor, g: torch.Tensor) -> AbsorbState:
    return AbsorbState(p, f, g, _kernel(p, f, g), torch.ones_like(f), torch.ones_like(g))


class AbsorbScheme:
    """``init``: a row potential (B, n) checked by :func:`scot_ot.ot.start.check_init`,
    or None for SCOT's start."""

    def __init__(self, init=None):
        self.init = init

    def start(self, p: OTProblem) -> Fresh:
        return Fresh(p, start_potential(p, self.init))

    def advance(self, s, k: int) -> AbsorbState:
        if isinstance(s, Fresh):  # first iteration in the log domain, then build K~
            s = _absorbed(s.problem, *_log_iteration(s.problem, s.f))
            k -= 1
        p = s.problem
        L = _bound(p.dtype)
        ta, tb, eps = p.tau(0), p.tau(1), p.eps
        for _ in range(k):
            Ktu = torch.bmm((p.a * s.u)[:, None, :], s.K)[:, 0, :]  # (B, m)  K~^T (a u)
            v = Ktu.reciprocal() if tb == 1.0 else torch.exp((tb - 1.0) * s.g0 / eps) * Ktu.pow(-tb)  # (B, m)
            Kv = torch.bmm(s.K, (p.b * v)[:, :, None])[:, :, 0]  # (B, n)  K~ (b v)
            u = Kv.reciprocal() if ta == 1.0 else torch.exp((ta - 1.0) * s.f0 / eps) * Kv.pow(-ta)  # (B, n)
            if _ok(v, L) and _ok(u, L):
                s = AbsorbState(p, s.f0, s.g0, s.K, u, v)
            else:  # redo this iteration in the log domain and absorb
                f = s.f0 + eps * torch.log(s.u)
                s = _absorbed(p, *_log_iteration(p, f))
        return s

    def residual(self, s: AbsorbState) -> torch.Tensor:
        p = s.problem
        row = p.a * s.u * torch.bmm(s.K, (p.b * s.v)[:, :, None])[:, :, 0]  # (B, n)
        col = p.b * s.v * torch.bmm((p.a * s.u)[:, None, :], s.K)[:, 0, :]  # (B, m)
        f, g = self.potentials(s)
        return marginal_error(p, row, col, f, g)

    def potentials(self, s: AbsorbState):
        eps = s.problem.eps
        return s.f0 + eps * torch.log(s.u), s.g0 + eps * torch.log(s.v)

    def plan(self, s: AbsorbState):
        return None  # built lazily from the potentials when asked for


@register
class TorchAbsorbSinkhorn:
    name = "torch-absorb"
    info = SolverInfo(
        summary="fast CPU Sinkhorn: BLAS mat-vecs, log-domain absorption keeps small eps finite",
        family=Family.ENTROPIC,
        marginals={Marginals.BALANCED, Marginals.KL_UNBALANCED, Marginals.SEMI_RELAXED},
        domain=Domain.KERNEL_ABSORPTION,
        devices=Devices(host_read_per_iteration=True),  # the absorption test
        differentiable=True,  # autograd through the unrolled iterations
        finite_at_any_eps=True,
        options=(INIT,),
        memory=dense_buffers(3),  # the stabilised kernel, one log-domain absorption step, the plan
    )

    def solve(self, problem, *, max_iter, tol, check_every, init=None) -> OTResult:
        return iterate(self.name, AbsorbScheme(check_init(problem, init)), problem, max_iter, tol,
                       check_every)

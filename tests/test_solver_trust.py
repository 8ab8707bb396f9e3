"""A solver returns a valid result or says why it cannot (issue 10), from SCOT's start (issue 9).

- every entropic solver starts from SCOT's ``u = 1/n``: iteration ``k`` is the same plan
  for all of them, and POT's own ``ot.sinkhorn`` (SCOT's solver) after ``k`` iterations;
- no NaN, inf or all-zero plan comes back: :class:`scot_ot.NumericalError` instead;
- half-precision costs and every scalar type of the parameters;
- gradients through the solvers that declare them (``torch-log`` and ``torch-absorb``
  here; every solver's dtypes, gradients or refusal: ``tests/test_solver_contract.py``).

``fused`` (Triton) is covered in ``tests/test_fused.py``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scot_ot
from random_problems import cosine_cost, gen, marginal
from scot_ot import NumericalError, solve
from scot_ot.ot import OTProblem, solver_info
from scot_ot.ot.iterate import iterate

F64 = torch.float64
HALF = [torch.float16, torch.bfloat16]
#: the Sinkhorn iterations: the same iterate as POT's ot.sinkhorn after k iterations
ENTROPIC = ["torch-log", "torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized",
            "pot-unbalanced"]
#: as declared (every solver's dtypes, gradients and tiny-eps behaviour: tests/test_solver_contract.py)
KERNEL_DOMAIN = [s for s in ENTROPIC if not solver_info(s).finite_at_any_eps]
LOG_DOMAIN = [s for s in ENTROPIC if solver_info(s).finite_at_any_eps]
DIFFERENTIABLE = [s for s in ENTROPIC if solver_info(s).differentiable]
FEW = settings(max_examples=5, deadline=None)
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- SCOT's start
@pytest.mark.parametrize("iters", [1, 2, 10])
@given(seed=seeds, n=st.integers(2, 20), m=st.integers(2, 20), eps=st.sampled_from([0.02, 0.05, 0.5]))
@FEW
def test_every_entropic_solver_is_pots_sinkhorn_after_k_iterations(iters, seed, n, m, eps):
    """SCOT calls ``ot.sinkhorn(a, b, C, eps, numItermax=k)`` from POT's start u = 1/n: after
    1, 2 and 10 iterations every entropic solver holds that plan (non-uniform marginals)."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    scot = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, numItermax=iters, stopThr=0.0, warn=False)
    for solver in ENTROPIC:  # pot-unbalanced with reg_m = inf (the default: balanced)
        r = solve(C, a, b, solver=solver, eps=eps, max_iter=iters, tol=0, check_every=3)
        np.testing.assert_allclose(r.plan.numpy(), scot, rtol=0, atol=1e-12, err_msg=solver)


@given(seed=seeds, n=st.integers(2, 20), m=st.integers(2, 20))
@FEW
def test_same_iterates_with_unbalanced_marginals(seed, n, m):
    """With KL-relaxed sides too, iteration k is one iterate for every unbalanced solver."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), 1.7 * marginal(g, m)
    for reg_m in (0.5, (math.inf, 0.3), (2.0, 0.7)):
        ref = solve(C, a, b, reg_m=reg_m, max_iter=4, tol=0)
        for solver in ("torch-absorb", "pot-unbalanced"):
            r = solve(C, a, b, solver=solver, reg_m=reg_m, max_iter=4, tol=0, check_every=3)
            torch.testing.assert_close(r.plan, ref.plan, atol=1e-12, rtol=0)
            torch.testing.assert_close(r.f, ref.f, atol=1e-10, rtol=0)
            torch.testing.assert_close(r.g, ref.g, atol=1e-10, rtol=0)


def test_start_is_scots_and_finite_at_zero_weights():
    from scot_ot.ot.start import scot_start

    a = torch.tensor([[0.5, 0.0, 0.25, 0.25]], dtype=F64)
    p = OTProblem.create(torch.rand(1, 4, 3, dtype=F64), a, torch.full((1, 3), 1 / 3, dtype=F64), eps=0.1)
    f = scot_start(p)
    # u_i = a_i exp(f_i/eps) = 1/n where a_i > 0; 0 (not inf/NaN) where a_i = 0
    want = torch.tensor([[-0.1 * math.log(2.0), 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(f, want, atol=1e-15, rtol=0)
    uniform = OTProblem.create(torch.rand(5, 3, dtype=F64), eps=0.1)
    assert torch.equal(scot_start(uniform), torch.zeros(1, 5, dtype=F64))


@pytest.mark.filterwarnings("ignore:.*umerical errors:UserWarning")  # POT's own, let through
@pytest.mark.parametrize("where", ["a", "b", "both"])
@given(seed=seeds)
@FEW
def test_zero_weights_give_the_same_iterates(where, seed):
    """A zero weight carries no mass in the first column update of any solver but
    pot-sinkhorn-stabilized (POT's u = 1/n there, documented). POT itself fails on some zero
    weights: its unbalanced solver computes 0/0 (a zero row of K = a b exp(-C/eps)), and
    sinkhorn_knopp inf * 0 (u = 1 / ((K / a) v)) when a and b both have zeros; these raise
    (they returned NaN with a warning before)."""
    g = gen(seed)
    C = cosine_cost(g, 9, 7)
    a, b = marginal(g, 9), marginal(g, 7)
    if where in ("a", "both"):
        a[2] = 0.0
    if where in ("b", "both"):
        b[4] = 0.0
    a, b = a / a.sum(), b / b.sum()
    ref = solve(C, a, b, max_iter=5, tol=0)
    for solver in ("torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-unbalanced"):
        if solver == "pot-unbalanced" or (solver == "pot-sinkhorn" and where == "both"):
            with pytest.raises(NumericalError, match="POT stopped after 0 of the 5 iterations"):
                solve(C, a, b, solver=solver, max_iter=5, tol=0)
            continue
        r = solve(C, a, b, solver=solver, max_iter=5, tol=0)
        torch.testing.assert_close(r.plan, ref.plan, atol=1e-12, rtol=0)
        assert bool(torch.isfinite(r.f).all() and torch.isfinite(r.g).all()), solver
        assert float(r.plan[2].abs().max()) == 0.0 if where != "b" else True
        assert float(r.plan[:, 4].abs().max()) == 0.0 if where != "a" else True


# ----------------------------------------------------------------------------- no garbage
@pytest.mark.filterwarnings("ignore:.*umerical errors:UserWarning")  # POT's own, let through
@pytest.mark.parametrize("solver", KERNEL_DOMAIN)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tiny_eps_raises_instead_of_returning_a_zero_or_nan_plan(solver, dtype):
    """eps = 1e-4 on a cosine cost: exp(-C/eps) underflows. Before: an all-zero plan (cost 0,
    error NaN) or a NaN plan, with a RuntimeWarning only."""
    C = cosine_cost(gen(3), 50, 40, d=16, dtype=dtype)
    with pytest.raises(NumericalError, match=rf"^solver '{solver}' failed numerically at eps=0.0001") as info:
        solve(C, solver=solver, eps=1e-4, max_iter=100)
    msg = str(info.value)
    assert "'torch-log'" in msg and "'torch-absorb'" in msg and str(dtype).replace("torch.", "") in msg


@pytest.mark.parametrize("solver", LOG_DOMAIN)
def test_log_domain_solvers_stay_finite_at_tiny_eps(solver):
    C = cosine_cost(gen(3), 50, 40, d=16, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = solve(C, solver=solver, eps=1e-4, max_iter=100, tol=1e-9)
    assert not r.converged and math.isfinite(r.error) and r.error == r.errors[-1]
    assert bool(torch.isfinite(r.plan).all()) and float(r.plan.sum()) == pytest.approx(1.0, abs=1e-3)


def test_finite_but_not_converged_says_so():
    g = gen(5)
    C = cosine_cost(g, 12, 9)
    r = solve(C, marginal(g, 12), marginal(g, 9), eps=0.01, max_iter=7, tol=1e-12, check_every=3)
    assert not r.converged and r.n_iters == 7 and r.error_iters == (3, 6, 7)
    P, a, b = r.plan, r.problem.a[0], r.problem.b[0]
    assert r.error == pytest.approx(float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum()), rel=1e-9)
    assert r.error > 1e-6


class _Broken:
    """A scheme whose error or potentials are not finite: the loop must raise, not return."""

    def __init__(self, bad_error: bool):
        self.bad_error = bad_error

    def start(self, p):
        return p

    def advance(self, p, k):
        return p

    def residual(self, p):
        return torch.full((1,), math.nan if self.bad_error else 0.5, dtype=F64)

    def potentials(self, p):
        f = torch.zeros(1, 3, dtype=F64)
        f[0, 1] = math.inf
        return f, torch.zeros(1, 2, dtype=F64)

    def plan(self, p):
        return None


@pytest.mark.parametrize("bad_error", [True, False])
def test_loop_raises_on_a_non_finite_error_or_potential(bad_error):
    p = OTProblem.create(torch.rand(3, 2, dtype=F64), eps=0.1)
    what = r"the marginal error became nan after 4 iterations" if bad_error else \
        r"1 entries of the potential f are NaN or inf after 8 iterations"
    with pytest.raises(NumericalError, match=rf"^solver 'broken' failed numerically at eps=0.1 .*{what}"):
        iterate("broken", _Broken(bad_error), p, max_iter=8, tol=0.0, check_every=4)


def test_zero_weight_rows_may_have_any_potential():
    """A non-finite potential is an error only where the weight is positive."""
    p = OTProblem.create(torch.rand(3, 2, dtype=F64), torch.tensor([0.5, 0.0, 0.5], dtype=F64), eps=0.1)
    r = iterate("broken", _Broken(False), p, max_iter=2, tol=0.0, check_every=1)
    assert r.error == 0.5 and not r.converged


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", HALF)
def test_torch_log_in_half_precision_does_not_stall(dtype):
    """bfloat16 iterations stalled at an error of 5e-3; the float32 working dtype converges."""
    C = cosine_cost(gen(8), 200, 150, dtype=dtype)
    r = solve(C, solver="torch-log", eps=0.05, max_iter=1000, tol=1e-6)
    assert r.converged and r.error <= 1e-6


@pytest.mark.parametrize("dtype", HALF)
def test_torch_absorb_half_precision_at_small_eps_stays_finite(dtype):
    """Scalings far beyond float16's range (e^11): absorption bound of float32, iterates of float32."""
    C = cosine_cost(gen(9), 40, 30, dtype=dtype)
    r = solve(C, solver="torch-absorb", eps=2e-3, max_iter=60, tol=0)
    ref = solve(C.float(), solver="torch-log", eps=2e-3, max_iter=60, tol=0)
    assert bool(torch.isfinite(r.plan).all())
    assert float((r.plan - ref.plan).abs().sum()) < 1e-3


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_marginals_pass_the_mass_check(dtype):
    """User marginals in bfloat16/float16: masses compared in float64 within the dtype's rounding,
    then made equal in float32 (the problem stays balanced)."""
    C = cosine_cost(gen(10), 3, 7, dtype=dtype)
    a, b = torch.full((3,), 1 / 3, dtype=dtype), marginal(gen(11), 7, dtype=dtype)
    assert float(a.double().sum()) != float(b.double().sum())  # rounding made them differ
    p = OTProblem.create(C, a, b)
    assert p.a.dtype == p.b.dtype == torch.float32
    assert float(p.a.sum()) == pytest.approx(float(p.b.sum()), rel=1e-6)
    r = solve(C, a, b, max_iter=500, tol=1e-6)
    assert r.converged
    with pytest.raises(ValueError, match="balanced OT needs equal masses"):
        OTProblem.create(C, a, 1.1 * b)


def test_scalar_parameters_of_any_numeric_type():
    """numpy scalars and 0-d tensors are numbers (they were refused as 'must be a finite number')."""
    g = gen(12)
    C = cosine_cost(g, 8, 6)
    a, b = marginal(g, 8), 1.3 * marginal(g, 6)
    base = dict(eps=0.5, max_iter=5, tol=1e-3, check_every=2, reg_m=1.0)  # all exact in float32
    want = solve(C, a, b, **base)
    for kw in (dict(eps=np.float32(0.5)), dict(eps=torch.tensor(0.5)), dict(eps=np.float64(0.5)),
               dict(max_iter=np.int64(5)), dict(max_iter=torch.tensor(5)), dict(check_every=np.int32(2)),
               dict(tol=np.float32(1e-3)), dict(tol=torch.tensor(1e-3, dtype=F64)), dict(reg_m=1),
               dict(reg_m=np.float64(1.0)), dict(reg_m=(torch.tensor(1.0), np.float32(1.0)))):
        r = solve(C, a, b, **{**base, **kw})
        assert r.n_iters == 5 and r.error_iters == (2, 4, 5), kw
        torch.testing.assert_close(r.plan, want.plan, atol=0, rtol=0)
        assert type(r.problem.eps) is float and type(r.problem.reg_m[0]) is float


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("solver", DIFFERENTIABLE)
@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_gradcheck_through_the_iterations(solver, eps):
    """Unrolled autograd equals finite differences (float64, 4 x 3, a few iterations); eps = 0.01
    makes torch-absorb absorb. Before: 'modified by an inplace operation' in backward."""
    g = gen(13)
    C = cosine_cost(g, 4, 3).requires_grad_()
    a, b = marginal(g, 4), marginal(g, 3)

    def balanced(C):
        r = solve(C, a, b, solver=solver, eps=eps, max_iter=4, tol=0)
        return r.plan, r.f, r.g

    assert torch.autograd.gradcheck(balanced, (C,))

    def unbalanced(C, a, b):
        return solve(C, a, b, solver=solver, eps=eps, max_iter=3, tol=0, reg_m=(1.0, 2.0)).plan

    assert torch.autograd.gradcheck(unbalanced, (C, a.clone().requires_grad_(), 1.5 * b.clone().requires_grad_()))


@pytest.mark.parametrize("solver", DIFFERENTIABLE)
@given(seed=seeds, n=st.integers(2, 8), m=st.integers(2, 8))
@settings(max_examples=3, deadline=None)
def test_envelope_gradient_of_the_entropic_objective_is_the_plan(solver, seed, n, m):
    """At convergence, d/dC [<C, P> + eps KL(P | a b)] = P; that value equals the dual a.f + b.g."""
    g = gen(seed)
    C = cosine_cost(g, n, m).requires_grad_()
    a, b = marginal(g, n), marginal(g, m)
    eps = 0.1
    r = solve(C, a, b, solver=solver, eps=eps, max_iter=5000, tol=1e-13, check_every=1)
    assert r.converged
    P = r.plan.detach()
    dual = a @ r.f + b @ r.g
    primal = (C * P).sum() + eps * (P * torch.log(P / (a[:, None] * b[None, :]))).sum()
    assert float(dual.detach()) == pytest.approx(float(primal.detach()), abs=1e-10)
    (grad,) = torch.autograd.grad(dual, C)
    torch.testing.assert_close(grad, P, atol=1e-9, rtol=0)


def test_plain_solve_of_a_cost_that_requires_grad_backpropagates():
    """The issue's reproduction: scot_ot.solve(C) with C.requires_grad crashed in backward."""
    C = torch.rand(6, 5, requires_grad=True)
    scot_ot.solve(C).cost.backward()
    assert C.grad is not None and bool(torch.isfinite(C.grad).all())

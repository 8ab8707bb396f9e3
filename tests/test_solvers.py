"""The solver layer: closed forms, parity with the float64 reference, stability.

Every random problem is fresh (hypothesis draws the seed and the sizes), so these tests
can fail on inputs nobody picked by hand. ``fused`` (Triton) has its own test file. What
every registered solver must do (the common loop, validation, batches, dtypes, symmetry
and shift invariance, warm starts) is in ``tests/test_solver_contract.py``, generated from
each solver's declared capabilities; the lists here are drawn from the registry too.

The reference is ``torch-log`` in float64. Conventions tested here are those of
:mod:`scot_ot.ot.result`: ``P = a b exp((f + g - C)/eps)``; the common error is
``||P1 - a e^{-f/rho_a}||_1 + ||P^T 1 - b e^{-g/rho_b}||_1`` (``rho = inf``: plain L1
marginal violation).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import scot_ot
from random_problems import cosine_cost, gen, marginal
from scot_ot import solve
from scot_ot.ot import Family, Marginals, available_solvers, solver_info

F64 = torch.float64


def _ot64(name: str) -> bool:
    info = solver_info(name)
    return info.solves_ot and F64 in info.dtypes.cost


#: the registered solvers of balanced OT that take a float64 cost (closed forms, parity with
#: ``torch-log``; ``fused`` computes in float32 and is tested in its own file)
BALANCED = [s for s in available_solvers() if _ot64(s) and Marginals.BALANCED in solver_info(s).marginals]
BALANCED_ENTROPIC = [s for s in BALANCED if solver_info(s).family is Family.ENTROPIC and s != "torch-log"]
#: the registered solvers of KL-unbalanced OT that take a float64 cost
UNBALANCED = [s for s in available_solvers() if _ot64(s) and Marginals.KL_UNBALANCED in solver_info(s).marginals]
#: the Sinkhorn iterations, from SCOT's u = 1/n or ``init``, checked step by step against a
#: hand-computed iteration (every solver's contract: tests/test_solver_contract.py)
SINKHORN = ["torch-log", "torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized",
            "pot-unbalanced"]

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=3, deadline=None)
seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(1, 24)


# ----------------------------------------------------------------------------- helpers
def l1_marginal_error(P, a, b) -> float:
    """``||P1 - a||_1 + ||P^T 1 - b||_1`` by hand, in float64 numpy."""
    P, a, b = (x.double().numpy() for x in (P, a, b))
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())


def assert_same_up_to_shift(f, g, f_ref, g_ref, atol):
    """Balanced duals are unique up to ``(f + c, g - c)``: remove the shift, then compare."""
    c = float((f - f_ref).mean())
    torch.testing.assert_close(f - c, f_ref, atol=atol, rtol=0)
    torch.testing.assert_close(g + c, g_ref, atol=atol, rtol=0)


def converged(C, a=None, b=None, solver="torch-log", **kw):
    kw.setdefault("max_iter", 20_000)
    kw.setdefault("tol", 1e-11)
    r = solve(C, a, b, solver=solver, **kw)
    assert r.converged, f"{solver} did not reach tol: errors[-3:]={r.errors[-3:]}"
    return r


def test_registry_lists_the_builtin_solvers():
    assert set(SINKHORN) | {"pot-emd", "fused"} <= set(scot_ot.available_solvers())
    assert scot_ot.available_solvers() == sorted(scot_ot.available_solvers())


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("solver", BALANCED)
@given(seed=seeds)
@SETTINGS
def test_one_by_one_problem(solver, seed):
    g = gen(seed)
    c = float(torch.rand((), generator=g, dtype=F64)) * 3
    mass = float(torch.rand((), generator=g, dtype=F64)) * 4 + 0.1
    C = torch.tensor([[c]], dtype=F64)
    m = torch.tensor([mass], dtype=F64)
    r = solve(C, m, m, solver=solver, eps=0.05)
    assert r.converged
    torch.testing.assert_close(r.plan, torch.tensor([[mass]], dtype=F64), rtol=1e-12, atol=0)
    assert float(r.cost) == pytest.approx(c * mass, rel=1e-12)
    # P = a b exp((f + g - C)/eps) = mass  <=>  f + g = C - eps log(mass); EMD: f + g = C
    want = c if solver_info(solver).family is Family.EXACT else c - 0.05 * math.log(mass)
    assert float(r.f[0] + r.g[0]) == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("solver", BALANCED)
@given(seed=seeds, n=st.integers(2, 30))
@SETTINGS
def test_one_minus_permutation_cost_recovers_the_permutation(solver, seed, n):
    perm = torch.randperm(n, generator=gen(seed))
    Pi = torch.zeros(n, n, dtype=F64)
    Pi[torch.arange(n), perm] = 1.0
    r = converged(1.0 - Pi, solver=solver, eps=0.01, tol=1e-10)
    # off-permutation entries of the entropic plan are O(exp(-1/eps)) = O(e^-100)
    torch.testing.assert_close(r.plan, Pi / n, atol=1e-12, rtol=0)
    assert float(r.cost) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("solver", BALANCED)
@given(seed=seeds, n=st.integers(2, 30))
@SETTINGS
def test_planted_permutation_matches_hungarian(solver, seed, n):
    """Planted entries in [0, 0.2], the rest in [0.5, 1]: any other permutation costs >= 0.6 more."""
    g = gen(seed)
    perm = torch.randperm(n, generator=g)
    C = 0.5 + 0.5 * torch.rand(n, n, generator=g, dtype=F64)
    C[torch.arange(n), perm] = 0.2 * torch.rand(n, generator=g, dtype=F64)
    rows, cols = linear_sum_assignment(C.numpy())
    assert np.array_equal(cols[np.argsort(rows)], perm.numpy())  # the plant is the optimum

    r = converged(C, solver=solver, eps=0.01, tol=1e-10)
    Pi = torch.zeros(n, n, dtype=F64)
    Pi[torch.arange(n), perm] = 1.0 / n
    assert torch.equal(r.plan.argmax(1), perm)
    assert float((r.plan - Pi).abs().sum()) < 1e-6  # mass off the plant ~ n e^{-0.3/eps}
    assert float(r.cost) == pytest.approx(float(C[rows, cols].sum()) / n, abs=1e-6)


# ----------------------------------------------------------------------------- exact solver
@given(seed=seeds, n=st.integers(1, 40))
@SETTINGS
def test_emd_matches_pot_and_hungarian_on_uniform_square(seed, n):
    g = gen(seed)
    C = torch.rand(n, n, generator=g, dtype=F64) * 2
    r = solve(C, solver="pot-emd")
    a = np.full(n, 1.0 / n)
    rows, cols = linear_sum_assignment(C.numpy())
    assert float(r.cost) == pytest.approx(ot.emd2(a, a, C.numpy()), abs=1e-12)
    assert float(r.cost) == pytest.approx(C.numpy()[rows, cols].sum() / n, abs=1e-12)
    # marginals exact, and the plan is a vertex: a permutation / n
    assert l1_marginal_error(r.plan, torch.tensor(a), torch.tensor(a)) < 1e-14
    assert r.error == pytest.approx(l1_marginal_error(r.plan, torch.tensor(a), torch.tensor(a)), abs=1e-15)
    assert torch.equal(torch.sort(r.plan.flatten(), descending=True).values[:n] * n, torch.ones(n, dtype=F64))


@given(seed=seeds, n=sizes, m=sizes)
@SETTINGS
def test_emd_potentials_are_kantorovich(seed, n, m):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    r = solve(C, a, b, solver="pot-emd")
    assert r.converged
    slack = C - r.f[:, None] - r.g[None, :]
    assert float(slack.min()) > -1e-10  # dual feasible
    assert float(slack[r.plan > 1e-14].abs().max()) < 1e-10  # complementary slackness
    assert float(a @ r.f + b @ r.g) == pytest.approx(float(r.cost), abs=1e-10)  # strong duality
    assert float(r.cost) == pytest.approx(ot.emd2(a.numpy(), b.numpy(), C.numpy()), abs=1e-12)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("solver", BALANCED_ENTROPIC)
@given(seed=seeds, n=sizes, m=sizes, eps=st.sampled_from([0.05, 0.1, 0.5]))
@SETTINGS
def test_balanced_parity_with_reference(solver, seed, n, m, eps):
    """(eps >= 0.05: at 0.02 a rare random problem needs > 20000 iterations to reach 1e-11.)"""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    ref = converged(C, a, b, eps=eps)
    r = converged(C, a, b, solver=solver, eps=eps)
    torch.testing.assert_close(r.plan, ref.plan, atol=1e-10, rtol=0)
    assert_same_up_to_shift(r.f, r.g, ref.f, ref.g, atol=1e-7)
    for res in (r, ref):  # marginals met to tol, measured by hand
        assert l1_marginal_error(res.plan, a, b) <= 1e-11


@pytest.mark.parametrize("solver", UNBALANCED)
@given(seed=seeds, n=sizes, m=sizes)
@SETTINGS
def test_unbalanced_with_large_reg_m_approaches_balanced(solver, seed, n, m):
    """``||P_rho - P_balanced||_1 = O(1/rho)``; the shift mode converges at rate ~1 - eps/rho,
    so this compares after a fixed number of iterations, not at tol."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    bal = converged(C, a, b)
    gaps = []
    for rho in (1e2, 1e4):
        r = solve(C, a, b, solver=solver, reg_m=rho, max_iter=400, tol=0)
        gaps.append(float((r.plan - bal.plan).abs().sum()))
        assert gaps[-1] < 10.0 / rho, (rho, gaps)
    assert gaps[1] < gaps[0]


@pytest.mark.parametrize("reg_m", [1.0, (0.3, 2.0), (math.inf, 1.0), (0.5, math.inf)])
@given(seed=seeds, n=sizes, m=sizes)
@SETTINGS
def test_unbalanced_parity(reg_m, seed, n, m):
    """Masses differ (1 and 1.7); agreement at convergence (per iteration: test_solver_trust.py)."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n, 1.0), marginal(g, m, 1.7)
    ref = converged(C, a, b, reg_m=reg_m)
    for solver in (s for s in UNBALANCED if s != "torch-log"):
        r = converged(C, a, b, solver=solver, reg_m=reg_m)
        torch.testing.assert_close(r.plan, ref.plan, atol=1e-10, rtol=0)
        # no shift invariance once a side is KL-relaxed: potentials are unique
        torch.testing.assert_close(r.f, ref.f, atol=1e-8, rtol=0)
        torch.testing.assert_close(r.g, ref.g, atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", UNBALANCED)
@given(seed=seeds, n=sizes, m=sizes, iters=st.integers(1, 30))
@SETTINGS
def test_semi_relaxed_meets_the_hard_side_exactly(solver, seed, n, m, iters):
    """reg_m = (inf, rho): every iteration ends with the f update, so P1 = a after each one."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n, 1.0), marginal(g, m, 2.5)
    r = solve(C, a, b, solver=solver, reg_m=(math.inf, 1.0), max_iter=iters, tol=0)
    torch.testing.assert_close(r.row_marginal, a, atol=1e-14, rtol=1e-13)
    r = converged(C, a, b, solver=solver, reg_m=(math.inf, 1.0))
    assert float(r.col_marginal.sum()) != pytest.approx(2.5, abs=1e-3)  # the soft side did move


# ----------------------------------------------------------------------------- one iteration
def one_sinkhorn_step(C, a, b, eps, f0):
    """By hand, from ``f0``: g_j = -eps log sum_i a_i e^{(f0_i - C_ij)/eps}, then
    f_i = -eps log sum_j b_j e^{(g_j - C_ij)/eps}; returns (plan, f, g) in numpy."""
    gj = -eps * logsumexp(np.log(a)[:, None] + (f0[:, None] - C) / eps, axis=0)  # (m,)
    fi = -eps * logsumexp(np.log(b)[None, :] + (gj[None, :] - C) / eps, axis=1)  # (n,)
    return a[:, None] * b[None, :] * np.exp((fi[:, None] + gj[None, :] - C) / eps), fi, gj


@given(seed=seeds, n=sizes, m=sizes, eps=st.sampled_from([0.01, 0.05, 0.5]), uniform=st.booleans())
@SETTINGS
def test_one_iteration_is_one_hand_computed_sinkhorn_step(seed, n, m, eps, uniform):
    """Every entropic solver starts from SCOT's (POT's) u = 1/n, i.e. f0 = -eps log(n a)."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a = torch.full((n,), 1.0 / n, dtype=F64) if uniform else marginal(g, n)
    b = marginal(g, m)
    Cn, an, bn = C.numpy(), a.numpy(), b.numpy()
    P, fi, gj = one_sinkhorn_step(Cn, an, bn, eps, -eps * np.log(n * an))
    for solver in SINKHORN:
        r = solve(C, a, b, solver=solver, eps=eps, max_iter=1, tol=0)
        np.testing.assert_allclose(r.plan.numpy(), P, rtol=1e-10, atol=1e-300, err_msg=solver)
        # the same iterate, potentials included (no constant shift: same start, same updates)
        np.testing.assert_allclose(r.f.numpy(), fi, rtol=0, atol=1e-12, err_msg=solver)
        np.testing.assert_allclose(r.g.numpy(), gj, rtol=0, atol=1e-12, err_msg=solver)


# ----------------------------------------------------------------------------- stability
def _cost_0_2_with_an_underflowing_row(g, n, m, dtype):
    """Costs in [0, 2]; row 0 in [1, 2], so exp(-C/1e-3) underflows on the whole row in float64."""
    C = 2 * torch.rand(n, m, generator=g, dtype=F64)
    C[0] = 1 + C[0] / 2
    return C.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", [s for s in SINKHORN if solver_info(s).finite_at_any_eps])
@given(seed=seeds, n=st.integers(2, 40), m=st.integers(2, 40))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_small_eps_stays_finite_in_the_log_domain(solver, dtype, seed, n, m):
    C = _cost_0_2_with_an_underflowing_row(gen(seed), n, m, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        r = solve(C, solver=solver, eps=1e-3, max_iter=150, check_every=50)
    for x in (r.plan, r.f, r.g):
        assert bool(torch.isfinite(x).all())
    assert all(math.isfinite(e) for e in r.errors)
    # same iterates as the float64 reference (not converged after 150 steps)
    ref = solve(C.double(), solver="torch-log", eps=1e-3, max_iter=150, check_every=50)
    if dtype == F64:
        torch.testing.assert_close(r.plan, ref.plan, atol=1e-10, rtol=0)
    else:  # float32 rounding of f (~6e-8 |f|) is amplified by 1/eps = 1e3; worst seen ~5e-4
        assert float((r.plan.double() - ref.plan).abs().sum()) < 5e-3


@pytest.mark.filterwarnings("ignore:.*umerical errors:UserWarning")  # POT's own, let through
@pytest.mark.parametrize("solver", [s for s in SINKHORN if not solver_info(s).finite_at_any_eps])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(seed=seeds)
@FEW
def test_kernel_domain_at_small_eps_raises_a_numerical_error(solver, dtype, seed):
    """exp(-C/eps) underflows on a whole row: no result, a NumericalError naming solver, eps, dtype.

    (``pot-sinkhorn-stabilized`` fails too: its first kernel is built before any absorption.)
    """
    C = _cost_0_2_with_an_underflowing_row(gen(seed), 30, 40, dtype)
    dt = str(dtype).replace("torch.", "")
    with pytest.raises(scot_ot.NumericalError, match=rf"^solver '{solver}' failed numerically at "
                       rf"eps=0.001 with a {dt} cost: .*Use 'torch-log' or 'torch-absorb'") as info:
        solve(C, solver=solver, eps=1e-3, max_iter=200)
    assert isinstance(info.value, FloatingPointError)
    assert (info.value.solver, info.value.eps, info.value.dtype) == (solver, 1e-3, dtype)


@given(seed=seeds)
@FEW
def test_kernel_domain_matches_log_domain_when_the_kernel_does_not_underflow(seed):
    """float64, eps = 1e-3, every row and column has a cost < 0.7 (e^-700 > 1e-308): no failure."""
    g = gen(seed)
    C = 2 * torch.rand(30, 40, generator=g, dtype=F64)
    C[:, :30].fill_diagonal_(0.5)
    C[torch.arange(10), 30 + torch.arange(10)] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = solve(C, solver="pot-sinkhorn", eps=1e-3, max_iter=300)
    ref = solve(C, solver="torch-log", eps=1e-3, max_iter=300)
    torch.testing.assert_close(r.plan, ref.plan, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- bad input
def _C():
    return torch.rand(4, 5, dtype=F64)


#: bad input specific to one solver (the rest: tests/test_solver_contract.py, for every solver)
BAD = [
    # (kwargs to solve, error, match)
    (dict(C=_C(), solver="sinkhorn"), ValueError, r"unknown solver 'sinkhorn'; available: .*torch-log"),
    (dict(C=_C(), solver="pot-emd", init=None), ValueError,
     r"'pot-emd' does not take option\(s\) init; its options: num_iter_max"),
    (dict(C=_C(), solver="torch-log", numItermax=5), ValueError,
     r"'torch-log' does not take option\(s\) numItermax; its options: init"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=lambda x: None)
def test_bad_input_raises_a_named_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        solve(**kwargs)


@pytest.mark.parametrize("solver", SINKHORN)
@given(seed=seeds, n=st.integers(2, 12), m=st.integers(2, 12))
@example(seed=10925, n=2, m=2)  # every cosine <= 0: the cost is the constant 1
@FEW
def test_init_is_the_row_potential_of_the_first_column_update(solver, seed, n, m):
    """One iteration from init = f0 is the hand-computed step from f0 (so init is used), and a
    different f0 gives a different plan (with n or m = 1 one iteration reaches the solution).

    Unless the cost is additive, ``C_ij = alpha_i + beta_j`` (a constant cost when every
    cosine is clipped at 0): then the kernel has rank one and one step from any f0 gives
    ``P = a b^T`` exactly (``v_j`` cancels ``beta_j`` and ``u_i`` cancels ``alpha_i``).
    """
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    f0 = 0.1 * torch.randn(n, generator=g, dtype=F64)
    P, fi, gj = one_sinkhorn_step(C.numpy(), a.numpy(), b.numpy(), 0.05, f0.numpy())
    r = solve(C, a, b, solver=solver, eps=0.05, max_iter=1, tol=0, init=f0)
    np.testing.assert_allclose(r.plan.numpy(), P, rtol=1e-10, atol=1e-300)
    default = solve(C, a, b, solver=solver, eps=0.05, max_iter=1, tol=0)
    additive = C - C.mean(dim=1, keepdim=True) - C.mean(dim=0, keepdim=True) + C.mean()  # 0 iff additive
    if float(additive.abs().max()) < 1e-12:
        for plan in (r.plan, default.plan):
            np.testing.assert_allclose(plan.numpy(), torch.outer(a, b).numpy(), rtol=1e-10)
    else:
        assert float((r.plan - default.plan).abs().max()) > 1e-6


def test_stabilized_plan_survives_an_absorption_on_the_last_iteration():
    """Regression: POT's sinkhorn_stabilized resets u = 1/n, v = 1/m after absorbing them; at
    n >= ~1000 (v ~ n > tau = 1e3) it absorbs every iteration, so its raw plan had mass 1/n^2."""
    n = 1200
    g = gen(n)
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=g, dtype=F64), dim=1)
    C = 1.0 - (x @ torch.nn.functional.normalize(torch.randn(n, 64, generator=g, dtype=F64), dim=1).T).clamp_min(0)
    r = solve(C, solver="pot-sinkhorn-stabilized", max_iter=10, check_every=5, tol=0)
    ref = solve(C, solver="torch-log", max_iter=10, check_every=5, tol=0)
    assert float(r.plan.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((r.plan - ref.plan).abs().sum()) < 1e-10
    assert r.error == pytest.approx(ref.error, rel=1e-6, abs=1e-14)

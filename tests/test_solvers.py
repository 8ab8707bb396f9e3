"""The solver layer: closed forms, parity with the float64 reference, the common loop, bad input.

Every random problem is fresh (hypothesis draws the seed and the sizes), so these tests
can fail on inputs nobody picked by hand. ``fused`` (Triton) has its own test file.

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
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import scot_ot
from scot_ot import solve

BALANCED_ENTROPIC = ["torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized"]
UNBALANCED = ["torch-log", "torch-absorb", "pot-unbalanced"]
ITERATIVE = ["torch-log", *BALANCED_ENTROPIC, "pot-unbalanced"]
ALL = [*ITERATIVE, "pot-emd"]  # every solver but `fused` (tested in its own file)

F64 = torch.float64
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=3, deadline=None)
seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(1, 24)


# ----------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine_cost(g: torch.Generator, n: int, m: int, d: int = 8, dtype=F64) -> torch.Tensor:
    """``1 - max(cos, 0)`` between random unit features, in [0, 1] (SCOT's cost)."""
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=F64), dim=1)
    return (1.0 - (x @ y.T).clamp_min(0.0)).to(dtype)


def marginal(g: torch.Generator, n: int, mass: float = 1.0, dtype=F64) -> torch.Tensor:
    x = torch.rand(n, generator=g, dtype=F64) + 0.2
    return (x * (mass / x.sum())).to(dtype)


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
    assert set(ALL) | {"fused"} <= set(scot_ot.available_solvers())
    assert scot_ot.available_solvers() == sorted(scot_ot.available_solvers())


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("solver", ALL)
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
    want = c if solver == "pot-emd" else c - 0.05 * math.log(mass)
    assert float(r.f[0] + r.g[0]) == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("solver", ALL)
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


@pytest.mark.parametrize("solver", ALL)
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
@pytest.mark.parametrize("solver", BALANCED_ENTROPIC + ["pot-unbalanced"])
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


@pytest.mark.parametrize("solver", ALL)
@given(seed=seeds, n=sizes, m=sizes)
@SETTINGS
def test_transposed_problem_gives_transposed_plan(solver, seed, n, m):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    if solver == "pot-emd":  # the cosine cost has ties (clamped entries): compare values
        ab, ba = solve(C, a, b, solver=solver), solve(C.T.contiguous(), b, a, solver=solver)
        assert float(ab.cost) == pytest.approx(float(ba.cost), abs=1e-12)
        return
    ab = converged(C, a, b, solver=solver)
    ba = converged(C.T.contiguous(), b, a, solver=solver)
    torch.testing.assert_close(ba.plan.T, ab.plan, atol=1e-10, rtol=0)
    assert_same_up_to_shift(ba.g, ba.f, ab.f, ab.g, atol=1e-7)


@pytest.mark.parametrize("solver", ITERATIVE)
@given(seed=seeds, n=sizes, m=sizes, shift=st.floats(-0.5, 2.0))
@SETTINGS
def test_constant_added_to_cost_leaves_plan_unchanged(solver, seed, n, m, shift):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    r0 = converged(C, a, b, solver=solver)
    r1 = converged(C + shift, a, b, solver=solver)
    torch.testing.assert_close(r1.plan, r0.plan, atol=1e-10, rtol=0)
    # potentials absorb the constant: f1_i + g1_j = f0_i + g0_j + shift
    torch.testing.assert_close(r1.f[:, None] + r1.g[None, :], r0.f[:, None] + r0.g[None, :] + shift,
                               atol=1e-7, rtol=0)
    assert float(r1.cost) == pytest.approx(float(r0.cost) + shift * float(a.sum()), abs=1e-9)


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
    """Masses differ (1 and 1.7); pot-unbalanced updates u first, so agreement is at convergence."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n, 1.0), marginal(g, m, 1.7)
    ref = converged(C, a, b, reg_m=reg_m)
    for solver in ("torch-absorb", "pot-unbalanced"):
        r = converged(C, a, b, solver=solver, reg_m=reg_m)
        torch.testing.assert_close(r.plan, ref.plan, atol=1e-10, rtol=0)
        # no shift invariance once a side is KL-relaxed: potentials are unique
        torch.testing.assert_close(r.f, ref.f, atol=1e-8, rtol=0)
        torch.testing.assert_close(r.g, ref.g, atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", ["torch-log", "torch-absorb"])
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


@pytest.mark.parametrize("solver", ALL)
@given(seed=seeds, n=sizes, m=sizes, B=st.integers(1, 3))
@SETTINGS
def test_batched_equals_per_problem(solver, seed, n, m, B):
    g = gen(seed)
    C = torch.stack([cosine_cost(g, n, m) for _ in range(B)])
    a = torch.stack([marginal(g, n) for _ in range(B)])
    b = torch.stack([marginal(g, m) for _ in range(B)])
    # tol=0: every problem runs the same iterations, batched or not
    rb = solve(C, a, b, solver=solver, max_iter=37, tol=0, check_every=10)
    assert rb.plan.shape == (B, n, m) and rb.f.shape == (B, n) and rb.g.shape == (B, m)
    assert rb.cost.shape == (B,)
    errs = []
    for k in range(B):
        rk = solve(C[k], a[k], b[k], solver=solver, max_iter=37, tol=0, check_every=10)
        torch.testing.assert_close(rb.plan[k], rk.plan, atol=1e-13, rtol=1e-11)
        torch.testing.assert_close(rb.f[k], rk.f, atol=1e-10, rtol=0)
        torch.testing.assert_close(rb.g[k], rk.g, atol=1e-10, rtol=0)
        errs.append(rk.error)
    assert rb.error == pytest.approx(max(errs), rel=1e-8, abs=1e-15)  # batch reports its worst


@pytest.mark.parametrize("solver", UNBALANCED)
@given(seed=seeds)
@FEW
def test_batched_unbalanced_equals_per_problem(solver, seed):
    g = gen(seed)
    C = torch.stack([cosine_cost(g, 9, 13) for _ in range(3)])
    a = torch.stack([marginal(g, 9, 1.0) for _ in range(3)])
    b = torch.stack([marginal(g, 13, 1.4) for _ in range(3)])
    rb = solve(C, a, b, solver=solver, reg_m=(0.7, 1.3), max_iter=25, tol=0)
    for k in range(3):
        rk = solve(C[k], a[k], b[k], solver=solver, reg_m=(0.7, 1.3), max_iter=25, tol=0)
        torch.testing.assert_close(rb.plan[k], rk.plan, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("solver", ALL)
@given(seed=seeds)
@FEW
def test_float32_in_float32_out(solver, seed):
    g = gen(seed)
    C = cosine_cost(g, 11, 7, dtype=torch.float32)
    a, b = marginal(g, 11, dtype=torch.float32), marginal(g, 7, dtype=torch.float32)
    kw = {"reg_m": 1.0} if solver == "pot-unbalanced" else {}
    r = solve(C, a, b, solver=solver, max_iter=200, tol=0, **kw)
    for x in (r.plan, r.f, r.g, r.cost, r.row_marginal, r.col_marginal):
        assert x.dtype == torch.float32 and x.device == C.device
    ref = solve(C.double(), a.double(), b.double(), solver=solver, max_iter=200, tol=0, **kw)
    torch.testing.assert_close(r.plan.double(), ref.plan, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the common metric
@pytest.mark.parametrize("solver", ALL)
@given(seed=seeds, n=sizes, m=sizes, iters=st.integers(1, 40))
@SETTINGS
def test_error_is_the_l1_marginal_violation_of_the_plan(solver, seed, n, m, iters):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    r = solve(C, a, b, solver=solver, max_iter=iters, tol=0, check_every=7)
    assert r.error == r.errors[-1]
    assert r.error == pytest.approx(l1_marginal_error(r.plan, a, b), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("solver", UNBALANCED)
@given(seed=seeds, n=sizes, m=sizes, iters=st.integers(1, 40),
       reg_m=st.sampled_from([0.5, (0.2, 3.0), (math.inf, 0.8), (2.0, math.inf)]))
@SETTINGS
def test_unbalanced_error_is_the_documented_residual(solver, seed, n, m, iters, reg_m):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n, 1.0), marginal(g, m, 0.6)
    r = solve(C, a, b, solver=solver, reg_m=reg_m, max_iter=iters, tol=0)
    ra, rb = reg_m if isinstance(reg_m, tuple) else (reg_m, reg_m)
    P, f, gg = r.plan.numpy(), r.f.numpy(), r.g.numpy()
    ta = a.numpy() * np.exp(-f / ra)  # exp(-f/inf) = 1: the hard side
    tb = b.numpy() * np.exp(-gg / rb)
    want = np.abs(P.sum(1) - ta).sum() + np.abs(P.sum(0) - tb).sum()
    assert r.error == pytest.approx(want, rel=1e-9, abs=1e-14)


# ----------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("solver", ALL)
@given(seed=seeds)
@FEW
def test_max_iter_one_runs_one_iteration(solver, seed):
    C = cosine_cost(gen(seed), 6, 8)
    r = solve(C, solver=solver, max_iter=1, tol=0)
    assert r.n_iters == 1 and r.error_iters == (1,) and len(r.errors) == 1


def one_sinkhorn_step(C, a, b, eps, f0):
    """By hand, from ``f0``: g_j = -eps log sum_i a_i e^{(f0_i - C_ij)/eps}, then
    f_i = -eps log sum_j b_j e^{(g_j - C_ij)/eps}; returns (plan, f, g) in numpy."""
    gj = -eps * logsumexp(np.log(a)[:, None] + (f0[:, None] - C) / eps, axis=0)  # (m,)
    fi = -eps * logsumexp(np.log(b)[None, :] + (gj[None, :] - C) / eps, axis=1)  # (n,)
    return a[:, None] * b[None, :] * np.exp((fi[:, None] + gj[None, :] - C) / eps), fi, gj


@given(seed=seeds, n=sizes, m=sizes, eps=st.sampled_from([0.01, 0.05, 0.5]), uniform=st.booleans())
@SETTINGS
def test_one_iteration_is_one_hand_computed_sinkhorn_step(seed, n, m, eps, uniform):
    """torch-log and torch-absorb start from f = g = 0 (u = a). POT starts from u = 1/n, i.e.
    f0 = -eps log(n a), as SCOT's official code does: the same step when a is uniform, a
    different first iterate otherwise (both converge to the same plan)."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a = torch.full((n,), 1.0 / n, dtype=F64) if uniform else marginal(g, n)
    b = marginal(g, m)
    Cn, an, bn = C.numpy(), a.numpy(), b.numpy()
    ours = one_sinkhorn_step(Cn, an, bn, eps, np.zeros(n))
    pots = one_sinkhorn_step(Cn, an, bn, eps, -eps * np.log(n * an))
    for solver in ("torch-log", "torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized"):
        P, fi, gj = ours if solver.startswith("torch") else pots
        r = solve(C, a, b, solver=solver, eps=eps, max_iter=1, tol=0)
        np.testing.assert_allclose(r.plan.numpy(), P, rtol=1e-10, atol=1e-300, err_msg=solver)
        if solver == "torch-log":
            np.testing.assert_allclose(r.f.numpy(), fi, rtol=0, atol=1e-13)
            np.testing.assert_allclose(r.g.numpy(), gj, rtol=0, atol=1e-13)


@pytest.mark.parametrize("solver", ITERATIVE)
@given(seed=seeds)
@FEW
def test_checks_fall_every_check_every_and_at_the_last_iteration(solver, seed):
    C = cosine_cost(gen(seed), 6, 8)
    r = solve(C, solver=solver, max_iter=7, check_every=3, tol=0)
    assert r.error_iters == (3, 6, 7) and len(r.errors) == 3 and r.n_iters == 7
    assert not r.converged


@pytest.mark.parametrize("solver", ITERATIVE)
@given(seed=seeds, n=st.integers(3, 24), m=st.integers(3, 24), k0=st.integers(2, 40),
       check_every=st.integers(1, 5))
@SETTINGS
def test_tol_stops_at_the_first_check_that_meets_it(solver, seed, n, m, k0, check_every):
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    every = solve(C, a, b, solver=solver, eps=0.02, max_iter=60, tol=0, check_every=1)
    assume(not every.converged)  # (tol=0 is met when the error is exactly 0)
    tol = every.errors[k0 - 1] * (1 + 1e-6)  # just above the error after k0 iterations
    # first multiple of check_every (or the last iteration) whose error is <= tol
    checks = [k for k in range(1, 61) if k % check_every == 0 or k == 60]
    # chunked POT runs differ from check_every=1 by rounding: keep away from ties and the noise floor
    # (the error is a difference of O(1) masses: ~1e-15 absolute rounding, more relative when small)
    assume(tol > 1e-12 and all(abs(every.errors[k - 1] - tol) > 1e-7 * tol + 1e-13 for k in checks))
    first = next(k for k in checks if every.errors[k - 1] <= tol)
    r = solve(C, a, b, solver=solver, eps=0.02, max_iter=60, tol=tol, check_every=check_every)
    assert r.n_iters == first and r.error_iters[-1] == first and r.converged
    assert r.error_iters == tuple(k for k in checks if k <= first)
    np.testing.assert_allclose(r.errors, [every.errors[k - 1] for k in r.error_iters], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("solver", ITERATIVE)
@given(seed=seeds, n=sizes, m=sizes)
@SETTINGS
def test_chunked_run_is_an_exact_continuation(solver, seed, n, m):
    """POT is called in warm-started chunks of check_every iterations: 3 + 3 + 3 == 9."""
    g = gen(seed)
    C = cosine_cost(g, n, m)
    a, b = marginal(g, n), marginal(g, m)
    kw = {"reg_m": 0.8} if solver == "pot-unbalanced" else {}
    r3 = solve(C, a, b, solver=solver, max_iter=9, check_every=3, tol=0, **kw)
    r9 = solve(C, a, b, solver=solver, max_iter=9, check_every=9, tol=0, **kw)
    if not r3.converged:  # (tol=0 is met when a tiny problem's error is exactly 0)
        assert r3.error_iters == (3, 6, 9) and r9.error_iters == (9,)
    torch.testing.assert_close(r3.plan, r9.plan, atol=1e-12, rtol=0)
    assert r3.error == pytest.approx(r9.error, rel=1e-9, abs=1e-14)


# ----------------------------------------------------------------------------- stability
def _cost_0_2_with_an_underflowing_row(g, n, m, dtype):
    """Costs in [0, 2]; row 0 in [1, 2], so exp(-C/1e-3) underflows on the whole row in float64."""
    C = 2 * torch.rand(n, m, generator=g, dtype=F64)
    C[0] = 1 + C[0] / 2
    return C.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["torch-log", "torch-absorb", "pot-sinkhorn-log"])
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


@pytest.mark.parametrize("solver", ["pot-sinkhorn", "pot-sinkhorn-stabilized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(seed=seeds)
@FEW
def test_kernel_domain_at_small_eps_warns_and_does_not_converge(solver, dtype, seed):
    """exp(-C/eps) underflows on a whole row: POT rolls back, we report nan and converged=False.

    (``pot-sinkhorn-stabilized`` fails too: its first kernel is built before any absorption.)
    """
    C = _cost_0_2_with_an_underflowing_row(gen(seed), 30, 40, dtype)
    with pytest.warns(RuntimeWarning, match=f"solver '{solver}'.*eps=0.001 is too small"):
        r = solve(C, solver=solver, eps=1e-3, max_iter=200)
    assert not r.converged
    assert math.isnan(r.error) and r.n_iters < 200


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


def _u(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def _with(C, i, j, v):
    C = C.clone()
    C[i, j] = v
    return C


BAD = [
    # (kwargs to solve, error, match)
    (dict(C=_with(_C(), 1, 2, math.nan)), ValueError, r"^C: .*NaN"),
    (dict(C=_with(_C(), 0, 0, math.inf)), ValueError, r"^C: .*inf"),
    (dict(C=torch.rand(2, 3, 4, 5, dtype=F64)), ValueError, r"^C: expected shape"),
    (dict(C=torch.ones(4, 5, dtype=torch.int64)), ValueError, r"^C: expected a floating-point"),
    (dict(C=np.ones((4, 5))), TypeError, r"^C: expected a torch.Tensor"),
    (dict(C=torch.rand(0, 5, dtype=F64)), ValueError, r"^C: empty"),
    (dict(C=_C(), a=_u(5)), ValueError, r"^a: expected shape \(4,\)"),
    (dict(C=_C(), b=_u(4)), ValueError, r"^b: expected shape \(5,\)"),
    (dict(C=_C(), a=torch.tensor([0.5, 0.5, 0.5, -0.5], dtype=F64)), ValueError, r"^a: .*negative"),
    (dict(C=_C(), b=torch.tensor([0.2, 0.2, math.nan, 0.2, 0.2], dtype=F64)), ValueError, r"^b: .*NaN"),
    (dict(C=_C(), a=torch.zeros(4, dtype=F64), reg_m=1.0), ValueError, r"^a: .*zero total mass"),
    (dict(C=_C(), a=_u(4).float()), ValueError, r"^a: dtype torch.float32 differs"),
    (dict(C=_C(), b=_u(5).to("meta")), ValueError, r"^b: device meta differs"),
    (dict(C=_C(), a=[0.25] * 4), TypeError, r"^a: expected a torch.Tensor"),
    (dict(C=_C(), a=2 * _u(4)), ValueError, r"^a, b: balanced OT needs equal masses"),
    (dict(C=_C(), eps=0.0), ValueError, r"^eps: must be a finite number > 0"),
    (dict(C=_C(), eps=-0.1), ValueError, r"^eps: "),
    (dict(C=_C(), eps=math.nan), ValueError, r"^eps: "),
    (dict(C=_C(), eps=math.inf), ValueError, r"^eps: "),
    (dict(C=_C(), reg_m=0.0), ValueError, r"^reg_m: each entry must be > 0"),
    (dict(C=_C(), reg_m=(1.0, -2.0)), ValueError, r"^reg_m: "),
    (dict(C=_C(), reg_m=math.nan), ValueError, r"^reg_m: "),
    (dict(C=_C(), reg_m=(1.0, 2.0, 3.0)), ValueError, r"^reg_m: expected a number or a pair"),
    (dict(C=_C(), solver="sinkhorn"), ValueError, r"unknown solver 'sinkhorn'; available: .*torch-log"),
    (dict(C=_C(), solver="pot-sinkhorn", init=None), TypeError, r"'pot-sinkhorn' does not take option\(s\) init"),
    (dict(C=_C(), solver="torch-log", numItermax=5), TypeError, r"does not take option\(s\) numItermax"),
    (dict(C=_C(), max_iter=0), ValueError, r"^max_iter: must be an integer >= 1"),
    (dict(C=_C(), max_iter=10.0), ValueError, r"^max_iter: "),
    (dict(C=_C(), check_every=0), ValueError, r"^check_every: must be an integer >= 1"),
    (dict(C=_C(), tol=-1e-3), ValueError, r"^tol: must be a number >= 0"),
    (dict(C=_C(), tol=math.nan), ValueError, r"^tol: "),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=lambda x: None)
@pytest.mark.parametrize("solver", ["torch-log", "torch-absorb", "pot-sinkhorn", "pot-emd"])
def test_bad_input_raises_a_named_error(solver, kwargs, error, match):
    kwargs = {"solver": solver, **kwargs}
    with pytest.raises(error, match=match):
        solve(**kwargs)


@pytest.mark.parametrize("solver", ["pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized", "pot-emd"])
def test_balanced_only_solver_refuses_reg_m(solver):
    with pytest.raises(ValueError, match=rf"^reg_m: solver '{solver}' solves balanced OT only"):
        solve(_C(), solver=solver, reg_m=1.0)


def test_bad_warm_start_is_refused():
    with pytest.raises(ValueError, match=r"^init\[0\] \(f\): expected a tensor with 4 entries"):
        solve(_C(), init=(torch.zeros(3, dtype=F64), torch.zeros(5, dtype=F64)))
    with pytest.raises(ValueError, match=r"^init\[1\] \(g\): the potential contains NaN"):
        solve(_C(), solver="torch-absorb", init=(torch.zeros(4, dtype=F64), torch.full((5,), math.nan, dtype=F64)))


@pytest.mark.parametrize("solver", ["torch-log", "torch-absorb"])
@given(seed=seeds)
@FEW
def test_warm_start_from_a_result_continues_it(solver, seed):
    C = cosine_cost(gen(seed), 7, 9)
    r5 = solve(C, solver=solver, max_iter=5, tol=0)
    r10 = solve(C, solver=solver, max_iter=10, tol=0)
    cont = solve(C, solver=solver, max_iter=5, tol=0, init=(r5.f, r5.g))
    torch.testing.assert_close(cont.plan, r10.plan, atol=1e-14, rtol=1e-12)


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

"""The ``fused`` Triton solver against the float64 ``torch-log`` reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
triton); with CUDA the same tests run on the GPU. Where triton is installed these
tests must run: a kernel module that cannot load fails the run instead of
skipping it. Only a machine without triton skips them, with the reason shown by
``pytest -rs``. The interpreter is slow (~10 ms per launch), so the problems are
small.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run here")
# no try/except: if triton is installed, kernels that cannot load (e.g. TRITON_INTERPRET set too
# late on a CPU machine) are an error of the test setup, and fail the run
from scot_ot.ot.fused import kernels as K  # noqa: E402

import scot_ot  # noqa: E402
from scot_ot.ot import OTProblem, marginal_error, plan_from_potentials  # noqa: E402
from scot_ot.ot.fused import FusedScheme  # noqa: E402
from scot_ot.ot.iterate import iterate  # noqa: E402

INF = math.inf

# Half-precision costs (see docs/fused-sinkhorn.md): with delta = max |C_hat - C|,
# the converged potential sums f_i + g_j move by at most DELTA_POT * delta and the
# plans by at most DELTA_PLAN * delta / eps in L1. Measured by
# benchmarks/fused_precision.py (the fused kernels, in the Triton interpreter), record
# benchmarks/results/fused-precision-cpu-20261201.json: 108 problems of 36 x 28
# (uniform, squared-distance and cosine costs; eps 0.01, 0.03, 0.1; balanced and KL
# reg_m = 0.5; bfloat16 and float16 costs; 3 seeds), maxima over the 106 that
# converged within 2000 iterations: 1.88 and 0.188; the bounds leave margins of 2.1x and 5.3x.
DELTA_POT = 4.0
DELTA_PLAN = 1.0


def rand(seed: int, *shape, lo=0.0, hi=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def marginals(seed: int, B: int, n: int, m: int, balanced: bool = True):
    """Random positive marginals (B, n), (B, m) in float64, equal masses when balanced."""
    a = rand(seed + 1, B, n, lo=0.2, hi=1.0, dtype=torch.float64)
    b = rand(seed + 2, B, m, lo=0.2, hi=1.0, dtype=torch.float64)
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True) * (1.0 if balanced else 1.7)
    return a, b


def pair(C32, a64, b64, eps, reg_m=None, iters=10, tol=0.0, check_every=None, **options):
    """(fused on the float32 problem, torch-log on the same numbers in float64)."""
    batched = C32.dim() == 3
    sq = (lambda x: x) if batched else (lambda x: x[0])
    common = dict(eps=eps, reg_m=reg_m, max_iter=iters, tol=tol, check_every=check_every or iters)
    fused = scot_ot.solve(C32, sq(a64).float(), sq(b64).float(), solver="fused", **common, **options)
    ref = scot_ot.solve(C32.double(), sq(a64), sq(b64), solver="torch-log", **common)
    return fused, ref


def assert_potentials_close(fused, ref, rtol=1e-5):
    """Relative to the potentials' size (one of them may be ~0, e.g. f when n = 1)."""
    scale = max(float(ref.f.abs().max()), float(ref.g.abs().max()))
    for x, y in ((fused.f, ref.f), (fused.g, ref.g)):
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=rtol * scale)


def assert_plans_close(fused, ref, rtol=1e-5):
    P, R = fused.plan.double(), ref.plan
    torch.testing.assert_close(P, R, rtol=rtol, atol=rtol * float(R.max()))


def common_metric(result) -> float:
    """The error of result.py, evaluated in float64 on the plan of the result's potentials."""
    p = result.problem
    p64 = OTProblem(C=p.C.double(), a=p.a.double(), b=p.b.double(), eps=p.eps, reg_m=p.reg_m,
                    batched=True)
    f, g = result.f_batched.double(), result.g_batched.double()
    P = plan_from_potentials(p64, f, g)
    return float(marginal_error(p64, P.sum(-1), P.sum(-2), f, g).max())


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("B, n, m, seed", [(1, 1, 29, 11), (1, 31, 1, 12), (1, 1, 1, 13),
                                           (1, 37, 53, 14), (3, 37, 53, 15), (1, 70, 9, 16)])
def test_edge_shapes_match_reference_after_same_iterations(B, n, m, seed):
    C = rand(seed, B, n, m)
    a, b = marginals(seed, B, n, m)
    fused, ref = pair(C if B > 1 else C[0], a, b, eps=0.05, iters=6, check_every=4)
    # with n = 1 or m = 1 the first iteration is exact: a solver may meet tol = 0 and stop at
    # the first check, at the fixed point
    assert fused.error_iters == (4, 6) or (fused.error == 0.0 and fused.error_iters == (4,))
    assert_potentials_close(fused, ref)
    assert_plans_close(fused, ref)


@pytest.mark.parametrize("seed", [21, 22])
def test_converged_plans_match_reference(seed):
    C = rand(seed, 1, 45, 33)[0]
    a, b = marginals(seed, 1, 45, 33)
    fused = scot_ot.solve(C, a[0].float(), b[0].float(), solver="fused", eps=0.05, max_iter=200,
                          tol=1e-6, check_every=10)
    assert fused.converged and fused.error <= 1e-6
    ref = scot_ot.solve(C.double(), a[0], b[0], solver="torch-log", eps=0.05, max_iter=fused.n_iters,
                        tol=0.0, check_every=fused.n_iters)
    assert ref.error <= 1e-6
    assert_plans_close(fused, ref)
    assert_potentials_close(fused, ref)


@pytest.mark.parametrize("reg_m, seed", [(0.7, 31), ((INF, 0.3), 32), ((0.4, INF), 33), ((2.0, 0.5), 34)])
def test_unbalanced_and_semi_relaxed_match_reference(reg_m, seed):
    C = rand(seed, 2, 23, 40)
    a, b = marginals(seed, 2, 23, 40, balanced=False)
    fused, ref = pair(C, a, b, eps=0.05, reg_m=reg_m, iters=15, check_every=5)
    assert_potentials_close(fused, ref)
    assert_plans_close(fused, ref)
    for e, r in zip(fused.errors, ref.errors):
        assert e == pytest.approx(r, rel=1e-4, abs=1e-6)


def test_small_eps_stays_finite_and_matches():
    """eps = 1e-3 on a cost in [0, 2]: exp(C/eps) would overflow any float; the log domain does not."""
    C = rand(41, 1, 30, 44, hi=2.0)[0]
    a, b = marginals(41, 1, 30, 44)
    fused, ref = pair(C, a, b, eps=1e-3, iters=12, check_every=4)
    assert all(math.isfinite(e) for e in fused.errors)
    assert bool(torch.isfinite(fused.f).all() and torch.isfinite(fused.g).all())
    assert bool(torch.isfinite(fused.plan).all())
    # scores reach C/eps = 2000: float32 keeps ~1e-4 of them, i.e. ~1e-7 in potential units
    for x, y in ((fused.f, ref.f), (fused.g, ref.g)):
        torch.testing.assert_close(x.double(), y, rtol=0, atol=1e-6)


def test_zero_weights_are_ignored():
    C = rand(42, 1, 12, 17)[0]
    a, b = marginals(42, 1, 12, 17)
    a[0, 3] = 0.0
    b[0, :5] = 0.0
    a, b = a / a.sum(), b / b.sum()
    fused, ref = pair(C, a, b, eps=0.05, iters=8)
    assert_plans_close(fused, ref)
    assert float(fused.plan[3].abs().max()) == 0.0 and float(fused.plan[:, :5].abs().max()) == 0.0


# ---------------------------------------------------------------------------- kernels
def reference_half_steps(C, f, g, log_a, log_b, eps, tau):
    C64 = C.double()
    lr = torch.logsumexp(log_b.double()[:, None, :] + (g.double()[:, None, :] - C64) / eps, dim=2)
    lc = torch.logsumexp(log_a.double()[:, :, None] + (f.double()[:, :, None] - C64) / eps, dim=1)
    return (-tau * eps * lr, lr), (-tau * eps * lc, lc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles, B, n, m, seed", [
    ((16, 16, 1), 1, 37, 53, 51),  # partial tiles on both axes, no split
    ((8, 16, 3), 2, 37, 53, 52),  # split into chunks + combine kernel
    ((16, 8, 100), 1, 5, 70, 53),  # more chunks asked than tiles: capped at one tile each (9)
    ((32, 32, 2), 1, 1, 1, 54),  # 1 x 1
])
def test_half_steps_any_tiling_match_logsumexp(dtype, tiles, B, n, m, seed):
    """The row and column passes equal float64 logsumexp on the stored cost, whatever the tiling."""
    t = K.Tiling(*tiles)
    C = rand(seed, B, n, m, hi=2.0).to(dtype)
    f, g = rand(seed + 1, B, n, lo=-0.1, hi=0.1), rand(seed + 2, B, m, lo=-0.1, hi=0.1)
    log_a, log_b = torch.log(rand(seed + 3, B, n, lo=0.1)), torch.log(rand(seed + 4, B, m, lo=0.1))
    eps, tau = 0.05, 0.9
    (f_ref, lr_ref), (g_ref, lc_ref) = reference_half_steps(C, f, g, log_a, log_b, eps, tau)
    f_new, lr = K.row_update(C, g, log_b, eps, tau, t)
    g_new, lc = K.col_update(C, f, log_a, eps, tau, t)
    for x, y in ((f_new, f_ref), (g_new, g_ref), (lr, lr_ref), (lc, lc_ref)):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=2e-6, atol=2e-6 * float(y.abs().max()))


def test_fused_split_path_through_the_solver_loop():
    """The scheme with forced multi-chunk tilings gives the same iterates as the default tiles."""
    C = rand(61, 2, 24, 40)
    p = OTProblem.create(C, eps=0.05, reg_m=(INF, 0.5))
    default = iterate("fused", FusedScheme(K, torch.float32), p, 4, 0.0, 3)
    split = iterate("fused", FusedScheme(K, torch.float32, tiling=(K.Tiling(8, 16, 3), K.Tiling(8, 16, 2))),
                    p, 4, 0.0, 3)
    assert split.errors == pytest.approx(default.errors, rel=1e-5)
    torch.testing.assert_close(split.f, default.f, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split.g, default.g, rtol=1e-6, atol=1e-7)


AOT_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print("SKIP", err)
    sys.exit(0)
from scot_ot.ot.fused import kernels as K

n = m = 4200  # not a multiple of 16: vector loads come from the VEC hint, not from specialisation
for side, kern, cdt, bm, vec in [("row", K._row_kernel, "fp32", 128, 4), ("col", K._col_kernel, "fp32", 128, 4),
                                 ("row", K._row_kernel, "bf16", 256, 8), ("col", K._col_kernel, "bf16", 256, 8)]:
    values = dict(C_ptr="*" + cdt, pot_ptr="*fp32", logw_ptr="*fp32", part_max_ptr="*fp32",
                  part_sum_ptr="*fp32", out_pot_ptr="*fp32", out_lse_ptr="*fp32", n=n, m=m, chunk=512,
                  split=9, stride_cb=n * m, stride_cn=m, scale=28.85, neg_tau_eps=-0.05)
    consts = dict(BLOCK_N=32, BLOCK_M=bm, VEC=vec, FINAL=False)
    sig, attrs = {}, {}
    for i, name in enumerate(kern.arg_names):
        v = consts.get(name, values.get(name))
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]  # torch's allocations are aligned
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:  # what triton's launcher does with ints: divisibility 16 when it holds
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    ptx = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert "ld.global.v4" in ptx, f"{side} {cdt}: no 16-byte loads"
    print(side, cdt, "ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="triton's CUDA compiler ships for linux")
def test_kernels_compile_for_sm90_with_16_byte_loads():
    """No GPU needed: the kernels compile for an H100 (sm_90) and full tiles load 16 bytes per thread.

    The interpreter accepts code the compiler rejects, and bandwidth depends on
    vector loads, so both are checked on the compiler's output (in a process
    without TRITON_INTERPRET).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.stdout.startswith("SKIP") or "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip(f"triton cannot compile for CUDA here: {out.stdout}{out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok") == 4


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_equal_the_launches():
    C = rand(62, 2, 300, 530)
    p = OTProblem.create(C, eps=0.05, reg_m=(INF, 0.5))
    graphed = FusedScheme(K, torch.float32)
    res = iterate("fused", graphed, p, 20, 0.0, 5)  # advances of 5: launched, captured, replayed x2
    assert 5 in graphed.graphs
    launched = iterate("fused", FusedScheme(K, torch.float32), p, 20, 0.0, 20)  # one advance: no graph
    assert torch.equal(res.f, launched.f) and torch.equal(res.g, launched.g)


# ---------------------------------------------------------------------------- the error
@pytest.mark.parametrize("reg_m, iters, check_every, seed", [
    (None, 3, 3, 71), (None, 7, 2, 72), (1.0, 5, 5, 73), ((INF, 0.2), 4, 4, 74)])
def test_reported_error_is_the_common_metric_of_the_returned_plan(reg_m, iters, check_every, seed):
    C = rand(seed, 2, 26, 35)
    a, b = marginals(seed, 2, 26, 35, balanced=reg_m is None)
    res = scot_ot.solve(C, a.float(), b.float(), solver="fused", eps=0.05, reg_m=reg_m,
                        max_iter=iters, tol=0.0, check_every=check_every)
    assert res.error_iters[-1] == iters
    assert res.error == pytest.approx(common_metric(res), rel=1e-4, abs=2e-6)
    assert res.error > 1e-4  # not yet converged: the comparison means something


def test_reported_error_with_half_cost_refers_to_the_stored_cost():
    C = rand(75, 1, 26, 35)[0]
    res = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=3, tol=0.0, check_every=3,
                        cost_dtype=torch.bfloat16)
    assert res.problem.C.dtype == torch.bfloat16
    assert torch.equal(res.problem.C, C.to(torch.bfloat16).unsqueeze(0))
    assert res.error == pytest.approx(common_metric(res), rel=1e-4, abs=2e-6)
    # the returned problem is one OTProblem.create builds from its own cost and marginals
    p = res.problem
    again = OTProblem.create(p.C[0], p.a[0], p.b[0], eps=p.eps)
    assert again.a.dtype == p.a.dtype == torch.float32 and torch.equal(again.a, p.a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cost_given_directly(dtype):
    """A half-precision C with the default marginals (bfloat16 failed the mass check before):
    read narrow, iterated and returned in float32, the iterates of float64 torch-log on C."""
    C = rand(97, 1, 20, 30)[0].to(dtype)
    res = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=6, tol=0.0)
    assert res.problem.C.dtype == dtype and res.f.dtype == res.plan.dtype == torch.float32
    ref = scot_ot.solve(C.double(), solver="torch-log", eps=0.05, max_iter=6, tol=0.0)
    assert_potentials_close(res, ref)
    assert_plans_close(res, ref)


def test_tolerance_stops_at_a_check():
    C = rand(76, 1, 30, 30)[0]
    res = scot_ot.solve(C, solver="fused", eps=0.1, max_iter=500, tol=1e-4, check_every=5)
    assert res.converged and res.error <= 1e-4 and res.n_iters % 5 == 0 and res.n_iters < 500
    assert all(e > 1e-4 for e in res.errors[:-1])


# ---------------------------------------------------------------------------- options
def test_warm_start_continues_the_iteration():
    C = rand(81, 1, 33, 27)[0]
    k = 4
    first = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=k, tol=0.0, check_every=k)
    second = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=k, tol=0.0, check_every=k,
                           init=first.f)
    whole = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=2 * k, tol=0.0, check_every=3)
    assert torch.equal(second.f, whole.f) and torch.equal(second.g, whole.g)
    assert second.error == whole.error


@pytest.mark.parametrize("iters", [1, 2, 10])
def test_scot_start_gives_pot_sinkhorns_iterates(iters):
    """Like every entropic solver, fused starts from SCOT's u = 1/n: after k iterations its plan is
    ``ot.sinkhorn``'s (non-uniform marginals; float32 kernels against POT in float64)."""
    import ot

    C = rand(84, 1, 23, 31)[0]
    a, b = marginals(84, 1, 23, 31)
    scot = ot.sinkhorn(a[0].cpu().numpy(), b[0].cpu().numpy(), C.double().cpu().numpy(), 0.05,
                       numItermax=iters, stopThr=0.0, warn=False)
    res = scot_ot.solve(C, a[0].float(), b[0].float(), solver="fused", eps=0.05, max_iter=iters, tol=0.0)
    assert float((res.plan.double().cpu() - torch.as_tensor(scot)).abs().max()) < 1e-5


def test_init_is_used():
    """One iteration from init = f0 is torch-log's from f0, and differs from the default start."""
    C = rand(85, 1, 12, 15)[0]
    a, b = marginals(85, 1, 12, 15)
    f0 = rand(86, 12, lo=-0.1, hi=0.1)
    res = scot_ot.solve(C, a[0].float(), b[0].float(), solver="fused", eps=0.05, max_iter=1, init=f0)
    ref = scot_ot.solve(C.double(), a[0], b[0], solver="torch-log", eps=0.05, max_iter=1, init=f0.double())
    assert_plans_close(res, ref)
    default = scot_ot.solve(C, a[0].float(), b[0].float(), solver="fused", eps=0.05, max_iter=1)
    assert float((res.plan - default.plan).abs().max()) > 1e-3


def test_eps_schedule_reaches_the_same_solution():
    C = rand(82, 1, 24, 30)[0]
    eps = 0.05
    plain = scot_ot.solve(C, solver="fused", eps=eps, max_iter=300, tol=1e-6, check_every=10)
    sched = scot_ot.solve(C, solver="fused", eps=eps, max_iter=300, tol=1e-6, check_every=10,
                          eps_schedule=(1.0, 0.5))
    assert plain.converged and sched.converged
    # 1.0 * 0.5**t is below 0.05 from t = 5: the first check (after 10 iterations) is at the target eps
    assert sched.error == pytest.approx(common_metric(sched), rel=1e-4, abs=2e-6)
    ref = scot_ot.solve(C.double(), solver="torch-log", eps=eps, max_iter=1000, tol=1e-10)
    for res in (plain, sched):
        assert float((res.plan.double() - ref.plan).abs().sum()) < 1e-5


@pytest.mark.parametrize("schedule", [None, (0.5, 0.5)])
def test_checks_do_not_change_the_iterates(schedule):
    """A check between iterations (even while eps is still scheduled) leaves the iterates alone."""
    C = rand(83, 1, 20, 24)[0]
    run = lambda every: scot_ot.solve(C, solver="fused", eps=0.01, max_iter=4, tol=0.0,  # noqa: E731
                                      check_every=every, eps_schedule=schedule)
    checked, unchecked = run(1), run(4)  # with the schedule: eps 0.5, 0.25, 0.125, 0.0625 > 0.01
    assert checked.error_iters == (1, 2, 3, 4) and unchecked.error_iters == (4,)
    assert torch.equal(checked.f, unchecked.f) and torch.equal(checked.g, unchecked.g)
    for res in (checked, unchecked):  # the errors are those of the problem's eps
        assert res.error == pytest.approx(common_metric(res), rel=1e-4, abs=2e-6)


@pytest.mark.parametrize("dtype, ulp_exp", [(torch.bfloat16, 9), (torch.float16, 12)])
def test_half_precision_cost(dtype, ulp_exp):
    """Exact (float32 level) for the rounded cost; within the documented bounds of the float32 one."""
    seed = 90 + ulp_exp
    C = rand(seed, 1, 36, 28)[0]  # in [0, 1): rounding error <= 2^-ulp_exp
    eps = 0.05
    half = scot_ot.solve(C, solver="fused", eps=eps, max_iter=300, tol=1e-6, check_every=10, cost_dtype=dtype)
    assert half.converged
    C_hat = C.to(dtype).double()
    delta = float((C_hat - C.double()).abs().max())
    assert 0 < delta <= 2.0**-ulp_exp
    # 1) the solver solved the rounded problem to float32 accuracy
    on_hat = scot_ot.solve(C_hat, solver="torch-log", eps=eps, max_iter=half.n_iters, tol=0.0,
                           check_every=half.n_iters)
    assert_potentials_close(half, on_hat)
    assert_plans_close(half, on_hat)
    # 2) the rounding moves the converged answer by O(delta) (potentials) and O(delta / eps) (plan)
    exact = scot_ot.solve(C.double(), solver="torch-log", eps=eps, max_iter=2000, tol=1e-12)
    sums = lambda r: r.f.double()[:, None] + r.g.double()[None, :]  # noqa: E731
    assert float((sums(half) - sums(exact)).abs().max()) <= DELTA_POT * delta
    assert float((half.plan.double() - exact.plan).abs().sum()) <= DELTA_PLAN * delta / eps


def test_float64_problem_needs_float32_storage():
    C = rand(95, 1, 10, 12, dtype=torch.float64)[0]
    with pytest.raises(ValueError, match="torch-log"):
        scot_ot.solve(C, solver="fused", max_iter=2)
    res = scot_ot.solve(C, solver="fused", eps=0.05, max_iter=8, tol=0.0, cost_dtype=torch.float32)
    ref = scot_ot.solve(C.float().double(), solver="torch-log", eps=0.05, max_iter=8, tol=0.0)
    # the problem solved is the float32 one: cost, marginals, potentials and plan in float32
    assert res.problem.C.dtype == res.problem.a.dtype == res.problem.b.dtype == torch.float32
    assert res.f.dtype == res.plan.dtype == torch.float32
    assert_potentials_close(res, ref)


def test_plan_is_not_materialised():
    res = scot_ot.solve(rand(96, 1, 8, 9)[0], solver="fused", max_iter=2)
    assert res.stored_plan is None
    assert res.plan.shape == (8, 9)


# ---------------------------------------------------------------------------- clear errors
def test_kernels_run_where_the_tests_run():
    """On a machine without CUDA the kernels are interpreted (tests/conftest.py), with CUDA compiled."""
    assert K.INTERPRETED == (not ON_GPU)


def test_launcher_rejects_bad_inputs():
    from scot_ot.ot.fused.solver import COST_DTYPES

    assert K.COST_DTYPES == COST_DTYPES  # the solver validates cost_dtype without importing triton
    # 16-byte vector width the launcher passes (the compile test below uses these for m = 4200)
    assert K.vector_width(torch.empty(2, 3, 4200)) == 4
    assert K.vector_width(torch.empty(2, 3, 4200, dtype=torch.bfloat16)) == 8
    assert K.vector_width(torch.empty(1, 3, 37)) == 1
    assert K.vector_width(torch.empty(1, 3, 4204)[:, :, 1:4201]) == 1  # address 4 bytes off
    C = rand(100, 1, 6, 7)
    log_b, g = torch.zeros(1, 7, device=DEVICE), torch.zeros(1, 7, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        K.row_update(C.double(), g, log_b, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        K.row_update((C * 10).to(torch.int32), g, log_b, 0.1)
    with pytest.raises(ValueError, match=r"\(B, n, m\)"):
        K.row_update(C[0], g, log_b, 0.1)
    with pytest.raises(ValueError, match="contiguous along its last axis"):
        K.row_update(C.transpose(1, 2).contiguous().transpose(1, 2), g, log_b, 0.1)
    with pytest.raises(ValueError, match="shape"):
        K.row_update(C, torch.zeros(1, 6, device=DEVICE), log_b, 0.1)
    with pytest.raises(ValueError, match="float32"):
        K.col_update(C, torch.zeros(1, 6, dtype=torch.float64, device=DEVICE),
                     torch.zeros(1, 6, device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="eps"):
        K.row_update(C, g, log_b, 0.0)
    with pytest.raises(ValueError, match="tau"):
        K.row_update(C, g, log_b, 0.1, tau=1.5)
    with pytest.raises(ValueError, match="power of two"):
        K.row_update(C, g, log_b, 0.1, tiling=K.Tiling(12, 16, 1))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        K.row_update(C.to("meta"), g.to("meta"), log_b.to("meta"), 0.1)
    other = "cpu" if ON_GPU else "meta"
    with pytest.raises(ValueError, match="device"):
        K.row_update(C, g.to(other), log_b, 0.1)


def test_solver_rejects_bad_options():
    C = rand(101, 1, 6, 7)[0]
    with pytest.raises(ValueError, match="cost_dtype"):
        scot_ot.solve(C, solver="fused", cost_dtype=torch.int8)
    with pytest.raises(ValueError, match="65504"):
        scot_ot.solve(C * 1e5, solver="fused", cost_dtype=torch.float16)
    for bad in ((0.5,), (0.5, 1.0), (-1.0, 0.5), "0.5,0.9"):
        with pytest.raises(ValueError, match="eps_schedule"):
            scot_ot.solve(C, solver="fused", eps_schedule=bad)
    with pytest.raises(ValueError, match=r"^init: expected a tensor of shape \(6,\)"):
        scot_ot.solve(C, solver="fused", init=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"^init: expected the row potential f alone"):
        scot_ot.solve(C, solver="fused", init=(torch.zeros(6, device=DEVICE), torch.zeros(7, device=DEVICE)))
    with pytest.raises(ValueError, match="does not take option.*its options: init, eps_schedule, cost_dtype"):
        scot_ot.solve(C, solver="fused", tiling=None)
    with pytest.raises(ValueError, match="^solver 'fused' is not differentiable"):
        scot_ot.solve(C.clone().requires_grad_(), solver="fused")


def test_cpu_without_interpreter_is_refused_with_the_cpu_solvers_named():
    code = (
        "import os, sys, torch, scot_ot\n"
        "try:\n"
        "    scot_ot.solve(torch.rand(4, 5), solver='fused')\n"
        "except scot_ot.SolverUnavailableError as err:\n"
        "    msg = str(err)\n"
        "    for word in ('CUDA', 'torch-log', 'torch-absorb', 'pot-sinkhorn-log', 'TRITON_INTERPRET'):\n"
        "        assert word in msg, msg\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert 'triton' not in sys.modules  # refused before importing it\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_command_line_refuses_fused_on_cpu_before_any_work(tmp_path):
    """``scot-ot match --solver fused`` on the CPU without the interpreter: one error line naming
    ``--solver``, the reason and the CPU solvers, exit 2, no traceback, nothing written (the check
    runs before the backbone loads; ``scot_ot.ot.check_solver_device``)."""
    from scot_ot.data import sample_pair

    pair, out = sample_pair(), tmp_path / "m.png"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "scot_ot", "match", str(pair.src_path), str(pair.trg_path),
                          "--solver", "fused", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "loading" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "scot-ot match: error: --solver: solver 'fused': its Triton kernels need a CUDA device"), run.stderr
    assert "'torch-log'" in run.stderr and not out.exists()


def test_scot_ot_imports_and_refuses_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch, scot_ot\n"
        "assert 'fused' in scot_ot.available_solvers()\n"
        "scot_ot.solve(torch.rand(4, 5), solver='torch-log', max_iter=2)\n"
        "try:\n"
        "    scot_ot.solve(torch.rand(4, 5), solver='fused')\n"
        "except scot_ot.SolverUnavailableError as err:\n"
        "    assert 'needs triton' in str(err) and 'torch-log' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

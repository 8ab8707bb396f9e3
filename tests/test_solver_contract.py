"""The contract of every registered solver, generated from the capabilities it declares.

:func:`implied_checks` reads a solver's :class:`scot_ot.ot.SolverInfo` and returns the
checks it implies; ``test_contract`` runs them for every name in
``available_solvers()``, so a newly registered solver gets them without any edit here:

- always: the result contract and what ``max_iter``/``tol``/``check_every`` do
  (``stopping``), validation of bad input (a named error, before any work), each
  declared cost dtype (and a ``ValueError`` for the others), each declared device, a
  batch equal to its problems one by one, no NaN at tiny eps (finite if
  ``finite_at_any_eps``), gradients (``gradcheck`` if ``differentiable``, else a
  refusal), the name in ``SCOT(solver=...)``, ``scot-ot eval --solver`` and
  ``scot-ot diagnose --solvers``, and the marginals it declares, met to tol (or,
  for a rule that is not OT, an honest marginal error); a ``reg_m`` of a kind it
  does not declare is refused;
- OT solvers: ``OT(b, a) = OT(a, b)^T``; with a fixed total mass (balanced or
  partial), ``C + c`` gives the same plan;
- ``takes_init``: a warm start from ``result.f`` continues the iteration.

``test_docs_example_solver`` executes the "Adding a solver" example of docs/solvers.md
(which registers itself), runs the checks its capabilities imply and unregisters it.
Problems are fresh (hypothesis draws the seed); costs are uniform in [0, 1] (no ties,
so exact plans are unique), marginals random and positive, ``eps = 0.1``.

The problems live on the CPU. A solver that runs on the CPU only in the Triton
interpreter (``fused``) gets it from conftest.py on a machine without CUDA; on a CUDA
machine conftest leaves the interpreter off (so that tests/test_fused.py runs the
kernels on the GPU), and each of that solver's cases on CPU problems runs in a child
pytest with the interpreter on (:func:`in_child_interpreter`), so the contract is checked
the same way everywhere; its ``device-cuda`` case runs natively on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scot_ot
from random_problems import gen, marginal
from scot_ot.ot import (Compute, Marginals, NumericalError, SolverInfo, Stopping, available_solvers,
                        registered, solver_info, solver_table)
from scot_ot.ot.problem import COST_DTYPES, working_dtype
from scot_ot.ot.registry import TABLE_END, TABLE_START, unregister, with_solver_table

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
EPS = 0.1
INF = math.inf
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- problems and runs
def sizes(g: torch.Generator) -> Tuple[int, int]:
    n, m = torch.randint(2, 9, (2,), generator=g).tolist()
    return n, m


def problem(seed: int, dtype=F64, mass_b: float = 1.0, B=None):
    """``(C, a, b)``: costs uniform in [0, 1], random positive marginals of mass 1 and ``mass_b``."""
    g = gen(seed)
    n, m = sizes(g)
    lead = () if B is None else (B,)
    C = torch.rand(*lead, n, m, generator=g, dtype=F64)
    a = torch.stack([marginal(g, n) for _ in range(B or 1)])
    b = torch.stack([marginal(g, m, mass_b) for _ in range(B or 1)])
    if B is None:
        a, b = a[0], b[0]
    return C.to(dtype), a.to(working_dtype(dtype)), b.to(working_dtype(dtype))


def base_dtype(info: SolverInfo) -> torch.dtype:
    """The widest cost dtype the solver takes."""
    return F64 if F64 in info.dtypes.cost else torch.float32


def exact_arithmetic(info: SolverInfo, dtype: torch.dtype) -> bool:
    return working_dtype(dtype) == F64 and info.dtypes.compute is not Compute.FLOAT32


def tol_for(info: SolverInfo, dtype: torch.dtype) -> float:
    """The tolerance a solver meets in this dtype."""
    return 1e-8 if exact_arithmetic(info, dtype) else 1e-5


def atol_for(info: SolverInfo, dtype: torch.dtype) -> float:
    """How close two plans that should be equal are, entry by entry (rounding only)."""
    return 1e-12 if exact_arithmetic(info, dtype) else 1e-5


def options(info: SolverInfo) -> Dict[str, object]:
    """The required options, set to their declared examples."""
    return {o.name: o.example for o in info.required_options}


def max_iter_for(info: SolverInfo) -> int:
    """Iterations allowed to reach tol (a FIXED solver runs them all)."""
    return 3000 if info.stopping is Stopping.FIXED else 20_000


def run(name: str, C, a=None, b=None, **kw):
    """``scot_ot.solve`` with the contract's eps and the required options; checks what every
    result must satisfy."""
    info = solver_info(name)
    kw = {"eps": EPS, **options(info), **kw}
    r = scot_ot.solve(C, a, b, solver=name, **kw)
    B, n, m = (1, *C.shape) if C.dim() == 2 else tuple(C.shape)
    lead = () if C.dim() == 2 else (B,)
    work = r.problem.a.dtype
    assert r.solver == name and r.errors and len(r.errors) == len(r.error_iters)
    assert r.error == r.errors[-1] and math.isfinite(r.error) and r.error >= 0
    assert list(r.error_iters) == sorted(r.error_iters) and 0 <= r.n_iters <= kw.get("max_iter", 1000)
    assert isinstance(r.converged, bool) and r.time_s >= 0
    assert r.plan.shape == (*lead, n, m) and r.f.shape == (*lead, n) and r.g.shape == (*lead, m)
    for x in (r.plan, r.f, r.g, r.cost):
        assert x.dtype == work and x.device == C.device
    assert work == working_dtype(C.dtype) or C.dtype not in COST_DTYPES
    assert bool(torch.isfinite(r.plan).all()) and bool((r.plan >= 0).all())
    return r


def l1(P, Q) -> float:
    return float((P.double() - Q.double()).abs().sum())


def hand_error(P, a, b) -> float:
    """``||P1 - a||_1 + ||P^T 1 - b||_1`` in float64."""
    P, a, b = P.double(), a.double(), b.double()
    return float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())


# ----------------------------------------------------------------------------- the checks
def check_stopping(name: str, seed: int) -> None:
    """What max_iter, tol and check_every do (``info.stopping``)."""
    info = solver_info(name)
    dt = base_dtype(info)
    C, a, b = problem(seed, dt)
    r = run(name, C, a, b, max_iter=7, check_every=3, tol=0)
    if info.stopping is Stopping.LOOP:
        if r.converged:  # tol=0 is met only by an exact zero
            assert r.error == 0.0
        else:
            assert r.error_iters == (3, 6, 7) and r.n_iters == 7
        one = run(name, C, a, b, max_iter=1, tol=0)
        assert one.n_iters == 1 and one.error_iters == (1,)
        # checks do not change the iterates: 3 + 3 + 3 == 9
        r3 = run(name, C, a, b, max_iter=9, check_every=3, tol=0)
        r9 = run(name, C, a, b, max_iter=9, check_every=9, tol=0)
        torch.testing.assert_close(r3.plan, r9.plan, atol=atol_for(info, dt), rtol=1e-6)
        # stops at the first check that meets tol
        tol = tol_for(info, dt)
        t = run(name, C, a, b, max_iter=max_iter_for(info), check_every=2, tol=tol)
        assert t.converged and t.error <= tol and all(e > tol for e in t.errors[:-1])
        assert all(k % 2 == 0 for k in t.error_iters)
    elif info.stopping is Stopping.FIXED:
        assert r.n_iters == 7 and r.error_iters == (7,) and r.converged == (r.error <= 0)
    else:  # DIRECT: one check, whatever max_iter
        assert len(r.errors) == 1


def _C():
    return torch.rand(4, 5, dtype=F64)


def _u(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def _with(C, i, j, v):
    C = C.clone()
    C[i, j] = v
    return C


#: (kwargs of solve, error, match): every solver refuses them with this named error
BAD = [
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
    (dict(C=_C().float(), b=_u(5).half()), ValueError, r"^b: dtype torch.float16 differs"),
    (dict(C=_C().half(), b=_u(5)), ValueError, r"^b: dtype torch.float64 differs.*float16 or torch.float32"),
    (dict(C=_C().to(torch.float8_e4m3fn)), ValueError, r"^C: dtype torch.float8_e4m3fn is not supported"),
    (dict(C=_C(), b=_u(5).to("meta")), ValueError, r"^b: device meta differs"),
    (dict(C=_C(), a=[0.25] * 4), TypeError, r"^a: expected a torch.Tensor"),
    (dict(C=_C(), a=2 * _u(4)), ValueError, r"^a, b: balanced OT needs equal masses"),
    (dict(C=_C(), eps=0.0), ValueError, r"^eps: must be a finite number > 0"),
    (dict(C=_C(), eps=-0.1), ValueError, r"^eps: "),
    (dict(C=_C(), eps=math.nan), ValueError, r"^eps: "),
    (dict(C=_C(), eps=math.inf), ValueError, r"^eps: "),
    (dict(C=_C(), eps=True), TypeError, r"^eps: expected a real number .*got bool True"),
    (dict(C=_C(), eps=np.bool_(True)), TypeError, r"^eps: expected a real number"),
    (dict(C=_C(), eps="0.05"), TypeError, r"^eps: expected a real number"),
    (dict(C=_C(), eps=torch.tensor([0.05])), TypeError, r"^eps: expected a real number.*0-d"),
    (dict(C=_C(), eps=torch.tensor(True)), TypeError, r"^eps: expected a real number"),
    (dict(C=_C(), reg_m=False), TypeError, r"^reg_m: expected a real number"),
    (dict(C=_C(), tol=True), TypeError, r"^tol: expected a real number"),
    (dict(C=_C(), max_iter=True), TypeError, r"^max_iter: expected an integer"),
    (dict(C=_C(), max_iter=np.bool_(True)), TypeError, r"^max_iter: expected an integer"),
    (dict(C=_C(), max_iter=torch.tensor(5.0)), TypeError, r"^max_iter: expected an integer"),
    (dict(C=_C(), check_every=False), TypeError, r"^check_every: expected an integer"),
    (dict(C=_C(), reg_m=0.0), ValueError, r"^reg_m: each entry must be > 0"),
    (dict(C=_C(), reg_m=(1.0, -2.0)), ValueError, r"^reg_m: "),
    (dict(C=_C(), reg_m=math.nan), ValueError, r"^reg_m: "),
    (dict(C=_C(), reg_m=(1.0, 2.0, 3.0)), ValueError, r"^reg_m: expected a number or a pair"),
    (dict(C=_C(), max_iter=0), ValueError, r"^max_iter: must be an integer >= 1"),
    (dict(C=_C(), max_iter=10.0), TypeError, r"^max_iter: expected an integer"),
    (dict(C=_C(), check_every=0), ValueError, r"^check_every: must be an integer >= 1"),
    (dict(C=_C(), tol=-1e-3), ValueError, r"^tol: must be a number >= 0"),
    (dict(C=_C(), tol=math.nan), ValueError, r"^tol: "),
]


def check_validation(name: str, seed: int) -> None:
    """Bad input raises the named error before the solver runs; so do an option it does not
    take, a missing required option and a ``reg_m`` of a kind it does not declare."""
    info = solver_info(name)
    opts = options(info)
    for kwargs, error, match in BAD:
        with pytest.raises(error, match=match):
            scot_ot.solve(**{**opts, **kwargs}, solver=name)
    C, a, b = problem(seed, base_dtype(info))
    with pytest.raises(ValueError, match=rf"^solver '{name}' does not take option\(s\) no_such_option; "
                                         rf"its options: {', '.join(info.option_names) or 'none'}$"):
        scot_ot.solve(C, a, b, solver=name, no_such_option=1, **opts)
    for opt in info.required_options:
        with pytest.raises(ValueError, match=rf"^{opt.name}: "):
            scot_ot.solve(C, a, b, solver=name, **{k: v for k, v in opts.items() if k != opt.name})
    for kind, reg_m in ((Marginals.KL_UNBALANCED, 1.0), (Marginals.SEMI_RELAXED, (INF, 1.0)),
                        (Marginals.SEMI_RELAXED, (1.0, INF))):
        if kind not in info.marginals:
            with pytest.raises(ValueError, match=rf"^reg_m: solver '{name}' "):
                scot_ot.solve(C, a, b, solver=name, reg_m=reg_m, **opts)


def check_dtypes(name: str, seed: int) -> None:
    """Each declared cost dtype gives results in the working dtype, equal (to its rounding) to the
    widest declared dtype's on the same rounded cost; another dtype raises ``ValueError``."""
    info = solver_info(name)
    wide = base_dtype(info)
    C, _, _ = problem(seed, F64)
    kw = dict(max_iter=30, check_every=10, tol=0)
    for dt in COST_DTYPES:
        Cd = C.to(dt)
        if dt not in info.dtypes.cost:
            with pytest.raises(ValueError):
                scot_ot.solve(Cd, solver=name, **options(info), **kw)
            continue
        r = run(name, Cd, **kw)
        ref = run(name, Cd.to(wide), **kw)
        assert l1(r.plan, ref.plan) <= (1e-10 if dt == wide == F64 else 1e-4), dt
        if info.solves_ot:  # and it gets to the tolerance of its working dtype
            tol = tol_for(info, dt)
            done = run(name, Cd, max_iter=max_iter_for(info), tol=tol)
            assert done.converged and done.error <= tol, (dt, done.errors[-3:])


def check_device(device_type: str, name: str, seed: int) -> None:
    """Runs on a device it declares (``cpu`` of an interpreter-only solver: with the interpreter,
    else a ``SolverUnavailableError``); results stay on the cost's device."""
    info = solver_info(name)
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    C, a, b = (x.to(device_type) for x in problem(seed, base_dtype(info)))
    if device_type == "cpu" and info.devices.cpu_interpreter_only and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(scot_ot.SolverUnavailableError):
            scot_ot.solve(C, a, b, solver=name, **options(info))
        return
    r = run(name, C, a, b, max_iter=20, tol=0)
    assert r.plan.device.type == device_type


def check_batch(name: str, seed: int) -> None:
    """A batch (B, n, m) gives the results of its problems one by one, and reports its worst error."""
    info = solver_info(name)
    dt = base_dtype(info)
    cases = [({}, 1.0)]
    if Marginals.KL_UNBALANCED in info.marginals:
        cases.append(({"reg_m": (0.7, 1.3)}, 1.4))
    for extra, mass_b in cases:
        C, a, b = problem(seed, dt, mass_b=mass_b, B=3)
        kw = dict(max_iter=7, check_every=3, tol=0, **extra)
        rb = run(name, C, a, b, **kw)
        errs = []
        for k in range(3):
            rk = run(name, C[k], a[k], b[k], **kw)
            torch.testing.assert_close(rb.plan[k], rk.plan, atol=atol_for(info, dt), rtol=1e-6)
            errs.append(rk.error)
        assert rb.error == pytest.approx(max(errs), rel=1e-6, abs=10 * atol_for(info, dt))


def check_tiny_eps(name: str, seed: int) -> None:
    """eps = 1e-3 on costs in [0, 2] with a row where exp(-C/eps) underflows: a finite result
    (``finite_at_any_eps``) or a :class:`NumericalError` naming the solver, never NaN or inf."""
    info = solver_info(name)
    g = gen(seed)
    C = 2 * torch.rand(12, 15, generator=g, dtype=F64)
    C[0] = 1 + C[0] / 2
    C = C.to(base_dtype(info))
    kw = dict(eps=1e-3, max_iter=150, check_every=50)
    if info.finite_at_any_eps:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            r = run(name, C, **kw)
        assert all(math.isfinite(e) for e in r.errors)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's own "numerical errors" warning may come first
        try:
            run(name, C, **kw)
        except NumericalError as err:
            assert err.solver == name and str(err).startswith(f"solver '{name}' failed numerically")


def check_grad(name: str, seed: int) -> None:
    """``differentiable``: autograd through the solve equals finite differences (float64, 4 x 3);
    otherwise a cost or marginal that requires grad is refused, and accepted under no_grad."""
    info = solver_info(name)
    g = gen(seed)
    dt = base_dtype(info)
    C = torch.rand(4, 3, generator=g, dtype=F64).to(dt)
    a, b = marginal(g, 4, dtype=dt), marginal(g, 3, dtype=dt)
    kw = dict(max_iter=4, check_every=4, tol=0)
    if not info.differentiable:
        for args in ((C.clone().requires_grad_(), a, b), (C, a.clone().requires_grad_(), b)):
            with pytest.raises(ValueError, match=rf"^solver '{name}' is not differentiable"):
                scot_ot.solve(*args, solver=name, **options(info))
        with torch.no_grad():
            run(name, C.clone().requires_grad_(), a, b, **kw)
        run(name, C.clone().requires_grad_().detach(), a, b, **kw)
        return
    assert dt == F64, "a differentiable solver is gradchecked in float64"
    assert torch.autograd.gradcheck(lambda C: run(name, C, a, b, **kw).plan, (C.clone().requires_grad_(),))
    if Marginals.KL_UNBALANCED in info.marginals:
        def unbalanced(C, a, b):
            return run(name, C, a, b, reg_m=(1.0, 2.0), **kw).plan

        assert torch.autograd.gradcheck(unbalanced, (C.clone().requires_grad_(), a.clone().requires_grad_(),
                                                     (1.5 * b).requires_grad_()))


def check_by_name(name: str, seed: int) -> None:
    """The name (with the required options' examples) works where users give it: ``scot-ot eval
    --solver SPEC``, ``scot-ot diagnose --solvers SPEC,...``, ``SCOT(solver=..., solver_options=...)``
    (its argument check), and the solve ``SCOT.match_hyperpixels`` makes on a float32 cost."""
    from scot_ot.cli import _split_specs, check_solver_specs
    from scot_ot.matching.scot import check_ot_args

    info = solver_info(name)
    spec = name + ("" if not info.required_options else
                   ":" + ",".join(f"{o.name}={o.example}" for o in info.required_options))
    args = argparse.Namespace(eps=0.05, max_iter=50, tol=1e-4, device="cpu")  # (where problem() puts C)
    [(_, got, overrides)] = check_solver_specs([spec], args)
    assert got == name and overrides == options(info)
    again = spec + ("," if ":" in spec else ":") + "max_iter=20"  # the same solver with an override
    both = check_solver_specs(_split_specs(f"{spec},{again}"), args, flag="--solvers")
    assert [(s[1], s[2].get("max_iter")) for s in both] == [(name, None), (name, 20)]
    ot_args = dict(eps=0.05, max_iter=50, tol=1e-4, check_every=10, reg_m=None, **overrides)
    check_ot_args(name, **ot_args)
    if torch.float32 in info.dtypes.cost:
        C, a, b = problem(seed, torch.float32)
        r = scot_ot.solve(C, a, b, solver=name, **ot_args)
        assert r.solver == name and bool(torch.isfinite(r.plan).all())


def check_marginals(name: str, seed: int) -> None:
    """The marginals it declares, met to tol, with the error the common metric; a rule that is not
    OT reports its marginal violation honestly."""
    info = solver_info(name)
    dt = base_dtype(info)
    tol = tol_for(info, dt)
    conv = dict(max_iter=max_iter_for(info), tol=tol)
    C, a, b = problem(seed, dt)
    if not info.solves_ot:
        r = run(name, C, a, b, tol=1e-6)
        assert r.error == pytest.approx(hand_error(r.plan, a, b), rel=1e-6, abs=1e-12)
        assert r.converged == (r.error <= 1e-6)
        return
    if Marginals.BALANCED in info.marginals:
        early = run(name, C, a, b, max_iter=3, tol=0)
        assert early.error == pytest.approx(hand_error(early.plan, a, b), rel=1e-5, abs=10 * atol_for(info, dt))
        r = run(name, C, a, b, **conv)
        assert r.converged and r.error <= tol
        assert hand_error(r.plan, a, b) <= tol * (1 + 1e-3) + 10 * atol_for(info, dt)
    if Marginals.KL_UNBALANCED in info.marginals:
        Cu, au, bu = problem(seed, dt, mass_b=1.7)
        for iters, kw in ((3, dict(max_iter=3, tol=0)), (None, conv)):
            r = run(name, Cu, au, bu, reg_m=(0.5, 2.0), **kw)
            P, f, g = r.plan.double(), r.f.double(), r.g.double()
            want = float((P.sum(1) - au.double() * torch.exp(-f / 0.5)).abs().sum()
                         + (P.sum(0) - bu.double() * torch.exp(-g / 2.0)).abs().sum())
            assert r.error == pytest.approx(want, rel=1e-5, abs=10 * atol_for(info, dt))
            assert iters is not None or (r.converged and r.error <= tol)
    if Marginals.SEMI_RELAXED in info.marginals:
        Cs, as_, bs = problem(seed, dt, mass_b=2.5)
        for reg_m, hard in (((INF, 1.0), 0), ((1.0, INF), 1)):
            r = run(name, Cs, as_, bs, reg_m=reg_m, **conv)
            side = r.plan.sum(1 - hard)  # P1 (hard = 0) or P^T 1 (hard = 1)
            assert r.converged and l1(side, (as_, bs)[hard]) <= tol * (1 + 1e-3) + 10 * atol_for(info, dt)
    if Marginals.PARTIAL_MASS in info.marginals:
        mass = float(options(info)["mass"])
        r = run(name, C, a, b, **conv)
        P = r.plan.double()
        assert r.converged and r.error <= tol
        assert bool((P.sum(1) <= a.double() + tol).all()) and bool((P.sum(0) <= b.double() + tol).all())
        assert float(P.sum()) == pytest.approx(mass, abs=tol)
    if Marginals.DUSTBIN in info.marginals:
        r = run(name, C, a, b, **conv)
        assert r.converged and r.error <= tol
        assert l1(r.plan.sum(1) + r.unmatched_a, a) <= 2 * tol
        assert l1(r.plan.sum(0) + r.unmatched_b, b) <= 2 * tol


def _same_plans(info: SolverInfo, dt, P, Q) -> None:
    """Two solutions of the same problem: equal (exact, unique) or within the tolerance's reach."""
    bound = 1e-10 if info.family.value == "exact" and dt == F64 else (1e-6 if dt == F64 else 1e-3)
    assert l1(P, Q) <= bound, l1(P, Q)


def check_transpose(name: str, seed: int) -> None:
    """``OT(C^T, b, a) = OT(C, a, b)^T``."""
    info = solver_info(name)
    dt = base_dtype(info)
    C, a, b = problem(seed, dt)
    kw = dict(max_iter=max_iter_for(info), tol=tol_for(info, dt))
    ab = run(name, C, a, b, **kw)
    ba = run(name, C.T.contiguous(), b, a, **kw)
    _same_plans(info, dt, ba.plan.T, ab.plan)


def check_cost_shift(name: str, seed: int) -> None:
    """With a fixed total mass, ``C + c`` gives the same plan and a cost ``c * mass`` higher."""
    info = solver_info(name)
    dt = base_dtype(info)
    C, a, b = problem(seed, dt)
    kw = dict(max_iter=max_iter_for(info), tol=tol_for(info, dt))
    r0 = run(name, C, a, b, **kw)
    r1 = run(name, C + 0.7, a, b, **kw)
    _same_plans(info, dt, r1.plan, r0.plan)
    mass = float(r0.plan.double().sum())
    assert float(r1.cost) == pytest.approx(float(r0.cost) + 0.7 * mass, abs=1e-5 if dt == F64 else 1e-3)


def check_init(name: str, seed: int) -> None:
    """``init=result.f`` continues the iteration (5 + 5 = 10); a different ``init`` changes the
    iterate; a pair ``(f, g)``, a wrong shape, NaN or another device is refused."""
    info = solver_info(name)
    dt = base_dtype(info)
    C, a, b = problem(seed, dt)
    kw = dict(max_iter=5, check_every=5, tol=0)
    r5, r10 = run(name, C, a, b, **kw), run(name, C, a, b, max_iter=10, check_every=5, tol=0)
    cont = run(name, C, a, b, init=r5.f, **kw)
    torch.testing.assert_close(cont.plan, r10.plan, atol=10 * atol_for(info, dt), rtol=1e-5)
    f0 = torch.randn(C.shape[0], generator=gen(seed), dtype=F64).to(a)
    other = run(name, C, a, b, max_iter=1, tol=0, init=f0)
    assert l1(other.plan, run(name, C, a, b, max_iter=1, tol=0).plan) > 1e-6
    n, m, dt_w = C.shape[0], C.shape[1], a.dtype
    bad = [
        ((torch.zeros(n, dtype=dt_w), torch.zeros(m, dtype=dt_w)), r"^init: expected the row potential f alone "
                                                                   r".*recomputes g from f"),
        (torch.zeros(n + 1, dtype=dt_w), rf"^init: expected a tensor of shape \({n},\)"),
        (torch.full((n,), math.nan, dtype=dt_w), r"^init: the potential contains NaN"),
        (torch.zeros(n, dtype=dt_w, device="meta"), r"^init: device meta differs"),
    ]
    for init, match in bad:
        with pytest.raises(ValueError, match=match):
            scot_ot.solve(C, a, b, solver=name, init=init)
    with pytest.raises(ValueError, match=rf"^init: expected a tensor of shape \(2, {n}\)"):
        scot_ot.solve(torch.stack([C, C]), solver=name, init=torch.zeros(n, dtype=dt_w))


Check = Callable[[str, int], None]


def implied_checks(info: SolverInfo) -> List[Tuple[str, Check]]:
    """The checks a solver's capabilities imply, by id."""
    checks: List[Tuple[str, Check]] = [
        ("stopping", check_stopping), ("validation", check_validation), ("dtypes", check_dtypes),
        *((f"device-{t}", functools.partial(check_device, t)) for t in info.devices.types),
        ("batch", check_batch), ("tiny-eps", check_tiny_eps), ("grad", check_grad),
        ("by-name", check_by_name), ("marginals", check_marginals),
    ]
    if info.solves_ot:
        checks.append(("transpose", check_transpose))
    if info.marginals & {Marginals.BALANCED, Marginals.PARTIAL_MASS}:
        checks.append(("cost-shift", check_cost_shift))
    if info.takes_init:
        checks.append(("init", check_init))
    return checks


CASES = [(name, cid, check) for name in available_solvers() for cid, check in implied_checks(solver_info(name))]


def _examples(info: SolverInfo) -> int:
    """Fresh problems per check: fewer for a solver running in an interpreter here."""
    slow = info.devices.cpu_interpreter_only and not torch.cuda.is_available()
    return 2 if slow else 4


def in_child_interpreter(test_id: str) -> None:
    """Run the test ``test_id`` of this file in a child pytest with ``TRITON_INTERPRET=1`` (set before
    anything imports triton); it must pass, not be skipped or deselected."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          f"{Path(__file__).resolve()}::{test_id}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    tail = (out.stdout[-4000:] + out.stderr[-2000:]).strip()
    assert out.returncode == 0 and re.search(r"\b1 passed\b", out.stdout) and "skipped" not in out.stdout, tail


@pytest.mark.filterwarnings("ignore:.*umerical errors:UserWarning")  # POT's own, let through
@pytest.mark.parametrize("name, cid, check", CASES, ids=[f"{n}:{c}" for n, c, _ in CASES])
def test_contract(name, cid, check):
    if (solver_info(name).devices.cpu_interpreter_only and os.environ.get("TRITON_INTERPRET") != "1"
            and cid != "device-cuda"):  # a CUDA machine: CPU problems in a child (see the module docstring)
        in_child_interpreter(f"test_contract[{name}:{cid}]")
        return

    @settings(max_examples=_examples(solver_info(name)), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=seeds)
    def holds(seed):
        check(name, seed)

    holds()


def test_an_interpreter_only_solvers_case_runs_in_a_child_interpreter():
    """The route a CUDA machine takes for ``fused``'s contract cases works here too: one case, in a child."""
    fused = [cid for n, cid, _ in CASES if n == "fused"]
    assert "validation" in fused and solver_info("fused").devices.cpu_interpreter_only
    in_child_interpreter("test_contract[fused:validation]")
    with pytest.raises(AssertionError):  # a wrong id runs nothing, and that is a failure
        in_child_interpreter("test_contract[fused:no-such-check]")


def test_every_registered_solver_gets_the_contract():
    """No solver is left out, and none is spared the checks every solver gets."""
    assert sorted({n for n, _, _ in CASES}) == available_solvers()
    always = {"stopping", "validation", "dtypes", "batch", "tiny-eps", "grad", "by-name", "marginals"}
    for name in available_solvers():
        assert always <= {c for n, c, _ in CASES if n == name}, name


def test_scot_ot_solvers_lists_every_solver(capsys):
    from scot_ot.cli import main

    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == solver_table()
    for name in available_solvers():
        assert f"| `{name}` |" in out


# ----------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("path", ["README.md", "docs/solvers.md"])
def test_solver_tables_in_the_docs_are_generated(path):
    text = (ROOT / path).read_text()
    assert TABLE_START in text and TABLE_END in text, path
    assert text == with_solver_table(text), (
        f"{path}: the solver table is not current; regenerate it with\n  python -c \"from pathlib import "
        f"Path; from scot_ot.ot.registry import with_solver_table as w; p = Path('{path}'); "
        f"p.write_text(w(p.read_text()))\"")


def docs_example() -> str:
    """The code block of docs/solvers.md's "Adding a solver" section."""
    text = (ROOT / "docs/solvers.md").read_text()
    section = text.split("\n## Adding a solver\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_example_solver_registers_itself_and_meets_its_contract():
    """The example of docs/solvers.md, executed as written: it registers itself, is listed and
    tabled, runs through ``scot_ot.solve``, and passes every check its capabilities imply."""
    before = available_solvers()
    namespace = {"__name__": "docs_example"}
    exec(compile(docs_example(), "docs/solvers.md", "exec"), namespace)  # noqa: S102
    new = sorted(set(available_solvers()) - set(before))
    assert len(new) == 1, new
    name = new[0]
    try:
        C = torch.rand(7, 5, generator=gen(0), dtype=F64)
        r = scot_ot.solve(C, solver=name, eps=0.1, max_iter=2000, tol=1e-9)
        assert r.converged and r.solver == name
        assert f"| `{name}` |" in solver_table()
        checks = implied_checks(solver_info(name))
        for seed in (1, 2):
            for cid, check in checks:
                try:
                    check(name, seed)
                except pytest.skip.Exception:
                    pass
        ran = {cid for cid, _ in checks}
        assert {"marginals", "transpose", "cost-shift", "grad", "batch", "dtypes"} <= ran
    finally:
        unregister(name)
    assert available_solvers() == before


def test_check_solver_device_refuses_a_device_the_solver_cannot_run_on():
    """``check_solver_device``: a device type the solver does not list is refused with the solvers
    that run there; every built-in that runs natively on the CPU passes there."""
    from scot_ot.ot import Devices, Domain, Family, SolverUnavailableError, check_solver_device, registered

    class CudaOnly:
        name = "cuda-only"
        info = SolverInfo(summary="x", family=Family.ENTROPIC, marginals={Marginals.BALANCED}, domain=Domain.LOG,
                          devices=Devices(("cuda",)))

        def solve(self, problem, *, max_iter, tol, check_every):
            raise AssertionError("never called")

    with registered(CudaOnly):
        with pytest.raises(SolverUnavailableError, match=r"^solver 'cuda-only' runs on cuda, not cpu; on cpu use "
                                                         r"'torch-log', "):
            check_solver_device("cuda-only", torch.device("cpu"))
        check_solver_device("cuda-only", torch.device("cuda"))  # listed: checking needs no CUDA device
    for name in available_solvers():
        if solver_info(name).devices.native("cpu"):
            check_solver_device(name, torch.device("cpu"))
    with pytest.raises(ValueError, match="solver: unknown solver 'nope'"):
        check_solver_device("nope", torch.device("cpu"))


def test_registry_refuses_what_it_cannot_drive():
    """A class without typed capabilities, a solve that does not take a declared option, and a
    name taken twice are refused at registration; ``registered`` removes what it added."""
    from scot_ot.ot import Domain, Family, Option, register

    info = SolverInfo(summary="x", family=Family.ENTROPIC, marginals={Marginals.BALANCED}, domain=Domain.LOG,
                      options=(Option("speed", "how fast"),))

    class Untyped:
        name = "untyped"
        info = {"domain": "log"}

        def solve(self, problem, *, max_iter, tol, check_every):
            raise AssertionError

    class Forgets:
        name = "forgets"

        def solve(self, problem, *, max_iter, tol, check_every):
            raise AssertionError

    Forgets.info = info
    with pytest.raises(TypeError, match="SolverInfo"):
        register(Untyped)
    with pytest.raises(TypeError, match="does not take speed"):
        register(Forgets)
    with pytest.raises(ValueError, match="already registered"):
        register(type(scot_ot.get_solver("torch-log")))
    with pytest.raises(TypeError, match="solves_ot"):
        SolverInfo(summary="x", family=Family.HEURISTIC, marginals=frozenset(), domain=Domain.LOG)
    with pytest.raises(TypeError, match="required option needs an example"):
        SolverInfo(summary="x", family=Family.ENTROPIC, marginals={Marginals.BALANCED}, domain=Domain.LOG,
                   options=(Option("mass", "m", required=True),))

    class Takes(Forgets):
        name = "takes"

        def solve(self, problem, *, max_iter, tol, check_every, speed=1):
            return scot_ot.solve(problem.C, solver="torch-log", max_iter=max_iter, tol=tol)

    with registered(Takes):
        assert "takes" in available_solvers()
    assert "takes" not in available_solvers()

"""How far a half-precision cost moves the converged ``fused`` answer: the measured bounds of the tests.

``fused`` with ``cost_dtype=torch.bfloat16`` or ``torch.float16`` solves the problem for the
rounded cost ``C_hat``, ``delta = max |C_hat - C|``. This script measures, over a grid of
problems, how far that moves the converged answer from the exact one (float64
``torch-log`` on ``C``, to tol 1e-12):

- ``pot_ratio = max_ij |Delta(f_i + g_j)| / delta`` (the potential sums: balanced
  potentials are defined up to a constant, their sums are not);
- ``plan_ratio = ||P_half - P||_1 * eps / delta`` (each log-plan entry moves by
  ``(Delta(f_i + g_j) + delta) / eps``, so the plans move by O(delta / eps)).

The grid, 108 problems: 3 costs x 3 eps x 2 marginal constraints x 2 cost dtypes x
``--seeds`` (3) seeds, on ``n x m`` = ``--shape`` (36 x 28, as in ``tests/test_fused.py``):

- costs: ``uniform`` (i.i.d. in [0, 1)), ``sqdist`` (``|x_i - y_j|^2`` between random
  points of the unit square, in [0, 2]), ``cosine`` (``1 - cos(x_i, y_j)`` between random
  16-d features, in [0, 2]);
- eps in {0.01, 0.03, 0.1};
- balanced, and KL-relaxed with ``reg_m = 0.5`` on both sides;
- ``cost_dtype`` bfloat16 and float16;
- random marginals in [0.5, 1.5), normalised (the same total mass on both sides).

``fused`` runs to ``--tol`` 1e-5 (``check_every = 10``, at most ``--max-iter``): float32
iterates at eps = 0.01 on costs in [0, 2] stall near 1e-6, and the interpreter spends
~25 ms per launch. At 1e-5 the potentials are within ~eps * 1e-5 of the fixed point, far
below the ``O(delta)`` moves measured (``delta`` >= 2.4e-4). A problem it does not
converge is recorded with ``fused_converged: false`` and left out of the maxima (and
counted). ``tests/test_fused.py`` asserts ``DELTA_POT = 4`` and ``DELTA_PLAN = 1``: the
record says whether the measured maxima stay below them, and by what margin.

Without CUDA the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set here
before triton is imported): the real kernels on CPU tensors, slowly (~10 ms per launch),
hence the small problems.

Usage::

    python benchmarks/fused_precision.py              # CPU: Triton interpreter, a few minutes
    python benchmarks/fused_precision.py --device cuda

Writes ``benchmarks/results/fused-precision-<device>-<date>.json`` and prints the maxima.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from pathlib import Path

from common import default_out, load_average, machine, table, write_json  # first: puts the checkout on sys.path

import torch

COSTS = ("uniform", "sqdist", "cosine")
EPSILONS = (0.01, 0.03, 0.1)
REG_MS = (None, 0.5)  # balanced, KL on both sides
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: the bounds tests/test_fused.py asserts
TEST_BOUNDS = {"pot_ratio": 4.0, "plan_ratio": 1.0}


def make_cost(kind: str, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """(n, m) float32 cost of the given kind (see the module docstring)."""
    if kind == "uniform":
        C = torch.rand(n, m, generator=g, dtype=torch.float64)
    elif kind == "sqdist":
        x, y = torch.rand(n, 2, generator=g, dtype=torch.float64), torch.rand(m, 2, generator=g, dtype=torch.float64)
        C = torch.cdist(x, y) ** 2
    elif kind == "cosine":
        x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
        y = torch.nn.functional.normalize(torch.randn(m, 16, generator=g, dtype=torch.float64), dim=1)
        C = 1.0 - x @ y.T
    else:
        raise ValueError(f"unknown cost {kind!r}")
    return C.float()


def one_problem(cost: str, eps: float, reg_m, dtype_name: str, seed: int, args) -> dict:
    import scot_ot

    n, m = args.shape
    g = torch.Generator().manual_seed(seed)
    C = make_cost(cost, n, m, g)
    a = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(m, generator=g, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    dev = torch.device(args.device)
    t = time.perf_counter()
    half = scot_ot.solve(C.to(dev), a.float().to(dev), b.float().to(dev), solver="fused", eps=eps,
                         max_iter=args.max_iter, tol=args.tol, check_every=10, reg_m=reg_m,
                         cost_dtype=DTYPES[dtype_name])
    t_fused = time.perf_counter() - t
    exact = scot_ot.solve(C.double(), a, b, solver="torch-log", eps=eps, max_iter=args.ref_max_iter,
                          tol=1e-12, check_every=10, reg_m=reg_m)
    delta = float((C.to(DTYPES[dtype_name]).double() - C.double()).abs().max())
    sums = lambda r: r.f.double().cpu()[:, None] + r.g.double().cpu()[None, :]  # noqa: E731
    pot = float((sums(half) - sums(exact)).abs().max())
    plan = float((half.plan.double().cpu() - exact.plan).abs().sum())
    return {"cost": cost, "eps": eps, "reg_m": reg_m, "cost_dtype": dtype_name, "seed": seed,
            "cost_range": [float(C.min()), float(C.max())], "delta": delta,
            "fused_converged": half.converged, "fused_iters": half.n_iters, "fused_error": half.error,
            "fused_time_s": t_fused, "reference_converged": exact.converged,
            "reference_iters": exact.n_iters, "reference_error": exact.error,
            "max_abs_delta_pot_sums": pot, "plan_l1": plan,
            "pot_ratio": pot / delta, "plan_ratio": plan * eps / delta}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda")
    p.add_argument("--shape", default="36,28", help="n,m")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--ref-max-iter", type=int, default=50000)
    p.add_argument("--note", default=None, help="a remark on the machine, stored as machine_note")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.shape = tuple(int(x) for x in args.shape.split(","))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    out = Path(args.out) if args.out else default_out("fused-precision", args.device)

    grid = list(itertools.product(COSTS, EPSILONS, REG_MS, DTYPES, range(args.seeds)))
    config = {"shape": list(args.shape), "costs": list(COSTS), "eps": list(EPSILONS),
              "reg_m": [r if r is not None else "balanced" for r in REG_MS], "cost_dtypes": list(DTYPES),
              "seeds": args.seeds, "n_problems": len(grid), "tol": args.tol, "max_iter": args.max_iter,
              "reference": "torch-log float64 on C, tol 1e-12", "marginals": "random in [0.5, 1.5), normalised",
              "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "test_bounds": TEST_BOUNDS}
    record = {"benchmark": "fused_precision", "machine": machine(args.device), "machine_note": args.note,
              "config": config, "records": []}
    t0 = time.perf_counter()
    for k, (cost, eps, reg_m, dt, s) in enumerate(grid):
        # one seed per problem: the same C and marginals for bf16 and fp16
        seed = 1000 * COSTS.index(cost) + 100 * EPSILONS.index(eps) + 10 * REG_MS.index(reg_m) + s
        rec = one_problem(cost, eps, reg_m, dt, seed, args)
        record["records"].append(rec)
        print(f"[{k + 1}/{len(grid)}] {cost} eps={eps:g} reg_m={reg_m} {dt} seed={seed}: "
              f"pot {rec['pot_ratio']:.3g} delta, plan {rec['plan_ratio']:.3g} delta/eps, "
              f"{rec['fused_iters']} it., {rec['fused_time_s']:.1f} s", flush=True)

    ok = [r for r in record["records"] if r["fused_converged"] and r["reference_converged"]]
    summary = {"n_problems": len(record["records"]), "n_converged": len(ok)}
    for key in ("pot_ratio", "plan_ratio"):
        worst = max(ok, key=lambda r: r[key])
        summary[key] = {"max": worst[key], "at": {k: worst[k] for k in ("cost", "eps", "reg_m", "cost_dtype", "seed")},
                        "per_dtype": {dt: max(r[key] for r in ok if r["cost_dtype"] == dt) for dt in DTYPES},
                        "test_bound": TEST_BOUNDS[key], "margin": TEST_BOUNDS[key] / worst[key]}
    record["summary"] = summary
    record["wall_s"] = time.perf_counter() - t0
    record["load_avg_after"] = load_average()
    write_json(record, out)

    rows = [{"quantity": key, "max": summary[key]["max"],
             **{f"max {dt}": summary[key]["per_dtype"][dt] for dt in DTYPES},
             "test bound": summary[key]["test_bound"], "margin": summary[key]["margin"],
             "worst case": ", ".join(f"{k}={v}" for k, v in summary[key]["at"].items())}
            for key in ("pot_ratio", "plan_ratio")]
    print()
    print(table(rows, list(rows[0])))
    print(f"{summary['n_converged']} of {summary['n_problems']} problems converged (the maxima are over those); "
          f"{record['wall_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()

"""Time every OT solver on SCOT-like dense costs: per iteration, to tolerance, and against EMD.

Problem: ``C = 1 - max(cos(x_i, y_j), 0)`` between ``n`` random unit features ``x`` and
``n`` features ``y`` in ``d = 512`` dimensions, uniform marginals, ``eps = 0.05``.
``--features iid`` (default) draws ``y`` independently of ``x``: cosines concentrate
near 0, so the costs lie in about [0.85, 1] and every solver converges in ~10
iterations. ``--features matched`` makes ``y`` a noisy permutation of ``x``
(``y_j = normalize(x_pi(j) + noise * z_j / sqrt(d))``), the structure of a real
correspondence problem, which needs hundreds of iterations.

For each size and solver, in this order:

1. **agreement** (before any timing): the plan after 10 iterations against
   ``torch-log``'s plan after 10 iterations (every solver starts from SCOT's
   ``u = 1/n`` and runs the same iterates); L1 distance, which must be below 1e-3
   (float32) / 1e-9 (float64);
2. **time per iteration**: runs of ``K`` iterations with ``check_every = K`` (one
   chunk, one error check); median and spread (quartiles, min, max) over 3 to
   ``--repeats`` repeats (within ``--solver-budget`` seconds) of ``t / K``. ``t`` is a
   run's time *with its plan*: the solver's own clock (validation excluded; setup and
   the one check included) plus the time to build ``result.plan`` for the solvers
   that build it lazily from the potentials (``torch-log``, ``torch-absorb``,
   ``fused``; POT returns its plan). ``K`` (10 to 500) makes a run last about
   ``--run-budget`` seconds and keeps the setup (POT's kernel; torch-absorb's first
   log-domain iteration and kernel; the plan) under ~20 % of it; the setup and the
   slope of a two-point fit (10 and 20 iterations) are recorded too. Every fit starts
   with one untimed warm-up run, so no cold first run (allocations, caches, lazy
   imports) enters a timing. For every solver of the common loop (``info.stopping``) the
   same with ``check_every = 10``: the difference is what the checks cost; for POT it
   is mostly the warm-started chunking that measures POT in the common metric, which
   rebuilds POT's kernel and plan once per chunk (see :mod:`scot_ot.ot.pot_solvers`);
Next to them (CPU only), POT's ``ot.sinkhorn`` on numpy arrays, timed the same way:
the yardstick of the targets, which are printed at the end and stored under
``targets``: ``torch-absorb``'s time per iteration <= 1.5x numpy ``ot.sinkhorn``'s,
and >= 4x faster than ``pot-sinkhorn-log`` (POT on torch tensors), at the largest n.

3. **to tolerance**: ``tol = 1e-4``, ``check_every = 10``, at most ``--max-iter``
   iterations *and* at most the iterations that fit in ``--tol-budget`` seconds at
   the measured speed; a solver stopped by the budget is recorded with
   ``converged: false`` and a ``note`` saying so (nothing is skipped silently);
   iterations, time (with the plan; median and spread of 1 to ``--tol-repeats``
   runs, as many as fit in ``--tol-budget``), error at stop, and the transport
   cost's relative gap to the exact optimum, ``(<C, P> - OT_emd) / OT_emd`` (EMD
   solved once per size). Beside it, ``time_same_iters_one_check_s``: the same
   number of iterations in one run with one check (``check_every = max_iter``,
   ``tol = 0``). For the POT wrappers that is one call of POT's solver (e.g. one
   ``ot.bregman.sinkhorn_knopp`` on the torch tensors), POT's own unchunked time; the
   difference to the to-tol time is the wrappers' chunking for the common error
   check. The ``ot.sinkhorn (numpy)`` record gets ``time_same_iters_s`` for the
   reference's iteration count.

Usage::

    python benchmarks/solvers.py                           # CPU, n in {1000, 2500, 4200}
    python benchmarks/solvers.py --sizes 500,1000 --solvers torch-absorb,pot-sinkhorn
    python benchmarks/solvers.py --device cuda             # includes `fused`
    python benchmarks/solvers.py --features matched

Writes ``benchmarks/results/solvers-<device>-<date>.json`` (``solvers-matched-...`` for
``--features matched``), a PNG of time per iteration against ``n`` beside it, and
prints a table. ``--note`` stores a remark on the machine (``machine_note``: for
example that other jobs shared the CPU).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

from common import default_out, load_average, machine, random_cosine_cost, spread, table, write_json  # first: puts the checkout on sys.path

import numpy as np
import torch
from tqdm.auto import tqdm

import scot_ot
from scot_ot import solve
from scot_ot.ot import Family, Marginals, Stopping, solver_info

EMD = "pot-emd"
REFERENCE = "torch-log"
AGREE_ITERS = 10
CHUNK = 10  # the default check_every, for the chunked timings
FAST = "torch-absorb"  # our fastest stable CPU solver
NUMPY_SINKHORN = "ot.sinkhorn (numpy)"  # yardstick of the targets, not a registered solver
AGREE_L1 = {torch.float32: 1e-3, torch.float64: 1e-9}


def default_solvers(device: str) -> List[str]:
    """From the registry: the entropic solvers of balanced OT (this problem) without required
    options that run natively on ``device`` (``fused`` only on CUDA); others by ``--solvers``."""
    return [s for s in scot_ot.available_solvers()
            if (i := solver_info(s)).family is Family.ENTROPIC and Marginals.BALANCED in i.marginals
            and not i.required_options and i.devices.native(torch.device(device).type)]


def transport_cost(C: torch.Tensor, P: torch.Tensor) -> float:
    """``<C, P>`` in float64."""
    return float((C.double() * P.double()).sum())


def plan_l1(P: torch.Tensor, Q: torch.Tensor) -> float:
    return float((P.double() - Q.double()).abs().sum())


def timed_solve(C: torch.Tensor, s: str, **kw):
    """``solve`` and build the plan: (result, seconds). Seconds are the solver's own clock
    (validation excluded) plus the time ``result.plan`` takes (the lazy solvers build it
    from the potentials on first access; POT's is stored and costs nothing)."""
    r = solve(C, solver=s, **kw)
    t = time.perf_counter()
    r.plan
    if C.device.type == "cuda":
        torch.cuda.synchronize(C.device)
    return r, r.time_s + (time.perf_counter() - t)


def reference_plan(C: torch.Tensor, eps: float) -> torch.Tensor:
    """torch-log's plan after AGREE_ITERS iterations."""
    return solve(C, solver=REFERENCE, eps=eps, max_iter=AGREE_ITERS, check_every=AGREE_ITERS, tol=0).plan


def time_per_iteration(C: torch.Tensor, s: str, args, check_every: Optional[int]):
    """Median and spread of ``t / K`` over repeated runs of ``K`` iterations, ``t`` with the plan.

    ``check_every=None``: one chunk per run (``check_every = K``). A two-point estimate
    (10 and 20 iterations) splits a run's time into a setup (POT's kernel, torch-absorb's
    first log-domain iteration and kernel) and a slope per iteration; ``K`` is picked so
    a run takes about ``--run-budget`` seconds and the setup is at most ~20 % of it
    (10 <= K <= 500). Otherwise runs of whole chunks of ``check_every``, the per-chunk
    overhead included. Repeats: 3 to ``--repeats``, within ``--solver-budget`` seconds.
    Returns (stats, K, repeats, {"setup_s": ..., "slope_s": ...} or {}).
    """
    def run(k: int) -> float:
        ce = k if check_every is None else check_every
        return timed_solve(C, s, eps=args.eps, max_iter=k, check_every=ce, tol=0)[1]

    if check_every is None:
        return repeated_runs(run, args)
    run(check_every)  # warm-up, untimed
    est = run(2 * check_every) / (2 * check_every)
    K = int(min(max(args.run_budget / est, 2 * check_every), 500)) // check_every * check_every
    repeats = int(min(max(args.solver_budget // (K * est), 3), args.repeats))
    return spread([run(K) / K for _ in range(repeats)]), K, repeats, {}


def repeated_runs(run: Callable[[int], float], args):
    """``time_per_iteration`` for any ``run(K) -> seconds`` of K iterations in one go."""
    run(10)  # warm-up, untimed: a cold first run must not enter the fit
    t10 = run(10)
    t20 = run(20)
    slope = (t20 - t10) / 10
    slope = slope if slope > t20 / 200 else t20 / 20  # timing noise: fall back to the mean
    setup = max(t20 - 20 * slope, 0.0)
    K = int(min(max(args.run_budget / slope, 4 * setup / slope, 10), 500))
    est = slope + setup / K
    repeats = int(min(max(args.solver_budget // (K * est), 3), args.repeats))
    stats = spread([run(K) / K for _ in range(repeats)])
    return stats, K, repeats, {"setup_s": setup, "slope_s": slope}


def numpy_sinkhorn_record(C: torch.Tensor, args, base: dict):
    """The issue's yardstick: POT's kernel-domain ``ot.sinkhorn`` on numpy arrays (not a
    registered solver; no common error metric), timed like the solvers.
    Returns (record, run): ``run(k)`` times one call of ``k`` iterations."""
    import ot

    Cn = C.cpu().numpy()
    a = np.full(Cn.shape[0], 1.0 / Cn.shape[0], dtype=Cn.dtype)
    b = np.full(Cn.shape[1], 1.0 / Cn.shape[1], dtype=Cn.dtype)

    def run(k: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": stopThr=0 on purpose
            t = time.perf_counter()
            ot.sinkhorn(a, b, Cn, args.eps, numItermax=k, stopThr=0.0)
            return time.perf_counter() - t

    stats, K, repeats, fit = repeated_runs(run, args)
    return {**base, "solver": NUMPY_SINKHORN, "iters_per_run": K, "repeats": repeats,
            "time_per_iter_s": stats, "setup_s_estimate": fit["setup_s"],
            "slope_s_per_iter_estimate": fit["slope_s"], "converged": None,
            "error_at_stop": None, "gap_to_emd": None}, run


def repeat_within(run: Callable[[], float], first: float, budget: float, most: int) -> Dict[str, float]:
    """Spread of ``first`` and up to ``most - 1`` more ``run()`` timings, within ``budget`` seconds."""
    extra = int(min(most - 1, budget // max(first, 1e-9) - 1))
    return spread([first] + [run() for _ in range(max(extra, 0))])


def targets(records: List[Dict[str, object]]) -> Dict[str, object]:
    """The issue's two per-iteration ratios at the largest n (measured in this run)."""
    n = max(r["n"] for r in records)
    per_it = {r["solver"]: r["time_per_iter_s"]["median"] for r in records
              if r["n"] == n and "time_per_iter_s" in r}
    out: Dict[str, object] = {"n": n}
    if FAST in per_it and NUMPY_SINKHORN in per_it:
        ratio = per_it[FAST] / per_it[NUMPY_SINKHORN]
        out["fast_over_numpy_sinkhorn"] = {"value": ratio, "target": "<= 1.5", "met": ratio <= 1.5}
    if FAST in per_it and "pot-sinkhorn-log" in per_it:
        speedup = per_it["pot-sinkhorn-log"] / per_it[FAST]
        out["speedup_over_pot_sinkhorn_log"] = {"value": speedup, "target": ">= 4", "met": speedup >= 4}
    return out


def bench_size(n: int, solvers: List[str], args, bar) -> List[Dict[str, object]]:
    C = random_cosine_cost(n, args.d, args.features, args.noise, args.seed + n, args.dtype, args.device)
    base = {"n": n, "dtype": str(args.dtype).replace("torch.", ""), "eps": args.eps,
            "device": args.device, "features": args.features,
            "cost_range": [float(C.min()), float(C.max())]}
    records = []

    # exact optimum, once per size
    bar.set_postfix_str(f"n={n} {EMD}")
    t0 = time.perf_counter()
    emd = solve(C, solver=EMD)
    cost_emd = transport_cost(C, emd.plan)
    records.append({**base, "solver": EMD, "emd_time_s": time.perf_counter() - t0, "cost": cost_emd,
                    "converged": emd.converged, "error_at_stop": emd.error, "gap_to_emd": 0.0})
    del emd
    bar.update()

    numpy_rec = numpy_run = None
    if args.device == "cpu":
        bar.set_postfix_str(f"n={n} {NUMPY_SINKHORN}")
        numpy_rec, numpy_run = numpy_sinkhorn_record(C, args, base)
        records.append(numpy_rec)

    # 1. agreement with the reference, before any timing (also the warm-up)
    ref, agree = reference_plan(C, args.eps), {}
    for s in solvers:
        bar.set_postfix_str(f"n={n} {s}: agreement")
        r = solve(C, solver=s, eps=args.eps, max_iter=AGREE_ITERS, check_every=AGREE_ITERS, tol=0)
        agree[s] = plan_l1(r.plan, ref)
        del r
    del ref

    for s in solvers:
        rec: Dict[str, object] = {**base, "solver": s, "agreement_l1_vs_torch_log": agree[s],
                                  "agrees": agree[s] <= AGREE_L1[args.dtype]}
        # 2. time per iteration, in one chunk; for POT also in chunks of CHUNK iterations
        bar.set_postfix_str(f"n={n} {s}: per iteration")
        stats, K, repeats, fit = time_per_iteration(C, s, args, None)
        rec.update(iters_per_run=K, repeats=repeats, time_per_iter_s=stats,
                   setup_s_estimate=fit["setup_s"], slope_s_per_iter_estimate=fit["slope_s"])
        if solver_info(s).stopping is Stopping.LOOP:
            bar.set_postfix_str(f"n={n} {s}: chunked")
            chunked, Kc, repeats_c, _ = time_per_iteration(C, s, args, CHUNK)
            rec.update(time_per_iter_chunked_s=chunked, iters_per_chunked_run=Kc,
                       chunked_repeats=repeats_c, chunk_overhead=chunked["median"] / stats["median"] - 1)

        # 3. to tolerance, within the time budget
        bar.set_postfix_str(f"n={n} {s}: to tol")
        speed = stats["median"]
        cap = min(args.max_iter, max(CHUNK, int(args.tol_budget / speed) // CHUNK * CHUNK))
        r, t_tol = timed_solve(C, s, eps=args.eps, max_iter=cap, check_every=CHUNK, tol=args.tol)
        cost = transport_cost(C, r.plan)
        to_tol = repeat_within(
            lambda: timed_solve(C, s, eps=args.eps, max_iter=r.n_iters, check_every=CHUNK, tol=args.tol)[1],
            t_tol, args.tol_budget, args.tol_repeats)
        # the same iterations in one run with one check: for POT, one call of its solver (unchunked)
        one = lambda: timed_solve(C, s, eps=args.eps, max_iter=r.n_iters, check_every=r.n_iters,  # noqa: E731
                                  tol=0)[1]
        t_one = one()
        same = repeat_within(one, t_one, args.tol_budget, args.tol_repeats)
        rec.update(tol=args.tol, max_iter=cap, iters_to_tol=r.n_iters, time_to_tol_s=to_tol["median"],
                   time_to_tol_spread_s=to_tol, time_same_iters_one_check_s=same["median"],
                   time_same_iters_one_check_spread_s=same,
                   converged=r.converged, error_at_stop=r.error, cost=cost,
                   gap_to_emd=(cost - cost_emd) / cost_emd)
        if not r.converged:
            why = (f"stopped by the time budget ({args.tol_budget:g} s at {speed:.3g} s/iteration) "
                   f"after {r.n_iters} iterations" if cap < args.max_iter
                   else f"did not reach tol in {args.max_iter} iterations")
            rec["note"] = f"not converged: {why}; error at stop {r.error:.3g}"
        del r
        records.append(rec)
        bar.update()

    # the numpy yardstick for the reference's iteration count to tol (one call, no chunks)
    ref_rec = next((x for x in records if x["solver"] == REFERENCE and "iters_to_tol" in x), None)
    if numpy_rec is not None and ref_rec is not None:
        k = ref_rec["iters_to_tol"]
        same = repeat_within(lambda: numpy_run(k), numpy_run(k), args.tol_budget, args.tol_repeats)
        numpy_rec.update(iters_same=k, time_same_iters_s=same["median"], time_same_iters_spread_s=same)
    return records


def plot(records: List[Dict[str, object]], out: Path, title: str) -> Optional[Path]:
    """Time per iteration against n, one line per solver, log-log; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or scot_ot[plot])")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in dict.fromkeys(r["solver"] for r in records if "time_per_iter_s" in r):
        rows = sorted((r for r in records if r["solver"] == s and "time_per_iter_s" in r), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        med = [r["time_per_iter_s"]["median"] for r in rows]
        lo = [m - r["time_per_iter_s"]["min"] for m, r in zip(med, rows)]
        hi = [r["time_per_iter_s"]["max"] - m for m, r in zip(med, rows)]
        ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=s)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n = m")
    ax.set_ylabel("time per iteration (s), median, bars min-max")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--sizes", default="1000,2500,4200", help="comma-separated n (= m)")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--solvers", default=None,
                   help="comma-separated; default: the registered entropic solvers of balanced OT "
                        f"without required options native on --device (cpu: {', '.join(default_solvers('cpu'))})")
    p.add_argument("--features", default="iid", choices=["iid", "matched"])
    p.add_argument("--noise", type=float, default=1.0, help="noise of --features matched")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=5000, help="iteration cap of the to-tol runs")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (at least 3)")
    p.add_argument("--run-budget", type=float, default=2.0, help="seconds per timed run (picks K)")
    p.add_argument("--solver-budget", type=float, default=8.0, help="seconds of timed runs per solver and size")
    p.add_argument("--tol-budget", type=float, default=60.0, help="seconds per to-tol run at most")
    p.add_argument("--tol-repeats", type=int, default=3,
                   help="to-tol and same-iterations runs per solver, at most (within --tol-budget)")
    p.add_argument("--note", default=None, help="a remark on the machine, stored as machine_note")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/solvers-<device>-<date>.json)")
    args = p.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.solvers is None:
        solvers = default_solvers(args.device)
    else:
        solvers = args.solvers.split(",")
        unknown = sorted(set(solvers) - set(scot_ot.available_solvers()))
        if unknown:
            p.error(f"--solvers: unknown {unknown}; available: {scot_ot.available_solvers()}")
        solvers = [s for s in solvers if s != EMD]  # EMD always runs, once per size
    solvers = sorted(solvers, key=lambda s: s != REFERENCE)  # the reference first
    name = "solvers" if args.features == "iid" else f"solvers-{args.features}"
    out = Path(args.out) if args.out else default_out(name, args.device)

    config = {"sizes": sizes, "eps": args.eps, "dtype": str(args.dtype).replace("torch.", ""),
              "solvers": solvers, "features": args.features, "noise": args.noise, "d": args.d,
              "marginals": "uniform", "tol": args.tol, "check_every_to_tol": CHUNK,
              "max_iter": args.max_iter, "repeats": args.repeats, "run_budget_s": args.run_budget,
              "solver_budget_s": args.solver_budget, "tol_budget_s": args.tol_budget,
              "tol_repeats": args.tol_repeats, "timings_include_plan": True, "warm_up_runs": 1,
              "agreement": f"L1 plan distance to torch-log after {AGREE_ITERS} iterations",
              "seed": args.seed}
    record = {"benchmark": "solvers", "machine": machine(args.device), "machine_note": args.note,
              "config": config, "records": []}
    t_start = time.perf_counter()
    with tqdm(total=len(sizes) * (len(solvers) + 1), desc="solvers", unit="run") as bar:
        for n in sizes:
            record["records"] += bench_size(n, solvers, args, bar)
            record["wall_s"] = time.perf_counter() - t_start
            record["load_avg_after"] = load_average()
            write_json(record, out)  # after every size: a partial record survives an interrupt

    record["targets"] = targets(record["records"])
    write_json(record, out)
    png = plot(record["records"], out,
               f"{args.features} cosine costs, eps={args.eps:g}, {config['dtype']}, {args.device}")
    rows = []
    for r in record["records"]:
        ti, tc = r.get("time_per_iter_s"), r.get("time_per_iter_chunked_s")
        rows.append({
            "n": r["n"], "solver": r["solver"],
            "ms/it": None if ti is None else 1e3 * ti["median"],
            "[min, max]": None if ti is None else f"[{1e3 * ti['min']:.3g}, {1e3 * ti['max']:.3g}]",
            "setup s": r.get("setup_s_estimate"),
            "ms/it chunked": None if tc is None else 1e3 * tc["median"],
            "iters": r.get("iters_to_tol"),
            "s to tol": r.get("time_to_tol_s", r.get("emd_time_s")),
            "s same it. 1 check": r.get("time_same_iters_one_check_s", r.get("time_same_iters_s")),
            "conv": r["converged"], "err": r["error_at_stop"], "gap EMD": r["gap_to_emd"],
            "L1 vs ref": r.get("agreement_l1_vs_torch_log"),
        })
    print()
    print(table(rows, list(rows[0])))
    for r in record["records"]:
        if "note" in r:
            print(f"n={r['n']} {r['solver']}: {r['note']}")
        if r.get("agrees") is False:
            print(f"WARNING n={r['n']} {r['solver']}: plan differs from torch-log by "
                  f"{r['agreement_l1_vs_torch_log']:.3g} (L1) after {AGREE_ITERS} iterations")
    for key, t in record["targets"].items():
        if key != "n":
            print(f"target at n={record['targets']['n']}: {key} = {t['value']:.2f} "
                  f"(target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    print(f"load average (1, 5, 15 min) before: {record['machine']['load_avg_1_5_15']}, "
          f"after: {record['load_avg_after']} on {record['machine']['cpu_count']} CPUs")
    print(f"\n{len(record['records'])} records in {record['wall_s']:.0f} s; wrote {out}"
          + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

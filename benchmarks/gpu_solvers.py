"""GPU Sinkhorn: the ``fused`` Triton solver against ``torch-log`` and POT, per iteration and in bandwidth.

Problem: ``C = 1 - max(cos(x_i, y_j), 0)`` between ``n`` random unit features in
``d = 512`` dimensions (as ``benchmarks/solvers.py``), ``n = m``, uniform
marginals, ``eps = 0.05``, one problem (``B = 1``).

For each size, in this order:

1. **agreement** (before any timing): every solver runs ``--check-iters``
   iterations (no tolerance) and its potentials are compared with float64
   ``torch-log`` on the same numbers (for a bfloat16 cost: on the rounded cost),
   as ``max_ij |(f_i + g_j) - (f_ref_i + g_ref_j)|`` over ``max_ij |f_ref_i + g_ref_j|``
   (free of the gauge ``(f + c, g - c)``, which does not change the plan); the
   check passes below 1e-4. A failed check is recorded and printed, and the solver is
   still timed.
2. **time per iteration**: CUDA events around ``--iters`` iterations, after
   ``--warmup`` iterations, ``--repeats`` times; median and spread of
   ``time / iters``. ``fused`` and ``torch-log`` are timed on their iteration
   loop (no error checks; ``fused`` replays its CUDA graph of ``iters``
   iterations, as it does in a solve after the first check); POT's ``ot.bregman.sinkhorn_log`` and ``ot.sinkhorn``
   are timed as whole calls with ``numItermax = iters, stopThr = 0`` (their own
   setup and their error every 10 iterations included, as a user would run them).
3. **bandwidth**: ``2 n m itemsize`` bytes of ``C`` (the floor: one read per
   half-iteration) over the time per iteration, against the device-to-device
   copy bandwidth measured in the same run (``torch`` copy of a 1 GiB buffer;
   bytes read + bytes written over time). For the other solvers the same ratio
   is an *effective* bandwidth: they move more bytes than the floor.

Sizes where a solver would not fit in free device memory (estimated from its
dense temporaries) are skipped with the reason recorded; an out-of-memory error
is recorded the same way.

Targets checked at the end (GPU only): ``fused`` float32 reads C at >= 80 % of the
copy bandwidth for ``n >= 4200``; it is >= 8x faster per iteration than POT
``sinkhorn_log`` at ``n = 10000``; a bfloat16 cost is >= 1.7x faster than float32.

Usage::

    python benchmarks/gpu_solvers.py                        # CUDA, n in {1000, 4200, 10000, 20000}
    python benchmarks/gpu_solvers.py --sweep                # + time other tilings of the fused kernels
    python benchmarks/gpu_solvers.py --device cpu --interpret   # smoke test: tiny sizes, Triton interpreter

Writes ``benchmarks/results/gpu_solvers-<device>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

from common import default_out, machine, spread, table, write_json  # first: puts the checkout on sys.path

EPS = 0.05
TOL_AGREE = 1e-4
GIB = 2.0**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --interpret)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels in the interpreter (sets TRITON_INTERPRET=1); smoke test only")
    p.add_argument("--sizes", default=None, help="comma-separated n (= m); default 1000,4200,10000,20000 "
                   "(48,100 with --interpret)")
    p.add_argument("--iters", type=int, default=None, help="iterations per timed run (default 20; 2 interpreted)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per solver (default 10; 2 interpreted)")
    p.add_argument("--warmup", type=int, default=3, help="iterations before timing")
    p.add_argument("--check-iters", type=int, default=None, help="iterations of the agreement check "
                   "(default 20; 5 interpreted)")
    p.add_argument("--solvers", default="fused,torch-log,pot-sinkhorn-log,pot-sinkhorn")
    p.add_argument("--dtypes", default="float32,bfloat16", help="cost dtypes for fused")
    p.add_argument("--sweep", action="store_true", help="also time other tilings of the fused half-steps")
    p.add_argument("--sweep-n", type=int, default=10000, help="size of the tiling sweep")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    small = args.interpret
    args.sizes = [int(s) for s in (args.sizes or ("48,100" if small else "1000,4200,10000,20000")).split(",")]
    args.iters = args.iters or (2 if small else 20)
    args.repeats = args.repeats or (2 if small else 10)
    args.check_iters = args.check_iters or (5 if small else 20)
    args.solvers = args.solvers.split(",")
    args.dtypes = args.dtypes.split(",")
    if small:
        args.sweep_n = min(args.sweep_n, 64)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run the smoke test with --device cpu --interpret")
    if device.type != "cuda" and not args.interpret:
        sys.exit("the fused kernels need CUDA; on CPU pass --interpret (a smoke test, not a benchmark)")
    Bench(args, device).run()


def sum_range(f, g) -> float:
    """``max_ij |f_i + g_j|`` without forming the (n, m) grid (gauge-free: (f + c, g - c) alike)."""
    return max(abs(float(f.max() + g.max())), abs(float(f.min() + g.min())))


class Bench:
    def __init__(self, args, device):
        import torch

        self.args, self.device, self.torch = args, device, torch
        self.cuda = device.type == "cuda"
        self.records: List[Dict[str, object]] = []
        self.machine = machine(str(device))
        self.machine["triton_interpreter"] = bool(args.interpret)
        try:
            import triton

            self.machine["triton"] = triton.__version__
        except ImportError:
            self.machine["triton"] = None

    # ------------------------------------------------------------------ timing
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time_runs(self, fn: Callable[[], object], repeats: int) -> List[float]:
        """Seconds per call of ``fn``: CUDA events on GPU, perf_counter on CPU."""
        torch, out = self.torch, []
        for _ in range(repeats):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                out.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out

    def copy_bandwidth(self) -> Dict[str, object]:
        """Device-to-device copy of a 1 GiB buffer (64 MiB on CPU): (read + written bytes) / time."""
        torch = self.torch
        numel = (GIB if self.cuda else 64 * 2**20) // 4
        src = torch.empty(int(numel), dtype=torch.float32, device=self.device).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        self.sync()
        times = self.time_runs(lambda: dst.copy_(src), 20)
        st = spread(times)
        return {"bytes": 2 * src.numel() * 4, "time_s": st, "GBps": 2 * src.numel() * 4 / st["median"] / 1e9}

    # ------------------------------------------------------------------ problem
    def cost(self, n: int, seed: int):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(n, 512, generator=g, device=self.device), dim=1)
        y = torch.nn.functional.normalize(torch.randn(n, 512, generator=g, device=self.device), dim=1)
        return (1 - (x @ y.T).clamp_min(0)).contiguous()  # (n, n) float32

    def fits(self, n: int, dense_copies: float, itemsize: int) -> Optional[str]:
        """None if ``dense_copies`` (n, n) temporaries fit in free memory, else the reason."""
        need = dense_copies * n * n * itemsize
        if self.cuda:
            free = self.torch.cuda.mem_get_info(self.device)[0]
        else:
            free = 8 * GIB  # the smoke test stays tiny anyway
        if need > 0.9 * free:
            return f"needs ~{need / GIB:.1f} GiB of dense temporaries, {free / GIB:.1f} GiB free"
        return None

    # ------------------------------------------------------------------ one size
    def run_size(self, n: int, copy_bw: float) -> None:
        import ot

        import scot_ot
        from scot_ot.ot import OTProblem
        from scot_ot.ot.fused.solver import FusedScheme, load_kernels
        from scot_ot.ot.torch_log import LogDomainScheme

        torch, args = self.torch, self.args
        C = self.cost(n, seed=n)
        problem = OTProblem.create(C, eps=EPS)
        kernels = load_kernels(self.device)
        base = {"n": n, "m": n, "B": 1, "eps": EPS, "iters": args.iters, "repeats": args.repeats}

        # 1. references: float64 torch-log after check_iters iterations, on C and on each rounded cost
        refs: Dict[str, Optional[object]] = {}
        for dtype in ["float32"] + [d for d in args.dtypes if d != "float32"]:
            why = self.fits(n, 5, 8)
            if why:
                refs[dtype] = None
                continue
            Cd = C.to(getattr(torch, dtype)).double()
            refs[dtype] = scot_ot.solve(Cd, solver="torch-log", eps=EPS, max_iter=args.check_iters,
                                        tol=0.0, check_every=args.check_iters)
            del Cd
        self.sync()

        def agreement(res, ref_key: str) -> Dict[str, object]:
            ref = refs.get(ref_key)
            if ref is None:
                return {"checked": False, "reason": "float64 reference does not fit in memory"}
            df, dg = res.f.double() - ref.f, res.g.double() - ref.g
            rel = sum_range(df, dg) / sum_range(ref.f, ref.g)
            return {"checked": True, "reference": f"torch-log float64 on the {ref_key} cost",
                    "iterations": args.check_iters, "max_potential_diff_rel": rel, "agree": rel < TOL_AGREE,
                    "error": res.errors[-1], "reference_error": ref.errors[-1]}

        def record(solver: str, dtype: str, itemsize: int, times: Optional[List[float]], check, note=None):
            rec = dict(base, solver=solver, cost_dtype=dtype, machine=self.machine,
                       bytes_per_iter_floor=2 * n * n * itemsize, check=check, note=note)
            if times is not None:
                st = spread(times)
                rec["time_per_iter_s"] = st
                rec["GBps"] = rec["bytes_per_iter_floor"] / st["median"] / 1e9
                rec["fraction_of_copy"] = rec["GBps"] / copy_bw
            self.records.append(rec)
            if check and check.get("checked") and not check["agree"]:
                print(f"!! {solver} ({dtype}) n={n}: potentials differ from the reference by "
                      f"{check['max_potential_diff_rel']:.2e} (relative) > {TOL_AGREE}", flush=True)

        def guarded(solver: str, dtype: str, itemsize: int, dense: float, body):
            why = self.fits(n, dense, itemsize)
            if why:
                record(solver, dtype, itemsize, None, None, note=f"skipped: {why}")
                return
            try:
                check, times = body()
            except torch.cuda.OutOfMemoryError as err:  # recorded, not fatal
                torch.cuda.empty_cache()
                record(solver, dtype, itemsize, None, None, note=f"out of memory: {str(err).splitlines()[0]}")
                return
            record(solver, dtype, itemsize, times, check)

        # 2. fused, per cost dtype: its iteration loop, timed with no checks
        if "fused" in args.solvers:
            for dtype in args.dtypes:
                tdt = getattr(torch, dtype)

                def fused_body(tdt=tdt, dtype=dtype):
                    res = scot_ot.solve(C, solver="fused", eps=EPS, max_iter=args.check_iters, tol=0.0,
                                        check_every=args.check_iters, cost_dtype=tdt)
                    check = agreement(res, dtype)
                    scheme = FusedScheme(kernels, tdt)
                    state = scheme.advance(scheme.start(problem), args.warmup)
                    for _ in range(2):  # on CUDA: the first run of `iters` launches, the second captures
                        scheme.advance(state, args.iters)
                    self.sync()
                    times = self.time_runs(lambda: scheme.advance(state, args.iters), args.repeats)
                    return check, [t / args.iters for t in times]

                itemsize = torch.tensor([], dtype=tdt).element_size()
                guarded("fused", dtype, itemsize, 1 + (itemsize < 4) * 0.5, fused_body)

        # 3. torch-log on the float32 cost: its iteration loop
        if "torch-log" in args.solvers:
            def log_body():
                res = scot_ot.solve(C, solver="torch-log", eps=EPS, max_iter=args.check_iters, tol=0.0,
                                    check_every=args.check_iters)
                check = agreement(res, "float32")
                scheme = LogDomainScheme()
                state = scheme.advance(scheme.start(problem), args.warmup)
                self.sync()
                times = self.time_runs(lambda: scheme.advance(state, args.iters), args.repeats)
                return check, [t / args.iters for t in times]

            guarded("torch-log", "float32", 4, 4, log_body)

        # 4. POT on CUDA tensors: whole calls of `iters` iterations
        a = torch.full((n,), 1.0 / n, device=self.device)
        pot_fns = {"pot-sinkhorn-log": (ot.bregman.sinkhorn_log, 5), "pot-sinkhorn": (ot.sinkhorn, 4)}
        for solver, (fn, dense) in pot_fns.items():
            if solver not in args.solvers:
                continue

            def pot_body(solver=solver, fn=fn):
                res = scot_ot.solve(C, solver=solver, eps=EPS, max_iter=args.check_iters, tol=0.0,
                                    check_every=args.check_iters)
                check = agreement(res, "float32")
                call = lambda k: fn(a, a, C, EPS, numItermax=k, stopThr=0.0, warn=False)  # noqa: E731
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call(args.warmup)
                    self.sync()
                    times = self.time_runs(lambda: call(args.iters), args.repeats)
                return check, [t / args.iters for t in times]

            guarded(solver, "float32", 4, dense, pot_body)
        del C, problem, refs
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ tiling sweep
    def sweep(self, copy_bw: float) -> None:
        from scot_ot.ot.fused.solver import load_kernels

        torch, args, n = self.torch, self.args, self.args.sweep_n
        K = load_kernels(self.device)
        C32 = self.cost(n, seed=1)
        log_w = torch.full((1, n), -math.log(n), device=self.device)
        pot = torch.zeros(1, n, device=self.device)
        shapes = {"row": [(8, 128), (16, 128), (16, 256), (32, 128), (8, 512), (32, 256)],
                  "col": [(16, 128), (32, 128), (64, 128), (32, 256), (16, 256), (64, 64)]}
        if args.interpret:
            shapes = {"row": [(16, 32)], "col": [(32, 16)]}
        for dtype in args.dtypes:
            C = C32.to(getattr(torch, dtype))[None]
            itemsize = C.element_size()
            for side, blocks in shapes.items():
                for bn, bm in blocks:
                    for warps, per_sm in ([(4, 8)] if args.interpret else
                                          [(4, 4), (4, 8), (4, 16), (8, 4), (8, 8)]):
                        split = K.auto_split(side, 1, n, n, bn, bm, self.device, programs_per_sm=per_sm)
                        tiling = K.Tiling(bn, bm, split, warps)
                        step = K.HalfStep(side, C, log_w, tiling)
                        for _ in range(args.warmup):
                            step(pot, EPS)
                        self.sync()
                        times = self.time_runs(lambda: step(pot, EPS), args.repeats * 3)
                        st = spread(times)
                        self.records.append({
                            "sweep": True, "solver": "fused", "half_step": side, "n": n, "m": n,
                            "cost_dtype": dtype, "tiling": dataclasses.asdict(tiling), "programs_per_sm": per_sm,
                            "time_s": st, "GBps": n * n * itemsize / st["median"] / 1e9,
                            "fraction_of_copy": n * n * itemsize / st["median"] / 1e9 / copy_bw,
                            "default": tiling == K.default_tiling(side, 1, n, n, C.dtype, self.device),
                            "machine": self.machine})
            del C

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        args = self.args
        copy = self.copy_bandwidth()
        print(f"device: {self.machine.get('gpu', self.device)}; copy bandwidth {copy['GBps']:.0f} GB/s", flush=True)
        for n in args.sizes:
            t0 = time.perf_counter()
            self.run_size(n, copy["GBps"])
            print(f"n = {n}: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.sweep:
            self.sweep(copy["GBps"])
        targets = self.targets()
        out = args.out or default_out("gpu_solvers", str(self.device))
        write_json({"benchmark": "gpu_solvers", "machine": self.machine,
                    "config": {k: v for k, v in vars(args).items()}, "copy_bandwidth": copy,
                    "targets": targets, "records": self.records}, out)
        self.print_tables(copy, targets)
        print(f"wrote {out}")

    def targets(self) -> List[Dict[str, object]]:
        """The three performance targets, each with the measured figure (or why there is none)."""
        if not self.cuda or self.args.interpret:
            return [{"target": "all", "met": None, "why": "not measured: no GPU (interpreter smoke test)"}]

        def per_iter(solver, dtype, n):
            for r in self.records:
                if (r.get("solver") == solver and r.get("cost_dtype") == dtype and r.get("n") == n
                        and not r.get("sweep") and "time_per_iter_s" in r):
                    return r
            return None

        out = []
        for n in self.args.sizes:
            r = per_iter("fused", "float32", n)
            if n >= 4200 and r:
                out.append({"target": f"fused float32 >= 80% of copy bandwidth, n={n}",
                            "value": r["fraction_of_copy"], "met": r["fraction_of_copy"] >= 0.8})
        f, p = per_iter("fused", "float32", 10000), per_iter("pot-sinkhorn-log", "float32", 10000)
        if f and p:
            x = p["time_per_iter_s"]["median"] / f["time_per_iter_s"]["median"]
            out.append({"target": ">= 8x faster per iteration than POT sinkhorn_log, n=10000",
                        "value": x, "met": x >= 8})
        else:
            out.append({"target": ">= 8x faster than POT sinkhorn_log, n=10000", "met": None,
                        "why": "n=10000 not measured for both"})
        for n in self.args.sizes:
            f, h = per_iter("fused", "float32", n), per_iter("fused", "bfloat16", n)
            if f and h:
                x = f["time_per_iter_s"]["median"] / h["time_per_iter_s"]["median"]
                out.append({"target": f"bfloat16 >= 1.7x faster than float32, n={n}", "value": x, "met": x >= 1.7})
        return out

    def print_tables(self, copy, targets) -> None:
        rows = []
        for r in self.records:
            if r.get("sweep"):
                continue
            t = r.get("time_per_iter_s")
            chk = r.get("check") or {}
            rows.append({"n": r["n"], "solver": r["solver"], "cost": r["cost_dtype"],
                         "ms/iter": t["median"] * 1e3 if t else None,
                         "q1-q3 ms": f"{t['q1'] * 1e3:.3g}-{t['q3'] * 1e3:.3g}" if t else None,
                         "GB/s": r.get("GBps"), "of copy": r.get("fraction_of_copy"),
                         "agree": chk.get("agree"), "rel diff": chk.get("max_potential_diff_rel"),
                         "note": r.get("note")})
        cols = ["n", "solver", "cost", "ms/iter", "q1-q3 ms", "GB/s", "of copy", "agree", "rel diff", "note"]
        print()
        print(table(rows, cols))
        sweep = [r for r in self.records if r.get("sweep")]
        if sweep:
            print()
            print(table([{"side": r["half_step"], "cost": r["cost_dtype"], **r["tiling"],
                          "us": r["time_s"]["median"] * 1e6, "of copy": r["fraction_of_copy"],
                          "default": r["default"]} for r in sweep],
                        ["side", "cost", "block_n", "block_m", "split", "num_warps", "us", "of copy", "default"]))
        print(f"\ncopy bandwidth: {copy['GBps']:.1f} GB/s (device-to-device, read + write)")
        for t in targets:
            met = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
            val = f" ({t['value']:.3g})" if "value" in t else f" ({t.get('why')})"
            print(f"target: {t['target']}: {met}{val}")


if __name__ == "__main__":
    main()

"""Evaluation that scales out: cache hit rates of shards, processes against threads, the disk cache.

Usage::

    python benchmarks/scaling.py --root ../shared/data/PF-WILLOW-dev [--pairs 40] [--repeats 2]

Three measurements on PF-WILLOW-dev, written to ``benchmarks/results/scaling-cpu-<date>.json``
(one record each, the machine with its load average before and after every run):

1. ``hit-rate``: the per-image feature cache's hit rate when the 360 pairs are split
   into N = 1, 2, 4 shards (``--shard K/N``: grouped by image), and, for comparison,
   when pairs are dealt round-robin (pair i to shard i mod N). The real
   :class:`~scot_ot.evaluation.run.FeatureCache` is driven with a stand-in model
   (:func:`~scot_ot.evaluation.shards.simulate_cache`), so no network runs; the
   figures are exact, for the default capacity (64 images) and a small one (8).
2. ``processes-vs-threads``: the first ``--pairs`` pairs with ``torchrun
   --standalone --nproc-per-node 2 -m scot_ot eval`` (2 processes x 1 thread, gloo)
   against ``python -m scot_ot eval`` with 2 threads (``OMP_NUM_THREADS``). Pairs/s of
   the evaluation loop (the record's ``pairs_per_s``: for torchrun, all pairs over
   rank 0's wall time up to the gather) and end to end (the command's wall time,
   with start-up and model loading). Runs alternate, ``--repeats`` times each. The
   per-pair PCKs of the two are compared first (they may differ only by float
   rounding: 1 and 2 threads round convolutions differently).
3. ``disk-cache``: ``--cache-dir`` on a fresh folder (features computed and written),
   then again on the same folder (features read), 1 process x 1 thread (the figure
   to read is the ratio; one thread is the least disturbed by other load), on the
   same pairs and on ``--pairs`` pairs spread over the split (every 9th: 2 lookups
   per image, where extraction weighs most).

The machine may be shared: the load averages are in the record; compare figures
only from runs with a low load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import default_out, load_average, machine, table, write_json  # first: puts the checkout on sys.path


def hit_rates(root: str) -> list:
    from scot_ot.datasets import load_pairs
    from scot_ot.evaluation.shards import plan_shard, simulate_cache

    pairs = load_pairs("pf-willow", root).pairs
    rows = []
    for capacity in (64, 8):
        for n in (1, 2, 4):
            for layout in ("grouped", "round-robin"):
                if layout == "grouped":
                    runs = [[pairs[i] for i in plan_shard(pairs, [(k, n)]).order] for k in range(1, n + 1)]
                else:
                    runs = [list(pairs[k::n]) for k in range(n)]
                counts = [simulate_cache(r, capacity) for r in runs]
                hits, misses = sum(c["hits"] for c in counts), sum(c["misses"] for c in counts)
                rows.append({"measure": "hit-rate", "capacity": capacity, "shards": n, "layout": layout,
                             "lookups": hits + misses, "hits": hits, "extracted": misses,
                             "hit_rate": hits / (hits + misses)})
    return rows


def run(cmd: list, env: dict, cwd: Path) -> dict:
    """Run a command; its wall time, load before/after; raises with its stderr tail on failure."""
    before = load_average()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "load_before": before, "load_after": load_average()}


def eval_cmd(root: str, pairs: int, out: Path, every: int = 1, extra=()) -> list:
    return ["-m", "scot_ot", "eval", "--dataset", "pf-willow", "--root", root, "--limit", str(pairs),
            "--every", str(every), "--out", str(out), *extra]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["processes-vs-threads", "disk-cache"])
    p.add_argument("--out", default=str(default_out("scaling", "cpu")))
    args = p.parse_args()
    root = str(Path(args.root).resolve())
    repo = Path(__file__).resolve().parents[1]
    base_env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base_env.pop("OMP_NUM_THREADS", None)
    py = sys.executable
    records = hit_rates(root)
    work = Path(tempfile.mkdtemp(prefix="scot-scaling-"))
    try:
        if "processes-vs-threads" not in args.skip:
            run([py, *eval_cmd(root, 2, work / "warm.json")], {**base_env, "OMP_NUM_THREADS": "2"}, work)
            setups = {
                "2 processes x 1 thread (torchrun, gloo)":
                    ([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                     {"OMP_NUM_THREADS": "1"}),
                "1 process x 2 threads": ([py], {"OMP_NUM_THREADS": "2"}),
            }
            results = {}
            for rep in range(args.repeats):
                for s, (label, (prefix, env)) in enumerate(setups.items()):
                    out = work / f"pt-{s}-{rep}.json"
                    timing = run([*prefix, *eval_cmd(root, args.pairs, out)], {**base_env, **env}, work)
                    rec = json.loads(out.read_text())
                    results.setdefault(label, []).append((timing, rec))
            recs = [runs[0][1] for runs in results.values()]
            pck = [[q["results"]["pot-sinkhorn"]["pck"] for q in r["pairs"]] for r in recs]
            differ = sum(a != b for a, b in zip(*pck))
            for label, runs in results.items():
                for rep, (timing, rec) in enumerate(runs):
                    records.append({"measure": "processes-vs-threads", "setup": label, "repeat": rep,
                                    "pairs": rec["n_evaluated"], "pairs_per_s_loop": rec["pairs_per_s"],
                                    "pairs_per_s_end_to_end": rec["n_evaluated"] / timing["wall_s"],
                                    "pairs_with_other_pck": differ, **timing,
                                    "pck": rec["solvers"]["pot-sinkhorn"]["pck"]})
        if "disk-cache" not in args.skip:
            for every in (1, 9):
                cache = work / f"cache-{every}"
                for label in ("cold (computed, written)", "warm (read)"):
                    out = work / f"dc-{every}-{label[:4]}.json"
                    timing = run([py, *eval_cmd(root, args.pairs, out, every, ["--cache-dir", str(cache)])],
                                 {**base_env, "OMP_NUM_THREADS": "1"}, work)
                    rec = json.loads(out.read_text())
                    fc = rec["feature_cache"]
                    records.append({"measure": "disk-cache", "every": every, "run": label,
                                    "pairs": rec["n_evaluated"], "images": fc["misses"],
                                    "extracted": fc["extracted"], "disk_hits": fc.get("disk_hits"),
                                    "pairs_per_s_loop": rec["pairs_per_s"],
                                    "pairs_per_s_end_to_end": rec["n_evaluated"] / timing["wall_s"], **timing,
                                    "cache_mb": sum(f.stat().st_size for f in cache.rglob("*.pt")) / 2 ** 20,
                                    "pck": rec["solvers"]["pot-sinkhorn"]["pck"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_json({"benchmark": "scaling", "machine": machine("cpu"),
                "config": {"root": root, "pairs": args.pairs, "repeats": args.repeats, "solver": "pot-sinkhorn",
                           "image_side": 300, "note": "shared machine: see the load averages"},
                "records": records}, Path(args.out))
    print(table([r for r in records if r["measure"] == "hit-rate"],
                ["capacity", "shards", "layout", "hits", "extracted", "hit_rate"]))
    print()
    print(table([r for r in records if r["measure"] != "hit-rate"],
                ["measure", "setup", "every", "run", "pairs", "pairs_per_s_loop", "pairs_per_s_end_to_end",
                 "wall_s", "load_before"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

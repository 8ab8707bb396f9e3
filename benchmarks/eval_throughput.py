"""Evaluation throughput (pairs per second) on PF-WILLOW-dev, with and without the feature cache.

Usage::

    python benchmarks/eval_throughput.py --root ../shared/data/PF-WILLOW-dev [--pairs 45]

Runs the first ``--pairs`` pairs (one subclass: its 10 images recur across its 90
pairs, as images do in every benchmark) through :func:`scot_ot.evaluation.run.evaluate`
after a 2-pair warm-up, once with a cache of size 0 (features recomputed for both
images of every pair), once with the per-image feature cache (the default), and once
with the cache and backbone batches of ``--batch-size`` equally sized images
(prefetched from the pairs ahead). Writes
``benchmarks/results/eval-throughput-<date>.json`` and prints the rates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scot_ot.datasets import load_pairs
from scot_ot.evaluation import run
from scot_ot.matching import SCOT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--pairs", type=int, default=45)
    p.add_argument("--solver", default="pot-sinkhorn")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=f"benchmarks/results/eval-throughput-{time.strftime('%Y%m%d')}.json")
    args = p.parse_args()

    pairs = list(load_pairs("pf-willow", args.root).pairs)[: args.pairs]
    model = SCOT()
    run.evaluate(model, pairs[:2], [args.solver], progress=False)  # warm-up: graph tracing, first calls
    rows = {}
    settings = (("uncached", 0, 1), ("cached", 64, 1), ("batched", 64, args.batch_size))
    for label, capacity, batch in settings:
        rec = run.evaluate(model, pairs, [args.solver], cache_size=capacity, batch_size=batch)
        rows[label] = {"pairs_per_s": rec["pairs_per_s"], "feature_cache": rec["feature_cache"],
                       "pck": rec["solvers"][args.solver]["pck"]}
        print(f"{label:>9}: {rec['pairs_per_s']:.2f} pairs/s  (cache {rec['feature_cache']})")
    assert rows["cached"]["pck"] == rows["uncached"]["pck"], "the cache changed the results"
    rows["batched"]["batch_size"] = args.batch_size
    record = {"benchmark": "eval-throughput", "n_pairs": len(pairs), "solver": args.solver,
              "rows": rows, "versions": run.versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    run.write_json(record, Path(args.out))
    print(f"speed-up from the cache: {rows['cached']['pairs_per_s'] / rows['uncached']['pairs_per_s']:.2f}x; "
          f"from batches of {args.batch_size} on top: {rows['batched']['pairs_per_s'] / rows['cached']['pairs_per_s']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

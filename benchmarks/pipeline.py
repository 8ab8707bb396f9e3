"""End-to-end time per image pair, split by stage: features + CAM, cost, OT, RHM, transfer.

Usage::

    python benchmarks/pipeline.py --root ../shared/data/PF-WILLOW-dev [--pairs 20] [--device cuda]
        [--preset faithful|accurate] [--scot '{"image_side": 400}']

Pairs: every k-th pair of the csv so that ``--pairs`` of them span the split (rule
fixed in advance). Each pair runs from image files to transferred keypoints with no
feature cache (what ``scot-ot match`` costs); one warm-up pair is not counted.
Writes ``benchmarks/results/pipeline-<device>-<date>.json`` and prints a table.
The record also holds the process's peak resident memory (``ru_maxrss``: model,
images, features and every (N, M) buffer of the pipeline), so run one configuration
per process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scot_ot.datasets import load_pairs
from scot_ot.evaluation.run import versions, write_json
from scot_ot.matching import SCOT

STAGES = ("features", "cost", "ot", "rhm", "transfer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--solver", default=None, help="default: the preset's")
    p.add_argument("--max-iter", type=int, default=1)
    p.add_argument("--preset", default="faithful", help="a SCOT.preset name")
    p.add_argument("--scot", default="{}", help="JSON object of SCOT arguments over the preset")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = torch.device(args.device)
    all_pairs = list(load_pairs("pf-willow", args.root).pairs)
    step = max(1, len(all_pairs) // args.pairs)
    pairs = all_pairs[::step][: args.pairs]
    solver = {"solver": args.solver} if args.solver else {}
    model = SCOT.preset(args.preset, device=args.device, max_iter=args.max_iter, **solver, **json.loads(args.scot))
    args.solver = model.ot_args["solver"]

    rows = []
    for k, pair in enumerate(tqdm([pairs[0]] + pairs, desc="pairs", unit="pair")):
        sync(device)
        t0 = time.perf_counter()
        corr = model.match(pair.src_path, pair.trg_path)
        sync(device)
        t1 = time.perf_counter()
        corr.transfer(pair.src_kps)
        t2 = time.perf_counter()
        if k == 0:
            continue  # warm-up
        row = dict(corr.timings)
        row["transfer"] = t2 - t1
        row["total"] = t2 - t0
        row["n_src"], row["n_trg"] = len(corr.src), len(corr.trg)
        rows.append(row)

    med = {s: statistics.median(r[s] for r in rows) for s in STAGES + ("total",)}
    q = {s: statistics.quantiles([r[s] for r in rows], n=4) if len(rows) > 1 else [med[s]] * 3
         for s in STAGES + ("total",)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    record = {
        "benchmark": "pipeline", "device": str(device), "device_name": name,
        "cpu_count": torch.get_num_threads(), "solver": args.solver, "max_iter": args.max_iter,
        "backbone": model.backbone.name, "layers": list(model.extractor.layers), "image_side": model.image_side,
        "preset": args.preset, "config": model.config(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_pairs": len(rows), "median_s": med, "quartiles_s": q,
        "median_hyperpixels": statistics.median(r["n_src"] for r in rows),
        "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "per_pair": rows,
    }
    out = Path(args.out or f"benchmarks/results/pipeline-{device.type}-{time.strftime('%Y%m%d')}.json")
    write_json(record, out)
    print(f"\n{len(rows)} pairs, {args.solver} x{args.max_iter}, {model.backbone.name} "
          f"{tuple(model.extractor.layers)}, ~{record['median_hyperpixels']:.0f} hyperpixels per image, {device}")
    print(f"{'stage':<10} {'median s':>9} {'q1':>8} {'q3':>8}")
    for s in STAGES + ("total",):
        print(f"{s:<10} {med[s]:9.3f} {q[s][0]:8.3f} {q[s][2]:8.3f}")
    print(f"peak memory (RSS) {record['peak_rss_mb']:.0f} MB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

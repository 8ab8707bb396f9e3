"""Which EfficientNet-Lite0 blocks make good hyperpixels? PCK on PF-WILLOW-dev per layer set.

Every candidate runs the default pipeline (CAM marginals, ``pot-sinkhorn`` with one
iteration, eps 0.05, RHM, exponent 0.5). Block ids count Lite0's 16 MBConv blocks
from 0 (strides: block 0 -> 2, 1-2 -> 4, 3-4 -> 8, 5-10 -> 16, 11-15 -> 32).

Usage::

    python benchmarks/layers.py --root ../shared/data/PF-WILLOW-dev            # all candidates, all pairs
    python benchmarks/layers.py --root ... --every 4 --candidates 0,1,2        # a quick screen

``--every k`` keeps every k-th pair of the csv (a rule fixed before looking at results).
Writes ``benchmarks/results/layers-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scot_ot.datasets import load_pairs
from scot_ot.evaluation.run import evaluate, versions, write_json
from scot_ot.matching import SCOT

CANDIDATES = [
    (2, 8, 9, 10),  # closest analogue of SCOT's ResNet-101 choice (one early, several mid-late)
    (2, 8, 9, 10, 13, 14),  # + two stride-32 blocks
    (2, 4, 8, 9, 10, 13, 14),  # + a stride-8 block
    (2, 7, 8, 9, 10, 12, 13, 14),  # denser mid/late
    (2, 9, 10, 13, 14, 15),  # later blocks, incl. the last one
    (2, 10, 14),  # one block per scale
    (4, 8, 9, 10, 13, 14),  # start at stride 8: ~4x fewer hyperpixels
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--every", type=int, default=1, help="keep every k-th pair")
    p.add_argument("--candidates", default=None, help="comma-separated indices into CANDIDATES")
    p.add_argument("--out", default=f"benchmarks/results/layers-{time.strftime('%Y%m%d-%H%M')}.json")
    args = p.parse_args()

    pairs = list(load_pairs("pf-willow", args.root).pairs)[:: args.every]
    chosen = CANDIDATES if args.candidates is None else [CANDIDATES[int(i)] for i in args.candidates.split(",")]
    rows = []
    for layers in chosen:
        model = SCOT(layers=layers)
        t0 = time.perf_counter()
        rec = evaluate(model, pairs, ["pot-sinkhorn"], config={"layers": list(layers)}, progress=True)
        s = rec["solvers"]["pot-sinkhorn"]
        n_hp = len(model.hyperpixels(pairs[0].src_path))
        rows.append({"layers": list(layers), "pck": s["pck"], "per_category": s["per_category"],
                     "n_pairs": s["n_pairs"], "hyperpixels_first_image": n_hp,
                     "seconds": time.perf_counter() - t0})
        print(f"{layers}: PCK@0.05/0.10/0.15 = "
              + " / ".join(f"{100 * v:.1f}" for v in s["pck"].values()))
    record = {"benchmark": "layers", "root": args.root, "every": args.every, "n_pairs": len(pairs),
              "pipeline": "CAM, pot-sinkhorn max_iter=1, eps=0.05, RHM, exponent=0.5, 300 px",
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    write_json(record, Path(args.out))
    print(f"\n{'layers':<28}  PCK@0.05  PCK@0.10  PCK@0.15  hyperpixels  s")
    for r in rows:
        print(f"{str(tuple(r['layers'])):<28}" + "".join(f"  {100 * v:8.1f}" for v in r["pck"].values())
              + f"  {r['hyperpixels_first_image']:11d}  {r['seconds']:.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

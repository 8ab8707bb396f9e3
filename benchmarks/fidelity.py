"""End-to-end parity with SCOT's official pipeline on real pairs, one shared ResNet state dict.

Usage::

    python benchmarks/fidelity.py --root ../shared/data/PF-WILLOW-dev [--pairs 20] [--backbone resnet101]

The oracle is ``tests/reference_scot.py``: SCOT's official rules written out
independently of ``scot_ot`` (forward pass unrolled block by block, resize, CAM,
staircase, one Sinkhorn iteration from ``u = 1/N``, RHM, transfer). Both run on the
first ``--pairs`` pairs of the csv with one randomly initialised ResNet (classifier
scaled by 0.01 so its softmax does not saturate) and SCOT's layers
(2, 22, 24, 25, 27, 28, 29); ``scot_ot`` runs with its defaults otherwise. Per pair:
the share of source hyperpixels whose argmax match agrees, and the largest distance
between the two transferred keypoint sets (original target pixels). Writes
``benchmarks/results/fidelity-<backbone>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import RESULTS, machine, spread, table, write_json  # noqa: E402  (puts the checkout first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference_scot as ref  # noqa: E402

from scot_ot.datasets import load_pairs  # noqa: E402
from scot_ot.matching import SCOT  # noqa: E402

LAYERS = {"resnet101": (2, 22, 24, 25, 27, 28, 29), "resnet50": (2, 11, 12, 13)}


def compare(model: SCOT, net, pair, layers) -> dict:
    """Agreement of the argmax matches and of the transferred keypoints on one pair."""
    kps = torch.as_tensor(pair.src_kps, dtype=torch.float32)
    ref_matches, ref_kps = ref.match(net, pair.src_path, pair.trg_path, layers, kps)
    corr = model.match(pair.src_path, pair.trg_path)
    ours_kps = corr.transfer(kps)
    same_grid = corr.matches.shape == ref_matches.shape
    agree = float((corr.matches.cpu() == ref_matches).float().mean()) if same_grid else 0.0
    return {"pair": f"{Path(pair.src_path).name}->{Path(pair.trg_path).name}",
            "n_hyperpixels": int(ref_matches.numel()), "same_grid": same_grid,
            "argmax_agreement": agree,
            "max_kp_diff_px": float((ours_kps - ref_kps).norm(dim=1).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--backbone", default="resnet101", choices=sorted(LAYERS))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    layers = LAYERS[args.backbone]
    net = ref.random_resnet(args.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.save(net.state_dict(), weights)
        model = SCOT(backbone=args.backbone, weights=str(weights), layers=layers)
    pairs = list(load_pairs("pf-willow", args.root).pairs)[: args.pairs]
    rows = [compare(model, net, pair, layers) for pair in tqdm(pairs, desc="pairs")]
    agreement = [r["argmax_agreement"] for r in rows]
    diffs = [r["max_kp_diff_px"] for r in rows]
    summary = {"argmax_agreement": spread(agreement), "max_kp_diff_px": spread(diffs),
               "pairs_at_99pct": sum(a >= 0.99 for a in agreement),
               "pairs_within_1px": sum(d <= 1.0 for d in diffs), "n_pairs": len(rows)}
    out = Path(args.out) if args.out else RESULTS / f"fidelity-{args.backbone}-{time.strftime('%Y%m%d')}.json"
    write_json({"benchmark": "fidelity", "machine": machine("cpu"),
                "config": {"backbone": args.backbone, "layers": list(layers), "pairs": args.pairs,
                           "weights": "random init (seed 0), classifier x 0.01"},
                "summary": summary, "records": rows}, out)
    print(table(rows, ["pair", "n_hyperpixels", "argmax_agreement", "max_kp_diff_px"]))
    print(f"\n{summary['pairs_at_99pct']}/{len(rows)} pairs with >= 99 % argmax agreement, "
          f"{summary['pairs_within_1px']}/{len(rows)} with keypoints within 1 px; record: {out}")


if __name__ == "__main__":
    main()

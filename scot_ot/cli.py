"""``scot-ot``: command-line entry point (match, demo, eval, diagnose, solvers)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a SCOT model."""
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--layers", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="hyperpixel layer ids, comma-separated (default: the backbone's preset)")
    p.add_argument("--weights", default=None, help="checkpoint for backbones without embedded weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--max-iter", type=int, default=1,
                   help="OT iterations (default 1, SCOT's official setting)")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--no-cam", action="store_true", help="uniform marginals instead of CAM weights")
    p.add_argument("--no-rhm", action="store_true", help="skip regularised Hough matching")
    p.add_argument("--exponent", type=float, default=0.5)


def build_model(args, solver: str):
    from .matching import SCOT

    return SCOT(backbone=args.backbone, layers=args.layers, weights=args.weights, device=args.device,
                solver=solver, eps=args.eps, max_iter=args.max_iter, tol=args.tol,
                use_cam=not args.no_cam, rhm=not args.no_rhm, exponent=args.exponent)


def read_keypoints(path: str) -> torch.Tensor:
    """(K, 2) xy keypoints from a JSON list of pairs or a two-column text/CSV file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--keypoints: no such file: {p}")
    try:
        if p.suffix.lower() == ".json":
            arr = np.asarray(json.loads(p.read_text()), dtype=np.float32)
        else:
            arr = np.loadtxt(p, delimiter="," if p.suffix.lower() == ".csv" else None, ndmin=2,
                             dtype=np.float32)
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"--keypoints: cannot read {p} as (K, 2) numbers ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"--keypoints: {p} must hold K rows of x, y; got shape {arr.shape}")
    return torch.from_numpy(arr)


def run_match(model, src, trg, out: str, src_kps=None, gt_kps=None, title: str = "") -> dict:
    """Match, transfer keypoints, draw, and return a summary dict."""
    from .plotting import plot_matches

    corr = model.match(src, trg)
    pred = corr.transfer(src_kps) if src_kps is not None else None
    src_img, _ = model.prepare(src, "src")
    trg_img, _ = model.prepare(trg, "trg")
    res = corr.ot
    summary = {
        "src_hyperpixels": len(corr.src), "trg_hyperpixels": len(corr.trg),
        "grid_src": list(corr.src.grid), "grid_trg": list(corr.trg.grid),
        "solver": res.solver, "eps": res.problem.eps, "n_iters": res.n_iters,
        "marginal_error": res.error, "converged": res.converged,
        "time_s": {k: round(v, 4) for k, v in corr.timings.items()},
    }
    if pred is not None:
        summary["transferred_keypoints"] = pred.tolist()
    plot_matches(corr, src_img, trg_img, out, src_kps=src_kps, pred_kps=pred, gt_kps=gt_kps,
                 title=title or f"{res.solver}, {res.n_iters} iteration(s)")
    return summary


def print_summary(summary: dict, out: str) -> None:
    print(f"hyperpixels: {summary['src_hyperpixels']} -> {summary['trg_hyperpixels']}"
          f"  (grids {summary['grid_src']} / {summary['grid_trg']})")
    print(f"solver: {summary['solver']}  eps={summary['eps']:g}  iterations={summary['n_iters']}"
          f"  marginal error={summary['marginal_error']:.3g}")
    print("time (s): " + "  ".join(f"{k}={v:.3f}" for k, v in summary["time_s"].items()))
    if "pck@0.1" in summary:
        print(f"PCK@0.10 on the sample's keypoints: {summary['pck@0.1']:.2f}")
    print(f"wrote {out}")


def cmd_match(args) -> int:
    kps = read_keypoints(args.keypoints) if args.keypoints else None
    model = build_model(args, args.solver)
    summary = run_match(model, args.src, args.trg, args.out, src_kps=kps)
    print_summary(summary, args.out)
    return 0


def cmd_demo(args) -> int:
    from .data import sample_pair
    from .evaluation.pck import pck_per_pair

    pair = sample_pair()
    model = build_model(args, args.solver)
    summary = run_match(model, pair.src_path, pair.trg_path, args.out, src_kps=pair.src_kps,
                        gt_kps=pair.trg_kps, title=f"demo: {pair.name}")
    pred = np.asarray(summary["transferred_keypoints"])
    summary["pck@0.1"] = pck_per_pair(pred, pair.trg_kps.numpy(), pair.threshold, (0.1,))[0.1]
    print(f"sample pair: {pair.name}")
    print_summary(summary, args.out)
    return 0


def cmd_eval(args) -> int:
    from .datasets import load_pairs
    from .evaluation.run import evaluate, format_table

    loaded = load_pairs(args.dataset, args.root, split=args.split, strict=args.strict)
    pairs = list(loaded.pairs)[: args.limit] if args.limit else list(loaded.pairs)
    print(f"{args.dataset}/{args.split}: {len(loaded.pairs)} pairs read, {len(loaded.skipped)} skipped"
          + (f", evaluating the first {len(pairs)}" if args.limit else ""))
    for s in loaded.skipped[:5]:
        print(f"  skipped: {s}")
    solvers = args.solver or ["pot-sinkhorn"]
    model = build_model(args, solvers[0])
    config = {"dataset": args.dataset, "root": str(args.root), "split": args.split, "limit": args.limit,
              "backbone": args.backbone, "layers": list(model.extractor.layers), "eps": args.eps,
              "max_iter": args.max_iter, "tol": args.tol, "use_cam": not args.no_cam,
              "rhm": not args.no_rhm, "exponent": args.exponent}
    try:
        record = evaluate(model, pairs, solvers, out=Path(args.out) if args.out else None,
                          resume=args.resume, config=config, skipped=loaded.skipped)
    except KeyboardInterrupt:
        print(f"\ninterrupted: partial results in {args.out} (continue with --resume)", file=sys.stderr)
        return 130
    print(format_table(record))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_solvers(args) -> int:
    from .ot import available_solvers
    from .ot.registry import solver_table

    print(solver_table(available_solvers()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scot-ot", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("match", help="match two images and draw the correspondences")
    m.add_argument("src")
    m.add_argument("trg")
    m.add_argument("--solver", default="pot-sinkhorn")
    m.add_argument("--keypoints", help="source keypoints: JSON [[x, y], ...] or two-column text/CSV")
    m.add_argument("--out", default="match.png")
    add_model_args(m)
    m.set_defaults(func=cmd_match)

    d = sub.add_parser("demo", help="match a bundled real image pair")
    d.add_argument("--solver", default="pot-sinkhorn")
    d.add_argument("--out", default="demo.png")
    add_model_args(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="PCK on a benchmark (PF-WILLOW, PF-PASCAL, SPair-71k)")
    e.add_argument("--dataset", required=True, choices=["pf-willow", "pf-pascal", "spair"])
    e.add_argument("--root", required=True, help="the dataset folder, in its original layout")
    e.add_argument("--split", default="test")
    e.add_argument("--solver", action="append", help="solver name; repeat to compare several")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs only")
    e.add_argument("--out", default=None, help="JSON file for the results")
    e.add_argument("--resume", action="store_true", help="continue a partial --out file")
    e.add_argument("--strict", action="store_true", help="a malformed pair is an error, not a skip")
    add_model_args(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("solvers", help="list the registered OT solvers")
    s.set_defaults(func=cmd_solvers)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"scot-ot {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

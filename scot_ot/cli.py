"""``scot-ot``: command-line entry point (match, demo, eval, diagnose, solvers)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

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

    from .matching.image import load_image
    from .matching.scot import check_keypoints

    src_full, trg_full = load_image(src, "src"), load_image(trg, "trg")
    if src_kps is not None:  # fail before any computation
        check_keypoints(src_kps, src_full.shape[2], src_full.shape[1])
    corr = model.match(src_full, trg_full)
    pred = corr.transfer(src_kps) if src_kps is not None else None
    src_img, _ = model.prepare(src_full, "src")
    trg_img, _ = model.prepare(trg_full, "trg")
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
    pairs = list(loaded.pairs)[:: args.every][: args.limit]
    print(f"{args.dataset}/{args.split}: {len(loaded.pairs)} pairs read, {len(loaded.skipped)} skipped, "
          f"evaluating {len(pairs)}")
    for s in loaded.skipped[:5]:
        print(f"  skipped: {s}")
    from .evaluation.run import parse_solver_spec

    solvers = args.solver or ["pot-sinkhorn"]
    names = [parse_solver_spec(s)[0] for s in solvers]  # fail on a bad spec before any work
    model = build_model(args, names[0])
    config = {"dataset": args.dataset, "root": str(args.root), "split": args.split, "every": args.every,
              "limit": args.limit,
              "backbone": args.backbone, "layers": list(model.extractor.layers), "eps": args.eps,
              "max_iter": args.max_iter, "tol": args.tol, "use_cam": not args.no_cam,
              "rhm": not args.no_rhm, "exponent": args.exponent}
    try:
        record = evaluate(model, pairs, solvers, out=Path(args.out) if args.out else None,
                          resume=args.resume, config=config, skipped=loaded.skipped,
                          batch_size=args.batch_size)
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


def _solver_list(text: str) -> List[Tuple[str, str, dict]]:
    """``--solvers`` as (spec, name, overrides), validated before any computation.

    Comma-separated specs ``NAME[:key=value,...]`` (as ``eval --solver``); a ``key=value``
    item after a comma continues the previous spec (solver names hold no ``=``), so
    ``pot-sinkhorn,torch-absorb:max_iter=1000,tol=1e-4,pot-emd`` is three solvers.
    """
    from .evaluation.run import parse_solver_spec
    from .ot import get_solver

    specs: List[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise ValueError("--solvers: give at least one solver name")
    dup = sorted({s for s in specs if specs.count(s) > 1})
    if dup:
        raise ValueError(f"--solvers: repeated solver(s) {', '.join(dup)}")
    out = []
    for spec in specs:
        name, overrides = parse_solver_spec(spec)
        get_solver(name)
        out.append((spec, name, overrides))
    return out


def _folder_name(spec: str) -> str:
    """A file-system-safe folder name for a solver spec."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", spec)


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--masks: no such file: {p}")
    with Image.open(p) as im:
        return np.asarray(im.convert("L")) > 0


def _check_inside(kps: torch.Tensor, img: torch.Tensor, name: str) -> None:
    H, W = img.shape[-2:]
    if bool(((kps < 0) | (kps > torch.tensor([W, H]))).any()):
        raise ValueError(f"{name}: keypoints outside the image of size {W} x {H} (W x H)")


def cmd_diagnose(args) -> int:
    """Many-to-one and background diagnostics of several solvers on one image pair.

    Features (and the CAM) are computed once and shared by every solver. Everything
    is computed in a staging folder beside ``--out`` and moved into ``--out`` only
    when all solvers have succeeded, so a failure leaves nothing half-written.
    """
    import dataclasses
    import shutil
    import tempfile

    from .diagnostics import cam_foreground, diagnose, keypoint_foreground, mask_foreground
    from .evaluation.pck import pck_per_pair
    from .evaluation.run import versions, write_json
    from .matching.image import load_image
    from .plotting import plot_background_matches, plot_in_degree, plot_matches

    solvers = _solver_list(args.solvers)
    src_kps = read_keypoints(args.keypoints) if args.keypoints else None
    trg_kps = read_keypoints(args.trg_keypoints) if args.trg_keypoints else None
    if src_kps is not None and trg_kps is not None and src_kps.shape != trg_kps.shape:
        raise ValueError(f"--keypoints {tuple(src_kps.shape)} and --trg-keypoints "
                         f"{tuple(trg_kps.shape)} must hold the same number of points")
    masks = [_read_mask(m) for m in args.masks] if args.masks else None
    src_full, trg_full = load_image(args.src, "src"), load_image(args.trg, "trg")
    if src_kps is not None:
        _check_inside(src_kps, src_full, "--keypoints")
    if trg_kps is not None:
        _check_inside(trg_kps, trg_full, "--trg-keypoints")

    # the CAM is always computed (it defines the default foreground); --no-cam only
    # makes the marginals uniform
    model = build_model(argparse.Namespace(**{**vars(args), "no_cam": False}), solvers[0][1])
    hs, ht = model.hyperpixels(src_full, "src"), model.hyperpixels(trg_full, "trg")
    if args.no_cam:
        hs = dataclasses.replace(hs, weights=torch.ones_like(hs.weights))
        ht = dataclasses.replace(ht, weights=torch.ones_like(ht.weights))
    if masks is not None:
        fg = mask_foreground(hs, ht, *masks)
    elif src_kps is not None and trg_kps is not None:
        fg = keypoint_foreground(hs, ht, src_kps, trg_kps, args.margin)
    else:
        fg = cam_foreground(hs, ht, args.cam_threshold)
    src_img = model.prepare(src_full, "src")[0].cpu()
    trg_img = model.prepare(trg_full, "trg")[0].cpu()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        table = {}
        for s, name, overrides in solvers:
            corr = model.with_solver(name, **overrides).match_hyperpixels(hs, ht)
            folder = stage / _folder_name(s)
            d = diagnose(corr, fg)
            d["match_time_s"] = float(sum(corr.timings.values()))
            pred = corr.transfer(src_kps) if src_kps is not None else None
            if pred is not None and trg_kps is not None:
                span = (trg_kps.max(0).values - trg_kps.min(0).values).max()
                d["pck@0.1"] = pck_per_pair(pred, trg_kps, float(span), (0.1,))[0.1]
            label = f"{name}, {corr.ot.n_iters} it."
            plot_matches(corr, src_img, trg_img, folder / "matches.png", src_kps=src_kps,
                         pred_kps=pred, gt_kps=trg_kps, title=f"{label}: top matches")
            plot_in_degree(corr, trg_img, folder / "in_degree.png",
                           title=f"{label}: target in-degree (max {d['max_in_degree']}, "
                                 f"collision rate {d['collision_rate']:.2f})")
            plot_background_matches(corr, src_img, trg_img, fg, folder / "background.png",
                                    title=f"{label}: foreground ({fg.method}) into background "
                                          f"{d['background_rate']:.1%}")
            table[s] = d
        record = {"src": str(args.src), "trg": str(args.trg), "foreground": fg.describe(),
                  "config": {"backbone": args.backbone, "layers": list(model.extractor.layers),
                             "eps": args.eps, "max_iter": args.max_iter, "tol": args.tol,
                             "use_cam": not args.no_cam, "rhm": not args.no_rhm,
                             "exponent": args.exponent},
                  "versions": versions(), "solvers": table}
        write_json(record, stage / "diagnostics.json")
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in stage.rglob("*") if p.is_file()):
            dest = out / f.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(format_diagnostics(table, fg.describe()))
    print(f"wrote {out}/diagnostics.json and {out}/<solver>/{{matches,in_degree,background}}.png")
    return 0


def format_diagnostics(table: dict, foreground: dict) -> str:
    """Side-by-side table of :func:`cmd_diagnose`'s per-solver diagnostics."""
    cols = [("iters", "n_iters", "d"), ("marg.err", "marginal_error", ".2e"),
            ("collision", "collision_rate", ".3f"), ("plan coll.", "plan_collision_rate", ".3f"),
            ("max in", "max_in_degree", "d"), ("eff/N", "effective_target_ratio", ".3f"),
            ("mutualNN", "mutual_nn_rate", ".3f"), ("backgr.", "background_rate", ".3f"),
            ("PCK@.1", "pck@0.1", ".2f"), ("OT s", "time_s", ".3f")]
    cols = [c for c in cols if all(c[1] in d for d in table.values())]
    w = max([24] + [len(s) + 1 for s in table])
    lines = [f"foreground: {foreground['method']} "
             f"(src {foreground['src_fraction']:.0%}, trg {foreground['trg_fraction']:.0%} of hyperpixels)",
             f"{'solver':<{w}}" + "".join(f" {name:>10}" for name, _, _ in cols)]
    for s, d in table.items():
        lines.append(f"{s:<{w}}" + "".join(f" {d[key]:>10{fmt}}" for _, key, fmt in cols))
    return "\n".join(lines)


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
    e.add_argument("--solver", action="append",
                   help="NAME or NAME:key=value,... (e.g. torch-absorb:max_iter=1000,tol=1e-4); "
                        "repeat to compare several")
    e.add_argument("--every", type=int, default=1, help="keep every K-th pair (a fixed subsample)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N (kept) pairs only")
    e.add_argument("--out", default=None, help="JSON file for the results")
    e.add_argument("--resume", action="store_true", help="continue a partial --out file")
    e.add_argument("--strict", action="store_true", help="a malformed pair is an error, not a skip")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per backbone batch, equal shapes only (default: 8 on cuda, 1 on cpu)")
    add_model_args(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("diagnose", help="many-to-one and background diagnostics of several solvers")
    g.add_argument("src")
    g.add_argument("trg")
    g.add_argument("--solvers", default="pot-sinkhorn,torch-log,pot-emd",
                   help="comma-separated solvers, each NAME or NAME:key=value,... to override "
                        "--eps/--max-iter/--tol for it, e.g. pot-sinkhorn,torch-absorb:max_iter=1000,"
                        "tol=1e-4,pot-emd (default: pot-sinkhorn,torch-log,pot-emd)")
    g.add_argument("--keypoints", help="source keypoints: JSON [[x, y], ...] or two-column text/CSV")
    g.add_argument("--trg-keypoints", help="target keypoints (same format); with --keypoints, the "
                   "foreground is the keypoint box and PCK@0.1 is reported")
    g.add_argument("--masks", nargs=2, metavar=("SRC_MASK", "TRG_MASK"),
                   help="foreground masks (images, nonzero = foreground); take precedence")
    g.add_argument("--margin", type=float, default=0.1,
                   help="keypoint-box foreground: widen the box by this fraction of its sides")
    g.add_argument("--cam-threshold", type=float, default=0.5,
                   help="CAM foreground (used without keypoints or masks): CAM > threshold")
    g.add_argument("--out", default="diagnostics", help="output folder")
    add_model_args(g)
    g.set_defaults(func=cmd_diagnose)

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

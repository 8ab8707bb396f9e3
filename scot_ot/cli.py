"""``scot-ot``: command-line entry point (match, demo, eval, merge, diagnose, solvers).

Every argument, solver spec and output path is checked before any image is read;
a mistake ends the command with one line on stderr, ``scot-ot CMD: error: ...``,
that names the argument or file, and exit status 2. Nothing half-written is left
behind: outputs are written atomically (:mod:`scot_ot.outputs`). Ctrl-C exits with
130 and SIGTERM with 143, after ``eval`` has saved its partial results.
``docs/bad-inputs.md`` lists the messages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .evaluation.run import MARGINALS
from .matching.hyperpixels import HYPERPIXEL_NORMS
from .matching.scot import COST_PRECISIONS, PRESETS

#: the OT arguments and the flags that set them
OT_FLAGS = {"eps": "--eps", "max_iter": "--max-iter", "tol": "--tol", "check_every": "--check-every",
            "reg_m": "--reg-m"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt`` (so the same cleanup runs)."""


#: torchrun ranks other than 0 say nothing on stdout and no progress (rank 0 speaks for the run)
_QUIET = False


def progress(message: str) -> None:
    """One line on stderr saying what the command is doing (stdout keeps the results)."""
    if not _QUIET:
        print(f"scot-ot: {message} ...", file=sys.stderr, flush=True)


def layer_list(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


layer_list.__name__ = "comma-separated layer ids"


def layer_lists(text: str) -> Tuple[Tuple[int, ...], ...]:
    return tuple(layer_list(part) for part in text.split("/"))


layer_lists.__name__ = "'/'-separated lists of comma-separated layer ids"


def name_list(text: str) -> Tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(x.strip() for x in text.split(",") if x.strip())


name_list.__name__ = "comma-separated backbone names"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a SCOT model."""
    p.add_argument("--preset", choices=tuple(PRESETS), default="faithful",
                   help="a named configuration: faithful (SCOT's official code) or accurate (docs/accuracy.md); "
                        "the other options change it")
    # None: the preset's value (resolve_preset_defaults), so that --preset alone reproduces the preset
    p.add_argument("--backbone", default=None, help="the backbone (default: the preset's, efficientnet-lite0)")
    p.add_argument("--ensemble", type=name_list, default=None,
                   help="more backbones whose hyperpixels join the first's, comma-separated, or 'none' "
                        "(default: the preset's)")
    p.add_argument("--hyperpixel-norm", choices=HYPERPIXEL_NORMS, default=None,
                   help="joint (SCOT: one L2 norm over all layers) or layer (each layer normalised first); "
                        "default: the preset's")
    p.add_argument("--cost-precision", choices=COST_PRECISIONS, default=None,
                   help="precision of the cost's matrix product: full (SCOT) or bfloat16 (faster on CPUs "
                        "with AVX512-BF16); default: the preset's")
    p.add_argument("--layers", type=layer_list, default=None,
                   help="hyperpixel layer ids, comma-separated (default: the backbone's preset)")
    p.add_argument("--ensemble-layers", type=layer_lists, default=None,
                   help="layer ids of each --ensemble backbone, comma-separated, the backbones separated by '/' "
                        "(default: the preset's with the preset's ensemble, else each backbone's default)")
    p.add_argument("--weights", default=None, help="checkpoint for backbones without embedded weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--eps", type=float, default=None, help="entropic regularisation (default: the preset's)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="OT iterations (default: the preset's; 1 in both, SCOT's official setting)")
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--marginals", choices=MARGINALS, default="cam",
                   help="marginal weights: cam (SCOT's default), mask (SCOT's FCN variant: the foreground "
                        "masks of --masks; eval and diagnose), uniform")
    p.add_argument("--no-rhm", action="store_true", help="skip regularised Hough matching")
    p.add_argument("--exponent", type=float, default=None, help="score exponent (default: the preset's)")


#: model options whose default is the preset's value: argparse dest -> SCOT argument
PRESET_FLAGS = {"backbone": "backbone", "ensemble": "ensemble", "hyperpixel_norm": "hyperpixel_norm",
                "cost_precision": "cost_precision", "eps": "eps", "max_iter": "max_iter", "tol": "tol",
                "exponent": "exponent"}


def resolve_preset_defaults(args) -> None:
    """Fill every model option left unset with the value of ``--preset``'s configuration."""
    from .matching import SCOT

    preset = SCOT.preset_arguments(args.preset)
    for dest, arg in PRESET_FLAGS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, preset[arg])
    # the preset's layer ids belong to the preset's backbones: another backbone or ensemble takes its defaults
    if getattr(args, "layers", None) is None and args.backbone == preset["backbone"]:
        args.layers = preset["layers"]
    if getattr(args, "ensemble_layers", None) is None and tuple(args.ensemble) == tuple(preset["ensemble"]):
        args.ensemble_layers = preset["ensemble_layers"]
    if getattr(args, "solver", "") is None:  # match, demo, eval without --solver: the preset's solver
        args.solver = preset["solver"]


# ---------------------------------------------------------------------------- checks
def _as_flag(message: str, overrides: Optional[dict] = None, spec: Optional[str] = None,
             flag: str = "--solver") -> str:
    """Put the flag (or the ``--solver`` spec) that set an argument in front of a library message ``"name: ..."``."""
    head, sep, rest = message.partition(":")
    if sep and overrides is not None and head in overrides:
        return f"{flag} {spec!r}: {message}"
    if sep and head in OT_FLAGS:
        return f"{OT_FLAGS[head]}: {rest.strip()}"
    if sep and head in ("device", "exponent"):
        return f"--{head}: {rest.strip()}"
    if sep and head == "solver":
        return f"--solver: {rest.strip()}"
    if spec is not None:
        return f"{flag} {spec!r}: {message}"
    return message


def check_solver_specs(specs: List[str], args, flag: str = "--solver") -> List[Tuple[str, str, dict]]:
    """``(spec, name, overrides)`` for each spec, after checking name, options and values with the base flags."""
    import torch

    from .evaluation.run import parse_solver_spec
    from .matching.scot import check_ot_args
    from .ot import SolverUnavailableError, check_solver_device

    dup = sorted({s for s in specs if specs.count(s) > 1})
    if dup:
        raise ValueError(f"{flag}: repeated solver(s) {', '.join(dup)}")
    base = {"eps": args.eps, "max_iter": args.max_iter, "tol": args.tol}
    out = []
    for spec in specs:
        try:
            name, overrides = parse_solver_spec(spec)
        except ValueError as e:
            raise ValueError(f"{flag}:{str(e).removeprefix('--solver:')}") from None
        try:
            check_ot_args(name, **{**base, **overrides})
        except ValueError as e:
            msg = str(e)
            if msg.startswith("solver:") or "does not take option" in msg:
                raise ValueError(f"{flag} {spec!r}: {msg.removeprefix('solver: ')}") from None
            raise ValueError(_as_flag(msg, overrides, spec, flag)) from None
        try:
            check_solver_device(name, torch.device(args.device))  # (--device checked by check_model_args)
        except SolverUnavailableError as e:
            raise ValueError(f"{flag}: {e}") from None  # (the message names the solver)
        out.append((spec, name, overrides))
    return out


def check_model_args(args) -> None:
    """Backbone, device, weights, exponent and marginals, before anything is loaded."""
    from .features import available_backbones
    from .matching.scot import check_device, check_ensemble

    resolve_preset_defaults(args)
    if args.marginals == "mask" and not getattr(args, "masks", None):
        where = ("give the masks with --masks" if hasattr(args, "masks")
                 else "masks come with 'scot-ot eval --masks DIR' and 'scot-ot diagnose --masks SRC TRG'")
        raise ValueError(f"--marginals mask: needs foreground masks; {where}")
    if args.backbone not in available_backbones():
        raise ValueError(f"--backbone: unknown backbone {args.backbone!r}; available: "
                         f"{', '.join(available_backbones())}")
    try:
        check_ensemble(args.backbone, args.ensemble)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    try:
        check_device(args.device)
    except ValueError as e:
        raise ValueError(_as_flag(str(e))) from None
    if not 0 < args.exponent < float("inf"):
        raise ValueError(f"--exponent: must be a finite number > 0, got {args.exponent!r}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise ValueError(f"--weights: no such file: {args.weights}")


def check_picture_out(path: str) -> Path:
    """``--out`` for a figure: a writable file whose extension names a format matplotlib writes."""
    from .outputs import PICTURE_FORMATS, check_output_file
    from .plotting import pyplot

    pyplot()  # ImportError naming the extra, before any work
    return check_output_file(path, "--out", PICTURE_FORMATS)


def build_model(args, solver: str):
    from .features.backbone import CheckpointError, WeightsNotFoundError
    from .matching import SCOT

    progress(f"loading the {args.backbone} backbone")
    try:
        return SCOT.preset(args.preset, backbone=args.backbone, layers=args.layers, weights=args.weights,
                           device=args.device, solver=solver, eps=args.eps, max_iter=args.max_iter, tol=args.tol,
                           use_cam=args.marginals != "uniform", rhm=not args.no_rhm, exponent=args.exponent,
                           ensemble=args.ensemble, ensemble_layers=args.ensemble_layers,
                           hyperpixel_norm=args.hyperpixel_norm, cost_precision=args.cost_precision)
    except (CheckpointError, WeightsNotFoundError) as e:
        raise ValueError(f"--weights: {e}" if args.weights else str(e)) from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("ensemble_layers:"):
            raise ValueError(f"--ensemble-layers: {msg.removeprefix('ensemble_layers: ')}") from None
        if msg.startswith("layers:"):
            raise ValueError(f"--layers:{msg.removeprefix('layers:')}") from None
        raise ValueError(_as_flag(msg)) from None


def model_config(model) -> dict:
    """What a command records of its model: the preset and the full configuration, less the solver
    (each ``--solver`` spec says its own) and ``use_cam`` (``marginals`` says it)."""
    cfg = model.config()
    for key in ("solver", "use_cam"):
        cfg.pop(key, None)
    return cfg


def read_keypoints(path: str, flag: str = "--keypoints") -> torch.Tensor:
    """(K, 2) xy keypoints from a JSON list of pairs or a two-column text/CSV file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag}: no such file: {p}")
    try:
        if p.suffix.lower() == ".json":
            arr = np.asarray(json.loads(p.read_text()), dtype=np.float32)
        else:
            arr = np.loadtxt(p, delimiter="," if p.suffix.lower() == ".csv" else None, ndmin=2,
                             dtype=np.float32)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {p} as (K, 2) numbers ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{flag}: {p} must hold K >= 1 rows of x, y; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{flag}: {p} holds NaN or infinite coordinates")
    return torch.from_numpy(arr)


# ---------------------------------------------------------------------------- match / demo
def run_match(model, src, trg, out: Path, src_kps=None, gt_kps=None, title: str = "") -> dict:
    """Match, transfer keypoints, draw, and return a summary dict."""
    import time

    from .evaluation.run import check_result
    from .matching.image import load_image
    from .matching.scot import check_keypoints
    from .plotting import plot_matches

    src_full, trg_full = load_image(src, "src"), load_image(trg, "trg")
    if src_kps is not None:  # fail before any computation
        check_keypoints(src_kps, src_full.shape[2], src_full.shape[1])
    progress("extracting features and CAM of both images")
    t = time.perf_counter()
    hs, ht = model.hyperpixels(src_full, "src"), model.hyperpixels(trg_full, "trg")
    t_feat = time.perf_counter() - t
    progress(f"solving OT with {model.ot_args['solver']} and matching")
    corr = model.match_hyperpixels(hs, ht)
    corr.timings["features"] = t_feat
    res = corr.ot
    check_result(res)
    pred = corr.transfer(src_kps) if src_kps is not None else None
    src_img, _ = model.prepare(src_full, "src")
    trg_img, _ = model.prepare(trg_full, "trg")
    summary = {
        "src_hyperpixels": len(corr.src), "trg_hyperpixels": len(corr.trg),
        "grid_src": list(corr.src.grid), "grid_trg": list(corr.trg.grid),
        "solver": res.solver, "eps": res.problem.eps, "n_iters": res.n_iters,
        "marginal_error": res.error, "converged": res.converged,
        "time_s": {k: round(v, 4) for k, v in corr.timings.items()},
    }
    if pred is not None:
        summary["source_keypoints"] = torch.as_tensor(src_kps).tolist()
        summary["transferred_keypoints"] = pred.tolist()
    progress(f"drawing {out}")
    plot_matches(corr, src_img.cpu(), trg_img.cpu(), out, src_kps=src_kps, pred_kps=pred, gt_kps=gt_kps,
                 title=title or f"{res.solver}, {res.n_iters} iteration(s)")
    return summary


def print_summary(summary: dict, out) -> None:
    print(f"hyperpixels: {summary['src_hyperpixels']} -> {summary['trg_hyperpixels']}"
          f"  (grids {summary['grid_src']} / {summary['grid_trg']})")
    print(f"solver: {summary['solver']}  eps={summary['eps']:g}  iterations={summary['n_iters']}"
          f"  marginal error={summary['marginal_error']:.3g}")
    print("time (s): " + "  ".join(f"{k}={v:.3f}" for k, v in summary["time_s"].items()))
    if "pck@0.1" in summary:
        print(f"PCK@0.10 on the sample's keypoints: {summary['pck@0.1']:.2f}")
    print(f"wrote {out}")


def print_keypoints(summary: dict) -> None:
    print("transferred keypoints (x, y in original pixels, source -> target):")
    for k, ((x0, y0), (x1, y1)) in enumerate(zip(summary["source_keypoints"], summary["transferred_keypoints"])):
        print(f"  {k + 1:3d}: ({x0:8.2f}, {y0:8.2f}) -> ({x1:8.2f}, {y1:8.2f})")


def cmd_match(args) -> int:
    from .matching.image import load_image
    from .matching.scot import check_keypoints
    from .outputs import check_output_file, write_json

    out = check_picture_out(args.out)
    kps_out = None
    if args.kps_out is not None:
        if not args.keypoints:
            raise ValueError("--kps-out: give --keypoints too (the source keypoints to transfer)")
        kps_out = check_output_file(args.kps_out, "--kps-out", ("json",))
    check_model_args(args)
    ((_, name, overrides),) = check_solver_specs([args.solver], args)
    kps = read_keypoints(args.keypoints) if args.keypoints else None
    src, trg = load_image(args.src, "SRC"), load_image(args.trg, "TRG")  # decoded before the model loads
    if kps is not None:
        try:
            check_keypoints(kps, src.shape[2], src.shape[1])
        except ValueError as e:
            raise ValueError(f"--keypoints {args.keypoints}: {e}") from None
    model = build_model(args, name).with_solver(name, **overrides)
    summary = run_match(model, src, trg, out, src_kps=kps)
    if kps is not None:
        print_keypoints(summary)
    if kps_out is not None:
        write_json({"src": str(args.src), "trg": str(args.trg), "solver": args.solver,
                    "source_keypoints": summary["source_keypoints"],
                    "transferred_keypoints": summary["transferred_keypoints"]}, kps_out)
        print(f"wrote {kps_out}")
    print_summary(summary, out)
    return 0


def cmd_demo(args) -> int:
    from .data import sample_pair
    from .evaluation.pck import pck_per_pair

    out = check_picture_out(args.out)
    check_model_args(args)
    ((_, name, overrides),) = check_solver_specs([args.solver], args)
    pair = sample_pair()
    model = build_model(args, name).with_solver(name, **overrides)
    summary = run_match(model, pair.src_path, pair.trg_path, out, src_kps=pair.src_kps,
                        gt_kps=pair.trg_kps, title=f"demo: {pair.name}")
    pred = np.asarray(summary["transferred_keypoints"])
    summary["pck@0.1"] = pck_per_pair(pred, pair.trg_kps.numpy(), pair.threshold, (0.1,))[0.1]
    print(f"sample pair: {pair.name}")
    print_summary(summary, out)
    return 0


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    """PCK of one or several solvers on a split; a shard of it with ``--shard K/N``; one rank's under torchrun."""
    from .datasets import DatasetError, load_pairs
    from .datasets.masks import MaskFolder
    from .evaluation import distributed
    from .evaluation.run import evaluate, format_table, read_results, run_config
    from .evaluation.shards import parse_shard, plan_shard
    from .outputs import check_output_dir, check_output_file

    global _QUIET
    launch = distributed.launch_from_env()  # None unless started by torchrun
    lead = launch is None or launch.rank == 0  # the process that prints the results
    _QUIET = not lead
    say = print if lead else (lambda *a, **k: None)
    if launch is not None:
        args.device = distributed.resolve_device(args.device, launch)
    elif args.device is None:
        args.device = "cpu"
    check_model_args(args)
    solvers = args.solver if isinstance(args.solver, list) else [args.solver]
    specs = check_solver_specs(solvers, args)
    for flag, value in (("--every", args.every), ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: must be an integer >= 1, got {value}")
    levels = [parse_shard(args.shard)] if args.shard is not None else []
    cache_dir = check_output_dir(args.cache_dir, "--cache-dir") if args.cache_dir is not None else None
    masks = MaskFolder(args.masks, "--masks") if args.masks is not None else None
    gallery = check_gallery_args(args, solvers, sharded=bool(levels) or launch is not None)
    out = check_output_file(args.out, "--out") if args.out else None
    part = launch.part_file(out) if launch is not None and out is not None else out  # what this process saves
    if args.resume:
        if out is None:
            raise ValueError("--resume: give --out FILE, the partial results to continue")
        if part.is_file():
            read_results(part)  # a results file? (its configuration is compared once the model is built)
        elif part != out and out.is_file():
            read_results(out)  # a merged torchrun record: this rank continues from its pairs
        else:
            say(f"--resume: {part} does not exist yet; starting a new run", file=sys.stderr)

    try:
        loaded = load_pairs(args.dataset, args.root, split=args.split, strict=args.strict)
    except DatasetError as e:
        raise DatasetError(f"{'--strict' if args.strict and e.line is not None else '--root'}: {e}") from None
    pairs = list(loaded.pairs)[:: args.every][: args.limit]
    if launch is not None:
        levels.append((launch.rank + 1, launch.world_size))
    plan = plan_shard(pairs, levels) if levels else None
    todo = [pairs[i] for i in plan.order] if plan is not None else pairs
    where = ""
    if plan is not None:
        where = (f" on {launch.world_size} ranks" if launch is not None else "") + \
                (f", shard {args.shard}" if args.shard is not None else "")
        where += f" ({'rank 0: ' if launch is not None else ''}{len(todo)} pairs, grouped by image)"
    say(f"{args.dataset}/{args.split}: {len(loaded.pairs)} pairs read, {len(loaded.skipped)} skipped, "
        f"evaluating {len(pairs)}{where}")
    for s in loaded.skipped[:5]:
        say(f"  skipped: {s}")
    if not pairs:
        first = f" (first skipped: {loaded.skipped[0]})" if loaded.skipped else ""
        raise ValueError(f"--root {args.root}: no pair to evaluate in {args.dataset}/{args.split}: "
                         f"{len(loaded.pairs)} read, {len(loaded.skipped)} skipped{first}")
    if not todo:
        n_shards = int(np.prod([n for _, n in levels]))
        who = (f"--shard {args.shard}" if args.shard is not None else "torchrun") + \
              (f" ({launch.label})" if launch is not None else "")
        raise ValueError(f"{who}: this shard holds no pair: {len(pairs)} pair(s) to evaluate cannot fill "
                         f"{n_shards} shards; use at most {len(pairs)}")

    if launch is not None:
        threads = distributed.threads_per_rank(launch)
        if threads is not None:
            torch.set_num_threads(threads)
    model = build_model(args, specs[0][1])
    config = {"dataset": args.dataset, "root": str(Path(args.root).resolve()), "split": args.split,
              "every": args.every, "limit": args.limit, **model_config(model)}
    if levels:
        config["shard"] = [list(lv) for lv in levels]
    if args.resume and part != out and not part.is_file() and out.is_file():
        from .evaluation.pck import DEFAULT_ALPHAS

        full = run_config(config, solvers, DEFAULT_ALPHAS, args.marginals, masks)  # as evaluate() has it
        distributed.seed_part(out, part, full, {p.pair_id for p in todo})
    if launch is not None:
        distributed.init(launch, args.device)
    t_start = time.perf_counter()
    try:
        record = evaluate(model, todo, solvers, out=part, resume=args.resume, config=config,
                          skipped=loaded.skipped, batch_size=args.batch_size, strict=args.strict,
                          cache_dir=cache_dir, shard=plan.record(pairs) if plan is not None else None,
                          progress=lead, masks=masks, marginals=args.marginals)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if launch is not None and part is not None:
            saved = (f"partial results in {out.with_name(out.stem + '.part-*-of-' + str(launch.world_size))}"
                     f"{out.suffix} (continue with --resume)")
        else:
            saved = (f"partial results in {out} (continue with --resume)" if out is not None and out.is_file()
                     else "nothing saved")
        if lead:
            print(f"\nscot-ot eval: {what}: {saved}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    if launch is not None:
        record = _gather_ranks(launch, record, out, part, time.perf_counter() - t_start)
        if record is None:
            return 0
    print(format_table(record))
    new_skips = record["skipped"][len(loaded.skipped):]
    if new_skips:
        print(f"\nskipped while running: {len(new_skips)} pair(s)")
        for s in new_skips[:5]:
            print(f"  skipped: {s}")
    if out is not None:
        print(f"wrote {out}")
    if gallery is not None:
        print(f"wrote {write_eval_gallery(model, todo, record, gallery, args, masks)}")
    return _dead_solvers(record, "eval")


def check_gallery_args(args, solvers: List[str], sharded: bool) -> Optional[Path]:
    """``--gallery`` DIR checked (with ``--gallery-size`` and ``--gallery-compare``) before any work, or None."""
    from .evaluation.gallery import check_compare, check_size
    from .outputs import check_output_dir
    from .plotting import pyplot

    if args.gallery is None:
        if args.gallery_compare is not None:
            raise ValueError("--gallery-compare: only with --gallery DIR")
        return None
    if sharded:
        raise ValueError("--gallery: draw it from the merged run (no --shard, no torchrun)")
    pyplot()  # ImportError naming the plot extra
    check_size(args.gallery_size)
    check_compare({"config": {"solvers": solvers}}, args.gallery_compare)
    return check_output_dir(args.gallery, "--gallery")


def write_eval_gallery(model, pairs, record: dict, folder: Path, args, masks) -> Path:
    """The failure gallery of an eval run, with the run's marginals and foreground."""
    from .evaluation.gallery import write_gallery
    from .evaluation.run import FeatureCache, foreground_source, with_marginals

    solvers = record["config"]["solvers"]
    compare = args.gallery_compare or (tuple(solvers[:2]) if len(solvers) > 1 else None)
    run_model, mask_for = with_marginals(model, args.marginals, masks)
    cache = FeatureCache(run_model, capacity=8, mask_for=mask_for)
    progress(f"drawing the gallery in {folder}")
    return write_gallery(run_model, pairs, record, folder, size=args.gallery_size, compare=compare,
                         foreground=foreground_source(masks)[0], features=cache.get)


def _gather_ranks(launch, record: dict, out: Optional[Path], part: Optional[Path], wall_s: float) -> Optional[dict]:
    """Rank 0: the merged record of every rank (written to ``out``); other ranks: None. Part files go after."""
    from .evaluation import distributed
    from .evaluation.merge import merge_records
    from .outputs import write_json

    try:
        records = distributed.gather_records(launch, record)
        merged = None
        if launch.rank == 0:
            n_new = sum(r.get("n_new", 0) for r in records)
            merged = merge_records(records, [f"rank {r}" for r in range(launch.world_size)],
                                   pairs_per_s=n_new / wall_s if n_new and wall_s > 0 else None)
            merged["ranks"] = {"world_size": launch.world_size, "threads_per_rank": torch.get_num_threads(),
                               "wall_s": wall_s}
            if out is not None:
                write_json(merged, out)
        distributed.broadcast(launch, True)  # --out is complete: the part files may go
    finally:
        distributed.close()
    if part is not None and part != out:
        part.unlink(missing_ok=True)
    return merged


def _dead_solvers(record: dict, command: str) -> int:
    """1 (with one error line) if a solver failed on every pair, else 0."""
    dead = [s for s, v in record["solvers"].items() if v["n_pairs"] == 0]
    if dead:
        first = record["solvers"][dead[0]]["first_failure"]
        print(f"scot-ot {command}: error: solver(s) {', '.join(dead)} failed on every pair "
              f"(first: {first['pair_id']}: {first['reason']})", file=sys.stderr)
        return 1
    return 0


def cmd_merge(args) -> int:
    """Merge the shard files of one run (``--shard K/N`` outputs) into one record."""
    from .evaluation.merge import merge_records, read_shard
    from .evaluation.run import format_table
    from .outputs import check_output_file, write_json

    out = check_output_file(args.out, "--out")
    for f in args.files:
        if Path(f).resolve() == out.resolve():
            raise ValueError(f"--out {args.out}: is one of the shard files; give another name")
    records = [read_shard(f, "FILE") for f in args.files]
    record = merge_records(records, [str(f) for f in args.files])
    write_json(record, out)
    print(format_table(record))
    print(f"\nmerged {len(records)} shard file(s): {record['n_evaluated']} pairs evaluated, "
          f"{record['n_skipped']} skipped")
    print(f"wrote {out}")
    return _dead_solvers(record, "merge")


def cmd_solvers(args) -> int:
    from .ot import available_solvers
    from .ot.registry import solver_table

    print(solver_table(available_solvers()))
    return 0


# ---------------------------------------------------------------------------- diagnose
def _split_specs(text: str) -> List[str]:
    """Comma-separated specs ``NAME[:key=value,...]``; a ``key=value`` item after a comma
    continues the previous spec (solver names hold no ``=``)."""
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
    return specs


def _folder_name(spec: str) -> str:
    """A file-system-safe folder name for a solver spec."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", spec)


def _check_inside(kps: torch.Tensor, img: torch.Tensor, name: str) -> None:
    H, W = img.shape[-2:]
    if bool(((kps < 0) | (kps > torch.tensor([W, H]))).any()):
        raise ValueError(f"{name}: keypoints outside the image of size {W} x {H} (W x H)")


def cmd_diagnose(args) -> int:
    """Many-to-one and background diagnostics of several solvers on one image pair.

    Features (and the CAM) are computed once and shared by every solver. A solver
    that fails numerically is recorded as failed (with its reason) and the others go
    on. Everything is computed in a staging folder beside ``--out`` and moved into
    ``--out`` only at the end, so a failure leaves nothing half-written.
    """
    import dataclasses
    import shutil
    import tempfile

    from .datasets.masks import read_mask
    from .diagnostics import cam_foreground, diagnose, keypoint_foreground, mask_foreground
    from .evaluation.pck import pck_per_pair
    from .evaluation.run import check_result, versions
    from .matching.image import load_image
    from .outputs import check_output_dir, write_json
    from .plotting import plot_background_matches, plot_in_degree, plot_matches, pyplot

    pyplot()
    out = check_output_dir(args.out, "--out")
    check_model_args(args)
    solvers = check_solver_specs(_split_specs(args.solvers), args, flag="--solvers")
    if not args.margin >= 0:
        raise ValueError(f"--margin: must be >= 0, got {args.margin}")
    src_kps = read_keypoints(args.keypoints) if args.keypoints else None
    trg_kps = read_keypoints(args.trg_keypoints, "--trg-keypoints") if args.trg_keypoints else None
    if src_kps is not None and trg_kps is not None and src_kps.shape != trg_kps.shape:
        raise ValueError(f"--keypoints {tuple(src_kps.shape)} and --trg-keypoints "
                         f"{tuple(trg_kps.shape)} must hold the same number of points")
    src_full, trg_full = load_image(args.src, "src"), load_image(args.trg, "trg")
    masks = ([read_mask(m, (img.shape[2], img.shape[1]), "--masks")
              for m, img in zip(args.masks, (src_full, trg_full))] if args.masks else None)
    if src_kps is not None:
        _check_inside(src_kps, src_full, "--keypoints")
    if trg_kps is not None:
        _check_inside(trg_kps, trg_full, "--trg-keypoints")

    # the CAM is computed unless masks replace it (it defines the default foreground);
    # --marginals uniform only makes the marginals uniform
    model = build_model(argparse.Namespace(**{**vars(args), "marginals": "cam"}), solvers[0][1])
    progress("extracting features and CAM of both images")
    by_mask = masks if args.marginals == "mask" else (None, None)
    hs, ht = model.hyperpixels(src_full, "src", by_mask[0]), model.hyperpixels(trg_full, "trg", by_mask[1])
    if args.marginals == "uniform":
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

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        table: Dict[str, dict] = {}
        for s, name, overrides in solvers:
            progress(f"solving OT with {s}")
            try:
                corr = model.with_solver(name, **overrides).match_hyperpixels(hs, ht)
                check_result(corr.ot)
            except FloatingPointError as e:
                table[s] = {"failed": f"{type(e).__name__}: {e}"}
                continue
            folder = stage / _folder_name(s)
            d = diagnose(corr, fg)
            d["match_time_s"] = float(sum(corr.timings.values()))
            pred = corr.transfer(src_kps) if src_kps is not None else None
            if pred is not None and trg_kps is not None:
                span = (trg_kps.max(0).values - trg_kps.min(0).values).max()
                d["pck@0.1"] = pck_per_pair(pred, trg_kps, float(span), (0.1,))[0.1]
            label = f"{name}, {corr.ot.n_iters} it."
            plot_matches(corr, src_img, trg_img, folder / "matches.png", src_kps=src_kps,
                         pred_kps=pred, gt_kps=trg_kps, title=f"{label}: mutual foreground matches")
            plot_in_degree(corr, trg_img, folder / "in_degree.png",
                           title=f"{label}: target in-degree (max {d['max_in_degree']}, "
                                 f"collision rate {d['collision_rate']:.2f})")
            bg = d["background_rate"]
            plot_background_matches(corr, src_img, trg_img, fg, folder / "background.png",
                                    title=f"{label}: foreground ({fg.method}) into background "
                                          + (f"{bg:.1%}" if bg is not None and bg == bg else "(no foreground)"))
            table[s] = d
        failed = [s for s, d in table.items() if "failed" in d]
        if len(failed) == len(table):
            reasons = "; ".join(f"{s}: {table[s]['failed']}" for s in failed)
            raise FloatingPointError(f"every solver failed, nothing written: {reasons}")
        record = {"src": str(args.src), "trg": str(args.trg), "foreground": fg.describe(),
                  "config": {**model_config(model), "marginals": args.marginals},
                  "versions": versions(), "solvers": table, "n_failed": len(failed)}
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
    """Side-by-side table of :func:`cmd_diagnose`'s per-solver diagnostics (failed solvers with their reason)."""
    cols = [("iters", "n_iters", "d"), ("marg.err", "marginal_error", ".2e"),
            ("collision", "collision_rate", ".3f"), ("plan coll.", "plan_collision_rate", ".3f"),
            ("max in", "max_in_degree", "d"), ("eff/N", "effective_target_ratio", ".3f"),
            ("mutualNN", "mutual_nn_rate", ".3f"), ("backgr.", "background_rate", ".3f"),
            ("PCK@.1", "pck@0.1", ".2f"), ("OT s", "time_s", ".3f")]
    ok = [d for d in table.values() if "failed" not in d]
    cols = [c for c in cols if all(c[1] in d for d in ok)]
    w = max([24] + [len(s) + 1 for s in table])

    def cell(v, fmt: str) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return f" {'-':>10}"
        return f" {v:>10{fmt}}"

    lines = [f"foreground: {foreground['method']} "
             f"(src {foreground['src_fraction']:.0%}, trg {foreground['trg_fraction']:.0%} of hyperpixels)",
             f"{'solver':<{w}}" + "".join(f" {name:>10}" for name, _, _ in cols)]
    for s, d in table.items():
        if "failed" in d:
            lines.append(f"{s:<{w}} failed: {d['failed']}")
        else:
            lines.append(f"{s:<{w}}" + "".join(cell(d[key], fmt) for _, key, fmt in cols))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- parser, main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scot-ot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("match", help="match two images and draw the correspondences")
    m.add_argument("src")
    m.add_argument("trg")
    m.add_argument("--solver", default=None, help="NAME or NAME:key=value,... (default: the preset's)")
    m.add_argument("--keypoints", help="source keypoints: JSON [[x, y], ...] or two-column text/CSV; "
                   "the transferred keypoints are printed")
    m.add_argument("--kps-out", metavar="FILE.json", help="also write the transferred keypoints (JSON)")
    m.add_argument("--out", default="match.png",
                   help="the picture; its extension names the format (.png, .jpg, .pdf, .svg, ...)")
    add_model_args(m)
    m.set_defaults(func=cmd_match)

    d = sub.add_parser("demo", help="match a bundled real image pair")
    d.add_argument("--solver", default=None, help="NAME or NAME:key=value,... (default: the preset's)")
    d.add_argument("--out", default="demo.png",
                   help="the picture; its extension names the format (.png, .jpg, .pdf, .svg, ...)")
    add_model_args(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="PCK on a benchmark (PF-WILLOW, PF-PASCAL, SPair-71k)")
    e.add_argument("--dataset", required=True, choices=["pf-willow", "pf-pascal", "spair"])
    e.add_argument("--root", required=True, help="the dataset folder, in its original layout")
    e.add_argument("--split", default="test")
    e.add_argument("--solver", action="append",
                   help="NAME or NAME:key=value,... (e.g. torch-absorb:max_iter=1000,tol=1e-4); "
                        "repeat to compare several (default: the preset's solver)")
    e.add_argument("--every", type=int, default=1, help="keep every K-th pair (a fixed subsample)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N (kept) pairs only")
    e.add_argument("--out", default=None, help="JSON file for the results, saved after every pair")
    e.add_argument("--resume", action="store_true", help="continue a partial --out file")
    e.add_argument("--strict", action="store_true",
                   help="a pair that cannot be evaluated (malformed row, missing or unreadable image, "
                        "keypoint outside its image) is an error, not a skip")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per backbone batch, equal shapes only (default: 8 on cuda, 1 on cpu)")
    e.add_argument("--shard", metavar="K/N", default=None,
                   help="evaluate shard K of N (K from 1): a fixed, balanced part of the pairs, grouped by "
                        "image; merge the N files with scot-ot merge (docs/scaling.md)")
    e.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep each image's hyperpixels and CAM in DIR, keyed by image content and feature "
                        "settings, for later runs and other shards")
    e.add_argument("--gallery", metavar="DIR", default=None,
                   help="write pictures of the worst pairs (lowest PCK@0.10 of the first solver) and of the "
                        "pairs where two solvers differ most, with DIR/index.html showing them")
    e.add_argument("--gallery-size", metavar="K", type=int, default=8, help="pairs per gallery selection")
    e.add_argument("--gallery-compare", nargs=2, metavar=("SPEC_A", "SPEC_B"), default=None,
                   help="the two --solver specs the gallery contrasts (default: the first two)")
    e.add_argument("--masks", metavar="DIR", default=None,
                   help="foreground masks, DIR/<image folder>/<image>.png or DIR/<image>.png (e.g. "
                        "PF-WILLOW-FCN): the foreground of the background rate (else the keypoint box), "
                        "and the marginals with --marginals mask")
    add_model_args(e)
    e.set_defaults(func=cmd_eval, device=None)  # None: cpu, or cuda:LOCAL_RANK under torchrun with CUDA

    mg = sub.add_parser("merge", help="merge the shard files of one eval run (scot-ot eval --shard K/N)")
    mg.add_argument("files", nargs="+", metavar="FILE", help="the shard results files, in any order")
    mg.add_argument("--out", required=True, help="JSON file for the merged results")
    mg.set_defaults(func=cmd_merge)

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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (as Ctrl-C raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Optional[List[str]] = None) -> int:
    from .features.backbone import CheckpointError

    from .evaluation.distributed import RankError, rank_label

    global _QUIET
    _QUIET = False  # (cmd_eval silences torchrun ranks other than 0)
    args = parser().parse_args(argv)
    prefix = f"scot-ot {args.command}"
    if args.command == "eval" and rank_label():
        prefix += f" ({rank_label()})"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with _sigterm_as_interrupt(), warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt as e:
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"\n{prefix}: {what}; nothing written", file=sys.stderr)
            return 143 if isinstance(e, Terminated) else 130
        except (ValueError, OSError, ImportError, CheckpointError, FloatingPointError) as e:
            print(f"{prefix}: error: {e}", file=sys.stderr)
            return 2
        except RankError as e:
            print(f"{prefix}: error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The pre-registered studies behind the ``accurate`` preset (docs/accuracy.md).

Round 1 (fixed before any run, never tuned on results; ``CANDIDATES[1]``):
image side {300, 400} x keypoint transfer {scot, weighted, soft} x bidirectional
{no, yes}, everything else SCOT's faithful pipeline (EfficientNet-Lite0, CAM
marginals, one Sinkhorn iteration at eps 0.05, RHM). 480 px is left out because its
cost and RHM buffers grow with (side / 300)^4: about 6.5 x, past the 2 s per pair
budget before any gain is known; other backbones need extra packages.

Round 2 (fixed after round 1, before any of its runs; ``CANDIDATES[2]``): the
hyperpixels and the sharpness of the plan. Image side {300, 400} x backbones {Lite0,
Lite0 + Lite2 ensemble} x hyperpixel norm {joint (SCOT), layer} x Sinkhorn eps
{0.02, 0.05, 0.1} x transfer {scot, soft} x bidirectional {no, yes at 300 px; no at
400 px, which broke both budgets in round 1 with Lite0 alone}: 72 candidates. The
Lite0-joint-eps0.05 candidates repeat round 1's (a check that the pipeline did not
move). eps changes no work (one iteration either way), so it shares its structure's
timing.

Round 3 (fixed after round 2, before any of its runs; ``CANDIDATES[3]``): spend the
time a bfloat16 cost saves on more hyperpixels. Round 2's pick (400 px, joint norm,
eps 0.05, one direction, SCOT's transfer) with backbones {Lite0 + Lite2, Lite0 +
Lite1, Lite0 + Lite1 + Lite2} x cost precision {full, bfloat16} x score exponent
{0.5 (SCOT's PF-WILLOW value), 1.0 (its SPair value)}: 12 candidates. The Lite0 +
Lite2 full-precision exponent-0.5 candidate is round 2's preset (a check that
nothing moved). eps and the exponent change no work, so they share their
structure's timing.

Round 4 (fixed after round 3, before any of its runs; ``CANDIDATES[4]``): mutual
consistency against many-to-one matches. Round 3's pick (400 px, joint norm, eps 0.05,
one Sinkhorn iteration, bfloat16 cost, exponent 0.5, SCOT's transfer) with backbones
{Lite0 + Lite2, Lite0 + Lite1 + Lite2} x direction {one, both (geometric mean)} x
soft mutual filter {off, on}: 8 candidates. Every candidate solves its one iteration
with the ``matrix-scaling`` solver (the same iterate as ``pot-sinkhorn``, tested
equal; 0.10 against 0.26 s and about 500 MB less per problem of 6700 x 6700 here),
which is what makes both directions fit the budgets. The Lite0 + Lite1 + Lite2, one
direction, no filter candidate is round 3's preset with that solver: its per-pair PCK
must repeat round 3's up to argmax ties broken by float rounding (the number of
pairs that differ is reported).

Round 5 (fixed after round 4, before any of its runs; ``CANDIDATES[5]``): the keypoint
transfer. Round 4's pick (400 px, Lite0 + Lite1 + Lite2, joint norm, eps 0.05, one
Sinkhorn iteration by matrix-scaling, bfloat16 cost, exponent 0.5, both directions,
soft mutual filter) with the transfer's vote {mean (SCOT), coordinate-wise median} x
its voting boxes scaled by {0.5, 1 (SCOT), 2, 3}, plus the nearest hyperpixel alone
(scale 0, where mean and median agree): 9 candidates, one structure. The mean at
scale 1 is round 4's pick: its per-pair PCK must repeat round 4's up to argmax ties
broken by the thread count (this unit runs with two threads; the number of pairs that
differ is reported).

Round 6 (fixed after round 5, before any of its runs; ``CANDIDATES[6]``): round 5's
larger voting boxes and median gained at alpha 0.10 and lost at 0.05. The
``consensus`` rule (the median of the boxes scaled by 2s locates the keypoint, the
mean of the boxes scaled by s whose votes agree with it places it) at s in {0.5, 1,
1.5, 2}, next to round 5's pick (median, boxes x 2) and round 4's (mean, boxes x 1):
6 candidates, the same structure.

Round 7 (fixed after round 6, before any of its runs; ``CANDIDATES[7]``): the robust
votes refined below the 4 px grid of the matches. ``median-soft`` (boxes x 2) and
``consensus-soft`` (s = 1): each vote moved by its match's soft-argmax offset (round
1's ``soft`` refinement), next to the unrefined median x 2 (the preset), consensus
s = 1 and round 4's mean x 1: 5 candidates, the same structure.

Round 8 (fixed after round 7, before any of its runs; ``CANDIDATES[8]``): the layers.
Every hyperpixel so far drew on blocks at strides 4, 16 and 32 of each backbone
(Lite0's ids were a first guess, Lite1/2's the same places in their stages); none at
stride 8, and SCOT's own ResNet layers have none at stride 32. Round 4's matching with
the layer sets {default, + the last stride-8 block, - the stride-32 blocks, both
changes} (``LAYER_SETS``, applied to all three backbones) x transfer {mean x 1,
median x 2 (the preset), median-soft x 2}: 12 candidates, four structures.

Round 9 (fixed after round 8, before any of its runs; ``CANDIDATES[9]``): every rule so
far places a keypoint by where the hyperpixels around it were matched; none looks at the
keypoint's own features. ``transfer_refine = R`` moves each transferred keypoint to the
target hyperpixel within R grid cells whose features are most like the source features
sampled at the keypoint. The median x 2 (the preset) and consensus s = 1 with R in {0,
1, 2, 3}, and round 4's mean x 1 (the reference whose transfer time the pipeline
timing holds): 9 candidates, one structure.

Protocol (``select``, the same for every round):

1. every candidate runs on all 360 PF-WILLOW-dev pairs (per-pair PCK at 0.05 /
   0.10 / 0.15 and the time of each stage);
2. eligible: median time per pair <= 2.0 s and peak memory <= 4 GB, measured by
   ``benchmarks/pipeline.py`` (image files to keypoints, 20 pairs, 2 threads, one
   process per structure, nothing else running: ``--timing``); the transfer rule's
   own time (milliseconds) comes from the study run;
3. the selection rule: among eligible candidates, the highest mean PCK@0.10, ties
   broken by PCK@0.05, then by the lower median time;
4. leave one subclass out: for each of the 4 subclasses, the rule picks on the
   other three (270 pairs) and the pick is scored on the held-out one (90 pairs);
   its in-sample score on the three is reported next to it;
5. the preset is the rule applied to all four subclasses, and its score on all 360
   pairs is reported once.

Run (one worker per unit, two at a time; then the timings alone; then the selection)::

    python benchmarks/accuracy.py --round 1 --side 300 &
    python benchmarks/accuracy.py --round 1 --side 400 &
    wait; python benchmarks/accuracy.py --round 1 --timing --select

    python benchmarks/accuracy.py --round 2 --units        # lists the units
    python benchmarks/accuracy.py --round 2 --unit side300-lite0-joint   # ... each unit, two at a time
    python benchmarks/accuracy.py --round 2 --timing --select

    python benchmarks/accuracy.py --round 3 --unit side400-lite0+lite2-joint   # ... each unit, two at a time
    python benchmarks/accuracy.py --round 3 --timing --select

    python benchmarks/accuracy.py --round 4 --unit side400-lite0+lite2-joint   # ... each unit, two at a time
    python benchmarks/accuracy.py --round 4 --timing --select

    python benchmarks/accuracy.py --round 5 --unit side400-lite0+lite1+lite2-joint --threads 2
    python benchmarks/accuracy.py --round 5 --timing --select

    python benchmarks/accuracy.py --round 6 --unit side400-lite0+lite1+lite2-joint --threads 2
    python benchmarks/accuracy.py --round 6 --timing --select

    python benchmarks/accuracy.py --round 7 --unit side400-lite0+lite1+lite2-joint --threads 2
    python benchmarks/accuracy.py --round 7 --timing --select

    python benchmarks/accuracy.py --round 8 --unit side400-lite0+lite1+lite2-joint-s4-8-16-32 &   # ... each
    python benchmarks/accuracy.py --round 8 --timing --select                                   # unit, two at a time

    python benchmarks/accuracy.py --round 9 --unit side400-lite0+lite1+lite2-joint --threads 2
    python benchmarks/accuracy.py --round 9 --timing --select

Records: round 1 in ``benchmarks/results/accuracy/`` (``side-<S>.json``,
``pipeline-*.json``, ``accuracy.json``), rounds 2 to 9 in ``benchmarks/results/accuracy/round<R>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

from common import RESULTS, machine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "PF-WILLOW-dev"
OUT = {1: RESULTS / "accuracy", **{r: RESULTS / "accuracy" / f"round{r}" for r in range(2, 10)}}
TIME_BUDGET_S = 2.0
MEMORY_BUDGET_MB = 4096
ALPHAS = ("0.05", "0.1", "0.15")
DIRECTION = {False: "uni", True: "bi"}
MUTUAL = {False: "plain", True: "mutual"}
#: rounds 2 and 3's hyperpixel sources: name -> the ``ensemble`` argument (Lite0 is always the first backbone)
ENSEMBLES = {"lite0": [], "lite0+lite2": ["efficientnet-lite2"], "lite0+lite1": ["efficientnet-lite1"],
             "lite0+lite1+lite2": ["efficientnet-lite1", "efficientnet-lite2"]}
#: round 2's entropic regularisations of the one Sinkhorn iteration (SCOT: 0.05)
EPS = (0.02, 0.05, 0.1)


def _round1() -> Dict[str, dict]:
    return {f"side{s}-{t}-{DIRECTION[b]}": {"image_side": s, "transfer": t, "bidirectional": b}
            for s in (300, 400) for t in ("scot", "weighted", "soft") for b in (False, True)}


def _round2() -> Dict[str, dict]:
    out = {}
    for s in (300, 400):
        for e, names in ENSEMBLES.items():
            for n in ("joint", "layer"):
                for eps in EPS:
                    for t in ("scot", "soft"):
                        for b in ((False, True) if s == 300 else (False,)):
                            out[f"side{s}-{e}-{n}-eps{eps}-{t}-{DIRECTION[b]}"] = {
                                "image_side": s, "ensemble": names, "hyperpixel_norm": n, "eps": eps,
                                "transfer": t, "bidirectional": b}
    return out


def _round3() -> Dict[str, dict]:
    return {f"side400-{e}-joint-eps0.05-{p}-exp{x}-scot-uni": {
        "image_side": 400, "ensemble": ENSEMBLES[e], "hyperpixel_norm": "joint", "eps": 0.05, "cost_precision": p,
        "exponent": x, "transfer": "scot", "bidirectional": False}
        for e in ("lite0+lite2", "lite0+lite1", "lite0+lite1+lite2") for p in ("full", "bfloat16") for x in (0.5, 1.0)}


def _round4() -> Dict[str, dict]:
    return {f"side400-{e}-joint-eps0.05-bfloat16-exp0.5-matrix-scaling-{MUTUAL[m]}-scot-{DIRECTION[b]}": {
        "image_side": 400, "ensemble": ENSEMBLES[e], "hyperpixel_norm": "joint", "eps": 0.05,
        "cost_precision": "bfloat16", "exponent": 0.5, "solver": "matrix-scaling", "mutual_filter": m,
        "transfer": "scot", "bidirectional": b}
        for e in ("lite0+lite2", "lite0+lite1+lite2") for b in (False, True) for m in (False, True)}


#: round 4's pick without its transfer rule (the structure rounds 5 to 7 transfer through), and its name's stem
MATCHING = {"image_side": 400, "ensemble": ENSEMBLES["lite0+lite1+lite2"], "hyperpixel_norm": "joint", "eps": 0.05,
            "cost_precision": "bfloat16", "exponent": 0.5, "solver": "matrix-scaling", "mutual_filter": True,
            "bidirectional": True}
STEM = "side400-lite0+lite1+lite2-joint-eps0.05-bfloat16-exp0.5-matrix-scaling-mutual"


def _transfers(rules: List[Tuple[str, float]]) -> Dict[str, dict]:
    """Candidates named by their vote (SCOT's rule: ``mean``) and box scale."""
    return {f"{STEM}-{'mean' if rule == 'scot' else rule}-box{box:g}-bi": {**MATCHING, "transfer": rule,
                                                                            "transfer_box": box}
            for rule, box in rules}


def _round5() -> Dict[str, dict]:
    return {f"{STEM}-nearest-bi": {**MATCHING, "transfer": "scot", "transfer_box": 0.0},
            **_transfers([(rule, box) for rule in ("scot", "median") for box in (0.5, 1.0, 2.0, 3.0)])}


def _round6() -> Dict[str, dict]:
    return _transfers([("scot", 1.0), ("median", 2.0)] + [("consensus", box) for box in (0.5, 1.0, 1.5, 2.0)])


def _round7() -> Dict[str, dict]:
    return _transfers([("scot", 1.0), ("median", 2.0), ("median-soft", 2.0), ("consensus", 1.0),
                       ("consensus-soft", 1.0)])


#: round 8's hyperpixel layers, by the strides they draw on: (Lite0's ids, Lite1's and Lite2's ids).
#: Lite0's stages end at blocks 2 (stride 4), 4 (8), 7 and 10 (16), 14 and 15 (32); Lite1's and
#: Lite2's at 3, 6, 10 and 14, 19 and 20. The default takes the last stride-4 block, the last
#: three blocks of the second stride-16 stage and the last two of the first stride-32 stage.
LAYER_SETS = {
    "s4-16-32": ((2, 8, 9, 10, 13, 14), (3, 12, 13, 14, 18, 19)),  # the default
    "s4-8-16-32": ((2, 4, 8, 9, 10, 13, 14), (3, 6, 12, 13, 14, 18, 19)),
    "s4-16": ((2, 8, 9, 10), (3, 12, 13, 14)),
    "s4-8-16": ((2, 4, 8, 9, 10), (3, 6, 12, 13, 14)),
}


def _round8() -> Dict[str, dict]:
    out = {}
    for name, (lite0, lite12) in LAYER_SETS.items():
        layers = {"layers": lite0, "ensemble_layers": (lite12, lite12)}
        for rule, box in (("scot", 1.0), ("median", 2.0), ("median-soft", 2.0)):
            vote = "mean" if rule == "scot" else rule
            out[f"{STEM}-{name}-{vote}-box{box:g}-bi"] = {**MATCHING, **layers, "transfer": rule, "transfer_box": box}
    return out


#: round 9's appearance-refinement windows, in target grid cells (4 px at 400 px)
REFINE_RADII = (1, 2, 3)


def _round9() -> Dict[str, dict]:
    out = _transfers([("scot", 1.0), ("median", 2.0), ("consensus", 1.0)])
    for rule, box in (("median", 2.0), ("consensus", 1.0)):
        for radius in REFINE_RADII:
            out[f"{STEM}-{rule}-box{box:g}-refine{radius}-bi"] = {**MATCHING, "transfer": rule, "transfer_box": box,
                                                                 "transfer_refine": radius}
    return out


#: round -> candidate name -> SCOT arguments (everything else: the faithful defaults)
CANDIDATES: Dict[int, Dict[str, dict]] = {1: _round1(), 2: _round2(), 3: _round3(), 4: _round4(), 5: _round5(),
                                          6: _round6(), 7: _round7(), 8: _round8(), 9: _round9()}


def unit_of(config: dict) -> str:
    """What one study run computes once for several candidates: the image side and the hyperpixels."""
    if "hyperpixel_norm" not in config:
        return f"side-{config['image_side']}"
    ens = next(e for e, names in ENSEMBLES.items() if names == list(config["ensemble"]))
    layers = next((f"-{n}" for n, (lite0, _) in LAYER_SETS.items() if "layers" in config
                   and tuple(config["layers"]) == lite0), "")  # round 8
    return f"side{config['image_side']}-{ens}-{config['hyperpixel_norm']}{layers}"


def structure(config: dict) -> str:
    """What the pipeline's time and memory depend on: the unit, the cost's precision (round 3), the
    solver and the mutual filter (round 4) and the directions (not the transfer rule)."""
    precision = f"-{config['cost_precision']}" if "cost_precision" in config else ""
    solver = f"-{config['solver']}-{MUTUAL[config['mutual_filter']]}" if "solver" in config else ""
    return f"{unit_of(config).replace('side-', 'side')}{precision}{solver}-{DIRECTION[config['bidirectional']]}"


def units(rnd: int) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for name, config in CANDIDATES[rnd].items():
        out.setdefault(unit_of(config), []).append(name)
    return out


def run_unit(rnd: int, unit: str, every: int = 1, out_dir: Path = None) -> Path:
    """Every candidate of ``unit`` on PF-WILLOW-dev: features once per image; per pair the cost once per
    precision, each direction once per precision and eps."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from scot_ot import SCOT
    from scot_ot.datasets import load_pairs
    from scot_ot.evaluation.pck import pck_per_pair
    from scot_ot.matching.mutual import soft_mutual_filter
    from scot_ot.matching.scot import Correspondence

    names = units(rnd)[unit]
    configs = [CANDIDATES[rnd][n] for n in names]
    varied = ("transfer", "transfer_box", "transfer_refine", "bidirectional", "eps", "cost_precision", "exponent", "mutual_filter")
    base = {k: v for k, v in configs[0].items() if k not in varied}
    directions = sorted({c["bidirectional"] for c in configs})
    rules = sorted({(c["transfer"], c.get("transfer_box", 1.0), c.get("transfer_refine", 0)) for c in configs})
    filters = sorted({c.get("mutual_filter", False) for c in configs})
    # what the plan and the scores depend on: (cost precision, eps, exponent), the cost once per precision
    settings = sorted({(c.get("cost_precision", "full"), c.get("eps", 0.05), c.get("exponent", 0.5))
                       for c in configs})
    eps_only = len(settings) == len({eps for _, eps, _ in settings})  # rounds 1 and 2: keys as before

    def label(prec, eps, exponent) -> str:
        return str(eps) if eps_only else f"{prec}/{eps}/{exponent}"
    pairs = list(load_pairs("pf-willow", DATA).pairs)[::every]
    model = SCOT(**base)
    feats: Dict[str, object] = {}
    feat_time: Dict[str, float] = {}
    rows = []
    for pair in tqdm(pairs, desc=unit, unit="pair"):
        for path in (pair.src_path, pair.trg_path):
            if str(path) not in feats:
                t = time.perf_counter()
                feats[str(path)] = model.hyperpixels(path)
                feat_time[str(path)] = time.perf_counter() - t
        hs, ht = feats[str(pair.src_path)], feats[str(pair.trg_path)]
        row = {"pair_id": pair.pair_id, "category": pair.category, "n_src": len(hs), "n_trg": len(ht),
               "match_s": {}, "results": {}}
        C, C_prec = None, None
        for prec, eps, exponent in settings:
            if prec != C_prec:
                del C
                variant = copy.copy(model)
                variant.cost_precision = prec
                cost_t = {"cost": 0.0}
                C, C_prec = variant.cost(hs, ht, cost_t), prec  # (N, M), shared by every eps and both directions
            solver = variant.with_solver(base.get("solver", "pot-sinkhorn"), eps=eps)
            solver.exponent = exponent
            fwd_t = {"cost": cost_t["cost"], "ot": 0.0, "rhm": 0.0}
            plan, fwd, res = solver.transport(C, hs, ht, fwd_t)
            scores = {False: fwd}
            match_s = {"uni": sum(fwd_t.values())}
            if True in directions:
                bwd_t = {"cost": 0.0, "ot": 0.0, "rhm": 0.0}
                t = time.perf_counter()
                C_back = C.T.contiguous()  # (M, N), as SCOT.match_hyperpixels
                bwd_t["cost"] += time.perf_counter() - t
                _, back, _ = solver.transport(C_back, ht, hs, bwd_t)
                del C_back
                t = time.perf_counter()
                scores[True] = (fwd * back.T).sqrt_()
                match_s["bi"] = match_s["uni"] + sum(bwd_t.values()) + time.perf_counter() - t
                del back
            row["match_s"][label(prec, eps, exponent)] = match_s
            for bi, mutual in ((b, m) for b in directions for m in filters):
                final = soft_mutual_filter(scores[bi].clone()) if mutual else scores[bi]
                conf, matches = final.max(dim=1)
                for rule, box, radius in rules:
                    name = next((n for n, c in zip(names, configs) if c["bidirectional"] == bi
                                 and c["transfer"] == rule and c.get("transfer_box", 1.0) == box
                                 and c.get("transfer_refine", 0) == radius
                                 and c.get("eps", 0.05) == eps
                                 and c.get("cost_precision", "full") == prec
                                 and c.get("exponent", 0.5) == exponent
                                 and c.get("mutual_filter", False) == mutual), None)
                    if name is None:
                        continue
                    corr = Correspondence(hs, ht, plan, final, matches, conf, res, {}, rule, box, radius)
                    t = time.perf_counter()
                    pred = corr.transfer(pair.src_kps).numpy()
                    transfer_s = time.perf_counter() - t
                    pck = pck_per_pair(pred, pair.trg_kps, pair.pck_threshold(), [float(a) for a in ALPHAS])
                    row["results"][name] = {"pck": {a: pck[float(a)] for a in ALPHAS}, "transfer_s": transfer_s}
                del final
            del plan, fwd, scores
        del C
        rows.append(row)
    record = {"benchmark": "accuracy", "round": rnd, "unit": unit, "config": base, "machine": machine("cpu"),
              "every": every, "torch_threads": torch.get_num_threads(), "feature_s_per_image": feat_time,
              "mean_feature_s": statistics.mean(feat_time.values()), "pairs": rows}
    out_dir = out_dir or OUT[rnd]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{unit}.json"
    out.write_text(json.dumps(record, indent=1))
    return out


def run_timing(rnd: int, out_dir: Path, pairs: int = 20) -> None:
    """``benchmarks/pipeline.py`` once per structure, each in its own process (peak memory per process)."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    done = set()
    for config in CANDIDATES[rnd].values():
        name = structure(config)
        if name in done:
            continue
        done.add(name)
        scot = {k: v for k, v in config.items()
                if k not in ("transfer", "transfer_box", "transfer_refine", "eps", "exponent", "solver")}  # same work
        subprocess.run([sys.executable, str(here / "pipeline.py"), "--root", str(DATA), "--pairs", str(pairs),
                        "--solver", config.get("solver", "pot-sinkhorn"),
                        "--scot", json.dumps(scot), "--out", str(out_dir / f"pipeline-{name}.json")], check=True)


# --------------------------------------------------------------------------- selection
def candidate_table(rnd: int, records: List[dict], timings: Dict[str, dict]) -> Dict[str, dict]:
    """Per candidate: per-pair PCK, means, per-subclass means, time per pair and peak memory, eligibility.

    Time: the structure's median pipeline time with SCOT's transfer replaced by the
    candidate's (its mean transfer time in the study run); memory: the structure's peak.
    """
    out: Dict[str, dict] = {}
    for rec in records:
        for row in rec["pairs"]:
            for name, r in row["results"].items():
                c = out.setdefault(name, {"config": CANDIDATES[rnd][name], "pairs": {}, "transfer_s": []})
                c["pairs"][row["pair_id"]] = {"category": row["category"], "pck": r["pck"]}
                c["transfer_s"].append(r["transfer_s"])
    scot_transfer = {}
    for name, c in out.items():
        if (c["config"]["transfer"] == "scot" and c["config"].get("transfer_box", 1.0) == 1.0
                and not c["config"].get("transfer_refine", 0)):  # the pipeline's
            scot_transfer[structure(c["config"])] = statistics.mean(c["transfer_s"])
    for c in out.values():
        ps = list(c["pairs"].values())
        c["pck"] = {a: statistics.mean(p["pck"][a] for p in ps) for a in ALPHAS}
        c["per_category"] = {cat: {a: statistics.mean(p["pck"][a] for p in ps if p["category"] == cat)
                                   for a in ALPHAS} for cat in sorted({p["category"] for p in ps})}
        t = timings.get(structure(c["config"]))
        extra = statistics.mean(c.pop("transfer_s")) - scot_transfer[structure(c["config"])]
        c["median_time_s"] = None if t is None else t["median_s"]["total"] + extra
        c["peak_rss_mb"] = None if t is None else t["peak_rss_mb"]
        c["eligible"] = (t is not None and c["median_time_s"] <= TIME_BUDGET_S
                         and c["peak_rss_mb"] <= MEMORY_BUDGET_MB)
    return out


def _mean_on(c: dict, categories, alpha: str) -> float:
    return statistics.mean(p["pck"][alpha] for p in c["pairs"].values() if p["category"] in categories)


def pick(table: Dict[str, dict], categories) -> str:
    """The selection rule on the pairs of ``categories``: eligible, best PCK@0.10, then PCK@0.05, then faster."""
    eligible = [n for n, c in table.items() if c["eligible"]]
    if not eligible:
        raise SystemExit("no candidate is eligible: run --timing first (on a quiet machine)")
    return max(eligible, key=lambda n: (_mean_on(table[n], categories, "0.1"),
                                        _mean_on(table[n], categories, "0.05"), -table[n]["median_time_s"]))


def load_records(rnd: int, out_dir: Path) -> Tuple[List[dict], Dict[str, dict]]:
    """The study runs of round ``rnd`` and its pipeline timings, by structure."""
    records = [json.loads((out_dir / f"{u}.json").read_text()) for u in units(rnd)
               if (out_dir / f"{u}.json").is_file()]
    timings = {f.stem.removeprefix("pipeline-"): json.loads(f.read_text()) for f in out_dir.glob("pipeline-*.json")}
    return records, timings


def select(rnd: int, out_dir: Path) -> dict:
    table = candidate_table(rnd, *load_records(rnd, out_dir))
    cats = sorted({p["category"] for c in table.values() for p in c["pairs"].values()})
    folds = []
    for held in cats:
        train = [c for c in cats if c != held]
        name = pick(table, train)
        folds.append({"held_out": held, "picked": name,
                      "held_out_pck": {a: _mean_on(table[name], [held], a) for a in ALPHAS},
                      "in_sample_pck": {a: _mean_on(table[name], train, a) for a in ALPHAS}})
    final = pick(table, cats)
    for f in folds:  # the pick's held-out score against the preset's (chosen with that subclass) and the best's
        held = f["held_out"]
        f["preset_pck_on_held_out"] = {a: _mean_on(table[final], [held], a) for a in ALPHAS}
        best = max((n for n, c in table.items() if c["eligible"]), key=lambda n: _mean_on(table[n], [held], "0.1"))
        f["best_eligible_on_held_out"] = {"candidate": best, "pck@0.1": _mean_on(table[best], [held], "0.1")}
    study = {"benchmark": "accuracy", "round": rnd, "machine": machine("cpu"), "candidates": CANDIDATES[rnd],
             "time_budget_s": TIME_BUDGET_S, "folds": folds, "selected": final,
             "selected_config": CANDIDATES[rnd][final], "selected_pck": table[final]["pck"],
             "table": {n: {k: v for k, v in c.items() if k != "pairs"} for n, c in table.items()},
             "pairs": {n: c["pairs"] for n, c in table.items()}}
    (out_dir / "accuracy.json").write_text(json.dumps(study, indent=1))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    print("| candidate | PCK@0.05 | PCK@0.10 | PCK@0.15 | " + " | ".join(f"{c} @0.10" for c in cats)
          + " | median s/pair | peak MB | eligible |")
    print("|" + "---|" * (7 + len(cats)))
    for n, c in sorted(table.items(), key=lambda kv: -kv[1]["pck"]["0.1"]):
        print(f"| {n} | " + " | ".join(pct(c["pck"][a]) for a in ALPHAS) + " | "
              + " | ".join(pct(c["per_category"][cat]["0.1"]) for cat in cats)
              + f" | {c['median_time_s'] or float('nan'):.2f} | {c['peak_rss_mb'] or float('nan'):.0f} | "
              f"{'yes' if c['eligible'] else 'no'} |")
    for f in folds:
        print(f"held out {f['held_out']}: picked {f['picked']}, held-out PCK@0.10 {pct(f['held_out_pck']['0.1'])} "
              f"(in-sample on the other three {pct(f['in_sample_pck']['0.1'])}; the final preset on "
              f"{f['held_out']} {pct(f['preset_pck_on_held_out']['0.1'])}; best eligible there "
              f"{f['best_eligible_on_held_out']['candidate']} {pct(f['best_eligible_on_held_out']['pck@0.1'])})")
    print(f"selected: {final} {CANDIDATES[rnd][final]}: " + " / ".join(pct(table[final]["pck"][a]) for a in ALPHAS))
    return study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--round", type=int, choices=sorted(CANDIDATES), default=2, dest="rnd")
    p.add_argument("--units", action="store_true", help="list the round's units and their candidates")
    p.add_argument("--unit", help="run every candidate of this unit (see --units)")
    p.add_argument("--side", type=int, help="round 1: the unit side-<SIDE>")
    p.add_argument("--every", type=int, default=1, help="every K-th pair only (a smoke test, not the study)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one worker per core)")
    p.add_argument("--timing", action="store_true", help="time and measure every structure (quiet machine)")
    p.add_argument("--timing-pairs", type=int, default=20)
    p.add_argument("--select", action="store_true", help="apply the protocol to the records")
    p.add_argument("--out-dir", default=None, help="default: the round's folder in benchmarks/results/accuracy")
    args = p.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else OUT[args.rnd]
    unit = f"side-{args.side}" if args.side else args.unit
    if args.units:
        for u, names in units(args.rnd).items():
            print(f"{u}: {', '.join(names)}")
    if unit:
        if unit not in units(args.rnd):
            raise SystemExit(f"--unit: {unit!r} is not a unit of round {args.rnd}; see --units")
        import torch

        torch.set_num_threads(args.threads)
        print(f"wrote {run_unit(args.rnd, unit, args.every, out_dir)}")
    if args.timing:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_timing(args.rnd, out_dir, args.timing_pairs)
    if args.select:
        select(args.rnd, out_dir)


if __name__ == "__main__":
    main()

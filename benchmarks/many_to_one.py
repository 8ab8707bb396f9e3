"""The many-to-one and background study on PF-WILLOW-dev (docs/many-to-one.md).

Every formulation runs through ``scot_ot.evaluation.evaluate`` (the same code as
``scot-ot eval``), with the FCN masks as the foreground of the background rate, and
writes one eval record per group of runs into ``--out-dir``; ``--summarize`` then
reads them all and writes the study record (``many-to-one.json``: per formulation the
means, per subclass, the pair-by-pair contrasts) and ``many-to-one.png``.

The grid is fixed here, before any run (see GRID), and never tuned on results:

- no OT (``similarity``), dual-softmax, SCOT's single Sinkhorn iteration
  (``pot-sinkhorn``, eps 0.05, 1 iteration from u = 1/N), converged Sinkhorn
  (``torch-absorb``, same iterates, to a marginal error of 1e-4);
- unbalanced Sinkhorn (KL) with reg_m in {0.01, 0.05, 0.5} = {0.2, 1, 10} x eps:
  from strongly relaxed to nearly balanced;
- entropic partial OT (``partial``) and exact partial OT (``pot-partial``) moving
  mass m in {0.5, 0.7, 0.9}; the exact one costs about 23 s per pair on this CPU,
  so it runs on a fixed subsample, every 18th pair (20 pairs, 5 per subclass);
- dustbins (``dustbin``) with dustbin cost z in {0.3, 0.5, 0.7} (costs lie in
  [0, 1]; z is the cost above which leaving a point unmatched is cheaper);
- exact OT (``pot-emd``);
- SCOT's setting with CAM, FCN-mask and uniform marginals.

Run (two workers on two cores, then the summary)::

    python benchmarks/many_to_one.py --groups main,marginals,partial-exact &
    python benchmarks/many_to_one.py --groups remedies,emd &
    wait; python benchmarks/many_to_one.py --summarize
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import RESULTS, machine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "PF-WILLOW-dev"
CONV = "max_iter=1000,tol=1e-4"

#: group -> (marginals, every, [(label, solver spec)]); fixed before running
GRID: Dict[str, tuple] = {
    "main": ("cam", 1, [
        ("no OT (similarity)", "similarity"),
        ("dual-softmax", "dual-softmax"),
        ("SCOT: Sinkhorn, 1 iteration", "pot-sinkhorn"),
        ("Sinkhorn, converged", f"torch-absorb:{CONV}"),
        ("unbalanced, reg_m 0.01", f"torch-absorb:{CONV},reg_m=0.01"),
        ("unbalanced, reg_m 0.05", f"torch-absorb:{CONV},reg_m=0.05"),
        ("unbalanced, reg_m 0.5", f"torch-absorb:{CONV},reg_m=0.5"),
    ]),
    "remedies": ("cam", 1, [
        ("partial (entropic), m 0.5", f"partial:{CONV},mass=0.5"),
        ("partial (entropic), m 0.7", f"partial:{CONV},mass=0.7"),
        ("partial (entropic), m 0.9", f"partial:{CONV},mass=0.9"),
        ("dustbin, z 0.3", f"dustbin:{CONV},dustbin_cost=0.3"),
        ("dustbin, z 0.5", f"dustbin:{CONV},dustbin_cost=0.5"),
        ("dustbin, z 0.7", f"dustbin:{CONV},dustbin_cost=0.7"),
    ]),
    "emd": ("cam", 1, [("exact OT (EMD)", "pot-emd")]),
    "marginals-mask": ("mask", 1, [("SCOT, FCN-mask marginals", "pot-sinkhorn")]),
    "marginals-uniform": ("uniform", 1, [("SCOT, uniform marginals", "pot-sinkhorn")]),
    "partial-exact": ("cam", 18, [
        ("partial (exact), m 0.5", "pot-partial:mass=0.5"),
        ("partial (exact), m 0.7", "pot-partial:mass=0.7"),
        ("partial (exact), m 0.9", "pot-partial:mass=0.9"),
    ]),
}
#: what --groups accepts besides group names
ALIASES = {"marginals": ["marginals-mask", "marginals-uniform"]}
#: the reference every contrast is made against, and the contrasts
REFERENCE = ("main", "pot-sinkhorn")


def run_group(name: str, out_dir: Path, limit: Optional[int] = None, progress: bool = True) -> Path:
    """Evaluate one group of GRID on PF-WILLOW-dev (resumable); returns its record's path.

    ``limit``: only the first pairs of the group's subsample (a smoke test, not the study)."""
    import torch

    from scot_ot import SCOT
    from scot_ot.datasets import load_pairs
    from scot_ot.datasets.masks import MaskFolder
    from scot_ot.evaluation.run import evaluate

    marginals, every, runs = GRID[name]
    pairs = list(load_pairs("pf-willow", DATA).pairs)[::every][:limit]
    out = out_dir / f"{name}.json"
    config = {"dataset": "pf-willow", "root": str(DATA), "every": every, "limit": limit, "group": name,
              "labels": {spec: label for label, spec in runs}, "torch_threads": torch.get_num_threads()}
    evaluate(SCOT(), pairs, [spec for _, spec in runs], out=out, resume=out.is_file(), config=config,
             progress=progress, masks=MaskFolder(DATA / "PF-WILLOW-FCN"), marginals=marginals)
    return out


# --------------------------------------------------------------------------- summary
def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _per_pair(record: dict, spec: str, key) -> Dict[str, float]:
    out = {}
    for p in record["pairs"]:
        r = p["results"][spec]
        if "failed" not in r:
            out[p["pair_id"]] = key(r)
    return out


def contrast(a: Dict[str, float], b: Dict[str, float], higher_is_better: bool = True, tol: float = 1e-9) -> dict:
    """Pair-by-pair: on the pairs both have, how often ``a`` is better / worse than / equal to ``b``,
    and the two-sided sign test's p-value of better against worse (ties left out)."""
    common = sorted(k for k in set(a) & set(b) if a[k] is not None and b[k] is not None
                    and math.isfinite(a[k]) and math.isfinite(b[k]))
    sign = 1 if higher_is_better else -1
    better = sum(sign * (a[k] - b[k]) > tol for k in common)
    worse = sum(sign * (a[k] - b[k]) < -tol for k in common)
    from scipy.stats import binomtest

    p = binomtest(better, better + worse).pvalue if better + worse else None  # two-sided sign test, ties dropped
    return {"pairs": len(common), "better": better, "worse": worse, "equal": len(common) - better - worse,
            "sign_test_p": p, "mean_difference": _mean([a[k] - b[k] for k in common])}


def summarize(out_dir: Path) -> dict:
    records = {g: json.loads((out_dir / f"{g}.json").read_text()) for g in GRID if (out_dir / f"{g}.json").is_file()}
    ref_group, ref_spec = REFERENCE
    ref = records[ref_group]
    pck10 = lambda r: r["pck"]["0.1"]  # noqa: E731
    bg = lambda r: r["background_rate"]  # noqa: E731
    coll = lambda r: r["collision_rate"]  # noqa: E731
    rows = []
    for g, rec in records.items():
        for spec in rec["config"]["solvers"]:
            s = rec["solvers"][spec]
            m = s.get("measures") or {}
            pairs = {p["pair_id"] for p in rec["pairs"] if "failed" not in p["results"][spec]}
            row = {"group": g, "label": rec["config"]["labels"][spec], "spec": spec,
                   "marginals": rec["config"]["marginals"], "n_pairs": s["n_pairs"], "n_failed": s["n_failed"],
                   "pck": s["pck"], "per_category": s["per_category"],
                   "per_category_measures": s.get("per_category_measures"), **m,
                   "mean_n_iters": s["mean_n_iters"], "complete": rec.get("complete", False)}
            if (g, spec) != REFERENCE:
                row["vs_scot_pck@0.1"] = contrast(_per_pair(rec, spec, pck10), _per_pair(ref, ref_spec, pck10))
                row["vs_scot_background"] = contrast(_per_pair(rec, spec, bg), _per_pair(ref, ref_spec, bg),
                                                     higher_is_better=False)
                row["vs_scot_collision"] = contrast(_per_pair(rec, spec, coll), _per_pair(ref, ref_spec, coll),
                                                    higher_is_better=False)
            if len(pairs) < len(ref["pairs"]):  # a subsample: the reference on the same pairs
                sub = [p for p in ref["pairs"] if p["pair_id"] in pairs]
                row["scot_on_same_pairs"] = {
                    "pck": {a: _mean([p["results"][ref_spec]["pck"][a] for p in sub]) for a in s["pck"]},
                    "background_rate": _mean([p["results"][ref_spec]["background_rate"] for p in sub]),
                    "collision_rate": _mean([p["results"][ref_spec]["collision_rate"] for p in sub])}
            rows.append(row)
    study = {"benchmark": "many-to-one", "machine": machine("cpu"), "grid": {g: list(v) for g, v in GRID.items()},
             "reference": list(REFERENCE), "foreground": ref.get("foreground"), "rows": rows,
             "measures_overhead": overhead(records.values()),
             "records": {g: f"{g}.json" for g in records}}
    (out_dir / "many-to-one.json").write_text(json.dumps(study, indent=1))
    plot(rows, out_dir / "many-to-one.png")
    print(table(rows))
    print()
    print(subclass_table(rows))
    print("measures / (cost + OT + RHM) time per pair:", study["measures_overhead"])
    return study


def overhead(records) -> dict:
    """What the failure measures add to the evaluation time of a pair: per pair and group, the measures'
    time over the time of everything else measured for the pair (cost, OT and RHM of every solver, ``time_s``).
    Transfer, PCK and the features are left out of the denominator, so the true share is smaller."""
    ratios = []
    for rec in records:
        for p in rec["pairs"]:
            ok = [r for r in p["results"].values() if "failed" not in r]
            if ok:
                ratios.append(sum(r["measures_time_s"] for r in ok) / sum(r["time_s"] for r in ok))
    ratios.sort()
    if not ratios:
        return {}
    return {"n": len(ratios), "mean": sum(ratios) / len(ratios), "median": ratios[len(ratios) // 2],
            "p95": ratios[int(0.95 * (len(ratios) - 1))], "max": ratios[-1]}


def _vs(c: Optional[dict]) -> str:
    if not c:
        return "reference"
    p = "" if c["sign_test_p"] is None else f" (p {c['sign_test_p']:.2g})"
    return f"{c['better']}/{c['worse']}/{c['equal']}{p}"


def table(rows: List[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| formulation | pairs | PCK@0.05 | PCK@0.10 | PCK@0.15 | collision | eff/N | mutual NN | "
             "background | unmatched | s/pair (OT) | PCK@0.10 vs SCOT: better/worse/equal | "
             "background vs SCOT: lower/higher/equal |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n_pairs']} | {pct(r['pck']['0.05'])} | {pct(r['pck']['0.1'])} | "
                     f"{pct(r['pck']['0.15'])} | {pct(r.get('collision_rate'))} | "
                     f"{pct(r.get('effective_target_ratio'))} | {pct(r.get('mutual_nn_rate'))} | "
                     f"{pct(r.get('background_rate'))} | {pct(r.get('unmatched_mass'))} | "
                     f"{r['time_s']:.2f} ({r['ot_time_s']:.2f}) | {_vs(r.get('vs_scot_pck@0.1'))} | "
                     f"{_vs(r.get('vs_scot_background'))} |")
    return "\n".join(lines)


def subclass_table(rows: List[dict]) -> str:
    """PCK@0.10 and background rate per subclass, one row per formulation."""
    cats = sorted({c for r in rows for c in r["per_category"]})
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| formulation | " + " | ".join(f"{c} PCK@0.10 / bg" for c in cats) + " |", "|" + "---|" * (1 + len(cats))]
    for r in rows:
        cells = []
        for c in cats:
            pck = r["per_category"].get(c, {}).get("0.1")
            bgr = ((r.get("per_category_measures") or {}).get(c) or {}).get("background_rate")
            cells.append(f"{pct(pck)} / {pct(bgr)}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[dict], out: Path) -> None:
    """PCK@0.10 against the background rate and against the collision rate, one numbered point per formulation."""
    from scot_ot.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = plt.cm.tab20(range(len(rows)))
    for ax, key, name in ((axes[0], "background_rate", "background rate (FCN foreground)"),
                          (axes[1], "collision_rate", "collision rate")):
        for k, (r, colour) in enumerate(zip(rows, colours), 1):
            if r.get(key) is None:
                continue
            ref = (r["group"], r["spec"]) == REFERENCE
            ax.scatter(100 * r[key], 100 * r["pck"]["0.1"], s=90 if ref else 30, marker="*" if ref else "o",
                       color=colour, label=f"{k}. {r['label']} ({r['n_pairs']} pairs)" if ax is axes[0] else None)
            ax.annotate(str(k), (100 * r[key], 100 * r["pck"]["0.1"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"{name}, %")
        ax.set_ylabel("PCK@0.10, %")
        ax.grid(alpha=0.3)
    fig.legend(loc="upper center", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("PF-WILLOW-dev: accuracy against failure measures (star: SCOT, 1 Sinkhorn iteration)", fontsize=9)
    save_figure(fig, out)


def gallery(out_dir: Path, folder: Path, size: int, specs: List[str]) -> Path:
    """The failure gallery of the main group for ``specs`` (the first is ranked, the first two compared)."""
    from scot_ot import SCOT
    from scot_ot.datasets import load_pairs
    from scot_ot.datasets.masks import MaskFolder
    from scot_ot.evaluation.gallery import write_gallery
    from scot_ot.evaluation.run import foreground_source

    rec = json.loads((out_dir / "main.json").read_text())
    rec["config"]["solvers"] = specs
    pairs = list(load_pairs("pf-willow", DATA).pairs)
    return write_gallery(SCOT(), pairs, rec, folder, size=size, compare=tuple(specs[:2]),
                         foreground=foreground_source(MaskFolder(DATA / "PF-WILLOW-FCN"))[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default=None, help=f"comma-separated, of {', '.join([*GRID, *ALIASES])}")
    p.add_argument("--summarize", action="store_true", help="read the group records, write the study record")
    p.add_argument("--out-dir", default=str(RESULTS / "many-to-one"))
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each group only (smoke test)")
    p.add_argument("--gallery", metavar="DIR", help="draw the failure gallery of the main group into DIR")
    p.add_argument("--gallery-size", type=int, default=3)
    p.add_argument("--gallery-solvers", default="pot-sinkhorn;torch-absorb:max_iter=1000,tol=1e-4;similarity",
                   help="';'-separated specs of the main group (first: ranked; first two: compared)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: two workers)")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.groups:
        import torch

        torch.set_num_threads(args.threads)
        names = [n for g in args.groups.split(",") for n in ALIASES.get(g, [g])]
        unknown = [n for n in names if n not in GRID]
        if unknown:
            p.error(f"--groups: unknown group(s) {', '.join(unknown)}; known: {', '.join([*GRID, *ALIASES])}")
        for n in names:
            t = time.perf_counter()
            print(f"wrote {run_group(n, out_dir, args.limit)} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.summarize:
        summarize(out_dir)
    if args.gallery:
        print(f"wrote {gallery(out_dir, Path(args.gallery), args.gallery_size, args.gallery_solvers.split(';'))}")


if __name__ == "__main__":
    main()

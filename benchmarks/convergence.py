"""Does SCOT need converged OT? Marginal error, cost gap, PCK, collisions and background
matches against the Sinkhorn iteration count, for every iterative solver, on real pairs.

Usage::

    python benchmarks/convergence.py --root ../shared/data/PF-WILLOW-dev \\
        [--pairs-per-class 1] [--curve-pairs 1] [--eps 0.01,0.02,0.05,0.1] [--device cpu]

Pairs (rule fixed in advance, not chosen by results): in each of the split's 4
categories, every ``(90 // k)``-th pair in csv order starting with the first, ``k =
--pairs-per-class``: pairs 1, 19, 37, 55, 73 of a category for k = 5 (20 pairs, each
with another source image). The first ``--curve-pairs`` pairs also get the
per-solver curves. Time on the 2-core CPU machine (no GPU): the default (k = 1, one
curve pair) took 6.4 min wall and 11.3 min CPU at load average 0.8-1.7 (several
times longer when other jobs load the cores). Most of it is part A, mainly the
log-domain solvers' runs to tol at eps 0.01. ``--pairs-per-class 5 --curve-pairs 0``
took 46 min wall and 38.5 min CPU at load 5-6. ``--curve-pairs 0``, ``--eps`` and
``--solvers`` cut it down.

Part A, curves (``--curve-pairs`` pairs, CAM marginals): for each iterative solver
(torch-log, torch-absorb, pot-sinkhorn, pot-sinkhorn-log, pot-sinkhorn-stabilized;
``fused`` too on CUDA) and eps in {0.01, 0.02, 0.05, 0.1}:

- a run of 10 iterations with ``check_every=1`` (the error after each of the first
  iterations);
- a run to ``tol=1e-4`` with ``check_every=10`` (the library's default check
  interval): its wall time and iteration count answer "which solver reaches 1e-4
  fastest"; the error-vs-time curve places the checks of this run at
  ``time_s * iteration / n_iters`` (per-iteration cost taken as constant within a run).
  torch-absorb runs first with ``max_iter=1000``; the others are capped at ``1.5 n + 20``
  iterations, ``n`` torch-absorb's count (every solver computes the same iterates up to
  rounding and initialisation). A solver whose error after 10 iterations is still >= 1
  (half the largest possible error, 2) is reported as failing and not run further;
- PCK@0.10, collision and background rates of its plan after 1 iteration and at
  tol, and the transport-cost gap to exact EMD (``pot-emd``).

Part B, iterates (all pairs, CAM and uniform marginals): SCOT's iterates (POT's
Sinkhorn-Knopp order and initialisation, ``u = 1/N``) are produced with
``torch-absorb`` warm-started from ``f = -eps log(N a)`` (the same iterates up to
rounding: checked on the first pair against ``pot-sinkhorn`` and recorded) and
snapshotted after 1, 2, 5, 10, 20, 50 iterations and at convergence ("conv": error <=
1e-4 at a snapshot, or at a check every 10 iterations after 50, or 1000 iterations;
snapshots after a converged one are copies of it). References: exact EMD, and "no OT"
(the cosine similarity in place of the plan, then the same scores and RHM, as HPF).
Each plan goes through SCOT's post-processing and RHM (replicated here on the shared
cost and cached Hough bins; checked against :meth:`SCOT.match_hyperpixels` on the
first pair) to PCK@{0.05,0.1,0.15}, collision rate, background rate,
effective-target ratio, mutual-NN rate, marginal error and cost gap. Foreground for the
background rate: the box spanned by each image's ground-truth keypoints widened by
10 % per side (independent of the CAM); the CAM foreground (CAM > 0.5) is recorded
too.

Writes ``benchmarks/results/convergence-<date>-<time>.json`` (machine, versions, date,
every measurement) and PNG plots beside it; prints the tables last. ``--replot JSON``
redraws the plots and reprints the tables of an earlier record without computing.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import math
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from common import RESULTS, load_average, machine, write_json  # first: puts the checkout on sys.path
from tqdm.auto import tqdm

import scot_ot
from scot_ot import diagnostics as dg
from scot_ot.datasets import load_pairs
from scot_ot.evaluation.pck import pck_per_pair
from scot_ot.evaluation.run import FeatureCache, versions
from scot_ot.matching import SCOT, cosine_cost
from scot_ot.matching.rhm import hough_bins, rescore
from scot_ot.matching.transfer import transfer_keypoints
from scot_ot.plotting import pyplot, save_figure

EPS = (0.01, 0.02, 0.05, 0.1)
SNAPSHOTS = (1, 2, 5, 10, 20, 50)
TOL, MAX_ITER, CHECK_EVERY = 1e-4, 1000, 10
FIRST_ITERS = 10
BROKEN_ERROR = 1.0
ALPHAS = (0.05, 0.1, 0.15)
MARGIN = 0.1


def iterative_solvers(device: torch.device) -> List[str]:
    names = ["torch-log", "torch-absorb", "pot-sinkhorn", "pot-sinkhorn-log", "pot-sinkhorn-stabilized"]
    return names + (["fused"] if device.type == "cuda" else [])


def select_pairs(pairs, per_class: int):
    """Every (n_c // per_class)-th pair of each category in csv order, from the first."""
    by_cat: Dict[str, list] = {}
    for p in pairs:
        by_cat.setdefault(p.category, []).append(p)
    out = []
    for cat in sorted(by_cat):
        ps = by_cat[cat]
        step = max(1, len(ps) // per_class)
        out += ps[::step][:per_class]
    return out


class PairProblem:
    """One pair's hyperpixels, shared cost, marginals, foregrounds, keypoints and RHM bins."""

    def __init__(self, pair, hs, ht, use_cam: bool, device):
        if not use_cam:
            hs = dataclasses.replace(hs, weights=torch.ones_like(hs.weights))
            ht = dataclasses.replace(ht, weights=torch.ones_like(ht.weights))
        self.pair, self.hs, self.ht = pair, hs, ht
        self.C = cosine_cost(hs.feats, ht.feats).to(device)  # (N, M)
        self.a = (hs.weights / hs.weights.sum()).to(self.C)  # (N,)
        self.b = (ht.weights / ht.weights.sum()).to(self.C)  # (M,)
        self.fg_kps = dg.keypoint_foreground(hs, ht, pair.src_kps, pair.trg_kps, MARGIN)
        self.fg_cam = dg.cam_foreground(hs, ht, 0.5)
        # the Hough cells of every candidate match depend on the geometry only: once per pair
        self.bins, ny, nx = hough_bins(hs.centres, ht.centres, hs.grid, ht.grid, hs.size, ht.size)
        self.hough_shape = (ny, nx)
        self.emd_cost = None

    def scot_init(self, eps: float):
        """The row potential whose next iteration is POT's first: ``u = 1/N`` <=> ``f = -eps log(N a)``
        (since issue 9 also every solver's default start, :func:`scot_ot.ot.start.scot_start`)."""
        return -eps * torch.log(len(self.a) * self.a)

    def rhm(self, votes: torch.Tensor) -> torch.Tensor:
        """:func:`scot_ot.matching.rhm.regularized_hough_matching` with this pair's cached bins."""
        return rescore(votes, self.bins, self.hough_shape)  # (N, M), in place

    def evaluate(self, plan: torch.Tensor, run: dict, exponent: float = 0.5) -> dict:
        """SCOT's post-processing + RHM on ``plan`` (N, M), then every metric; ``run`` is copied in."""
        t = time.perf_counter()
        hs = self.hs
        scores = (plan * len(hs)).clamp_min_(0.0).pow_(exponent)  # as SCOT.match_hyperpixels
        scores = self.rhm(scores)
        matches = scores.argmax(dim=1).cpu()
        pred = transfer(hs, self.ht, matches, self.pair.src_kps)
        pck = pck_per_pair(pred, self.pair.trg_kps, self.pair.pck_threshold(), ALPHAS)
        stats = dg.matching_stats(matches, scores.cpu(), self.fg_kps)
        raw = plan.argmax(dim=1).cpu()
        cost = float(torch.dot(self.C.flatten(), plan.flatten()))
        out = {
            **run,
            "pck": {f"{a:g}": v for a, v in pck.items()},
            "collision_rate": stats["collision_rate"], "max_in_degree": stats["max_in_degree"],
            "effective_target_ratio": stats["effective_target_ratio"],
            "mutual_nn_rate": stats["mutual_nn_rate"],
            "background_rate": stats["background_rate"],
            "background_rate_cam_fg": dg.background_rate(matches, self.fg_cam.src, self.fg_cam.trg),
            "plan_collision_rate": dg.collision_rate(raw, plan.shape[1]),
            "plan_background_rate": dg.background_rate(raw, self.fg_kps.src, self.fg_kps.trg),
            "cost": cost,
            "cost_gap": None if self.emd_cost is None else (cost - self.emd_cost) / self.emd_cost,
            "matches": matches,  # dropped before writing
        }
        out["eval_time_s"] = time.perf_counter() - t
        return out

    def plan(self, res) -> torch.Tensor:
        """``res.plan``; built in place from the potentials when the solver stored none:
        ``P = a b exp((f + g - C) / eps)`` (:mod:`scot_ot.ot.result`), one (N, M) buffer."""
        if res.stored_plan is not None:
            return res.plan
        P = res.f[:, None] + res.g[None, :]  # (N, M)
        P.sub_(self.C).div_(res.problem.eps).exp_()
        return P.mul_(self.a[:, None]).mul_(self.b[None, :])

    def evaluate_result(self, res) -> dict:
        return self.evaluate(self.plan(res), {"n_iters": res.n_iters, "converged": bool(res.converged),
                                        "marginal_error": float(res.error), "ot_time_s": float(res.time_s)})

    def evaluate_nn(self) -> dict:
        """No OT: the cosine similarity ``1 - C`` in place of the plan (then the same scores and RHM);
        the registered rule ``similarity``, ``(1 - C) / sum(1 - C)`` (:mod:`scot_ot.ot.similarity`)."""
        sim = scot_ot.solve(self.C, solver="similarity").plan  # (N, M), mass 1
        out = self.evaluate(sim, {"n_iters": 0, "converged": True, "marginal_error": None,
                                  "ot_time_s": 0.0})
        return {**out, "cost": None, "cost_gap": None}


def transfer(hs, ht, matches, kps) -> np.ndarray:
    k = torch.from_numpy(np.array(kps, dtype=np.float32)) * torch.tensor(hs.scale)  # copy: read-only input
    moved = transfer_keypoints(k, hs.boxes.cpu(), ht.boxes.cpu(), matches)
    return (moved / torch.tensor(ht.scale)).numpy()


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "matches"}


# --------------------------------------------------------------------------- part A
def curves(pp: PairProblem, solvers, eps_list, bar) -> dict:
    """Per solver and eps: first iterations, the run to tol, iteration-1 and final metrics.

    torch-absorb runs first; every other solver's run to tol is capped at
    ``1.5 n + 20`` iterations, ``n`` torch-absorb's count (all solvers compute the same
    iterates up to rounding and their initialisation, so a healthy one stops within a
    few checks of ``n``; the cap keeps a failing solver from running 1000 slow iterations).
    """
    out = {}
    order = sorted(solvers, key=lambda s: s != "torch-absorb")
    for eps in eps_list:
        cap = MAX_ITER
        for s in order:
            bar.set_postfix_str(f"curves {s} eps={eps:g}")
            first = scot_ot.solve(pp.C, pp.a, pp.b, solver=s, eps=eps, max_iter=FIRST_ITERS, tol=0.0,
                                  check_every=1)
            one = scot_ot.solve(pp.C, pp.a, pp.b, solver=s, eps=eps, max_iter=1)
            rec = {"first_errors": list(first.errors), "first_iters": list(first.error_iters),
                   "first_time_s": first.time_s, "iter1": strip(pp.evaluate_result(one))}
            err10 = first.errors[-1]
            if not (math.isfinite(err10) and err10 < BROKEN_ERROR):
                rec["failed"] = (f"marginal error {err10:.3g} after {FIRST_ITERS} iterations "
                                 f"(>= {BROKEN_ERROR}); not run to tol")
            else:
                res = scot_ot.solve(pp.C, pp.a, pp.b, solver=s, eps=eps, max_iter=cap, tol=TOL,
                                    check_every=CHECK_EVERY)
                rec.update({"errors": list(res.errors), "error_iters": list(res.error_iters),
                            "time_s": res.time_s, "n_iters": res.n_iters, "converged": res.converged,
                            "max_iter": cap, "time_per_iter_s": res.time_per_iter_s,
                            "final": strip(pp.evaluate_result(res))})
                if s == "torch-absorb" and res.converged:
                    cap = min(MAX_ITER, int(1.5 * res.n_iters) + 20)
            out[f"{s}|{eps:g}"] = rec
            bar.update(1)
    return out


# --------------------------------------------------------------------------- part B
def iterates(pp: PairProblem, eps_list, bar) -> dict:
    """SCOT's iterates (POT init) by warm-started torch-absorb, evaluated at each snapshot.

    Once a snapshot is converged (error <= tol), the later ones are that same plan and
    are copied, not recomputed.
    """
    out = {}
    for eps in eps_list:
        bar.set_postfix_str(f"iterates eps={eps:g}")
        init, done, snaps, last = pp.scot_init(eps), 0, {}, None
        for k in SNAPSHOTS:
            if last is not None and last["marginal_error"] <= TOL:
                snaps[str(k)] = {**last, "copied_from": last["n_iters"]}
                continue
            res = scot_ot.solve(pp.C, pp.a, pp.b, solver="torch-absorb", eps=eps, max_iter=k - done,
                                tol=0.0, check_every=k - done, init=init)
            done, init = k, res.f  # a warm start is the row potential alone
            last = snaps[str(k)] = {**pp.evaluate_result(res), "n_iters": k}
        if last["marginal_error"] <= TOL:
            snaps["conv"] = {**last, "converged": True, "copied_from": last["n_iters"]}
        else:
            res = scot_ot.solve(pp.C, pp.a, pp.b, solver="torch-absorb", eps=eps, max_iter=MAX_ITER - done,
                                tol=TOL, check_every=CHECK_EVERY, init=init)
            snaps["conv"] = {**pp.evaluate_result(res), "n_iters": done + res.n_iters}
        out[f"{eps:g}"] = snaps
        bar.update(1)
    return out


def checks(pp: PairProblem, model: SCOT, snaps: dict) -> dict:
    """The replicated pipeline and SCOT-init iterates agree with the library's own."""
    out = {}
    eps = float(next(iter(snaps)))
    for k in (1, 10):
        ref = model.with_solver("pot-sinkhorn", eps=eps, max_iter=k).match_hyperpixels(pp.hs, pp.ht)
        same = float((ref.matches.cpu() == snaps[f"{eps:g}"][str(k)]["matches"]).double().mean())
        out[f"eps{eps:g}_pot-sinkhorn_{k}it_vs_torch-absorb_scot_init_matches_agree"] = same
    res = scot_ot.solve(pp.C, pp.a, pp.b, solver="torch-absorb", eps=eps, max_iter=20)
    mine = pp.evaluate_result(res)
    ref = model.with_solver("torch-absorb", eps=eps, max_iter=20).match_hyperpixels(pp.hs, pp.ht)
    out["replicated_pipeline_vs_SCOT_matches_agree"] = float((ref.matches.cpu() == mine["matches"]).double().mean())
    return out


# --------------------------------------------------------------------------- summaries
def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def summarize(record: dict) -> dict:
    summ = {}
    for marg in ("cam", "uniform"):
        rows = record["pairs"]
        table = {}
        keys = [str(k) for k in SNAPSHOTS] + ["conv"]
        for eps in record["config"]["eps"]:
            for k in keys:
                items = [p[marg]["iterates"][f"{eps:g}"][k] for p in rows]
                table[f"{eps:g}|{k}"] = aggregate(items)
        table["emd"] = aggregate([p[marg]["emd"] for p in rows])
        table["nn"] = aggregate([p[marg]["nn"] for p in rows])
        table["paired_pck@0.1"] = paired(rows, marg, record["config"]["eps"])
        summ[marg] = table
    return summ


def paired(rows: List[dict], marg: str, eps_list) -> dict:
    """Per-pair PCK@0.1 differences: iteration 1 minus converged, minus EMD, minus no-OT."""
    out = {}
    for eps in eps_list:
        first = [p[marg]["iterates"][f"{eps:g}"]["1"]["pck"]["0.1"] for p in rows]
        for name, other in (("conv", [p[marg]["iterates"][f"{eps:g}"]["conv"]["pck"]["0.1"] for p in rows]),
                            ("emd", [p[marg]["emd"]["pck"]["0.1"] for p in rows]),
                            ("noOT", [p[marg]["nn"]["pck"]["0.1"] for p in rows])):
            d = np.array(first) - np.array(other)
            out[f"{eps:g}|1-{name}"] = {"mean": float(d.mean()), "pairs_better": int((d > 0).sum()),
                                        "pairs_worse": int((d < 0).sum()), "pairs_equal": int((d == 0).sum())}
    return out


def aggregate(items: List[dict]) -> dict:
    return {
        "pck@0.05": mean([i["pck"]["0.05"] for i in items]),
        "pck@0.1": mean([i["pck"]["0.1"] for i in items]),
        "pck@0.15": mean([i["pck"]["0.15"] for i in items]),
        **{k: mean([i[k] for i in items]) for k in (
            "collision_rate", "plan_collision_rate", "max_in_degree", "effective_target_ratio",
            "mutual_nn_rate", "background_rate", "background_rate_cam_fg", "plan_background_rate",
                "marginal_error", "cost_gap", "n_iters")},
        "converged_fraction": mean([float(i["converged"]) for i in items]),
    }


def curve_summary(record: dict) -> dict:
    """Per solver and eps, over the curve pairs: time and iterations to tol, iteration-1 and final metrics."""
    out = {}
    for key in record["pairs"][0]["cam"].get("curves", {}):
        recs = [p["cam"]["curves"][key] for p in record["pairs"] if "curves" in p["cam"]]
        ok = [r for r in recs if "failed" not in r]
        row = {"pairs": len(recs), "failed": len(recs) - len(ok),
               "iter1_pck@0.1": mean([r["iter1"]["pck"]["0.1"] for r in recs]),
               "iter1_collision_rate": mean([r["iter1"]["collision_rate"] for r in recs]),
               "iter1_cost_gap": mean([r["iter1"]["cost_gap"] for r in recs])}
        if ok:
            row.update({
                "time_to_tol_s": mean([r["time_s"] for r in ok]),
                "n_iters": mean([r["n_iters"] for r in ok]),
                "converged": sum(r["converged"] for r in ok),
                "time_per_iter_ms": 1e3 * mean([r["time_per_iter_s"] for r in ok]),
                "final_pck@0.1": mean([r["final"]["pck"]["0.1"] for r in ok]),
                "final_collision_rate": mean([r["final"]["collision_rate"] for r in ok]),
                "final_background_rate": mean([r["final"]["background_rate"] for r in ok]),
                "final_cost_gap": mean([r["final"]["cost_gap"] for r in ok]),
            })
        else:
            row["failure"] = recs[0]["failed"]
        out[key] = row
    return out


# --------------------------------------------------------------------------- plots
def plot_curves(record: dict, solvers: List[str], stem: Path) -> List[Path]:
    plt = pyplot()
    eps_list = record["config"]["eps"]
    written = []
    pairs = [p for p in record["pairs"] if "curves" in p["cam"]]
    if not pairs:
        return written
    for xaxis in ("iteration", "time"):
        fig, axes = plt.subplots(1, len(eps_list), figsize=(4 * len(eps_list), 3.4), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, eps in zip(axes, eps_list):
            for si, s in enumerate(solvers):
                for pi, p in enumerate(pairs):
                    r = p["cam"]["curves"][f"{s}|{eps:g}"]
                    it = list(r["first_iters"])
                    err = list(r["first_errors"])
                    t = [r["first_time_s"] * i / FIRST_ITERS for i in it]
                    if "errors" in r:
                        later = [(i, e) for i, e in zip(r["error_iters"], r["errors"]) if i > FIRST_ITERS]
                        if xaxis == "time":  # the tol run's own clock only
                            it = list(r["error_iters"])
                            err = list(r["errors"])
                            t = [r["time_s"] * i / r["n_iters"] for i in it]
                        else:
                            it += [i for i, _ in later]
                            err += [e for _, e in later]
                    x = it if xaxis == "iteration" else t
                    y = [max(e, 1e-12) if math.isfinite(e) else np.nan for e in err]
                    ax.plot(x, y, color=f"C{si}", lw=1.2, alpha=0.9, marker="o", ms=2.5,
                            ls="-" if "failed" not in r else ":",
                            label=(s + (" (fails)" if "failed" in r else "")) if pi == 0 else None)
            ax.axhline(TOL, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # narrow log ranges label minor ticks
            ax.set_title(f"eps = {eps:g}", fontsize=9)
            ax.set_xlabel("iteration" if xaxis == "iteration" else
                          f"wall time (s), {record['device']}, run to tol")
        axes[0].set_ylabel("marginal error ||P1-a||_1 + ||P^T1-b||_1")
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"marginal error vs {xaxis} ({len(pairs)} pair(s), CAM marginals; "
                     f"dashed: tol {TOL:g})", fontsize=10)
        written.append(save_figure(fig, Path(f"{stem}-error-vs-{xaxis}.png")))
    return written


def plot_metrics(record: dict, stem: Path) -> Path:
    plt = pyplot()
    eps_list = record["config"]["eps"]
    keys = [str(k) for k in SNAPSHOTS] + ["conv"]
    xs = list(range(len(keys)))
    metrics = [("pck@0.1", "PCK@0.10"), ("collision_rate", "collision rate (final matches)"),
               ("background_rate", "background rate (keypoint-box fg)"), ("cost_gap", "cost gap to EMD")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, (m, label) in zip(axes, metrics):
        for mi, (marg, ls) in enumerate((("cam", "-"), ("uniform", "--"))):
            t = record["summary"][marg]
            for ei, eps in enumerate(eps_list):
                ax.plot(xs, [t[f"{eps:g}|{k}"][m] for k in keys], ls=ls, marker="o", ms=3,
                        color=f"C{ei}", label=f"eps {eps:g}, {marg}")
            if m != "cost_gap":
                ax.axhline(t["emd"][m], color="k", ls=ls, lw=1, label=f"EMD, {marg}")
                if marg == "cam":  # no OT: the marginals play no part
                    ax.axhline(t["nn"][m], color="grey", ls=":", lw=1.2, label="no OT (similarity + RHM)")
        ax.set_xticks(xs, keys)
        ax.set_xlabel("Sinkhorn iterations (SCOT's iterates)")
        ax.set_title(label, fontsize=9)
        if m == "cost_gap":  # negative before convergence: the plan's columns are not yet met
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.axhline(0.0, color="k", lw=1, label="EMD")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(f"mean over {len(record['pairs'])} PF-WILLOW-dev pairs "
                 "(solid: CAM marginals, dashed: uniform)", fontsize=10)
    return save_figure(fig, Path(f"{stem}-metrics-vs-iterations.png"))


# --------------------------------------------------------------------------- tables
def format_tables(record: dict) -> str:
    """The tables printed last: solvers on the curve pairs, then SCOT's iterates on all pairs."""
    lines = curve_tables(record) if record["curve_summary"] else []
    eps_list = record["config"]["eps"]
    for marg in ("cam", "uniform"):
        t = record["summary"][marg]
        lines.append(f"\n{marg} marginals, SCOT's iterates, mean over {len(record['pairs'])} pairs "
                     "(bg: background rate, keypoint-box / CAM foreground; gap: cost gap to EMD):")
        lines.append(f"{'eps':>5} {'iters':>6} {'PCK@.05':>8} {'PCK@.1':>7} {'PCK@.15':>8} {'coll.':>6} "
                     f"{'planCol':>7} {'eff/N':>6} {'mutNN':>6} {'bg(kp)':>7} {'bg(cam)':>7} {'gap':>8} "
                     f"{'marg.err':>9}")
        rows = [(f"{eps:g}", k, t[f"{eps:g}|{k}"]) for eps in eps_list
                for k in [str(x) for x in SNAPSHOTS] + ["conv"]]
        rows += [("EMD", "-", t["emd"]), ("noOT", "-", t["nn"])]
        for eps, k, r in rows:
            it = f"{r['n_iters']:.0f}" if k == "conv" else k
            lines.append(f"{eps:>5} {it:>6} {100 * r['pck@0.05']:>8.1f} {100 * r['pck@0.1']:>7.1f} "
                         f"{100 * r['pck@0.15']:>8.1f} {r['collision_rate']:>6.3f} "
                         f"{r['plan_collision_rate']:>7.3f} {r['effective_target_ratio']:>6.3f} "
                         f"{r['mutual_nn_rate']:>6.3f} {r['background_rate']:>7.3f} "
                         f"{r['background_rate_cam_fg']:>7.3f} {r['cost_gap']:>8.4f} {r['marginal_error']:>9.2e}")
        lines.append(f"PCK@0.1 of iteration 1 minus that of the converged plan / EMD / no OT, per pair "
                     f"({marg}): mean difference in points; pairs better / worse / equal")
        for key, d in t["paired_pck@0.1"].items():
            lines.append(f"  eps {key:<12} {100 * d['mean']:+6.1f}   "
                         f"{d['pairs_better']:>3} / {d['pairs_worse']:>3} / {d['pairs_equal']:>3}")
    return "\n".join(lines)


def curve_tables(record: dict) -> List[str]:
    eps_list = record["config"]["eps"]
    cs = record["curve_summary"]
    n = record["config"]["curve_pairs"]
    lines = [f"\nTime to tol {TOL:g} (check_every {CHECK_EVERY}), CAM marginals, mean over {n} pair(s), "
             f"{record['device']}: seconds, iterations, ms per iteration",
             f"{'solver':<25}" + "".join(f" {'eps ' + format(e, 'g'):>24}" for e in eps_list)]
    for s in record["config"]["solvers"]:
        cells = []
        for eps in eps_list:
            r = cs[f"{s}|{eps:g}"]
            if "time_to_tol_s" not in r:
                cells.append(f"{'fails':>24}")
            else:
                flag = "" if r["converged"] == r["pairs"] else "*"
                cells.append(f"{r['time_to_tol_s']:>8.2f}s {r['n_iters']:>5.0f}{flag:1} it "
                             f"{r['time_per_iter_ms']:>5.0f}ms")
        lines.append(f"{s:<25}" + "".join(" " + c for c in cells))
    lines.append("(* not at tol within the iteration cap; fails: error >= 1 after 10 iterations)")
    lines.append(f"\nPer solver (curve pairs, CAM): PCK@0.1 / collision rate / cost gap after 1 iteration "
                 "-> at tol")
    for s in record["config"]["solvers"]:
        cells = []
        for eps in eps_list:
            r = cs[f"{s}|{eps:g}"]
            one = f"{100 * r['iter1_pck@0.1']:.0f}/{r['iter1_collision_rate']:.2f}/{r['iter1_cost_gap']:.3f}"
            fin = ("fails" if "final_pck@0.1" not in r else
                   f"{100 * r['final_pck@0.1']:.0f}/{r['final_collision_rate']:.2f}/{r['final_cost_gap']:.3f}")
            cells.append(f"eps {eps:g}: {one} -> {fin}")
        lines.append(f"{s:<25}" + "   ".join(cells))
    return lines


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="PF-WILLOW(-dev) folder")
    p.add_argument("--pairs-per-class", type=int, default=1)
    p.add_argument("--curve-pairs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eps", default=",".join(f"{e:g}" for e in EPS), help="comma-separated eps values")
    p.add_argument("--solvers", default=None, help="comma-separated iterative solvers for the curves "
                   "(default: all of them, fused on CUDA only)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/convergence-<date>.json)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="redraw the plots and reprint the tables of an earlier record, compute nothing")
    args = p.parse_args()
    if args.replot:
        record = json.loads(Path(args.replot).read_text())
        stem = Path(args.replot).with_suffix("")
        plot_curves(record, record["config"]["solvers"], stem)
        plot_metrics(record, stem)
        print(format_tables(record))
        return

    t_start = time.perf_counter()
    device = torch.device(args.device)
    solvers = args.solvers.split(",") if args.solvers else iterative_solvers(device)
    for s in solvers:
        scot_ot.get_solver(s)
    eps_list = [float(e) for e in args.eps.split(",")]
    pairs = select_pairs(load_pairs("pf-willow", args.root).pairs, args.pairs_per_class)
    model = SCOT(device=args.device)  # CAM on: the uniform runs replace the weights by ones
    cache = FeatureCache(model, capacity=256)
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out) if args.out else RESULTS / f"convergence-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "benchmark": "convergence", "date": date, "versions": versions(),
        "machine": machine(args.device),
        "device": str(device),
        "config": {"root": str(args.root), "pairs_per_class": args.pairs_per_class,
                   "curve_pairs": args.curve_pairs, "solvers": solvers, "eps": eps_list,
                   "snapshots": list(SNAPSHOTS), "tol": TOL, "max_iter": MAX_ITER,
                   "check_every": CHECK_EVERY, "first_iters": FIRST_ITERS, "alphas": list(ALPHAS),
                   "foreground": f"keypoint box + {MARGIN:g} margin (also CAM > 0.5)",
                   "backbone": "efficientnet-lite0", "layers": list(model.extractor.layers),
                   "dtype": "float32", "exponent": 0.5, "rhm": True},
        "pairs": [],
    }
    n_curve = min(args.curve_pairs, len(pairs))
    total = n_curve * len(eps_list) * len(solvers) + len(pairs) * 2 * (len(eps_list) + 1)
    bar = tqdm(total=total, desc="convergence", unit="run")
    timing = {"features": 0.0, "emd": 0.0, "curves": 0.0, "iterates": 0.0}
    for pi, pair in enumerate(pairs):
        t = time.perf_counter()
        hs, ht = cache.get(pair.src_path), cache.get(pair.trg_path)
        timing["features"] += time.perf_counter() - t
        entry = {"pair_id": pair.pair_id, "category": pair.category, "n_src": len(hs), "n_trg": len(ht)}
        for marg in ("cam", "uniform"):
            pp = PairProblem(pair, hs, ht, marg == "cam", device)
            bar.set_postfix_str(f"{pair.category} emd {marg}")
            t = time.perf_counter()
            emd = scot_ot.solve(pp.C, pp.a, pp.b, solver="pot-emd")
            pp.emd_cost = float((pp.C * emd.plan).sum())
            ev = pp.evaluate_result(emd)
            timing["emd"] += time.perf_counter() - t
            bar.update(1)
            block = {"emd": strip(ev), "nn": strip(pp.evaluate_nn()),
                     "foreground_kps": pp.fg_kps.describe(), "foreground_cam": pp.fg_cam.describe()}
            t = time.perf_counter()
            snaps = iterates(pp, eps_list, bar)
            timing["iterates"] += time.perf_counter() - t
            if pi == 0 and marg == "cam":
                block["checks"] = checks(pp, model, snaps)
            block["iterates"] = {e: {k: strip(v) for k, v in s.items()} for e, s in snaps.items()}
            if pi < n_curve and marg == "cam":
                t = time.perf_counter()
                block["curves"] = curves(pp, solvers, eps_list, bar)
                timing["curves"] += time.perf_counter() - t
            entry[marg] = block
        record["pairs"].append(entry)
    bar.close()
    record["summary"] = summarize(record)
    record["curve_summary"] = curve_summary(record)
    record["machine"]["load_avg_end"] = load_average()
    record["timing_s"] = {**timing, "total": time.perf_counter() - t_start,
                          "process_cpu": time.process_time()}  # CPU seconds, all threads
    stem = out.with_suffix("")
    record["plots"] = [str(p.name) for p in plot_curves(record, solvers, stem)] + \
        [plot_metrics(record, stem).name]
    write_json(record, out)
    print(format_tables(record))
    print("\nchecks:", record["pairs"][0]["cam"]["checks"])
    print(f"\nwrote {out} and {', '.join(record['plots'])}  "
          f"({record['timing_s']['total'] / 60:.1f} min wall, "
          f"{record['timing_s']['process_cpu'] / 60:.1f} min CPU: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items()) + ")")


if __name__ == "__main__":
    main()

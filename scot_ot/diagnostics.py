"""Diagnostics of a correspondence: many-to-one matching, background matching, plan shape.

SCOT (Liu et al., CVPR 2020) argues that optimal transport, with its marginal
constraints, (i) spreads the matches over the target instead of piling many
source hyperpixels onto one target hyperpixel, and (ii) with CAM-weighted
marginals, matches the foreground to the foreground. These functions measure both
on a computed matching so that the claims can be checked, not assumed.

Notation: ``N`` source and ``M`` target hyperpixels; ``matches`` (N,) holds
``m(i)``, the target of source ``i`` (the argmax of row ``i`` of the scores);
``scores`` (N, M) are the scores the matches were read from; ``plan`` (N, M) the
OT plan.

Many-to-one (pure functions of ``matches``)
-------------------------------------------
- in-degree of target ``j``: :math:`d_j = |\\{i : m(i) = j\\}|`, with
  :math:`\\sum_j d_j = N`;
- collision rate: the fraction of *hit* targets that more than one source hits,

  .. math:: \\mathrm{collision} = \\frac{|\\{j : d_j \\ge 2\\}|}{|\\{j : d_j \\ge 1\\}|}

  (0 for an injective matching, 1 when every hit target is hit twice or more);
- effective number of distinct targets, the exponential of the entropy of the
  in-degree distribution :math:`q_j = d_j / N`:

  .. math:: N_\\mathrm{eff} = \\exp\\Big(-\\sum_{j: d_j > 0} q_j \\log q_j\\Big),
      \\qquad \\mathrm{ratio} = N_\\mathrm{eff} / N \\in [1/N, 1]

  (1 for an injective matching, 1/N when all sources hit one target);
- mutual nearest neighbours: the fraction of sources ``i`` that are the best
  source of their own target, :math:`\\arg\\max_{i'} S_{i' m(i)} = i`.

Background matching
-------------------
With foreground masks ``src_fg`` (N,) and ``trg_fg`` (M,) over hyperpixels,

.. math:: \\mathrm{background\\_rate} =
    \\frac{|\\{i : \\mathrm{fg}^s_i \\wedge \\neg \\mathrm{fg}^t_{m(i)}\\}|}{|\\{i : \\mathrm{fg}^s_i\\}|}

the fraction of foreground sources matched into the target's background (NaN
when the source has no foreground hyperpixel). A hyperpixel is foreground when
its centre is; the masks come from one of

- :func:`cam_foreground`: the CAM map at the hyperpixel centre > ``threshold``
  (default 0.5; note that SCOT's marginals are built from the same CAM, so this
  foreground is not independent of the CAM marginals);
- :func:`keypoint_foreground`: the centre lies in the box spanned by the image's
  keypoints, widened by ``margin`` times the box's width (height) on the left and
  right (top and bottom); default margin 0.1. Independent of the CAM, but only a
  box: background inside it counts as foreground;
- :func:`mask_foreground`: a user mask of any resolution (the centre is looked
  up after scaling to the mask's size), nonzero = foreground.

Plan statistics (pure functions of ``plan``)
--------------------------------------------
With :math:`\\bar P = P / \\sum_{ij} P_{ij}`:

- entropy :math:`H(\\bar P) = -\\sum_{ij} \\bar P_{ij} \\log \\bar P_{ij}` in nats
  (:math:`\\log(NM)` for a uniform plan, :math:`\\log N` for a uniform-row plan with
  one nonzero per row; exact OT plans have at most :math:`N + M - 1` nonzeros);
- mass on the row argmax :math:`\\sum_i \\max_j P_{ij} / \\sum_{ij} P_{ij}`
  (1 when every row puts all its mass on one target);
- marginal error :math:`\\|P\\mathbf 1 - a\\|_1 + \\|P^\\top \\mathbf 1 - b\\|_1`
  (the library's error metric for balanced OT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch


# --------------------------------------------------------------------------- many-to-one
def _check_matches(matches: torch.Tensor, n_targets: int) -> torch.Tensor:
    if not isinstance(matches, torch.Tensor) or matches.dim() != 1:
        raise ValueError("matches: expected a 1-D tensor of target indices")
    if matches.numel() == 0:
        raise ValueError("matches: empty (no source hyperpixel)")
    if matches.dtype.is_floating_point or matches.dtype == torch.bool:
        raise ValueError(f"matches: expected an integer tensor, got {matches.dtype}")
    if not isinstance(n_targets, int) or n_targets < 1:
        raise ValueError(f"n_targets: expected an integer >= 1, got {n_targets!r}")
    lo, hi = int(matches.min()), int(matches.max())
    if lo < 0 or hi >= n_targets:
        raise ValueError(f"matches: indices must lie in [0, {n_targets}), got [{lo}, {hi}]")
    return matches.long()


def in_degree(matches: torch.Tensor, n_targets: int) -> torch.Tensor:
    """``d_j``: how many sources hit target ``j``, shape (M,) int64."""
    return torch.bincount(_check_matches(matches, n_targets), minlength=n_targets)


def in_degree_histogram(matches: torch.Tensor, n_targets: int) -> torch.Tensor:
    """``h_k = |{j : d_j = k}|`` for ``k = 0 .. max_j d_j``, shape (max d + 1,) int64."""
    return torch.bincount(in_degree(matches, n_targets))


def max_in_degree(matches: torch.Tensor, n_targets: int) -> int:
    """``max_j d_j``."""
    return int(in_degree(matches, n_targets).max())


def collision_rate(matches: torch.Tensor, n_targets: int) -> float:
    """``|{j : d_j >= 2}| / |{j : d_j >= 1}|``: share of hit targets hit more than once."""
    d = in_degree(matches, n_targets)
    return float((d >= 2).sum()) / float((d >= 1).sum())


def effective_targets(matches: torch.Tensor, n_targets: int) -> float:
    """``exp(-sum_j q_j log q_j)`` with ``q_j = d_j / N``: the effective number of distinct targets."""
    d = in_degree(matches, n_targets).double()
    q = d[d > 0] / d.sum()  # (hit targets,)
    return float(torch.exp(-(q * q.log()).sum()))


def effective_target_ratio(matches: torch.Tensor, n_targets: int) -> float:
    """:func:`effective_targets` divided by the number of sources N, in [1/N, 1]."""
    return effective_targets(matches, n_targets) / matches.numel()


def mutual_nn_rate(matches: torch.Tensor, scores: torch.Tensor) -> float:
    """Share of sources ``i`` with ``argmax_i' scores[i', m(i)] == i`` (mutual nearest neighbours)."""
    if scores.dim() != 2 or scores.shape[0] != matches.numel():
        raise ValueError(f"scores: expected shape ({matches.numel()}, M), got {tuple(scores.shape)}")
    m = _check_matches(matches, scores.shape[1])
    best_src = scores.argmax(dim=0)  # (M,)
    back = best_src[m]  # (N,)
    return float((back == torch.arange(m.numel(), device=m.device)).double().mean())


# --------------------------------------------------------------------------- background
def background_rate(matches: torch.Tensor, src_fg: torch.Tensor, trg_fg: torch.Tensor) -> float:
    """Share of foreground sources whose match lies in the target background (NaN: no foreground source)."""
    src_fg, trg_fg = src_fg.bool(), trg_fg.bool()
    if src_fg.shape != matches.shape:
        raise ValueError(f"src_fg: expected shape {tuple(matches.shape)}, got {tuple(src_fg.shape)}")
    if trg_fg.dim() != 1:
        raise ValueError(f"trg_fg: expected a 1-D mask, got shape {tuple(trg_fg.shape)}")
    m = _check_matches(matches, trg_fg.numel())
    n_fg = int(src_fg.sum())
    if n_fg == 0:
        return math.nan
    into_bg = src_fg & ~trg_fg[m]  # (N,)
    return float(into_bg.sum()) / n_fg


# --------------------------------------------------------------------------- plan statistics
def _check_plan(plan: torch.Tensor) -> torch.Tensor:
    if not isinstance(plan, torch.Tensor) or plan.dim() != 2:
        raise ValueError("plan: expected an (N, M) tensor")
    total = float(plan.sum())
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"plan: total mass must be finite and > 0, got {total}")
    return plan


def plan_entropy(plan: torch.Tensor) -> float:
    """``-sum P̄ log P̄`` (nats) of the normalised plan ``P̄ = P / sum P``; ``0 log 0 = 0``."""
    p = _check_plan(plan).double()
    p = p / p.sum()  # (N, M)
    return float(-torch.special.xlogy(p, p).sum())


def argmax_mass(plan: torch.Tensor) -> float:
    """``sum_i max_j P_ij / sum_ij P_ij``: the share of the mass that the row argmax keeps."""
    p = _check_plan(plan)  # sums in float64, no float64 copy of the plan
    return float(p.amax(dim=1).sum(dtype=torch.float64) / p.sum(dtype=torch.float64))


def plan_marginal_error(plan: torch.Tensor, a: Optional[torch.Tensor] = None,
                        b: Optional[torch.Tensor] = None) -> float:
    """``||P 1 - a||_1 + ||P^T 1 - b||_1`` (uniform ``a``, ``b`` when None)."""
    p = _check_plan(plan).double()
    N, M = p.shape
    a = torch.full((N,), 1.0 / N, dtype=p.dtype) if a is None else a.double().to("cpu")
    b = torch.full((M,), 1.0 / M, dtype=p.dtype) if b is None else b.double().to("cpu")
    p = p.cpu()
    return float((p.sum(1) - a).abs().sum() + (p.sum(0) - b).abs().sum())


# --------------------------------------------------------------------------- foreground
@dataclass(frozen=True)
class Foreground:
    """Foreground masks over the hyperpixels of both images, and how they were made."""

    src: torch.Tensor  # (N,) bool
    trg: torch.Tensor  # (M,) bool
    method: str  # "cam", "keypoint-box" or "mask"
    params: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        """JSON-ready description: method, parameters, foreground shares."""
        return {"method": self.method, **self.params,
                "src_fraction": float(self.src.float().mean()),
                "trg_fraction": float(self.trg.float().mean())}


def _pixel_lookup(hp, image: torch.Tensor) -> torch.Tensor:
    """Values of a (H', W') map at the hyperpixel centres (resized-image pixels scaled to the map)."""
    W, H = hp.size
    Hm, Wm = image.shape[-2:]
    c = hp.centres.cpu()
    x = (c[:, 0] * Wm / W).long().clamp(0, Wm - 1)
    y = (c[:, 1] * Hm / H).long().clamp(0, Hm - 1)
    return image.cpu()[y, x]  # (N,)


def cam_mask(hp, threshold: float = 0.5) -> torch.Tensor:
    """(N,) bool: CAM value at the hyperpixel centre > ``threshold``."""
    if hp.cam is None:
        raise ValueError("CAM foreground: these hyperpixels carry no CAM map (made with use_cam=False); "
                         "give keypoints or masks instead")
    return _pixel_lookup(hp, hp.cam) > threshold


def keypoint_mask(hp, keypoints, margin: float = 0.1) -> torch.Tensor:
    """(N,) bool: centre inside the box spanned by (K, 2) xy keypoints (original pixels), widened by ``margin``."""
    if isinstance(keypoints, torch.Tensor):
        kps = keypoints.detach().cpu().double().reshape(-1, 2)
    else:  # a copy: datasets hand out read-only arrays
        kps = torch.from_numpy(np.array(keypoints, dtype=np.float64)).reshape(-1, 2)
    if kps.shape[0] == 0 or not bool(torch.isfinite(kps).all()):
        raise ValueError("keypoints: need at least one finite (x, y) keypoint for a foreground box")
    if margin < 0:
        raise ValueError(f"margin: must be >= 0, got {margin!r}")
    sx, sy = hp.scale
    kps = kps * torch.tensor([sx, sy], dtype=torch.float64)  # resized pixels
    lo, hi = kps.min(0).values, kps.max(0).values  # (2,)
    pad = margin * (hi - lo)
    c = hp.centres.cpu().double()
    return ((c >= lo - pad) & (c <= hi + pad)).all(dim=1)


def user_mask(hp, mask) -> torch.Tensor:
    """(N,) bool: ``mask`` (H', W') of any resolution (same aspect as the image) nonzero at the centre."""
    m = torch.as_tensor(mask)
    if m.dim() != 2:
        raise ValueError(f"mask: expected a 2-D (H, W) array, got shape {tuple(m.shape)}")
    return _pixel_lookup(hp, m) != 0


def cam_foreground(src, trg, threshold: float = 0.5) -> Foreground:
    return Foreground(cam_mask(src, threshold), cam_mask(trg, threshold), "cam", {"threshold": threshold})


def keypoint_foreground(src, trg, src_kps, trg_kps, margin: float = 0.1) -> Foreground:
    return Foreground(keypoint_mask(src, src_kps, margin), keypoint_mask(trg, trg_kps, margin),
                      "keypoint-box", {"margin": margin})


def mask_foreground(src, trg, src_mask, trg_mask) -> Foreground:
    return Foreground(user_mask(src, src_mask), user_mask(trg, trg_mask), "mask", {})


# --------------------------------------------------------------------------- all at once
def matching_stats(matches: torch.Tensor, scores: torch.Tensor,
                   foreground: Optional[Foreground] = None) -> Dict[str, Any]:
    """Many-to-one statistics of ``matches`` (N,) read from ``scores`` (N, M), and the background rate."""
    M = scores.shape[1]
    matches = matches.cpu()
    d = in_degree(matches, M)
    out = {
        "collision_rate": collision_rate(matches, M),
        "max_in_degree": int(d.max()),
        "in_degree_histogram": in_degree_histogram(matches, M).tolist(),
        "hit_targets": int((d > 0).sum()),
        "effective_targets": effective_targets(matches, M),
        "effective_target_ratio": effective_target_ratio(matches, M),
        "mutual_nn_rate": mutual_nn_rate(matches, scores.cpu()),
    }
    out["background_rate"] = (None if foreground is None
                              else background_rate(matches, foreground.src, foreground.trg))
    return out


#: the per-pair measures :func:`pair_measures` returns (and ``scot-ot eval`` records and averages)
PAIR_MEASURES = ("collision_rate", "effective_target_ratio", "mutual_nn_rate", "background_rate",
                 "plan_mass", "unmatched_mass")


def pair_measures(corr, foreground: Optional[Foreground] = None) -> Dict[str, Optional[float]]:
    """The failure measures of one correspondence, as ``scot-ot eval`` records them per pair and solver.

    On the final matches ``m(i)`` (after RHM) and their ``scores``: the collision rate,
    the effective-target ratio :math:`N_\\mathrm{eff} / N`, the mutual-NN rate, and the
    background rate with ``foreground`` (``None`` without one; NaN when the source has
    no foreground hyperpixel). ``plan_mass`` is :math:`\\sum_{ij} P_{ij}` and
    ``unmatched_mass`` :math:`\\max(0, 1 - \\sum_{ij} P_{ij})`: the share of the unit
    source mass the plan leaves unmatched (partial OT, dustbins, unbalanced OT; 0 up to
    rounding for balanced solvers), ``None`` for the rules that are not OT (their plan's
    mass means nothing).
    """
    from .ot.registry import Family, solver_info

    matches = corr.matches.cpu()
    M = len(corr.trg)
    mass = float(corr.plan.detach().sum())  # float32 pairwise sum: 30x faster than a float64 copy
    not_ot = solver_info(corr.ot.solver).family is Family.HEURISTIC
    return {
        "collision_rate": collision_rate(matches, M),
        "effective_target_ratio": effective_target_ratio(matches, M),
        "mutual_nn_rate": mutual_nn_rate(matches, corr.scores.detach().cpu()),
        "background_rate": (None if foreground is None
                            else background_rate(matches, foreground.src, foreground.trg)),
        "plan_mass": None if not_ot else mass,
        "unmatched_mass": None if not_ot else max(0.0, 1.0 - mass),
    }


def diagnose(corr, foreground: Optional[Foreground] = None, cam_threshold: float = 0.5) -> Dict[str, Any]:
    """Every diagnostic of a :class:`~scot_ot.matching.Correspondence`, as a JSON-ready dict.

    ``foreground``: masks for the background rate; when None, the CAM foreground
    (:func:`cam_foreground` at ``cam_threshold``) if both images carry a CAM map, else
    no background rate (``None``). Keys: the many-to-one statistics of the final
    matches (after RHM; :func:`matching_stats`), the same for the raw plan's row
    argmax under ``plan_*``, ``background_rate``, ``foreground`` (how it was made),
    the plan statistics and the OT run (solver, eps, n_iters, converged, time_s).
    """
    if foreground is None and corr.src.cam is not None and corr.trg.cam is not None:
        foreground = cam_foreground(corr.src, corr.trg, cam_threshold)
    plan = corr.plan.detach().cpu()
    out = matching_stats(corr.matches, corr.scores.detach(), foreground)
    raw = matching_stats(plan.argmax(dim=1), plan, foreground)
    out.update({f"plan_{k}": v for k, v in raw.items() if k != "in_degree_histogram"})
    res = corr.ot
    out.update({
        "foreground": None if foreground is None else foreground.describe(),
        "n_src": len(corr.src), "n_trg": len(corr.trg),
        "plan_entropy": plan_entropy(plan),
        "plan_entropy_uniform": math.log(plan.numel()),
        "argmax_mass": argmax_mass(plan),
        "marginal_error": float(res.error),
        "solver": res.solver, "eps": res.problem.eps, "n_iters": res.n_iters,
        "converged": bool(res.converged), "time_s": float(res.time_s),
    })
    return out

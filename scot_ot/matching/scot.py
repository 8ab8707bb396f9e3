"""The SCOT pipeline: two images in, dense correspondences out.

1. both images resized so that the longest side is ``image_side`` (SCOT's float32
   ratio, sizes truncated: :func:`.image.resize_longest`);
2. hyperpixel features and CAM weights (:mod:`.hyperpixels`), marginals
   ``a = w_s / sum w_s``, ``b = w_t / sum w_t``;
3. cost ``C_ij = 1 - max(cos(x_i, y_j), 0)`` between L2-normalised hyperpixels;
4. an OT plan from any registered solver (:func:`scot_ot.solve`);
5. scores ``V = (N_s * P)_+ ^ exponent``, then regularised Hough matching
   (:mod:`.rhm`), optionally the soft mutual filter (:mod:`.mutual`, not SCOT's);
6. per source hyperpixel, the target of highest score; keypoints are
   transferred through those matches (:mod:`.transfer`).

SCOT's official code runs **one** Sinkhorn iteration (``niter=1``) with eps 0.05
(its paper states 50 iterations): the defaults ``solver="pot-sinkhorn"``,
``max_iter=1`` reproduce the code; raise ``max_iter`` (and set ``tol``) to solve
the OT problem to convergence.
"""

from __future__ import annotations

import copy
import reprlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ot import OTResult, get_solver, solve
from .hyperpixels import HYPERPIXEL_NORMS, HyperpixelExtractor, Hyperpixels
from .image import ImageError, ImageLike, load_image, resize_longest
from .mutual import soft_mutual_filter
from .rhm import regularized_hough_matching
from .transfer import TRANSFER_RULES, refine_keypoints, soft_offsets

#: the smallest image side (after resizing) the stride-32 backbones accept
MIN_SIDE = 32


#: precisions of the cost's matrix product (:func:`cosine_cost`)
COST_PRECISIONS = ("full", "bfloat16")


def cosine_cost(src: torch.Tensor, trg: torch.Tensor, precision: str = "full") -> torch.Tensor:
    """``C_ij = 1 - max(<x_i, y_j>, 0)`` for L2-normalised rows; values in [0, 1].

    Computed in place in the one (N, M) buffer of the product (the upper clamp
    absorbs rounding): three passes over it instead of five with temporaries.

    ``precision``: ``"full"`` (SCOT) multiplies in the features' dtype;
    ``"bfloat16"`` rounds both factors to bfloat16 (8-bit significand) and
    multiplies there (float32 accumulation inside the kernel, the product rounded to
    bfloat16), then returns the cost in the features' dtype. Rounding to nearest
    leaves a relative error of at most :math:`u = 2^{-8}` per entry, so for unit rows
    :math:`|\\Delta\\langle x, y\\rangle| \\le (2u + u^2)(1 + u) + u \\le 3u + 4u^2
    \\approx 0.012`, from the inputs (Cauchy-Schwarz) and the rounded product (plus
    float32 accumulation, at most :math:`d \\, 2^{-24}` for ``d`` channels); the
    roundings are random, so the largest error is about ten times smaller in practice
    (0.0013 over 7100 x 7100 random ReLU rows of 1544 channels). On CPUs with
    AVX512-BF16 the product is about 3.7 x faster (0.21 against 0.79 s for
    7100 x 7100 hyperpixels of 1544 channels on the 2-core study machine).
    """
    if precision == "bfloat16":
        C = (src.to(torch.bfloat16) @ trg.to(torch.bfloat16).T).to(src.dtype)  # (N, M)
    else:
        C = src @ trg.T  # (N, M)
    return C.clamp_(0.0, 1.0).neg_().add_(1.0)


def check_keypoints(keypoints, width: float, height: float) -> torch.Tensor:
    """(K, 2) xy keypoints as float32, or ValueError if malformed or outside a W x H image."""
    if isinstance(keypoints, torch.Tensor):
        kps = keypoints.detach().float().cpu()
    else:
        try:
            kps = torch.from_numpy(np.array(keypoints, dtype=np.float32))
        except (TypeError, ValueError):
            raise ValueError(f"keypoints: expected (K, 2) numbers, got {reprlib.repr(keypoints)}") from None
    if kps.dim() != 2 or kps.shape[1] != 2:
        raise ValueError(f"keypoints: expected shape (K, 2), got {tuple(kps.shape)}")
    if not bool(torch.isfinite(kps).all()):
        raise ValueError("keypoints: contain NaN or inf")
    if bool(((kps < 0) | (kps > torch.tensor([width, height]))).any()):
        raise ValueError(f"keypoints: outside the source image of size {width:.0f} x {height:.0f} (W x H)")
    return kps


#: named configurations for :meth:`SCOT.preset`: constructor arguments over the defaults
PRESETS: Dict[str, Dict[str, object]] = {
    "faithful": {},  # SCOT's official code (docs/fidelity.md)
    # chosen by round 5 of the study of docs/accuracy.md and kept by rounds 6 to 9
    # (benchmarks/results/accuracy/round9/accuracy.json; round 8 kept each backbone's default layers,
    # round 9 no transfer_refine):
    # Lite0 + Lite1 + Lite2 hyperpixels at 400 px, the cost's product in bfloat16 (fast on CPUs with
    # AVX512-BF16 and on GPUs), both directions, the soft mutual filter, SCOT's one Sinkhorn iteration
    # computed in place by matrix-scaling, keypoints moved by the median vote of boxes twice SCOT's size
    "accurate": {"image_side": 400, "ensemble": ("efficientnet-lite1", "efficientnet-lite2"),
                 "cost_precision": "bfloat16", "bidirectional": True, "mutual_filter": True,
                 "solver": "matrix-scaling", "transfer": "median", "transfer_box": 2.0},
}


def _same_value(a, b) -> bool:
    """Equal arguments, a list equal to a tuple of the same items included."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


#: arguments every solver takes; the rest are each solver's own ``options``
COMMON_OT_ARGS = ("eps", "max_iter", "tol", "check_every", "reg_m")


def check_number(name: str, value, above: Optional[float] = None, at_least: Optional[float] = None) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number (not a bool), ``> above`` or
    ``>= at_least``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f"> {above:g}" if above is not None else f">= {at_least:g}"
        raise ValueError(f"{name}: must be a finite number {bound}, got {value!r}")


def check_ensemble(backbone: str, ensemble) -> Tuple[str, ...]:
    """``ensemble`` as a tuple of backbone names, or ValueError (not a list of known, distinct names)."""
    from ..features import available_backbones

    if isinstance(ensemble, str) or not isinstance(ensemble, (list, tuple)):
        raise ValueError(f"ensemble: expected a list of backbone names, got {ensemble!r}")
    names = tuple(ensemble)
    unknown = [n for n in names if n not in available_backbones()]
    if unknown:
        raise ValueError(f"ensemble: unknown backbone(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(available_backbones())}")
    if len(set(names + (backbone,))) != len(names) + 1:
        raise ValueError(f"ensemble: {list(names)} repeats a backbone (the main one is {backbone!r})")
    return names


def check_ensemble_layers(companions: Sequence, ensemble_layers) -> Optional[List[Tuple[int, ...]]]:
    """``ensemble_layers`` checked against the ensemble's backbones (None: their default layers), or
    ValueError naming the argument (not one list of valid ids per backbone)."""
    if ensemble_layers is None:
        return None
    if isinstance(ensemble_layers, str) or not isinstance(ensemble_layers, (list, tuple)):
        raise ValueError(f"ensemble_layers: expected one list of layer ids per ensemble backbone, "
                         f"got {ensemble_layers!r}")
    if len(ensemble_layers) != len(companions):
        raise ValueError(f"ensemble_layers: {len(ensemble_layers)} list(s) of layer ids for "
                         f"{len(companions)} ensemble backbone(s) ({', '.join(b.name for b in companions) or 'none'})")
    try:
        return [b.check_layer_ids(ids) for b, ids in zip(companions, ensemble_layers)]
    except ValueError as e:
        raise ValueError(f"ensemble_layers: {e}") from None


def check_device(device) -> torch.device:
    """``device`` as a :class:`torch.device`, or ValueError if it is not a name or not present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"device: {device!r} needs CUDA, which is not available on this machine ({why}); "
                             "use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: {device!r}: this machine has {n} CUDA device(s), cuda:0 .. cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device: {device!r} (Apple GPU) is not available on this machine; use 'cpu'")
    elif dev.type != "cpu":
        raise ValueError(f"device: {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def check_ot_args(solver: str, **ot_args) -> None:
    """ValueError naming the argument unless :func:`scot_ot.solve` would accept ``solver`` with ``ot_args``.

    ``ot_args``: any of :data:`COMMON_OT_ARGS` and the solver's own ``options``.
    Checks the names, ``max_iter``/``tol``/``check_every``, ``eps`` and ``reg_m`` (on a
    1 x 1 problem, with the solver layer's own validation), without solving anything.
    """
    from ..ot.api import check_supported
    from ..ot.iterate import validate_loop_args
    from ..ot.problem import OTProblem

    impl = get_solver(solver)
    unknown = sorted(set(ot_args) - set(COMMON_OT_ARGS) - set(impl.info.option_names))
    if unknown:
        takes = ", ".join(COMMON_OT_ARGS + impl.info.option_names)
        raise ValueError(f"solver {solver!r} does not take option(s) {', '.join(unknown)}; it takes {takes}")
    validate_loop_args(ot_args.get("max_iter", 1000), ot_args.get("tol", 1e-6), ot_args.get("check_every", 10))
    problem = OTProblem.create(torch.zeros(1, 1, dtype=torch.float64), eps=ot_args.get("eps", 0.05),
                               reg_m=ot_args.get("reg_m"))
    check_supported(solver, impl.info, problem)  # reg_m of a kind the solver declares


@dataclass(frozen=True)
class Correspondence:
    """Dense matches between two images.

    ``plan`` (N, M) is the OT plan; ``scores`` (N, M) the post-processed and
    RHM-rescored plan; ``matches`` (N,) the best target hyperpixel of each source
    hyperpixel and ``confidences`` (N,) its score. Coordinates of boxes/centres are
    in resized pixels; :meth:`transfer` works in original pixels, with the keypoint
    transfer rule ``transfer_rule`` (one of :data:`.transfer.TRANSFER_RULES`), its
    voting boxes scaled by ``transfer_box`` (:func:`.transfer.voters`) and, for
    ``transfer_refine`` > 0, the appearance refinement within that many cells
    (:func:`.transfer.refine_keypoints`).
    """

    src: Hyperpixels
    trg: Hyperpixels
    plan: torch.Tensor
    scores: torch.Tensor
    matches: torch.Tensor
    confidences: torch.Tensor
    ot: OTResult
    timings: Dict[str, float] = field(default_factory=dict)
    transfer_rule: str = "scot"
    transfer_box: float = 1.0
    transfer_refine: int = 0

    def transfer(self, keypoints) -> torch.Tensor:
        """Map (K, 2) xy keypoints of the original source image to the original target image.

        As SCOT: ``k' = r_s k`` into the resized source (one float32 ratio per image,
        both axes), transfer there (:func:`.transfer.transfer_keypoints`), and back with
        ``k / r_t``. SCOT compares in the resized target frame with the threshold times
        ``r_t``; dividing both sides by ``r_t`` gives the same test in original pixels.
        Keypoints are checked against ``(W' + 1) / r`` x ``(H' + 1) / r``, the bound
        that truncating resize leaves of the original size (within ``1 / r`` px of it).
        """
        sx, sy = self.src.scale
        W, H = self.src.size
        kps = check_keypoints(keypoints, (W + 1) / sx, (H + 1) / sy)
        src_scale = torch.tensor(self.src.scale, dtype=torch.float32)  # (2,) = (r_s, r_s)
        trg_scale = torch.tensor(self.trg.scale, dtype=torch.float32)  # (2,) = (r_t, r_t)
        matches = self.matches.cpu()
        rule = TRANSFER_RULES[self.transfer_rule]
        extra = {"weights": self.confidences.detach().cpu()} if rule.weighted else {}
        offsets = (soft_offsets(self.scores.detach().cpu(), matches, self.trg.centres.cpu(), self.trg.grid)
                   if rule.refined else None)
        moved = rule.vote(kps * src_scale, self.src.boxes.cpu(), self.trg.boxes.cpu(), matches,
                          box_scale=self.transfer_box, offsets=offsets, **extra)  # (K, 2), resized target pixels
        if self.transfer_refine:
            moved = refine_keypoints(kps * src_scale, moved, self.src.feats.detach().cpu(), self.src.centres.cpu(),
                                     self.src.grid, self.trg.feats.detach().cpu(), self.trg.centres.cpu(),
                                     self.trg.grid, self.transfer_refine)
        return moved / trg_scale


class SCOT:
    """Semantic correspondence by optimal transport, with the OT solver chosen by name.

    Parameters
    ----------
    backbone : name from :func:`scot_ot.features.available_backbones`.
    layers : hyperpixel layer ids; None takes the backbone's preset.
    weights : checkpoint path for backbones without embedded weights.
    solver, eps, max_iter, tol, check_every, reg_m : passed to :func:`scot_ot.solve`
        (``max_iter=1`` with ``pot-sinkhorn`` is SCOT's official setting).
    solver_options : extra options of the chosen solver.
    use_cam : CAM-weighted marginals (else uniform).
    rhm : apply regularised Hough matching.
    exponent : scores are ``(N_s * P)_+ ** exponent`` (0.5 PF-PASCAL/WILLOW, 1 SPair).
    image_side : longest image side after resizing.
    transfer : keypoint transfer rule, one of :data:`.transfer.TRANSFER_RULES`
        (``"scot"``: SCOT's equal votes).
    transfer_box : the voting boxes are the hyperpixels' receptive fields scaled by this
        factor about their centres (1: SCOT's; 0: the nearest hyperpixel alone;
        :func:`.transfer.voters`).
    transfer_refine : 0 (SCOT) or R > 0: each transferred keypoint then moves to the target
        hyperpixel within R grid cells whose features are most like the source features at
        the keypoint (:func:`.transfer.refine_keypoints`).
    bidirectional : also match target to source and keep the geometric mean of both
        directions' scores (:meth:`match_hyperpixels`).
    hyperpixel_norm : ``"joint"`` (SCOT: one L2 norm over all layers) or ``"layer"``
        (each layer normalised first, so each weighs the same in the cosine).
    ensemble : names of more backbones whose layers join the hyperpixels;
        the cosine is the mean of the backbones' (:mod:`.hyperpixels`). Their
        weights come from their own packages (both dependencies, for the
        ``accurate`` preset).
    ensemble_layers : one list of layer ids per ``ensemble`` backbone (default: each
        backbone's default layers), as ``layers`` is for the first backbone.
    cost_precision : ``"full"`` (SCOT) or ``"bfloat16"``: the precision of the cost's
        matrix product (:func:`cosine_cost`: about 3.7 x faster on CPUs with
        AVX512-BF16, entries within 0.012 of the full product).
    mutual_filter : rescore the final scores by the soft mutual nearest-neighbour
        filter (:func:`.mutual.soft_mutual_filter`) before each source takes its best
        target (not in SCOT).

    The defaults reproduce SCOT's official code; :meth:`preset` builds the named
    configurations of :data:`PRESETS`.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: Optional[Sequence[int]] = None,
        weights: Optional[str] = None,
        device: str = "cpu",
        solver: str = "pot-sinkhorn",
        eps: float = 0.05,
        max_iter: int = 1,
        tol: float = 1e-6,
        check_every: int = 10,
        reg_m=None,
        solver_options: Optional[dict] = None,
        use_cam: bool = True,
        rhm: bool = True,
        exponent: float = 0.5,
        image_side: int = 300,
        transfer: str = "scot",
        transfer_box: float = 1.0,
        transfer_refine: int = 0,
        bidirectional: bool = False,
        hyperpixel_norm: str = "joint",
        ensemble: Sequence[str] = (),
        ensemble_layers: Optional[Sequence[Sequence[int]]] = None,
        cost_precision: str = "full",
        mutual_filter: bool = False,
    ):
        from ..features import get_backbone

        if solver_options is not None and not isinstance(solver_options, dict):
            raise ValueError(f"solver_options: expected a dict of option name -> value, got {solver_options!r}")
        ot_args = dict(eps=eps, max_iter=max_iter, tol=tol, check_every=check_every, reg_m=reg_m,
                       **(solver_options or {}))
        check_ot_args(solver, **ot_args)  # every argument checked before any work
        check_number("exponent", exponent, above=0.0)
        if not isinstance(image_side, int) or isinstance(image_side, bool) or image_side < MIN_SIDE:
            raise ValueError(f"image_side: must be an integer >= {MIN_SIDE}, got {image_side!r}")
        if transfer not in TRANSFER_RULES:
            raise ValueError(f"transfer: expected one of {', '.join(TRANSFER_RULES)}, got {transfer!r}")
        check_number("transfer_box", transfer_box, at_least=0.0)
        if not isinstance(transfer_refine, (int, np.integer)) or isinstance(transfer_refine, bool) or transfer_refine < 0:
            raise ValueError(f"transfer_refine: must be an integer >= 0 (grid cells), got {transfer_refine!r}")
        for flag, value in (("use_cam", use_cam), ("rhm", rhm), ("bidirectional", bidirectional),
                            ("mutual_filter", mutual_filter)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag}: expected True or False, got {value!r}")
        if hyperpixel_norm not in HYPERPIXEL_NORMS:
            raise ValueError(f"hyperpixel_norm: expected one of {', '.join(HYPERPIXEL_NORMS)}, "
                             f"got {hyperpixel_norm!r}")
        if cost_precision not in COST_PRECISIONS:
            raise ValueError(f"cost_precision: expected one of {', '.join(COST_PRECISIONS)}, "
                             f"got {cost_precision!r}")
        ensemble = check_ensemble(backbone, ensemble)
        self.device = check_device(device)
        self.backbone = get_backbone(backbone, weights=weights, device=self.device)
        if layers is not None:
            try:
                layers = self.backbone.check_layer_ids(layers)
            except ValueError as e:
                raise ValueError(f"layers: {e}") from None
        companions = [get_backbone(name, device=self.device) for name in ensemble]
        self.extractor = HyperpixelExtractor(
            self.backbone, layers if layers is not None else self.backbone.default_layers, use_cam,
            norm=hyperpixel_norm, companions=companions,
            companion_layers=check_ensemble_layers(companions, ensemble_layers),
        )
        self.ot_args = dict(solver=solver, **ot_args)
        self.rhm = rhm
        self.exponent = exponent
        self.image_side = image_side
        self.transfer = transfer
        self.transfer_box = float(transfer_box)
        self.transfer_refine = int(transfer_refine)
        self.bidirectional = bidirectional
        self.cost_precision = cost_precision
        self.mutual_filter = mutual_filter
        self.preset_name: Optional[str] = None

    @classmethod
    def preset(cls, name: str, **overrides) -> "SCOT":
        """The configuration :data:`PRESETS` names, with ``overrides`` (any constructor argument) on top.

        ``"faithful"`` is SCOT's official code (the constructor's defaults); ``"accurate"``
        the configuration docs/accuracy.md selected. ValueError for an unknown name.
        """
        base = cls.preset_arguments(name)
        model = cls(**{**PRESETS[name], **overrides})
        changed = sorted(k for k, v in overrides.items() if k != "device" and not _same_value(base.get(k), v))
        model.preset_name = name if not changed else f"{name} (with {', '.join(changed)} changed)"
        return model

    @classmethod
    def preset_arguments(cls, name: str) -> Dict[str, object]:
        """Every constructor argument of the preset ``name``: the defaults with :data:`PRESETS` on top."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
        import inspect

        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **PRESETS[name]}

    def config(self) -> Dict[str, object]:
        """Everything that decides this model's output, JSON-ready (recorded by ``scot-ot eval``)."""
        return {"preset": self.preset_name, "backbone": self.backbone.name, "layers": list(self.extractor.layers),
                "image_side": self.image_side, "use_cam": self.extractor.use_cam, **self.ot_args,
                "rhm": self.rhm, "exponent": self.exponent, "transfer": self.transfer,
                "transfer_box": self.transfer_box, "transfer_refine": self.transfer_refine,
                "bidirectional": self.bidirectional, "hyperpixel_norm": self.extractor.norm,
                "ensemble": [b.name for b in self.extractor.companions],
                "ensemble_layers": [list(ids) for ids in self.extractor.companion_layers],
                "cost_precision": self.cost_precision,
                "mutual_filter": self.mutual_filter}

    def with_solver(self, solver: str, **ot_args) -> "SCOT":
        """A copy that shares this model's backbone and features but solves OT differently.

        ``ot_args`` override any of ``eps, max_iter, tol, check_every, reg_m`` and the
        solver's own options.
        """
        merged = {**self.ot_args, **ot_args}
        merged.pop("solver")
        check_ot_args(solver, **merged)
        other = copy.copy(self)
        other.ot_args = {"solver": solver, **merged}
        return other

    # ------------------------------------------------------------------ stages
    def prepare(self, image: ImageLike, name: str = "image") -> Tuple[torch.Tensor, Tuple[float, float]]:
        """Load and resize one image (:func:`.image.resize_longest`): (3, H', W') on the device,
        and its scale ``(r, r)`` from original to resized pixels."""
        img = load_image(image, name)
        small, scale = resize_longest(img, self.image_side)
        if min(small.shape[-2:]) < MIN_SIDE:
            raise ImageError(
                f"{name}: image of size {img.shape[2]} x {img.shape[1]} is too small or too elongated: "
                f"after resizing to {self.image_side} px its short side is {min(small.shape[-2:])} px, "
                f"the network needs at least {MIN_SIDE}"
            )
        return small.to(self.device), scale

    def hyperpixels(self, image: ImageLike, name: str = "image", mask=None) -> Hyperpixels:
        img, scale = self.prepare(image, name)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.float32)[None, None]
            mask = torch.nn.functional.interpolate(mask, size=img.shape[-2:], mode="nearest")[0, 0]
        return self.extractor(img, scale, mask=None if mask is None else mask.to(self.device))

    def hyperpixels_many(self, images: Sequence[ImageLike], names: Optional[Sequence[str]] = None,
                         batch_size: int = 1) -> List[Hyperpixels]:
        """Hyperpixels of several images, in order, with the backbone run on batches.

        Images whose resized shapes are equal go through the network together, up to
        ``batch_size`` at a time (no padding, so each result equals the unbatched
        :meth:`hyperpixels` up to float rounding). Batches pay off on a GPU; on the
        2-core CPU they do not (``benchmarks/eval_throughput.py``).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        names = [f"image {k}" for k in range(len(images))] if names is None else list(names)
        prepared = [self.prepare(img, name) for img, name in zip(images, names)]
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for k, (img, _) in enumerate(prepared):
            groups.setdefault(tuple(img.shape), []).append(k)
        out: List[Optional[Hyperpixels]] = [None] * len(prepared)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                imgs = torch.stack([prepared[k][0] for k in chunk])
                for k, hp in zip(chunk, self.extractor.extract(imgs, [prepared[k][1] for k in chunk])):
                    out[k] = hp
        return out

    def match_hyperpixels(self, src: Hyperpixels, trg: Hyperpixels) -> Correspondence:
        """OT + post-processing + RHM on two images' hyperpixels (both ways when ``bidirectional``).

        Bidirectional: the target-to-source problem (cost :math:`C^\\top`, copied
        from the forward cost; marginals swapped) gets its own OT and RHM, and the
        scores are the geometric mean :math:`\\sqrt{S^{s \\to t}_{ij} \\, S^{t \\to s}_{ji}}`:
        a match both directions agree on keeps its score, one that only one direction
        favours loses it. ``plan`` and ``ot`` are the source-to-target ones; the timings
        add both directions. With ``mutual_filter`` the final scores (of one direction or
        both) are then rescored by :func:`.mutual.soft_mutual_filter` (timed with RHM).
        """
        timings = {"cost": 0.0, "ot": 0.0, "rhm": 0.0}
        C = self.cost(src, trg, timings)
        plan, scores, res = self.transport(C, src, trg, timings)
        if self.bidirectional:
            t = time.perf_counter()
            C_back = C.T.contiguous()  # (M, N): a copy, faster than computing it or solving on the view
            timings["cost"] += time.perf_counter() - t
            _, back, _ = self.transport(C_back, trg, src, timings)
            del C_back
            t = time.perf_counter()
            scores = scores.mul_(back.T).sqrt_()  # (N, M)
            timings["rhm"] += time.perf_counter() - t
            del back
        if self.mutual_filter:
            t = time.perf_counter()
            scores = soft_mutual_filter(scores)  # (N, M), in place
            timings["rhm"] += time.perf_counter() - t
        confidences, matches = scores.max(dim=1)
        return Correspondence(src, trg, plan, scores, matches, confidences, res, timings, self.transfer,
                              self.transfer_box, self.transfer_refine)

    def cost(self, src: Hyperpixels, trg: Hyperpixels, timings: Dict[str, float]) -> torch.Tensor:
        """SCOT's step 3: the (N, M) cosine cost (:func:`cosine_cost` at ``cost_precision``),
        timed into ``timings["cost"]``."""
        t = time.perf_counter()
        C = cosine_cost(src.feats, trg.feats, self.cost_precision)  # (N, M)
        timings["cost"] += time.perf_counter() - t
        return C

    def transport(self, C: torch.Tensor, src: Hyperpixels, trg: Hyperpixels, timings: Dict[str, float]
                  ) -> Tuple[torch.Tensor, torch.Tensor, OTResult]:
        """SCOT's steps 4-5 from ``src`` to ``trg`` on the cost ``C`` (N, M), left unchanged:
        the plan, the RHM scores (N, M) and the OT result."""
        a = src.weights / src.weights.sum()
        b = trg.weights / trg.weights.sum()
        t = time.perf_counter()
        res = solve(C, a.to(C), b.to(C), **self.ot_args)
        plan = res.plan
        timings["ot"] += time.perf_counter() - t
        t = time.perf_counter()
        scores = (plan * len(src)).clamp_min_(0.0).pow_(self.exponent)  # (N, M), one new buffer
        if self.rhm:
            scores = regularized_hough_matching(scores, src.centres, trg.centres, src.grid, trg.grid,
                                                src.size, trg.size)
        timings["rhm"] += time.perf_counter() - t
        return plan, scores, res

    def match(self, src: ImageLike, trg: ImageLike, src_mask=None, trg_mask=None) -> Correspondence:
        """Dense correspondences from ``src`` to ``trg`` (paths, PIL images or tensors)."""
        t = time.perf_counter()
        hs = self.hyperpixels(src, "src", src_mask)
        ht = self.hyperpixels(trg, "trg", trg_mask)
        t_feat = time.perf_counter() - t
        corr = self.match_hyperpixels(hs, ht)
        corr.timings["features"] = t_feat
        return corr

"""PCK evaluation of one or several OT solvers on a dataset split.

Features are computed once per image (an image appears in many pairs) and kept in
a small LRU cache; every solver then runs on the same hyperpixels.

What can go wrong with one pair is recorded, never fatal to the run:

- an image that does not decode (or is too small) and a source keypoint outside its
  image: the pair is *skipped*, listed in ``record["skipped"]`` with the annotation
  file, line and reason, like the pairs the loader left out (``strict=True`` raises
  :class:`~scot_ot.datasets.DatasetError` instead);
- a solver that fails numerically on a pair (:class:`~scot_ot.ot.errors.NumericalError`,
  or any ``FloatingPointError``): that solver's result for the pair is
  ``{"failed": reason}``, counted in the solver's ``n_failed`` and left out of its
  PCK means (a PCK of 0 would blame the matching for a solver's failure).

Zero evaluated pairs is an error (``ValueError``), not an empty record.

The JSON record is standard JSON (``null``, never ``NaN``) and is rewritten
atomically after every evaluated pair, so an interruption (Ctrl-C, SIGTERM, or a
kill) loses at most the pair in flight; ``resume`` continues a partial file after
checking that it is a results file made with the same configuration.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..outputs import write_json as _write_json
from .pck import DEFAULT_ALPHAS, pck_per_pair, summarize_pck


class FeatureCache:
    """LRU cache of :class:`~scot_ot.matching.Hyperpixels` by image path.

    Counters, over :meth:`get` calls (``hits + misses`` = lookups that returned):
    ``misses`` counts the first use of each extracted image (prefetched or not),
    ``hits`` the later uses served from the cache, ``extracted`` the images that went
    through the backbone (more than ``misses`` only when a prefetched image was
    evicted before its use), ``unreadable`` the images that could not be used (their
    error is remembered, not retried).

    ``batch_size > 1``: :meth:`prefetch` extracts the next uncached images of the pairs
    ahead together, in batches of equally sized images.

    ``disk``: a :class:`~scot_ot.evaluation.disk_cache.DiskCache`; an image not in
    memory is read from it when there (not ``extracted``), and stored in it after an
    extraction. Its counters join :meth:`counters`.

    ``mask_for``: ``image path -> (H, W) foreground`` for SCOT's mask ("FCN")
    marginals: each image's map replaces its CAM (images then go through the
    backbone one by one). Its :class:`~scot_ot.datasets.masks.MaskError` is
    remembered like an unreadable image's.
    """

    def __init__(self, model, capacity: int = 64, batch_size: int = 1, disk=None, mask_for=None):
        self.model, self.capacity, self.batch_size, self.disk = model, capacity, batch_size, disk
        self.mask_for = mask_for
        self.items: "OrderedDict[str, object]" = OrderedDict()
        self.unused: set = set()  # prefetched, not yet looked up
        self.bad: Dict[str, Exception] = {}
        self.hits = self.misses = self.extracted = 0

    def __contains__(self, path) -> bool:
        return str(path) in self.items

    def get(self, path) -> object:
        """The hyperpixels of ``path``; re-raises the :class:`ImageError` of an unreadable image."""
        key = str(path)
        if key in self.bad:
            raise self.bad[key]
        if key in self.items:
            self.items.move_to_end(key)
            if key in self.unused:
                self.unused.discard(key)
                self.misses += 1
            else:
                self.hits += 1
            return self.items[key]
        hp = self._extract_one(key)
        self.misses += 1
        self._put(key, hp)
        return hp

    def _extract_one(self, key: str) -> object:
        from ..datasets.masks import MaskError
        from ..matching.image import ImageError

        if self.disk is not None:
            hp = self.disk.load(key)
            if hp is not None:
                return hp
        try:
            if self.mask_for is None:
                hp = self.model.hyperpixels(key, name="image")
            else:
                hp = self.model.hyperpixels(key, name="image", mask=self.mask_for(key))
        except (ImageError, MaskError) as e:
            self.bad[key] = e
            raise
        self.extracted += 1
        if self.disk is not None:
            self.disk.save(key, hp)
        return hp

    def prefetch(self, paths: Sequence) -> None:
        """Extract the uncached ones of ``paths`` (in order, at most ``capacity // 2``) in batches."""
        from ..matching.image import ImageError

        if self.mask_for is not None:
            return  # one by one, each with its mask
        todo = [k for k in dict.fromkeys(str(p) for p in paths) if k not in self.items and k not in self.bad]
        todo = todo[: max(1, self.capacity // 2)]
        if self.disk is not None:
            stored = [(key, self.disk.load(key)) for key in todo]
            for key, hp in stored:
                if hp is not None:
                    self.unused.add(key)
                    self._put(key, hp)
            todo = [key for key, hp in stored if hp is None]
        if not todo:
            return
        try:
            extracted = list(zip(todo, self.model.hyperpixels_many(todo, ["image"] * len(todo), self.batch_size)))
        except ImageError:  # one bad image spoils the batch: take them one by one
            extracted = []
            for key in todo:
                try:
                    extracted.append((key, self.model.hyperpixels(key, name="image")))
                except ImageError as e:
                    self.bad[key] = e
        for key, hp in extracted:
            self.extracted += 1
            if self.disk is not None:
                self.disk.save(key, hp)
            self.unused.add(key)
            self._put(key, hp)

    def _put(self, key: str, hp) -> None:
        self.items[key] = hp
        if len(self.items) > self.capacity:
            old, _ = self.items.popitem(last=False)
            self.unused.discard(old)

    def counters(self) -> Dict[str, int]:
        out = {"hits": self.hits, "misses": self.misses, "extracted": self.extracted,
               "unreadable": len(self.bad), "batch_size": self.batch_size}
        if self.disk is not None:
            out.update(self.disk.counters())
        return out


def parse_solver_spec(spec: str) -> Tuple[str, dict]:
    """``"NAME[:key=value,...]"`` -> (NAME, overrides), e.g. ``"torch-absorb:max_iter=1000,tol=1e-4"``.

    Values are read as int, then float (``inf`` allowed); the overrides go to
    :meth:`scot_ot.SCOT.with_solver` (``eps, max_iter, tol, check_every, reg_m`` or
    the solver's own options), which checks them.
    """
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise ValueError(f"--solver: no solver name in {spec!r}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--solver: expected key=value in {spec!r}, got {item!r}")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            try:
                overrides[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--solver: {key}={value!r} in {spec!r} is not a number") from None
    return name.strip(), overrides


def versions() -> Dict[str, str]:
    import ot
    import torch
    import torchvision

    import scot_ot

    return {"scot_ot": scot_ot.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pot": ot.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def write_json(record: dict, out: Path) -> None:
    """Write ``record`` to ``out`` atomically as standard JSON (NaN -> null), mode 0666 & ~umask."""
    _write_json(record, out)


def check_result(res) -> None:
    """``NumericalError`` unless the OT result ``res`` has a finite error and a finite, non-zero plan."""
    from ..ot.errors import NumericalError

    err = float(res.error)
    detail = None
    if not math.isfinite(err):
        detail = f"the marginal error is {err}"
    else:
        total = float(res.plan.sum())
        if not math.isfinite(total):
            detail = "the plan holds NaN or inf"
        elif total <= 0:
            detail = "the plan is all zeros"
    if detail is not None:
        raise NumericalError(res.solver, res.problem.eps, res.plan.dtype, detail)


# ------------------------------------------------------------------------ results files
_RESULT_KEYS = ("config", "pairs")


def read_results(path: Path, arg: str = "--resume", hint: str = "use another --out, or drop --resume to overwrite it"
                 ) -> dict:
    """The results record in ``path``, or ``ValueError`` naming ``arg``, the file and what is wrong (then ``hint``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{arg}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{arg}: {path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                         f"{hint}") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"{arg}: {path} is not a scot-ot eval results file ({what}); {hint}")

    if not isinstance(rec, dict):
        raise bad(f"its top level is a {type(rec).__name__}, not an object")
    missing = [k for k in _RESULT_KEYS if k not in rec]
    if missing:
        raise bad(f"no {' or '.join(repr(k) for k in missing)} key")
    config, pairs = rec["config"], rec["pairs"]
    if not isinstance(config, dict) or not isinstance(config.get("solvers"), list) \
            or not isinstance(config.get("alphas"), list):
        raise bad("'config' lacks its 'solvers' or 'alphas' list")
    if not isinstance(pairs, list):
        raise bad("'pairs' is not a list")
    alphas = {_key(float(a)) for a in config["alphas"] if isinstance(a, (int, float))}
    seen = set()
    for k, p in enumerate(pairs):
        where = f"pairs[{k}]"
        if not isinstance(p, dict) or not isinstance(p.get("pair_id"), str) \
                or not isinstance(p.get("category"), str) or not isinstance(p.get("results"), dict):
            raise bad(f"{where} is not an object with 'pair_id', 'category' and 'results'")
        if p["pair_id"] in seen:
            raise bad(f"{where}: pair {p['pair_id']!r} appears twice")
        seen.add(p["pair_id"])
        for s in config["solvers"]:
            r = p["results"].get(s)
            if isinstance(r, dict) and isinstance(r.get("failed"), str):
                continue
            pck = r.get("pck") if isinstance(r, dict) else None
            if not isinstance(pck, dict) or set(pck) != alphas or not all(
                    isinstance(v, (int, float)) and 0 <= v <= 1 for v in pck.values()) \
                    or not all(isinstance(r.get(f), (int, float)) for f in ("ot_time_s", "n_iters")):
                raise bad(f"{where} ({p['pair_id']}): no valid result for solver {s!r}")
    return rec


def _same_root(a: Any, b: Any) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (TypeError, OSError):
        return a == b


def config_diff(old: dict, new: dict) -> List[str]:
    """The keys on which two run configurations differ, as ``"key: old -> new"`` (root paths resolved)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(absent)"), new.get(k, "(absent)")
        if k == "root" and isinstance(a, str) and isinstance(b, str) and _same_root(a, b):
            continue
        if a != b:
            out.append(f"{k}: {json.dumps(a)} in the file, {json.dumps(b)} now")
    return out


# ------------------------------------------------------------------------ summaries
def _key(alpha: float) -> str:
    return f"{alpha:g}"


#: the per-pair numbers besides the PCK whose means the summary reports (absent ones are skipped)
MEASURES = ("collision_rate", "effective_target_ratio", "mutual_nn_rate", "background_rate", "unmatched_mass",
            "ot_time_s", "time_s", "measures_time_s")


def _mean(values) -> Optional[float]:
    """Mean of the finite numbers among ``values`` (None and NaN left out); None when there are none."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(xs)) if xs else None


def _measure_means(results: Sequence[dict]) -> Dict[str, Optional[float]]:
    return {m: _mean(r.get(m) for r in results) for m in MEASURES}


def summarize(record: dict) -> None:
    """Fill ``record["solvers"]`` from the per-pair results (PCK means, per category, OT time, failures).

    Pairs where a solver failed are counted in its ``n_failed`` and left out of its
    means; ``n_pairs`` counts the pairs it solved. With no solved pair its ``pck``
    values are ``None``. ``measures`` and ``per_category_measures`` hold the means of
    :data:`MEASURES` (a pair without a value, e.g. a background rate with no foreground
    source, is left out of that mean).
    """
    alphas = record["config"]["alphas"]
    record["solvers"] = {}
    for solver in record["config"]["solvers"]:
        ok = [p for p in record["pairs"] if "failed" not in p["results"][solver]]
        failed = [p for p in record["pairs"] if "failed" in p["results"][solver]]
        entry: Dict[str, Any] = {
            "pck": {_key(a): None for a in alphas}, "per_category": {}, "pairs_per_category": {},
            "mean_ot_time_s": None, "mean_n_iters": None, "n_pairs": len(ok), "n_failed": len(failed),
            "first_failure": ({"pair_id": failed[0]["pair_id"], "reason": failed[0]["results"][solver]["failed"]}
                              if failed else None),
        }
        if ok:
            s = summarize_pck([(p["category"], {float(k): v for k, v in p["results"][solver]["pck"].items()})
                               for p in ok], alphas)
            entry.update({
                "pck": {_key(a): s.mean[a] for a in alphas},
                "per_category": {c: {_key(a): v[a] for a in alphas} for c, v in s.per_category.items()},
                "pairs_per_category": s.n_pairs_per_category,
                "mean_ot_time_s": float(np.mean([p["results"][solver]["ot_time_s"] for p in ok])),
                "mean_n_iters": float(np.mean([p["results"][solver]["n_iters"] for p in ok])),
                "measures": _measure_means([p["results"][solver] for p in ok]),
                "per_category_measures": {
                    c: _measure_means([p["results"][solver] for p in ok if p["category"] == c])
                    for c in s.per_category},
            })
        record["solvers"][solver] = entry


# ------------------------------------------------------------------------ the run
#: ``--marginals``: CAM weights (SCOT's default), the foreground masks (SCOT's FCN variant), uniform
MARGINALS = ("cam", "mask", "uniform")


def foreground_source(masks=None) -> Tuple[Callable, dict]:
    """``(pair, hs, ht) -> Foreground`` for the background rate, and its JSON description.

    With ``masks`` (a :class:`~scot_ot.datasets.masks.MaskFolder`) the foreground is the
    masks' (independent of the CAM); without, the box spanned by each image's keypoints
    widened by 10 % (:func:`scot_ot.diagnostics.keypoint_foreground`: background inside
    the box counts as foreground).
    """
    from ..datasets.masks import THRESHOLD
    from ..diagnostics import keypoint_foreground, mask_foreground

    if masks is None:
        def from_keypoints(pair, hs, ht):
            return keypoint_foreground(hs, ht, pair.src_kps, pair.trg_kps, margin=0.1)

        return from_keypoints, {"source": "keypoint-box", "margin": 0.1}

    def from_masks(pair, hs, ht):
        return mask_foreground(hs, ht, masks.load_for_image(pair.src_path), masks.load_for_image(pair.trg_path))

    return from_masks, {"source": "masks", "dir": str(masks.root.resolve()), "threshold": THRESHOLD}


def _evaluate_pair(models: dict, hs, ht, pair, alphas, foreground: Callable) -> Dict[str, dict]:
    """Every solver on one pair; ``FloatingPointError`` -> ``{"failed": reason}``; ``ValueError`` propagates.

    Each result holds the PCK, the times (``ot_time_s``; ``time_s`` = cost + OT + RHM;
    ``measures_time_s``, what the measures took), the iterations, the marginal error and
    :func:`scot_ot.diagnostics.pair_measures` with ``foreground(pair, hs, ht)``.
    """
    from ..diagnostics import pair_measures
    from ..matching.scot import check_keypoints

    sx, sy = hs.scale
    W, H = hs.size  # the bound Correspondence.transfer checks, before any solver runs
    check_keypoints(pair.src_kps, (W + 1) / sx, (H + 1) / sy)
    fg = foreground(pair, hs, ht)  # MaskError (a ValueError): the pair is skipped
    results = {}
    for s, m in models.items():
        try:
            corr = m.match_hyperpixels(hs, ht)
            check_result(corr.ot)
        except FloatingPointError as e:
            results[s] = {"failed": f"{type(e).__name__}: {e}"}
            continue
        pred = corr.transfer(pair.src_kps).numpy()  # ValueError: keypoints outside the source image
        if not np.all(np.isfinite(pred)):
            results[s] = {"failed": "FloatingPointError: transferred keypoints are not finite"}
            continue
        pck = pck_per_pair(pred, pair.trg_kps, pair.pck_threshold(), alphas)
        t = time.perf_counter()
        measures = pair_measures(corr, fg)
        results[s] = {"pck": {_key(a): v for a, v in pck.items()},
                      "ot_time_s": corr.timings["ot"], "time_s": sum(corr.timings.values()),
                      "n_iters": corr.ot.n_iters, "marginal_error": corr.ot.error, **measures,
                      "measures_time_s": time.perf_counter() - t}
    return results


def run_config(config: Optional[dict], solvers: Sequence[str], alphas: Sequence[float], marginals: str,
               masks=None) -> dict:
    """The configuration :func:`evaluate` records (``--resume`` compares it key by key)."""
    return {**(config or {}), "marginals": marginals,
            "masks": None if masks is None else str(masks.root.resolve()),
            "solvers": list(solvers), "alphas": [float(a) for a in alphas]}


def with_marginals(model, marginals: str, masks=None) -> Tuple[object, Optional[Callable]]:
    """``model`` set up for ``marginals`` (see :data:`MARGINALS`), and the cache's ``mask_for``.

    ``"cam"`` and ``"mask"`` need what they read: a model with the CAM on (``use_cam``),
    a :class:`~scot_ot.datasets.masks.MaskFolder`. ``"uniform"`` and ``"mask"`` switch the
    CAM off in a copy of the model (same backbone), so it is not computed for nothing.
    """
    if marginals not in MARGINALS:
        raise ValueError(f"--marginals: expected one of {', '.join(MARGINALS)}, got {marginals!r}")
    if marginals == "mask" and masks is None:
        raise ValueError("--marginals mask: needs the masks; give --masks DIR")
    if marginals == "cam":
        if not model.extractor.use_cam:
            raise ValueError("--marginals cam: this model was built with use_cam=False")
        return model, None
    other = copy.copy(model)
    other.extractor = copy.copy(model.extractor)
    other.extractor.use_cam = False
    return other, (masks.load_for_image if marginals == "mask" else None)


def evaluate(model, pairs: Sequence, solvers: Sequence[str], out: Optional[Path] = None,
             alphas: Sequence[float] = DEFAULT_ALPHAS, resume: bool = False, config: Optional[dict] = None,
             progress: bool = True, save_every: int = 1, skipped: Sequence = (),
             cache_size: int = 64, batch_size: Optional[int] = None, strict: bool = False,
             cache_dir: Optional[Path] = None, shard: Optional[dict] = None, masks=None,
             marginals: str = "cam") -> dict:
    """Evaluate ``model`` with each of ``solvers`` on ``pairs``; returns the JSON record.

    Every pair's result per solver holds its PCK, times and failure measures (see
    :func:`_evaluate_pair`); ``record["solvers"]`` their means, overall and per category.
    ``masks``: a :class:`~scot_ot.datasets.masks.MaskFolder`; the background rate then
    uses its foreground (else the keypoint box; ``record["foreground"]`` says which),
    and an image without a mask skips its pairs. ``marginals``: one of
    :data:`MARGINALS` (:func:`with_marginals`).

    ``solvers`` are specs for :func:`parse_solver_spec` (results are keyed by the
    spec), all checked before any image is read. ``model`` is a :class:`scot_ot.SCOT`;
    each solver runs through :meth:`SCOT.with_solver` on the same hyperpixels, cached
    for the last ``cache_size`` images. ``batch_size``: images per backbone batch
    (None: 8 on CUDA, 1 on the CPU, where batches measured slower).

    ``out``: the record is written there after every ``save_every`` evaluated pairs
    (default: every pair) and at the end. ``resume``: continue the partial record in
    ``out`` (ValueError if it is not a results file, or was made with another
    configuration: the message lists the differing keys). ``skipped``: the loader's
    skipped pairs, recorded. ``strict``: a pair that cannot be evaluated raises
    :class:`~scot_ot.datasets.DatasetError` instead of being skipped.

    ``cache_dir``: also keep each image's hyperpixels on disk there
    (:class:`~scot_ot.evaluation.disk_cache.DiskCache`), for later runs and other
    shards. ``shard``: what :meth:`~scot_ot.evaluation.shards.ShardPlan.record` says of
    the shard that ``pairs`` are (stored as ``record["shard"]`` for
    :func:`~scot_ot.evaluation.merge.merge_records`).

    Raises ValueError when there is no pair to evaluate or none could be evaluated.
    """
    from tqdm.auto import tqdm

    from ..datasets import DatasetError

    solvers = list(solvers)
    if not solvers:
        raise ValueError("solvers: give at least one solver")
    model, mask_for = with_marginals(model, marginals, masks)
    foreground, foreground_info = foreground_source(masks)
    dup = sorted({s for s in solvers if solvers.count(s) > 1})
    if dup:
        raise ValueError(f"--solver: repeated solver spec(s) {', '.join(dup)}")
    models = {}
    for spec in solvers:
        name, overrides = parse_solver_spec(spec)
        try:
            models[spec] = model.with_solver(name, **overrides)
        except ValueError as e:
            raise ValueError(f"--solver {spec!r}: {e}") from None
    if batch_size is None:
        batch_size = 8 if model.device.type == "cuda" else 1
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every: must be an integer >= 1, got {save_every!r}")

    config = run_config(config, solvers, alphas, marginals, masks)
    record = {"config": config, "foreground": foreground_info, "versions": versions(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n_pairs_total": len(pairs),
              "skipped": [str(s) for s in skipped], "pairs": [], "complete": False}
    if shard is not None:
        record["shard"] = shard
    if resume and out is not None and Path(out).is_file():
        old = read_results(Path(out))
        diff = config_diff(old["config"], config)
        if diff:
            raise ValueError(f"--resume: {out} was made with another configuration ({'; '.join(diff)}); "
                             "use another --out, or drop --resume to overwrite it")
        record["pairs"] = old["pairs"]
    done = {p["pair_id"] for p in record["pairs"]}
    todo = [p for p in pairs if p.pair_id not in done]
    if not todo and not record["pairs"]:
        raise ValueError("pairs: no pair to evaluate (the split is empty, or every pair was skipped"
                         + (f"; first: {record['skipped'][0]}" if record["skipped"] else "") + ")")

    n_loader_skips = len(record["skipped"])
    disk = None
    if cache_dir is not None:
        from .disk_cache import DiskCache

        disk = DiskCache(cache_dir, model, mask_file=None if mask_for is None else masks.path_for)
    cache = FeatureCache(model, capacity=cache_size, batch_size=batch_size, disk=disk, mask_for=mask_for)
    lookahead = 4 * batch_size  # pairs whose images a prefetch may extract
    t_start, n_new, n_unsaved = time.perf_counter(), 0, 0
    bar = tqdm(todo, desc="pairs", unit="pair", disable=not progress)

    def skip(pair, reason: str) -> None:
        if strict:
            file, line = pair.origin if pair.origin is not None else (None, None)
            raise DatasetError(f"pair {pair.pair_id}: {reason}", file=file, line=line)
        record["skipped"].append(f"{pair.where()}: {reason}")

    try:
        for i, pair in enumerate(bar):
            if batch_size > 1 and cache_size > 0 and not (pair.src_path in cache and pair.trg_path in cache):
                cache.prefetch([p for q in todo[i:i + lookahead] for p in (q.src_path, q.trg_path)])
            try:
                hs, ht = cache.get(pair.src_path), cache.get(pair.trg_path)
                results = _evaluate_pair(models, hs, ht, pair, alphas, foreground)
            except ValueError as e:  # ImageError, MaskError (no mask) or keypoints outside the image
                skip(pair, str(e))
                continue
            record["pairs"].append({"pair_id": pair.pair_id, "category": pair.category, "results": results})
            n_new += 1
            n_unsaved += 1
            if out is not None and n_unsaved >= save_every:
                _finish(record, t_start, n_new, cache, out, complete=False)
                n_unsaved = 0
    except (KeyboardInterrupt, DatasetError):
        bar.close()
        if out is not None and record["pairs"]:
            _finish(record, t_start, n_new, cache, out, complete=False)
        raise
    bar.close()
    if not record["pairs"]:
        first = record["skipped"][n_loader_skips] if len(record["skipped"]) > n_loader_skips else "?"
        raise ValueError(f"no pair could be evaluated: all {len(todo)} were skipped (first: {first})")
    _finish(record, t_start, n_new, cache, out, complete=True)
    return record


def _finish(record: dict, t_start: float, n_new: int, cache: FeatureCache, out, complete: bool) -> None:
    elapsed = time.perf_counter() - t_start
    record["complete"] = complete
    record["n_evaluated"] = len(record["pairs"])
    record["n_new"] = n_new
    record["n_skipped"] = len(record["skipped"])
    record["pairs_per_s"] = n_new / elapsed if elapsed > 0 and n_new else None
    record["feature_cache"] = cache.counters()
    summarize(record)
    if out is not None:
        write_json(record, Path(out))


def _pct(v: Optional[float], width: int = 8) -> str:
    return f"{100 * v:{width}.1f}" if v is not None else f"{'-':>{width}}"


#: the measures the printed table shows, with their column titles
_TABLE_MEASURES = (("collision_rate", "coll"), ("effective_target_ratio", "eff/N"),
                   ("mutual_nn_rate", "mutual"), ("background_rate", "bg"), ("unmatched_mass", "unmatch"))


def _measure_cells(values: Optional[dict]) -> str:
    values = values or {}
    return "".join(f"  {_pct(values.get(m), max(7, len(t)))}" for m, t in _TABLE_MEASURES)


def format_table(record: dict) -> str:
    """Per solver and category: PCK and the failure measures (in %); then every solver side by side
    (PCK, measures, OT and total time per pair, iterations), the foreground used, and the failures."""
    alphas = [_key(a) for a in record["config"]["alphas"]]
    heads = "".join(f"  {t:>{max(7, len(t))}}" for _, t in _TABLE_MEASURES)
    lines: List[str] = []
    for solver, s in record["solvers"].items():
        failed = f", {s['n_failed']} failed" if s.get("n_failed") else ""
        lines.append(f"\n{solver}  ({s['n_pairs']} pairs{failed})")
        lines.append(f"  {'category':<14}" + "".join(f"  PCK@{a:<5}" for a in alphas) + heads + "  pairs")
        per_cat = s.get("per_category_measures", {})
        for cat, v in s["per_category"].items():
            lines.append(f"  {cat:<14}" + "".join(f"  {_pct(v[a])}" for a in alphas)
                         + _measure_cells(per_cat.get(cat)) + f"  {s['pairs_per_category'][cat]:5d}")
        lines.append(f"  {'all':<14}" + "".join(f"  {_pct(s['pck'][a])}" for a in alphas)
                     + _measure_cells(s.get("measures")))
        if s.get("n_failed"):
            first = s["first_failure"]
            lines.append(f"  failed on {s['n_failed']} pair(s), left out of the PCK; first: "
                         f"{first['pair_id']}: {first['reason']}")
    w = max(len("solver"), *(len(name) for name in record["solvers"]))
    lines.append("\n" + f"{'solver':<{w}}" + "".join(f"  PCK@{a:<5}" for a in alphas) + heads
                 + "  OT s/pair  s/pair  iters  failed")
    for solver, s in record["solvers"].items():
        t = f"{s['mean_ot_time_s']:9.4f}" if s["mean_ot_time_s"] is not None else f"{'-':>9}"
        total = (s.get("measures") or {}).get("time_s")
        tt = f"{total:6.3f}" if total is not None else f"{'-':>6}"
        it = f"{s['mean_n_iters']:5.0f}" if s["mean_n_iters"] is not None else f"{'-':>5}"
        lines.append(f"{solver:<{w}}" + "".join(f"  {_pct(s['pck'][a])}" for a in alphas)
                     + _measure_cells(s.get("measures")) + f"  {t}  {tt}  {it}  {s.get('n_failed', 0):6d}")
    fg = record.get("foreground")
    if fg:
        where = f"masks in {fg['dir']}" if fg.get("source") == "masks" else \
            f"the keypoint box (+{fg.get('margin', 0.1):g} of its size; background inside it counts as foreground)"
        lines.append(f"\ncoll: collision rate; eff/N: effective distinct targets per source; mutual: mutual-NN "
                     f"rate; bg: foreground sources matched into the background, foreground from {where}; "
                     "unmatch: unmatched mass (OT solvers)")
    if record.get("pairs_per_s"):
        lines.append(f"\n{record['pairs_per_s']:.2f} pairs/s (features cached per image)")
    return "\n".join(lines)

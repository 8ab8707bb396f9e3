"""PCK evaluation of one or several OT solvers on a dataset split.

Features are computed once per image (an image appears in many pairs) and kept in
a small LRU cache; every solver then runs on the same hyperpixels. The JSON record
is rewritten atomically every ``save_every`` pairs and at the end, so an
interruption (Ctrl-C) leaves a valid partial file that ``resume`` continues.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .pck import DEFAULT_ALPHAS, pck_per_pair, summarize_pck


class FeatureCache:
    """LRU cache of :class:`~scot_ot.matching.Hyperpixels` by image path.

    ``misses`` counts images extracted, ``hits`` lookups served without extracting.

    ``batch_size > 1``: on a miss, the next uncached images of the pairs ahead
    (:meth:`prefetch`) are extracted together, in batches of equally sized images.
    """

    def __init__(self, model, capacity: int = 64, batch_size: int = 1):
        self.model, self.capacity, self.batch_size = model, capacity, batch_size
        self.items: "OrderedDict[str, object]" = OrderedDict()
        self.hits = self.misses = 0

    def __contains__(self, path) -> bool:
        return str(path) in self.items

    def get(self, path) -> object:
        key = str(path)
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        hp = self.model.hyperpixels(path, name=key)
        self._put(key, hp)
        return hp

    def prefetch(self, paths: Sequence) -> None:
        """Extract the uncached ones of ``paths`` (in order, at most ``capacity // 2``) in batches."""
        todo = [k for k in dict.fromkeys(str(p) for p in paths) if k not in self.items]
        todo = todo[: max(1, self.capacity // 2)]
        if not todo:
            return
        for key, hp in zip(todo, self.model.hyperpixels_many(todo, todo, self.batch_size)):
            self.misses += 1
            self._put(key, hp)

    def _put(self, key: str, hp) -> None:
        self.items[key] = hp
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)


def parse_solver_spec(spec: str) -> Tuple[str, dict]:
    """``"NAME[:key=value,...]"`` -> (NAME, overrides), e.g. ``"torch-absorb:max_iter=1000,tol=1e-4"``.

    Values are read as int, then float (``inf`` allowed); the overrides go to
    :meth:`scot_ot.SCOT.with_solver` (``eps, max_iter, tol, check_every, reg_m`` or
    the solver's own options).
    """
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
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
    """Write ``record`` to ``out`` atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, out)


def _key(alpha: float) -> str:
    return f"{alpha:g}"


def summarize(record: dict) -> None:
    """Fill ``record["solvers"]`` from the per-pair results (PCK means, per category, OT time)."""
    alphas = record["config"]["alphas"]
    record["solvers"] = {}
    for solver in record["config"]["solvers"]:
        rows = [(p["category"], {float(k): v for k, v in p["results"][solver]["pck"].items()})
                for p in record["pairs"]]
        if not rows:
            continue
        s = summarize_pck(rows, alphas)
        times = [p["results"][solver]["ot_time_s"] for p in record["pairs"]]
        iters = [p["results"][solver]["n_iters"] for p in record["pairs"]]
        record["solvers"][solver] = {
            "pck": {_key(a): s.mean[a] for a in alphas},
            "per_category": {c: {_key(a): v[a] for a in alphas} for c, v in s.per_category.items()},
            "pairs_per_category": s.n_pairs_per_category,
            "mean_ot_time_s": float(np.mean(times)),
            "mean_n_iters": float(np.mean(iters)),
            "n_pairs": s.n_pairs,
        }


def evaluate(model, pairs: Sequence, solvers: Sequence[str], out: Optional[Path] = None,
             alphas: Sequence[float] = DEFAULT_ALPHAS, resume: bool = False, config: Optional[dict] = None,
             progress: bool = True, save_every: int = 10, skipped: Sequence = (),
             cache_size: int = 64, batch_size: Optional[int] = None) -> dict:
    """Evaluate ``model`` with each of ``solvers`` on ``pairs``; returns the JSON record.

    ``solvers`` are specs for :func:`parse_solver_spec` (results are keyed by the
    spec). ``model`` is a :class:`scot_ot.SCOT`; each solver runs through
    :meth:`SCOT.with_solver` on the same hyperpixels, cached for the last
    ``cache_size`` images. ``batch_size``: images per backbone batch (None: 8 on CUDA,
    1 on the CPU, where batches measured slower).
    """
    from tqdm.auto import tqdm

    config = {**(config or {}), "solvers": list(solvers), "alphas": [float(a) for a in alphas]}
    record = {"config": config, "versions": versions(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n_pairs_total": len(pairs),
              "skipped": [str(s) for s in skipped], "pairs": [], "complete": False}
    if resume and out is not None and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        if old.get("config") != config:
            raise ValueError(f"--resume: {out} was made with another configuration; "
                             "use another --out or drop --resume")
        record["pairs"] = old["pairs"]
    done = {p["pair_id"] for p in record["pairs"]}
    todo = [p for p in pairs if p.pair_id not in done]
    models = {}
    for spec in solvers:
        name, overrides = parse_solver_spec(spec)
        models[spec] = model.with_solver(name, **overrides)
    if batch_size is None:
        batch_size = 8 if model.device.type == "cuda" else 1
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    cache = FeatureCache(model, capacity=cache_size, batch_size=batch_size)
    lookahead = 4 * batch_size  # pairs whose images a prefetch may extract
    t_start, n_new = time.perf_counter(), 0
    bar = tqdm(todo, desc="pairs", unit="pair", disable=not progress)
    try:
        for i, pair in enumerate(bar):
            if batch_size > 1 and cache_size > 0 and not (pair.src_path in cache and pair.trg_path in cache):
                cache.prefetch([p for q in todo[i:i + lookahead] for p in (q.src_path, q.trg_path)])
            hs, ht = cache.get(pair.src_path), cache.get(pair.trg_path)
            results = {}
            for s, m in models.items():
                corr = m.match_hyperpixels(hs, ht)
                pred = corr.transfer(pair.src_kps).numpy()
                pck = pck_per_pair(pred, pair.trg_kps, pair.pck_threshold(), alphas)
                results[s] = {"pck": {_key(a): v for a, v in pck.items()},
                              "ot_time_s": corr.timings["ot"], "n_iters": corr.ot.n_iters,
                              "marginal_error": corr.ot.error}
            record["pairs"].append({"pair_id": pair.pair_id, "category": pair.category,
                                    "results": results})
            n_new += 1
            if out is not None and n_new % save_every == 0:
                _finish(record, t_start, n_new, cache, out, complete=False)
    except KeyboardInterrupt:
        bar.close()
        if out is not None:
            _finish(record, t_start, n_new, cache, out, complete=False)
        raise
    bar.close()
    _finish(record, t_start, n_new, cache, out, complete=True)
    return record


def _finish(record: dict, t_start: float, n_new: int, cache: FeatureCache, out, complete: bool) -> None:
    elapsed = time.perf_counter() - t_start
    record["complete"] = complete
    record["pairs_per_s"] = n_new / elapsed if elapsed > 0 else None
    record["feature_cache"] = {"hits": cache.hits, "misses": cache.misses, "batch_size": cache.batch_size}
    summarize(record)
    if out is not None:
        write_json(record, Path(out))


def format_table(record: dict) -> str:
    """Per-category PCK per solver, then a side-by-side summary (PCK and OT time)."""
    alphas = [_key(a) for a in record["config"]["alphas"]]
    lines: List[str] = []
    for solver, s in record["solvers"].items():
        lines.append(f"\n{solver}  ({s['n_pairs']} pairs)")
        lines.append(f"  {'category':<14}" + "".join(f"  PCK@{a:<5}" for a in alphas) + "  pairs")
        for cat, v in s["per_category"].items():
            lines.append(f"  {cat:<14}" + "".join(f"  {100 * v[a]:8.1f}" for a in alphas)
                         + f"  {s['pairs_per_category'][cat]:5d}")
        lines.append(f"  {'all':<14}" + "".join(f"  {100 * s['pck'][a]:8.1f}" for a in alphas))
    if len(record["solvers"]) > 1:
        w = max(len("solver"), *(len(name) for name in record["solvers"]))
        lines.append("\n" + f"{'solver':<{w}}" + "".join(f"  PCK@{a:<5}" for a in alphas)
                     + "  OT s/pair  iters")
        for solver, s in record["solvers"].items():
            lines.append(f"{solver:<{w}}" + "".join(f"  {100 * s['pck'][a]:8.1f}" for a in alphas)
                         + f"  {s['mean_ot_time_s']:9.4f}  {s['mean_n_iters']:5.0f}")
    if record.get("pairs_per_s"):
        lines.append(f"\n{record['pairs_per_s']:.2f} pairs/s (features cached per image)")
    return "\n".join(lines)

"""Merge shard results into one record (``scot-ot merge``, and rank 0 of a torchrun run).

The shards of one run are the records of ``--shard 1/N`` .. ``--shard N/N`` (or of
torchrun's ranks). They merge only if they fit together:

- the same configuration (every key but ``shard``; the dataset folder may differ
  between machines, the pair list may not: :func:`~scot_ot.evaluation.shards.pairs_digest`)
  and the same library versions; a difference is named with the two files;
- every shard ``1/N .. N/N`` present once, each complete (a partial one says how to
  finish it with ``--resume``);
- every planned pair evaluated or skipped in exactly one file (a duplicated or a
  missing pair is named).

The merged record lists the pairs in the order of the split, as a single process
would; its summary is recomputed from them by :func:`~scot_ot.evaluation.run.summarize`,
the runner's own code. Merging the ranks of ``--shard K/N`` gives the record of shard
``K/N``, which merges with the other shards in turn.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Dict, List, Optional, Sequence

from .run import summarize
from .shards import format_levels

#: counters of ``feature_cache`` that add up over shards
_COUNTERS = ("hits", "misses", "extracted", "unreadable", "disk_hits", "disk_writes", "disk_corrupt")


class MergeError(ValueError):
    """Shard records that do not make one run (the message names the files, shards or pairs)."""


def _levels(rec: dict, name: str) -> List[tuple]:
    shard = rec.get("shard")
    if not isinstance(shard, dict) or not isinstance(shard.get("levels"), list) or not shard["levels"]:
        raise MergeError(f"{name} is not a shard: it was made without --shard (or torchrun); "
                         "a whole run has nothing to merge with")
    try:
        levels = [(int(k), int(n)) for k, n in shard["levels"]]
        ok = all(1 <= k <= n for k, n in levels) and len(shard["pair_ids"]) == len(shard["positions"])
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise MergeError(f"{name}: its 'shard' entry is damaged")
    return levels


def _diff_versions(a: dict, b: dict) -> List[str]:
    return [f"{k}: {a.get(k, '(absent)')} vs {b.get(k, '(absent)')}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def merge_records(records: Sequence[dict], names: Sequence[str], pairs_per_s: Optional[float] = None) -> dict:
    """One record from the shard ``records`` (``names``: their files, for the messages).

    Raises :class:`MergeError` naming what does not fit. ``pairs_per_s``: the merged
    run's rate, when one process measured it (torchrun's rank 0); otherwise None (the
    shards' own rates are kept in ``merged_from``).
    """
    if not records:
        raise MergeError("give at least one shard file")
    levels = [_levels(r, n) for r, n in zip(records, names)]
    parent, (_, count) = levels[0][:-1], levels[0][-1]
    first = names[0]
    for lv, name in zip(levels, names):
        if lv[:-1] != parent or lv[-1][1] != count:
            raise MergeError(f"{name} is shard {format_levels(lv)}, {first} is shard {format_levels(levels[0])}: "
                             "not shards of the same split")
    by_index: Dict[int, str] = {}
    for lv, name in zip(levels, names):
        k = lv[-1][0]
        if k in by_index:
            raise MergeError(f"shard {format_levels(parent + [(k, count)])} is given twice: {by_index[k]} and {name}")
        by_index[k] = name
    missing = [k for k in range(1, count + 1) if k not in by_index]
    if missing:
        shown = ", ".join(format_levels(parent + [(k, count)]) for k in missing[:10])
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise MergeError(f"shard(s) {shown}{more} missing: {len(by_index)} of {count} given")

    # one configuration, one pair list, one set of versions
    base = {k: v for k, v in records[0]["config"].items() if k not in ("shard", "root")}
    for rec, name in zip(records[1:], names[1:]):
        cfg = {k: v for k, v in rec["config"].items() if k not in ("shard", "root")}
        diff = [f"{k}: {json.dumps(base.get(k, '(absent)'))} in {first}, {json.dumps(cfg.get(k, '(absent)'))} "
                f"in {name}" for k in sorted(set(base) | set(cfg)) if base.get(k, "(absent)") != cfg.get(k, "(absent)")]
        if diff:
            raise MergeError(f"{name} was made with another configuration than {first} ({'; '.join(diff)})")
        vdiff = _diff_versions(records[0].get("versions", {}), rec.get("versions", {}))
        if vdiff:
            raise MergeError(f"{name} was made with other versions than {first} ({'; '.join(vdiff)})")
        for key in ("pairs_digest", "n_pairs_all"):
            if rec["shard"].get(key) != records[0]["shard"].get(key):
                raise MergeError(f"{name} and {first} shard different pair lists ({key} differs: the dataset "
                                 "changed between the runs, or --every/--limit differ)")

    # every planned pair evaluated or skipped once
    owner: Dict[str, str] = {}
    position: Dict[str, int] = {}
    for rec, name, lv in zip(records, names, levels):
        if not rec.get("complete"):
            raise MergeError(f"{name} (shard {format_levels(lv)}) is incomplete: {len(rec['pairs'])} of "
                             f"{len(rec['shard']['pair_ids'])} pairs done; finish it with the same "
                             f"scot-ot eval command and --resume")
        for pid, pos in zip(rec["shard"]["pair_ids"], rec["shard"]["positions"]):
            if pid in owner:
                raise MergeError(f"pair {pid} is planned in both {owner[pid]} and {name}")
            owner[pid], position[pid] = name, int(pos)
    seen: Dict[str, str] = {}
    pairs = []
    for rec, name in zip(records, names):
        for p in rec["pairs"]:
            pid = p["pair_id"]
            if pid in seen:
                raise MergeError(f"pair {pid} appears twice: in {seen[pid]} and {name}")
            if owner.get(pid) != name:
                raise MergeError(f"pair {pid} in {name} is not one of its shard's pairs")
            seen[pid] = name
            pairs.append(p)
    skipped = list(dict.fromkeys(s for rec in records for s in rec["skipped"]))
    for pid, name in owner.items():
        if pid not in seen and not any(f"pair {pid}:" in s for s in skipped):
            raise MergeError(f"pair {pid} is missing: {name} neither evaluated nor skipped it")
    pairs.sort(key=lambda p: position[p["pair_id"]])
    if parent == [] and len(owner) != records[0]["shard"]["n_pairs_all"]:
        raise MergeError(f"the shards plan {len(owner)} pairs, the split has {records[0]['shard']['n_pairs_all']}")

    config = dict(records[0]["config"])
    config.pop("shard", None)
    if parent:
        config["shard"] = [list(lv) for lv in parent]
    record = {"config": config, "versions": records[0].get("versions", {}), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "n_pairs_total": sum(r["n_pairs_total"] for r in records), "skipped": skipped, "pairs": pairs,
              "complete": True, "n_evaluated": len(pairs), "n_new": sum(r.get("n_new", 0) for r in records),
              "n_skipped": len(skipped), "pairs_per_s": pairs_per_s,
              "feature_cache": {k: sum(r.get("feature_cache", {}).get(k, 0) for r in records)
                                for k in _COUNTERS if any(k in r.get("feature_cache", {}) for r in records)}}
    sizes = {r.get("feature_cache", {}).get("batch_size") for r in records}
    if len(sizes) == 1 and None not in sizes:
        record["feature_cache"]["batch_size"] = sizes.pop()
    if parent:
        ids = sorted(owner, key=position.get)
        record["shard"] = {**records[0]["shard"], "levels": [list(lv) for lv in parent],
                           "spec": format_levels(parent), "pair_ids": ids, "positions": [position[i] for i in ids]}
    record["merged_from"] = [{"source": name, "shard": format_levels(lv), "root": rec["config"].get("root"),
                              "n_evaluated": rec.get("n_evaluated"), "pairs_per_s": rec.get("pairs_per_s"),
                              "date": rec.get("date"), "machine": rec.get("machine")}
                             for rec, name, lv in sorted(zip(records, names, levels), key=lambda t: t[2][-1][0])]
    summarize(record)
    return record


def read_shard(path, arg: str = "merge") -> dict:
    """A shard results file for :func:`merge_records` (``ValueError`` naming it if it is not one)."""
    from .run import read_results

    return read_results(path, arg, hint="give the JSON files that scot-ot eval --shard K/N --out wrote")


"""Evaluation that scales out (issue 14): shards, torchrun, merge, and the feature cache on disk.

The real-data tests take the first 6 pairs of PF-WILLOW-dev (one source image, 7
images) at 96 px instead of 300 (the code paths are under test, not the accuracy),
with one torch thread everywhere: features computed with 1 and 2 threads differ in
their last float bits (measured: up to 9e-7), and "equal to a single-process run"
means bit-equal here, so every run compared uses the same thread count. torchrun runs
with 2 gloo processes through ``python -m scot_ot`` (a wrapper sets the image side
first). Timings (every ``*time_s`` key) are measurements and are left out of every
comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import scot_ot.cli as cli
from fast_models import drop_timings, small_scot, uncached_backbone, use_small_models
from scot_ot.data import sample_pair
from scot_ot.datasets import load_pairs
from scot_ot.evaluation.disk_cache import DiskCache
from scot_ot.evaluation.merge import MergeError, merge_records
from scot_ot.evaluation.run import FeatureCache
from scot_ot.evaluation.shards import grouped_order, parse_shard, plan_shard, simulate_cache, split_run
from scot_ot.matching import SCOT

WILLOW_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PF-WILLOW-dev"
SIDE = 96
N_PAIRS = 6
needs_willow = pytest.mark.skipif(not WILLOW_DEV.is_dir(), reason="PF-WILLOW-dev is not beside the checkout")

@pytest.fixture(autouse=True)
def fast_models(monkeypatch):
    """One backbone load for the module; CLI models at SIDE px; one torch thread (see the module doc)."""
    use_small_models(monkeypatch, SIDE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _eval(*extra):
    return ["eval", "--dataset", "pf-willow", "--root", WILLOW_DEV, "--limit", N_PAIRS, *extra]


def _entries(rec: dict) -> list:
    """Per-pair entries without their timings."""
    return drop_timings(rec["pairs"])


def _summary(rec: dict) -> dict:
    return drop_timings(rec["solvers"])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The single-process, unsharded record of the first N_PAIRS pairs (1 thread, SIDE px)."""
    out = tmp_path_factory.mktemp("single") / "r.json"
    mp = pytest.MonkeyPatch()
    use_small_models(mp, SIDE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([str(a) for a in _eval("--out", out)]) == 0
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return json.loads(out.read_text())


# ------------------------------------------------------------------ shard plans
class _P:  # the fields a plan reads
    def __init__(self, i, cat, src, trg):
        self.pair_id, self.category = f"p{i}", cat
        self.src_path, self.trg_path = Path(src), Path(trg)
        self.src_kps = self.trg_kps = np.zeros((1, 2))
        self.threshold_box = (0.0, 0.0, 1.0, 1.0)


def test_shards_partition_every_split_in_balanced_grouped_runs():
    rng = np.random.default_rng(0)
    for m in (0, 1, 5, 17, 40):
        pairs = [_P(i, f"c{rng.integers(3)}", f"/x/{rng.integers(6)}.png", f"/y/{rng.integers(6)}.png")
                 for i in range(m)]
        for n in (1, 2, 3, 4, 7):
            plans = [plan_shard(pairs, [(k, n)]) for k in range(1, n + 1)]
            got = [i for p in plans for i in p.order]
            assert sorted(got) == list(range(m)) and len(got) == m  # every pair once
            sizes = [len(p.order) for p in plans]
            assert max(sizes) - min(sizes) <= (1 if m else 0)
            assert got == grouped_order(pairs)  # the shards are consecutive runs of one grouped order
            for p in plans:  # nested: the ranks of a shard partition it
                sub = [i for r in range(1, 3) for i in plan_shard(pairs, [*p.levels, (r, 2)]).order]
                assert sub == list(p.order)
    pairs = [_P(i, "c", f"/a/{i % 3}.png", f"/b/{i % 4}.png") for i in range(12)]
    order = grouped_order(pairs)  # the pairs of one source image are adjacent, every other one reversed
    assert [pairs[i].src_path.name for i in order] == ["0.png"] * 4 + ["1.png"] * 4 + ["2.png"] * 4
    assert [pairs[i].trg_path.name[0] for i in order] == list("0123" "3210" "0123")
    assert split_run(list(range(10)), 3, 3) == [6, 7, 8, 9] and parse_shard(" 2/3 ") == (2, 3)
    # roots do not enter a plan: the same pairs under another folder shard the same way
    moved = [_P(i, "c", f"/elsewhere/{i % 3}.png", f"/b2/{i % 4}.png") for i in range(12)]
    assert plan_shard(moved, [(2, 3)]) == plan_shard(pairs, [(2, 3)])


@needs_willow
def test_grouped_shards_keep_the_cache_hit_rate():
    """PF-WILLOW-dev: 40 images, 720 lookups. Grouped shards extract each image once in all;
    dealing pairs round-robin (pair i to shard i mod N) would extract most images in every shard."""
    pairs = load_pairs("pf-willow", WILLOW_DEV).pairs
    for n in (1, 2, 4):
        grouped = [simulate_cache([pairs[i] for i in plan_shard(pairs, [(k, n)]).order]) for k in range(1, n + 1)]
        dealt = [simulate_cache(pairs[k::n]) for k in range(n)]
        hits = sum(c["hits"] for c in grouped)
        assert sum(c["hits"] + c["misses"] for c in grouped) == 720
        assert hits == 680  # 1 - 40/720 = 94.4 %, whatever N
        if n > 1:
            assert sum(c["hits"] for c in dealt) < hits
        # a cache smaller than a category (10 images): the snake order still reuses most targets
        small = sum(simulate_cache([pairs[i] for i in plan_shard(pairs, [(k, n)]).order], 8)["hits"]
                    for k in range(1, n + 1))
        assert small == 592 and sum(simulate_cache(pairs[k::n], 8)["hits"] for k in range(n)) < small


# ------------------------------------------------------------------ torchrun
_WRAPPER = """
import runpy, scot_ot.cli as cli
build = cli.build_model
def small(args, solver):
    model = build(args, solver)
    model.image_side = {side}
    return model
cli.build_model = small
runpy.run_module("scot_ot", run_name="__main__", alter_sys=True)  # python -m scot_ot, the documented entry
"""


def _torchrun(tmp_path: Path, argv, nproc: int = 2) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "small_scot_ot.py"
    wrapper.write_text(_WRAPPER.format(side=SIDE))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(wrapper), *[str(a) for a in argv]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@needs_willow
def test_torchrun_two_ranks_equal_a_single_process(single, tmp_path):
    out = tmp_path / "r.json"
    proc = _torchrun(tmp_path, _eval("--out", out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert _entries(rec) == _entries(single)  # same pairs, same order, same results
    assert rec["config"] == single["config"] and _summary(rec) == _summary(single)
    assert rec["complete"] and rec["n_evaluated"] == N_PAIRS and rec["ranks"]["world_size"] == 2
    assert [m["shard"] for m in rec["merged_from"]] == ["1/2", "2/2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "small_scot_ot.py"]  # part files gone
    assert proc.stdout.count("wrote ") == 1 and "(rank 1 of 2)" not in proc.stderr  # rank 0 speaks


@needs_willow
def test_torchrun_failing_rank_fails_the_run(tmp_path):
    """Rank 1's shard holds only pairs whose source image is corrupt: the run fails with its error,
    and nothing is merged (rank 0's part file stays for --resume)."""
    lines = (WILLOW_DEV / "test_pairs.csv").read_text().splitlines()
    rows = lines[1:3] + [line for line in lines[1:] if "duck" in line][:2]
    root = tmp_path / "willow"
    for row in rows:
        for k, rel in enumerate(row.split(",")[:2]):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if "duck" in rel and k == 0:
                (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
            elif not (root / rel).exists():
                shutil.copy(WILLOW_DEV / rel, root / rel)
    (root / "test_pairs.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    out = tmp_path / "r.json"
    proc = _torchrun(tmp_path, ["eval", "--dataset", "pf-willow", "--root", root, "--out", out])
    assert proc.returncode != 0
    assert "scot-ot eval (rank 1 of 2): error: no pair could be evaluated" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.json")]  # no temporary file


# ------------------------------------------------------------------ shards and merge
@needs_willow
def test_shards_merged_equal_the_unsharded_run(single, tmp_path, capsys):
    cache = tmp_path / "cache"
    files = [tmp_path / f"s{k}.json" for k in (1, 2, 3)]
    for k, f in enumerate(files, 1):
        rc, _, err = run_cli(_eval("--shard", f"{k}/3", "--out", f, "--cache-dir", cache), capsys)
        assert rc == 0, err
        assert json.loads(f.read_text())["config"]["shard"] == [[k, 3]]
    shard3 = json.loads(files[2].read_text())["feature_cache"]
    assert shard3["disk_hits"] >= 1  # the source image of all 6 pairs came from shard 1's files

    # resume per shard: shard 2 cut to its first pair continues, and keeps that pair
    rec = json.loads(files[1].read_text())
    first = rec["pairs"][0]
    rec["pairs"], rec["complete"] = rec["pairs"][:1], False
    files[1].write_text(json.dumps(rec))
    rc, _, err = run_cli(_eval("--shard", "2/3", "--out", files[1], "--resume"), capsys)
    assert rc == 0, err
    again = json.loads(files[1].read_text())
    assert again["complete"] and again["pairs"][0] == first and len(again["pairs"]) == 2

    out = tmp_path / "all.json"
    rc, stdout, err = run_cli(["merge", files[2], files[0], files[1], "--out", out], capsys)  # any order
    assert rc == 0, err
    rec = json.loads(out.read_text())
    assert _entries(rec) == _entries(single) and rec["config"] == single["config"]
    assert _summary(rec) == _summary(single) and "merged 3 shard file(s)" in stdout

    # a missing shard, a duplicated one, a partial one: refused with their names, nothing written
    out2 = tmp_path / "refused.json"
    rc, _, err = run_cli(["merge", files[0], files[2], "--out", out2], capsys)
    assert rc == 2 and "shard(s) 2/3 missing" in err
    copy = tmp_path / "s2-copy.json"
    shutil.copy(files[1], copy)
    rc, _, err = run_cli(["merge", *files, copy, "--out", out2], capsys)
    assert rc == 2 and f"shard 2/3 is given twice: {files[1]} and {copy}" in err
    rec = json.loads(files[1].read_text())
    rec["complete"] = False
    copy.write_text(json.dumps(rec))
    rc, _, err = run_cli(["merge", files[0], copy, files[2], "--out", out2], capsys)
    assert rc == 2 and f"{copy} (shard 2/3) is incomplete" in err and "--resume" in err
    assert not out2.exists()


def _fake_shard(k: int, n: int, ids, done=None, **config) -> dict:
    """A complete shard record over pair ids ``ids`` (all evaluated unless ``done`` says which)."""
    done = ids if done is None else done
    res = {"pck": {"0.05": 0.5, "0.1": 1.0, "0.15": 1.0}, "ot_time_s": 0.1, "n_iters": 1, "marginal_error": 0.0}
    return {"config": {"eps": 0.05, "solvers": ["s"], "alphas": [0.05, 0.1, 0.15], "shard": [[k, n]], **config},
            "versions": {"torch": "x"}, "n_pairs_total": len(ids), "skipped": [], "complete": True,
            "pairs": [{"pair_id": i, "category": "c", "results": {"s": res}} for i in done],
            "shard": {"levels": [[k, n]], "pair_ids": list(ids), "positions": [int(i[1:]) for i in ids],
                      "n_pairs_all": 4, "pairs_digest": "d"}}


def test_merge_names_what_does_not_fit():
    a, b = _fake_shard(1, 2, ["p0", "p1"]), _fake_shard(2, 2, ["p2", "p3"])
    merged = merge_records([b, a], ["b.json", "a.json"])
    assert [p["pair_id"] for p in merged["pairs"]] == ["p0", "p1", "p2", "p3"] and "shard" not in merged["config"]
    assert merged["solvers"]["s"]["n_pairs"] == 4
    cases = [([a, _fake_shard(2, 2, ["p2", "p3"], eps=0.1)], "eps: 0.05 in a.json, 0.1 in b.json"),
             ([a, {**b, "versions": {"torch": "y"}}], "other versions than a.json (torch: x vs y)"),
             ([a, _fake_shard(2, 2, ["p1", "p3"])], "pair p1 is planned in both a.json and b.json"),
             ([a, _fake_shard(2, 2, ["p2", "p3"], done=["p2"])], "pair p3 is missing: b.json neither evaluated"),
             ([a, _fake_shard(2, 3, ["p2", "p3"])], "not shards of the same split"),
             ([a, {**b, "shard": {**b["shard"], "pairs_digest": "e"}}], "different pair lists")]
    for records, message in cases:
        with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            merge_records(records, ["a.json", "b.json"])


# ------------------------------------------------------------------ the feature cache on disk
@pytest.fixture(scope="module")
def model():
    return small_scot(SIDE)


def _same(a, b) -> bool:
    tensors = ("feats", "boxes", "centres", "weights", "cam")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in tensors) and \
        (a.grid, a.size, a.scale) == (b.grid, b.size, b.scale)


def test_disk_cache_returns_fresh_features_and_misses_a_changed_setting(model, tmp_path):
    path = sample_pair().src_path
    fresh = model.hyperpixels(path, name="image")
    first = FeatureCache(model, disk=DiskCache(tmp_path, model))
    assert _same(first.get(path), fresh)
    assert first.counters()["extracted"] == 1 and first.counters()["disk_writes"] == 1
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o666 & ~_umask()
    second = FeatureCache(model, disk=DiskCache(tmp_path, model))  # another run (or shard)
    assert _same(second.get(path), fresh)
    assert second.counters()["extracted"] == 0 and second.counters()["disk_hits"] == 1

    copy = tmp_path / "renamed.png"  # the key is the content, not the name
    shutil.copy(path, copy)
    assert DiskCache(tmp_path, model).load(copy) is not None

    # a changed setting is a different key: image side, CAM, layers, norm, ensemble and its layers, weights
    changed = []
    companion = uncached_backbone("efficientnet-lite2", pretrained=False)
    for change in (lambda m: setattr(m, "image_side", SIDE + 8),
                   lambda m: setattr(m.extractor, "use_cam", False),
                   lambda m: setattr(m.extractor, "layers", m.extractor.layers[:-1]),
                   lambda m: setattr(m.extractor, "cam_top_k", 3),
                   lambda m: setattr(m.extractor, "norm", "layer"),
                   lambda m: m.extractor.__dict__.update(companions=(companion,),
                                                         companion_layers=(companion.default_layers,)),
                   lambda m: m.extractor.__dict__.update(companions=(companion,), companion_layers=((3, 6),))):
        other = SCOT.__new__(SCOT)
        other.__dict__.update(model.__dict__)
        other.extractor = type(model.extractor).__new__(type(model.extractor))
        other.extractor.__dict__.update(model.extractor.__dict__)
        change(other)
        disk = DiskCache(tmp_path, other)
        changed.append(disk.key(path))
        assert disk.load(path) is None
    assert len(set(changed)) == 7 and DiskCache(tmp_path, model).key(path) not in changed
    other = SCOT.__new__(SCOT)
    other.__dict__.update(model.__dict__)
    other.backbone = uncached_backbone("efficientnet-lite0", pretrained=False)  # other weights, same name
    assert DiskCache(tmp_path, other).key(path) != DiskCache(tmp_path, model).key(path)


def test_disk_cache_recomputes_a_corrupt_file(model, tmp_path):
    path = sample_pair().trg_path
    disk = DiskCache(tmp_path, model)
    FeatureCache(model, disk=disk).get(path)
    (f,) = tmp_path.rglob("*.pt")
    for damage in (b"not a torch file", f.read_bytes()[: len(f.read_bytes()) // 2]):
        f.write_bytes(damage)
        cache = FeatureCache(model, disk=DiskCache(tmp_path, model))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hp = cache.get(path)
        assert _same(hp, model.hyperpixels(path, name="image"))
        assert cache.counters()["disk_corrupt"] == 1 and cache.counters()["extracted"] == 1
        assert any("unreadable" in str(w.message) and str(f) in str(w.message) for w in caught)
        assert DiskCache(tmp_path, model).load(path) is not None  # rewritten whole


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

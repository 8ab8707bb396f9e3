"""Every mistake gets a clear message and loses nothing (issue 11): a table of bad inputs.

Each CLI case runs ``scot-ot`` in process (``main()``) and asserts a non-zero exit,
one error paragraph on stderr with no traceback, the offending argument or file
named, and nothing written (the output folder stays empty; input files stay
unchanged). Each API case asserts a named exception with the same naming. The cases
that need a real subprocess (SIGTERM) or real work (recorded failures, skipped
pairs, written outputs) have their own tests below. ``docs/bad-inputs.md`` lists
every case id with its message; a test checks that it does.

Speed: images go through the network at 96 px instead of 300 (the code paths are
under test, not the accuracy) and the backbone is loaded once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

import scot_ot.cli as cli
from fast_models import cached_backbone, small_scot, use_small_models
import scot_ot.features as features
from scot_ot.data import SAMPLES, sample_pair
from scot_ot.datasets import DatasetError, load_pairs
from scot_ot.datasets.pf_willow import HEADER as WILLOW_HEADER
from scot_ot.evaluation.merge import MergeError, merge_records
from scot_ot.evaluation.run import config_diff, evaluate, read_results
from scot_ot.evaluation.shards import parse_shard
from scot_ot.features.backbone import CheckpointError
from scot_ot.matching import SCOT, ImageError, load_image
from scot_ot.outputs import atomic_write, check_output_file, write_json

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
SIDE = 96  # image side for cases that extract features

# ------------------------------------------------------------------ shared fixtures


@pytest.fixture(autouse=True)
def fast_models(monkeypatch):
    """One backbone load for the module; CLI models at :data:`SIDE` px."""
    use_small_models(monkeypatch, SIDE)


def _willow(root: Path, rows: List[Tuple[str, str, Optional[Tuple[int, float]]]]) -> Path:
    """A PF-WILLOW folder from the bundled samples; rows (src, trg, (column, value) to overwrite)."""
    meta = json.loads((SAMPLES / "keypoints.json").read_text())
    root.mkdir(parents=True)
    lines = [",".join(WILLOW_HEADER)]
    for src, trg, patch in rows:
        cells = []
        for name in (src, trg):
            cat = "duck(S)" if name.startswith("duck") or name.startswith("corrupt") else "car(G)"
            rel = f"PF-WILLOW/{cat}/{name}"
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("corrupt"):
                dest.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing
            elif (SAMPLES / name).is_file() and not dest.exists():
                shutil.copy(SAMPLES / name, dest)
            cells.append(rel)
        kps = [np.array(meta["images"][n]["keypoints"] if n in meta["images"] else
                        meta["images"]["duck_060_0000.png"]["keypoints"]) for n in (src, trg)]
        coords = [*kps[0][:, 0], *kps[0][:, 1], *kps[1][:, 0], *kps[1][:, 1]]
        if patch is not None:
            coords[patch[0]] = patch[1]
        lines.append(",".join(cells + [f"{c:.4f}" for c in coords]))
    (root / "test_pairs.csv").write_text("\n".join(lines) + "\n")
    return root


DUCK_A, DUCK_B, CAR_A, CAR_B = "duck_060_0000.png", "duck_060_0036.png", "car_Cars_000a.png", "car_Cars_028a.png"


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """The bad (and good) input files every case refers to as ``{d}/...``."""
    d = tmp_path_factory.mktemp("inputs")
    pair = sample_pair()
    (d / "random.bin").write_bytes(np.random.default_rng(0).bytes(2000))
    torch.save([1, 2, 3], d / "list.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, d / "wrongkeys.pth")
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    gray = np.asarray(Image.open(pair.src_path).convert("L")).astype(np.uint16) * 257  # 16-bit, full range
    Image.fromarray(gray).save(d / "gray16.png")
    (d / "kps.json").write_text(json.dumps(pair.src_kps[:3].tolist()))
    (d / "far.json").write_text("[[5000, 10]]")
    (d / "notadir").write_text("a file where a folder is expected\n")
    (d / "empty-masks").mkdir()  # a masks folder that holds no mask
    (d / "resume-list.json").write_text("[]")
    (d / "resume-no-pairs.json").write_text(json.dumps({"config": {"solvers": ["pot-sinkhorn"],
                                                                   "alphas": [0.05, 0.1, 0.15]}}))
    (d / "resume-broken-pair.json").write_text(json.dumps({
        "config": {"solvers": ["pot-sinkhorn"], "alphas": [0.05, 0.1, 0.15]}, "pairs": [{"pair_id": "x"}]}))
    (d / "resume-corrupt.json").write_text('{"config": {"solvers": ["pot-\x01sinkhorn"]}}')
    # PF-WILLOW folders: good pairs, a corrupt image, a keypoint outside its image
    _willow(d / "willow", [(DUCK_A, DUCK_B, None), ("corrupt.png", DUCK_B, None),
                           (DUCK_A, DUCK_B, (2, 99999.0)), (CAR_A, CAR_B, None)])
    _willow(d / "willow-corrupt", [("corrupt.png", DUCK_B, None), ("corrupt.png", DUCK_A, None)])
    empty = _willow(d / "willow-empty", [(DUCK_A, DUCK_B, None)])
    shutil.rmtree(empty / "PF-WILLOW")  # the csv names images that are not there
    # a valid results file made with eps 0.1 and the root written relative to d
    layers = list(cached_backbone("efficientnet-lite0").default_layers)
    config = {"dataset": "pf-willow", "root": "willow", "split": "test", "every": 1, "limit": None,
              "backbone": "efficientnet-lite0", "layers": layers, "eps": 0.1, "max_iter": 1, "tol": 1e-6,
              "rhm": True, "exponent": 0.5, "marginals": "cam", "masks": None, "solvers": ["pot-sinkhorn"],
              "alphas": [0.05, 0.1, 0.15]}
    (d / "resume-other.json").write_text(json.dumps({"config": config, "pairs": [], "complete": False}))
    _shard_files(d, {**config, "eps": 0.05})
    return d


def _shard_files(d: Path, config: dict) -> None:
    """Shard results files of one 6-pair run (shard-K.json, K = 1..3) and broken variants, for merge."""
    res = {"pck": {"0.05": 0.5, "0.1": 1.0, "0.15": 1.0}, "ot_time_s": 0.1, "n_iters": 1, "marginal_error": 0.0}

    def shard(k: int, ids: List[str], done: Optional[List[str]] = None, complete: bool = True, **change) -> dict:
        return {"config": {**config, "shard": [[k, 3]], **change}, "versions": {"scot_ot": "0.1.0"},
                "n_pairs_total": len(ids), "skipped": [], "complete": complete,
                "pairs": [{"pair_id": i, "category": "duck(S)", "results": {"pot-sinkhorn": res}}
                          for i in (ids if done is None else done)],
                "shard": {"levels": [[k, 3]], "pair_ids": ids, "positions": [int(i[1:]) for i in ids],
                          "n_pairs_all": 6, "pairs_digest": "same"}}

    files = {"shard-1": shard(1, ["p0", "p1"]), "shard-2": shard(2, ["p2", "p3"]),
             "shard-3": shard(3, ["p4", "p5"]), "shard-2-copy": shard(2, ["p2", "p3"]),
             "shard-2-eps": shard(2, ["p2", "p3"], eps=0.1),
             "shard-2-partial": shard(2, ["p2", "p3"], done=["p2"], complete=False),
             "shard-2-lost": shard(2, ["p2", "p3"], done=["p2"]), "shard-3-dup": shard(3, ["p3", "p4", "p5"])}
    files["whole"] = {k: v for k, v in files["shard-1"].items() if k != "shard"}
    for name, rec in files.items():
        (d / f"{name}.json").write_text(json.dumps(rec))


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: List[str], capsys) -> Tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_paragraph_error(err: str, names: List[str]) -> str:
    """One error (a paragraph at the end of stderr), no traceback, every name in it; returns it."""
    assert "Traceback" not in err and "weights_only" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if " error: " in line or line.startswith("scot-ot: error")]
    assert len(errors) == 1, err
    assert errors[0] == len(lines) - 1, f"the error is not the last line:\n{err}"
    paragraph = err.rstrip("\n").split("\n\n")[-1]
    message = lines[-1]
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return paragraph


def assert_standard_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds the non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ the CLI table
@dataclass(frozen=True)
class CliCase:
    id: str
    argv: str  # formatted with d (inputs), tmp (the output folder, must stay empty), trg (a good image)
    names: Tuple[str, ...]  # must appear in the error line (formatted like argv)
    rc: int = 2
    cwd: Optional[str] = None  # chdir here first (formatted)
    env: Tuple[Tuple[str, str], ...] = ()  # environment variables set first (a torchrun rank's)


_W = "eval --dataset pf-willow --root {d}/willow"
_NOWHERE = "eval --dataset pf-willow --root {d}/nowhere"
CLI_CASES = [
    # arguments (all refused before any image is read or model loaded)
    CliCase("device-cuda", "demo --device cuda --out {tmp}/d.png", ("--device", "'cuda'", "CUDA")),
    CliCase("device-cuda-index", "demo --device cuda:1 --out {tmp}/d.png", ("--device", "cuda:1")),
    CliCase("device-unknown", "demo --device gpu --out {tmp}/d.png", ("--device", "'gpu'")),
    CliCase("device-mps", "demo --device mps --out {tmp}/d.png", ("--device", "'mps'")),
    CliCase("ensemble-unknown", "demo --ensemble efficientnet-lite9 --out {tmp}/d.png",
            ("--ensemble", "'efficientnet-lite9'", "efficientnet-lite2")),
    CliCase("ensemble-repeats-backbone", "demo --ensemble efficientnet-lite0 --out {tmp}/d.png",
            ("--ensemble", "repeats", "efficientnet-lite0")),
    CliCase("weights-random-file", "demo --weights {d}/random.bin --out {tmp}/d.png",
            ("--weights", "random.bin", "not a state dict of the expected backbone")),
    CliCase("weights-not-a-dict", "demo --weights {d}/list.pth --out {tmp}/d.png",
            ("--weights", "list.pth", "not a dict")),
    CliCase("weights-wrong-keys", "demo --weights {d}/wrongkeys.pth --out {tmp}/d.png",
            ("--weights", "wrongkeys.pth", "missing", "unexpected")),
    CliCase("weights-missing", "demo --weights {d}/absent.pth --out {tmp}/d.png", ("--weights", "absent.pth")),
    CliCase("solver-option-typo", _NOWHERE + " --solver torch-log:bogus=1", ("--solver", "bogus", "init")),
    CliCase("solver-option-typo-match", "match {d}/tiny.png {d}/tiny.png --solver torch-log:bogus=1 "
            "--out {tmp}/m.png", ("--solver", "bogus")),
    CliCase("solver-unknown", "demo --solver sinkhorn --out {tmp}/d.png", ("--solver", "'sinkhorn'", "torch-log")),
    CliCase("solver-option-not-a-number", _NOWHERE + " --solver torch-log:eps=big", ("--solver", "eps", "'big'")),
    CliCase("solver-repeated", _NOWHERE + " --solver torch-log --solver torch-log", ("--solver", "repeated")),
    CliCase("max-iter-zero", _NOWHERE + " --max-iter 0", ("--max-iter", "0")),
    CliCase("tol-negative", "demo --tol -1 --out {tmp}/d.png", ("--tol", "-1")),
    CliCase("eps-zero", "demo --eps 0 --out {tmp}/d.png", ("--eps", "0")),
    CliCase("spec-value", "diagnose {d}/tiny.png {d}/tiny.png --solvers pot-sinkhorn,torch-absorb:max_iter=0 "
            "--out {tmp}/diag", ("--solvers", "torch-absorb:max_iter=0", "max_iter")),
    CliCase("layers-not-numbers", "demo --layers 1,x --out {tmp}/d.png", ("--layers", "1,x")),
    CliCase("layers-out-of-range", "demo --layers 1,99 --out {tmp}/d.png", ("--layers", "99")),
    CliCase("ensemble-layers-count", "demo --ensemble efficientnet-lite2 --ensemble-layers 3,6/3,6 "
            "--out {tmp}/d.png", ("--ensemble-layers", "2 list(s) of layer ids for 1 ensemble backbone(s)")),
    CliCase("ensemble-layers-not-numbers", "demo --ensemble efficientnet-lite2 --ensemble-layers 3,x "
            "--out {tmp}/d.png", ("--ensemble-layers", "3,x")),
    CliCase("every-zero", _W + " --every 0", ("--every",)),
    # --resume
    CliCase("resume-without-out", _W + " --resume", ("--resume", "--out")),
    CliCase("resume-not-an-object", _NOWHERE + " --out {d}/resume-list.json --resume",
            ("--resume", "resume-list.json", "top level is a list")),
    CliCase("resume-no-pairs", _NOWHERE + " --out {d}/resume-no-pairs.json --resume",
            ("--resume", "resume-no-pairs.json", "'pairs'")),
    CliCase("resume-broken-pair", _NOWHERE + " --out {d}/resume-broken-pair.json --resume",
            ("--resume", "resume-broken-pair.json", "pairs[0]")),
    CliCase("resume-corrupt-json", _NOWHERE + " --out {d}/resume-corrupt.json --resume",
            ("--resume", "resume-corrupt.json", "not valid JSON", "line 1 column")),
    CliCase("resume-other-configuration", _W + " --out {d}/resume-other.json --resume",
            ("--resume", "resume-other.json", "another configuration", "eps: 0.1 in the file, 0.05 now"),
            cwd="{d}"),
    # outputs
    CliCase("out-is-a-folder", "demo --out {tmp}", ("--out", "{tmp}", "is a folder")),
    CliCase("out-under-a-file", "demo --out {d}/notadir/x.png", ("--out", "{d}/notadir/x.png", "not a folder")),
    CliCase("out-unknown-format", "demo --out {tmp}/m.xyz", ("--out", "m.xyz", ".jpg")),
    CliCase("out-folder-eval", _W + " --out {tmp}", ("--out", "{tmp}", "is a folder")),
    CliCase("out-file-diagnose", "diagnose {d}/tiny.png {d}/tiny.png --out {d}/notadir",
            ("--out", "notadir", "is a file")),
    CliCase("kps-out-without-keypoints", "match {trg} {trg} --kps-out {tmp}/k.json --out {tmp}/m.png",
            ("--kps-out", "--keypoints")),
    CliCase("kps-out-not-json", "match {trg} {trg} --keypoints {d}/kps.json --kps-out {tmp}/k.txt "
            "--out {tmp}/m.png", ("--kps-out", "k.txt", ".json")),
    # images
    CliCase("image-too-small", "match {d}/tiny.png {trg} --out {tmp}/m.png", ("SRC", "tiny.png", "16 px")),
    CliCase("image-corrupt", "match {trg} {d}/corrupt.png --out {tmp}/m.png", ("TRG", "corrupt.png", "cannot read")),
    CliCase("image-missing", "match {d}/absent.png {trg} --out {tmp}/m.png", ("SRC", "absent.png", "no such file")),
    CliCase("keypoints-outside-image", "match {trg} {trg} --keypoints {d}/far.json --out {tmp}/m.png",
            ("--keypoints", "far.json", "outside")),
    # evaluation runs
    CliCase("eval-no-pair-found", "eval --dataset pf-willow --root {d}/willow-empty --out {tmp}/r.json",
            ("--root", "willow-empty", "no pair to evaluate", "image not found")),
    CliCase("eval-every-image-unreadable", "eval --dataset pf-willow --root {d}/willow-corrupt --out {tmp}/r.json",
            ("no pair could be evaluated", "test_pairs.csv:2", "corrupt.png")),
    CliCase("eval-strict-unreadable-image", "eval --dataset pf-willow --root {d}/willow-corrupt --strict "
            "--out {tmp}/r.json", ("test_pairs.csv:2", "corrupt.png", "cannot read")),
    CliCase("eval-strict-missing-image", "eval --dataset pf-willow --root {d}/willow-empty --strict "
            "--out {tmp}/r.json", ("--strict", "test_pairs.csv:2", "image not found")),
    # numerical failure of the only solver
    CliCase("demo-numerical-failure", "demo --eps 1e-4 --out {tmp}/d.png",
            ("failed numerically", "pot-sinkhorn", "eps=0.0001", "torch-log")),
    # shards, merge, torchrun, feature cache (issue 14)
    CliCase("shard-malformed", _NOWHERE + " --shard 3", ("--shard", "'3'", "K/N")),
    CliCase("shard-zero", _NOWHERE + " --shard 0/4", ("--shard", "'0/4'", "1..4", "SLURM_ARRAY_TASK_ID + 1")),
    CliCase("shard-empty", _W + " --shard 1/5 --out {tmp}/r.json", ("--shard 1/5", "holds no pair", "at most 4")),
    CliCase("cache-dir-is-a-file", _NOWHERE + " --cache-dir {d}/notadir", ("--cache-dir", "notadir", "is a file")),
    CliCase("resume-other-shard", "eval --dataset pf-willow --root willow --shard 2/3 --out {d}/shard-1.json "
            "--resume", ("--resume", "shard-1.json", "shard: [[1, 3]] in the file, [[2, 3]] now"), cwd="{d}"),
    CliCase("torchrun-device-index", _NOWHERE + " --device cuda:1", ("--device", "'cuda:1'", "--device cuda"),
            env=(("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"))),
    CliCase("torchrun-env-not-a-number", _NOWHERE, ("torchrun", "WORLD_SIZE", "'two'"),
            env=(("RANK", "0"), ("WORLD_SIZE", "two"))),
    CliCase("merge-missing-shard", "merge {d}/shard-1.json {d}/shard-3.json --out {tmp}/all.json",
            ("shard(s) 2/3 missing", "2 of 3 given")),
    CliCase("merge-duplicated-shard", "merge {d}/shard-1.json {d}/shard-2.json {d}/shard-2-copy.json "
            "{d}/shard-3.json --out {tmp}/all.json",
            ("shard 2/3 is given twice", "{d}/shard-2.json", "{d}/shard-2-copy.json")),
    CliCase("merge-other-configuration", "merge {d}/shard-1.json {d}/shard-2-eps.json {d}/shard-3.json "
            "--out {tmp}/all.json", ("shard-2-eps.json", "another configuration", "eps: 0.05 in", "0.1 in")),
    CliCase("merge-incomplete-shard", "merge {d}/shard-1.json {d}/shard-2-partial.json {d}/shard-3.json "
            "--out {tmp}/all.json", ("shard-2-partial.json", "shard 2/3", "incomplete", "--resume")),
    CliCase("merge-missing-pair", "merge {d}/shard-1.json {d}/shard-2-lost.json {d}/shard-3.json "
            "--out {tmp}/all.json", ("pair p3 is missing", "shard-2-lost.json")),
    CliCase("merge-duplicated-pair", "merge {d}/shard-1.json {d}/shard-2.json {d}/shard-3-dup.json "
            "--out {tmp}/all.json", ("pair p3", "planned in both", "shard-2.json", "shard-3-dup.json")),
    CliCase("merge-not-a-shard", "merge {d}/whole.json {d}/shard-2.json --out {tmp}/all.json",
            ("whole.json", "not a shard")),
    CliCase("merge-not-results", "merge {d}/resume-list.json --out {tmp}/all.json",
            ("FILE", "resume-list.json", "not a scot-ot eval results file")),
    # masks, marginals and the failure gallery (issue 13)
    CliCase("masks-no-folder", _NOWHERE + " --masks {d}/nomasks", ("--masks", "nomasks", "no such folder")),
    CliCase("marginals-mask-without-masks", _NOWHERE + " --marginals mask", ("--marginals mask", "--masks")),
    CliCase("marginals-mask-match", "match {trg} {trg} --marginals mask --out {tmp}/m.png",
            ("--marginals mask", "eval --masks DIR")),
    CliCase("diagnose-mask-missing", "diagnose {trg} {trg} --masks {d}/absent.png {d}/absent.png --out {tmp}/diag",
            ("--masks", "absent.png", "no such file")),
    CliCase("eval-no-mask-for-any-image", _W + " --masks {d}/empty-masks --out {tmp}/r.json",
            ("no pair could be evaluated", "no mask for", "empty-masks")),
    CliCase("gallery-size-zero", _NOWHERE + " --gallery {tmp}/g --gallery-size 0", ("--gallery-size", "0")),
    CliCase("gallery-compare-unknown", _NOWHERE + " --gallery {tmp}/g --solver pot-sinkhorn --solver similarity "
            "--gallery-compare pot-sinkhorn pot-emd", ("--gallery-compare", "'pot-emd'", "similarity")),
    CliCase("gallery-compare-without-gallery", _NOWHERE + " --gallery-compare pot-sinkhorn similarity",
            ("--gallery-compare", "--gallery DIR")),
    CliCase("gallery-with-shard", _NOWHERE + " --gallery {tmp}/g --shard 1/2", ("--gallery", "--shard")),
    CliCase("gallery-is-a-file", _NOWHERE + " --gallery {d}/notadir", ("--gallery", "notadir", "is a file")),
    CliCase("merge-out-is-an-input", "merge {d}/shard-1.json {d}/shard-2.json {d}/shard-3.json "
            "--out {d}/shard-1.json", ("--out", "shard-1.json", "one of the shard files")),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case, d, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fmt = {"d": d, "tmp": out, "trg": sample_pair().trg_path}
    if case.cwd:
        monkeypatch.chdir(case.cwd.format(**fmt))
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    before = _snapshot(d)
    rc, stdout, err = run_cli(case.argv.format(**fmt).split(), capsys)
    assert rc == case.rc, (rc, stdout, err)
    assert_one_paragraph_error(err, [n.format(**fmt) for n in case.names])
    assert list(out.iterdir()) == [], "something was written"
    assert _snapshot(d) == before, "an input file was changed"


def test_docs_list_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CLI_CASES + API_CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/bad-inputs.md lacks {missing}"


# ------------------------------------------------------------------ the API table
@pytest.fixture(scope="module")
def model():
    return small_scot(SIDE)


@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable  # (d, model) -> anything; must raise
    error: type
    names: Tuple[str, ...]


def _16bit_int_image(d, m):
    return load_image(Image.fromarray(np.full((20, 20), 70000, np.int32)), "src")


API_CASES = [
    ApiCase("api-device-cuda", lambda d, m: SCOT(device="cuda"), ValueError, ("device", "'cuda'")),
    ApiCase("api-weights-random-file", lambda d, m: SCOT(weights=d / "random.bin"), CheckpointError,
            ("random.bin", "not a state dict of the expected backbone")),
    ApiCase("api-weights-not-a-dict", lambda d, m: SCOT(weights=d / "list.pth"), CheckpointError, ("list.pth",)),
    ApiCase("api-solver-option-typo", lambda d, m: SCOT(solver="torch-log", solver_options={"bogus": 1}),
            ValueError, ("bogus",)),
    ApiCase("api-with-solver-option-typo", lambda d, m: m.with_solver("torch-log", bogus=1), ValueError,
            ("bogus",)),
    ApiCase("api-max-iter-zero", lambda d, m: SCOT(max_iter=0), ValueError, ("max_iter",)),
    ApiCase("api-ensemble-a-string", lambda d, m: SCOT(ensemble="efficientnet-lite2"), ValueError,
            ("ensemble", "list of backbone names")),
    ApiCase("api-ensemble-unknown", lambda d, m: SCOT(ensemble=["lite2"]), ValueError,
            ("ensemble", "'lite2'", "efficientnet-lite2")),
    ApiCase("api-keypoints-not-numbers", lambda d, m: m.match(SAMPLES / DUCK_A, SAMPLES / DUCK_B).transfer("abc"),
            ValueError, ("keypoints", "(K, 2) numbers", "'abc'")),
    ApiCase("api-layers-a-string", lambda d, m: SCOT(layers="2,8"), ValueError,
            ("layers", "efficientnet-lite0", "0..15", "'2,8'")),
    ApiCase("api-layers-floats", lambda d, m: SCOT(layers=[2.5, 8]), ValueError, ("layers", "[2.5, 8]")),
    ApiCase("api-use-cam-not-bool", lambda d, m: SCOT(use_cam="no"), ValueError,
            ("use_cam", "True or False", "'no'")),
    ApiCase("api-solver-options-not-a-dict", lambda d, m: SCOT(solver_options=["init"]), ValueError,
            ("solver_options", "dict", "['init']")),
    ApiCase("api-ensemble-layers-count",
            lambda d, m: SCOT(ensemble=["efficientnet-lite2"], ensemble_layers=[(3, 6), (3, 6)]), ValueError,
            ("ensemble_layers", "2 list(s) of layer ids for 1 ensemble backbone(s)", "efficientnet-lite2")),
    ApiCase("api-ensemble-layers-out-of-range",
            lambda d, m: SCOT(ensemble=["efficientnet-lite2"], ensemble_layers=[(3, 99)]), ValueError,
            ("ensemble_layers", "efficientnet-lite2", "0..20", "(3, 99)")),
    ApiCase("api-hyperpixel-norm-unknown", lambda d, m: SCOT(hyperpixel_norm="l2"), ValueError,
            ("hyperpixel_norm", "joint, layer", "'l2'")),
    ApiCase("api-cost-precision-unknown", lambda d, m: SCOT(cost_precision="float16"), ValueError,
            ("cost_precision", "full, bfloat16", "'float16'")),
    ApiCase("api-mutual-filter-not-bool", lambda d, m: SCOT(mutual_filter="yes"), ValueError,
            ("mutual_filter", "True or False", "'yes'")),
    ApiCase("api-transfer-box-negative", lambda d, m: SCOT(transfer_box=-1.0), ValueError,
            ("transfer_box", "finite number >= 0", "-1.0")),
    ApiCase("api-transfer-refine-not-whole", lambda d, m: SCOT(transfer_refine=1.5), ValueError,
            ("transfer_refine", "integer >= 0", "1.5")),
    ApiCase("api-exponent-none", lambda d, m: SCOT(exponent=None), ValueError,
            ("exponent", "finite number > 0", "None")),
    ApiCase("api-tol-negative", lambda d, m: SCOT(tol=-1), ValueError, ("tol",)),
    ApiCase("api-resume-not-an-object", lambda d, m: read_results(d / "resume-list.json"), ValueError,
            ("resume-list.json",)),
    ApiCase("api-resume-broken-pair", lambda d, m: read_results(d / "resume-broken-pair.json"), ValueError,
            ("resume-broken-pair.json", "pairs[0]")),
    ApiCase("api-resume-corrupt-json", lambda d, m: read_results(d / "resume-corrupt.json"), ValueError,
            ("resume-corrupt.json", "not valid JSON")),
    ApiCase("api-resume-other-configuration",
            lambda d, m: evaluate(m, load_pairs("pf-willow", d / "willow").pairs, ["pot-sinkhorn"],
                                  out=d / "resume-other.json", resume=True, progress=False,
                                  config={**json.loads((d / "resume-other.json").read_text())["config"],
                                          "eps": 0.05, "root": str(d / "willow")}),
            ValueError, ("resume-other.json", "eps: 0.1 in the file, 0.05 now")),
    ApiCase("api-out-is-a-folder", lambda d, m: check_output_file(d, "out"), ValueError, ("is a folder",)),
    ApiCase("api-out-under-a-file", lambda d, m: write_json({}, d / "notadir" / "r.json"), OSError,
            ("notadir/r.json",)),
    ApiCase("api-image-float-0-255", lambda d, m: load_image(torch.rand(3, 20, 20) * 255, "src"), ImageError,
            ("src", "[0, 1]", "255")),
    ApiCase("api-image-too-small", lambda d, m: load_image(np.zeros((1, 1, 3), np.uint8), "src"), ImageError,
            ("src", "16 px")),
    ApiCase("api-image-too-small-file", lambda d, m: m.match(d / "tiny.png", d / "tiny.png"), ImageError,
            ("tiny.png", "16 px")),
    ApiCase("api-image-32bit-int", _16bit_int_image, ImageError, ("src", "70000")),
    ApiCase("api-image-bool", lambda d, m: load_image(np.ones((20, 20), bool), "src"), ImageError, ("src", "bool")),
    ApiCase("api-eval-no-pair", lambda d, m: evaluate(m, [], ["pot-sinkhorn"], progress=False), ValueError,
            ("no pair to evaluate",)),
    ApiCase("api-eval-every-image-unreadable",
            lambda d, m: evaluate(m, load_pairs("pf-willow", d / "willow-corrupt").pairs, ["pot-sinkhorn"],
                                  progress=False), ValueError, ("no pair could be evaluated", "corrupt.png")),
    ApiCase("api-eval-strict-unreadable-image",
            lambda d, m: evaluate(m, load_pairs("pf-willow", d / "willow-corrupt").pairs, ["pot-sinkhorn"],
                                  progress=False, strict=True), DatasetError, ("test_pairs.csv:2", "corrupt.png")),
    ApiCase("api-merge-missing-shard",
            lambda d, m: merge_records([read_results(d / "shard-1.json"), read_results(d / "shard-3.json")],
                                       ["shard-1.json", "shard-3.json"]), MergeError, ("shard(s) 2/3 missing",)),
    ApiCase("api-shard-out-of-range", lambda d, m: parse_shard("3/2"), ValueError, ("--shard", "1..2", "'3/2'")),
    ApiCase("api-numerical-failure",
            lambda d, m: m.with_solver("pot-sinkhorn", eps=1e-4).match(sample_pair().src_path,
                                                                       sample_pair().trg_path),
            FloatingPointError, ("pot-sinkhorn", "eps=0.0001")),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(case, d, model):
    before = _snapshot(d)
    with pytest.raises(case.error) as info:
        case.call(d, model)
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message
    for name in case.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert _snapshot(d) == before


# ------------------------------------------------------------------ images loaded right
def test_images_16bit_and_tensor_layouts(d):
    x = load_image(d / "gray16.png")  # mode I;16: scaled by 1/65535, not clipped at 255
    ref = load_image(sample_pair().src_path).mean(0)  # the 8-bit gray it was made from, roughly
    assert x.shape[0] == 3 and abs(float(x.mean()) - float(ref.mean())) < 0.02
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    hwc = load_image(torch.from_numpy(arr))  # uint8 HWC torch tensor, as the numpy array
    assert torch.equal(hwc, load_image(arr)) and hwc.shape == (3, 20, 30)
    assert torch.equal(load_image(torch.from_numpy(arr).permute(2, 0, 1)), hwc)
    assert torch.allclose(load_image(arr.astype(np.float32) / 255), hwc)


# ------------------------------------------------------------------ runs that record, skip and write
def test_eval_records_skips_and_failures(d, tmp_path, capsys, monkeypatch):
    """Corrupt image and keypoint outside: skipped with file:line; a solver's numerical failure: recorded."""
    out = tmp_path / "r.json"
    argv = (f"eval --dataset pf-willow --root {d / 'willow'} --solver pot-sinkhorn "
            f"--solver pot-sinkhorn:eps=0.0001 --batch-size 3 --out {out}").split()
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 1  # a solver failed on every pair: the record is complete, the exit status says so
    assert_one_paragraph_error(err, ["pot-sinkhorn:eps=0.0001", "failed on every pair"])
    rec = assert_standard_json(out)
    assert rec["complete"] and rec["n_evaluated"] == 2 and oct(out.stat().st_mode & 0o777) == oct(0o666 & ~0o022)
    skipped = "\n".join(rec["skipped"])
    assert "test_pairs.csv:3:" in skipped and "corrupt.png" in skipped
    assert "test_pairs.csv:4:" in skipped and "outside the source image" in skipped
    bad = rec["solvers"]["pot-sinkhorn:eps=0.0001"]
    assert bad["n_failed"] == 2 and bad["n_pairs"] == 0 and bad["pck"]["0.1"] is None
    assert "NumericalError" in bad["first_failure"]["reason"]
    assert rec["solvers"]["pot-sinkhorn"]["n_pairs"] == 2 and rec["solvers"]["pot-sinkhorn"]["n_failed"] == 0
    cache = rec["feature_cache"]  # 3 pairs looked up both images (the 4th stopped at its corrupt source)
    assert cache["hits"] + cache["misses"] == 6 and cache["misses"] == 4 and cache["unreadable"] == 1
    assert "skipped while running: 2" in stdout

    # resume a partial file, with the root now written relative: same root, continues
    rec["pairs"], rec["complete"] = rec["pairs"][:1], False
    first = rec["pairs"][0]
    out.write_text(json.dumps(rec))
    monkeypatch.chdir(d)
    rc, _, err = run_cli([*argv[:4], "willow", *argv[5:], "--resume"], capsys)
    assert rc == 1 and "another configuration" not in err
    again = assert_standard_json(out)
    assert again["complete"] and len(again["pairs"]) == 2 and again["pairs"][0] == first


def test_eval_api_records_failure_and_skip(d, model, tmp_path):
    pairs = load_pairs("pf-willow", d / "willow").pairs
    out = tmp_path / "r.json"
    rec = evaluate(model, [pairs[2], pairs[0]], ["pot-sinkhorn:eps=0.0001"], out=out, progress=False)
    assert rec["skipped"] == [s for s in rec["skipped"] if "test_pairs.csv:4: pair " in s] and len(rec["skipped"]) == 1
    assert rec["solvers"]["pot-sinkhorn:eps=0.0001"]["n_failed"] == 1
    assert assert_standard_json(out)["solvers"]["pot-sinkhorn:eps=0.0001"]["mean_ot_time_s"] is None


def test_config_diff_same_root_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_diff({"root": "willow", "eps": 0.05}, {"root": str(tmp_path / "willow"), "eps": 0.05}) == []
    assert config_diff({"root": "a", "eps": 0.1}, {"root": "b", "eps": 0.1}) == ['root: "a" in the file, "b" now']


def test_match_writes_what_it_says(d, tmp_path, capsys, monkeypatch):
    """16-bit source, JPEG picture, keypoints printed and written, files 0644 under umask 022."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        rc, stdout, err = run_cli(["match", str(d / "gray16.png"), str(sample_pair().trg_path),
                                   "--keypoints", str(d / "kps.json"), "--kps-out", "k.json",
                                   "--out", "m.jpg"], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert (tmp_path / "m.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, as the extension says
    kps = assert_standard_json(tmp_path / "k.json")
    assert len(kps["transferred_keypoints"]) == 3 and len(kps["source_keypoints"]) == 3
    assert "transferred keypoints" in stdout and stdout.count(" -> (") == 3
    for name in ("m.jpg", "k.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "m.jpg"]  # no temporary file left
    assert "extracting features" in err  # progress is shown


def test_write_respects_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json({"x": float("nan")}, tmp_path / "a.json")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None}
    with pytest.raises(OSError, match="cannot write .*b.json") as info:
        atomic_write(tmp_path / "b.json", lambda tmp: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert ".part" not in str(info.value) and list(tmp_path.iterdir()) == [tmp_path / "a.json"]


def test_diagnose_records_a_failed_solver(d, tmp_path, capsys):
    pair = sample_pair()
    out = tmp_path / "diag"
    rc, stdout, err = run_cli(["diagnose", str(pair.src_path), str(pair.trg_path), "--solvers",
                               "pot-sinkhorn,pot-sinkhorn:eps=0.0001", "--out", str(out)], capsys)
    assert rc == 0, err
    rec = assert_standard_json(out / "diagnostics.json")
    assert rec["n_failed"] == 1 and "NumericalError" in rec["solvers"]["pot-sinkhorn:eps=0.0001"]["failed"]
    assert (out / "pot-sinkhorn" / "matches.png").is_file() and not (out / "pot-sinkhorn_eps=0.0001").exists()
    assert "failed: NumericalError" in stdout


# ------------------------------------------------------------------ SIGTERM, in a real process
_SUBPROCESS = """
import sys, time
import scot_ot.cli as cli, scot_ot.evaluation.run as run
build, evaluate_pair = cli.build_model, run._evaluate_pair
def small(args, solver):
    model = build(args, solver)
    model.image_side = {side}
    return model
def slow(*a, **k):  # each pair takes 2 s more, so that the signal lands mid-run
    out = evaluate_pair(*a, **k)
    time.sleep(2.0)
    return out
cli.build_model, run._evaluate_pair = small, slow
sys.exit(cli.main({argv!r}))
"""


def test_sigterm_saves_finished_pairs(d, tmp_path):
    out = tmp_path / "r.json"
    argv = ["eval", "--dataset", "pf-willow", "--root", str(d / "willow"), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _SUBPROCESS.format(side=SIDE, argv=argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            if out.is_file() and json.loads(out.read_text())["pairs"]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no pair was saved in time")
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    rec = assert_standard_json(out)
    assert not rec["complete"] and len(rec["pairs"]) >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left

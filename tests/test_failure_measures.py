"""Failure measures in evaluation (issue 13): ``--masks``, ``--marginals``, the per-pair measures, ``--gallery``.

Real data: the first pairs of PF-WILLOW-dev and their FCN masks (``PF-WILLOW-FCN``),
at 96 px (the code paths are under test, not the accuracy). Every recorded measure is
checked against the diagnostics functions recomputed on the same pair, and the
masks against their definition (bilinear stretch to the image's size, threshold 0.5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scot_ot.cli as cli
from fast_models import small_scot, use_small_models
from scot_ot import diagnostics
from scot_ot.datasets import load_pairs
from scot_ot.datasets.masks import MaskError, MaskFolder, read_mask
from scot_ot.evaluation.disk_cache import DiskCache
from scot_ot.evaluation.run import evaluate, format_table
from scot_ot.matching.image import ImageError
from scot_ot.matching.cam import staircase

WILLOW_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PF-WILLOW-dev"
FCN = WILLOW_DEV / "PF-WILLOW-FCN"
SIDE = 96
pytestmark = pytest.mark.skipif(not FCN.is_dir(), reason="PF-WILLOW-dev with its FCN masks is not beside the checkout")


@pytest.fixture(scope="module")
def model():
    return small_scot(SIDE)


@pytest.fixture(scope="module")
def pairs():
    ps = list(load_pairs("pf-willow", WILLOW_DEV).pairs)
    return [ps[0], ps[100], ps[200]]  # three subclasses


@pytest.fixture(scope="module")
def record(model, pairs):
    return evaluate(model, pairs, ["pot-sinkhorn", "similarity", "partial:mass=0.6,max_iter=200,tol=1e-4"],
                    progress=False, masks=MaskFolder(FCN))


# ----------------------------------------------------------------------------- masks
def test_read_mask_stretches_bilinearly_then_thresholds(tmp_path):
    m = np.zeros((2, 4), dtype=np.uint8)
    m[:, 1:] = 255  # columns 1..3 foreground
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png", (8, 3))  # (W, H): twice as wide, 1.5 x as high
    assert out.shape == (3, 8) and out.dtype == torch.bool
    # bilinear, align_corners=False: output x samples input (x + 0.5) / 2 - 0.5; value 255 * (that - 0) past
    # column 0's centre; > 0.5 from input coordinate 0.5 on, i.e. output x >= 1.5
    want = torch.tensor([False, False] + [True] * 6)
    assert torch.equal(out, want.expand(3, 8))


def test_mask_folder_finds_nested_then_flat_and_names_both_places(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "cls" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.png")
    folder = MaskFolder(tmp_path)
    assert folder.path_for("/data/JPEG/cls/a.jpg") == tmp_path / "cls" / "a.png"
    assert folder.path_for("/data/JPEGImages/b.jpg") == tmp_path / "b.png"
    with pytest.raises(MaskError, match=r"--masks: no mask for .*c\.jpg \(looked for .*cls/c\.png and .*c\.png\)"):
        folder.path_for("/x/cls/c.jpg")
    with pytest.raises(MaskError, match="--masks: no such folder"):
        MaskFolder(tmp_path / "absent")
    (tmp_path / "cls" / "bad.png").write_text("not a png")
    with pytest.raises(MaskError, match="cannot read .*bad.png as an image"):
        folder.load("/x/cls/bad.jpg", (4, 4))


def test_an_unreadable_image_is_an_image_error_not_a_mask_error(tmp_path):
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "broken.png")  # its mask exists
    (tmp_path / "broken.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="cannot read .*broken.jpg"):
        MaskFolder(tmp_path).load_for_image(tmp_path / "broken.jpg")


def test_every_dev_image_has_a_mask_at_its_own_size(pairs):
    folder = MaskFolder(FCN)
    for p in pairs:
        with Image.open(p.src_path) as im:
            W, H = im.size
        m = folder.load_for_image(p.src_path)
        assert m.shape == (H, W) and 0.02 < float(m.float().mean()) < 0.9  # some object, some background


# ----------------------------------------------------------------------------- measures
def test_record_holds_every_measure_for_every_pair_and_solver(record, pairs):
    assert record["foreground"]["source"] == "masks" and record["config"]["masks"] == str(FCN.resolve())
    assert record["config"]["marginals"] == "cam"
    assert len(record["pairs"]) == len(pairs)
    for p in record["pairs"]:
        for spec, r in p["results"].items():
            for key in ("collision_rate", "effective_target_ratio", "mutual_nn_rate", "background_rate"):
                assert 0.0 <= r[key] <= 1.0, (spec, key, r[key])
            assert r["time_s"] >= r["ot_time_s"] > 0 and r["measures_time_s"] > 0
        res = p["results"]
        assert res["similarity"]["unmatched_mass"] is None and res["similarity"]["plan_mass"] is None
        assert res["pot-sinkhorn"]["unmatched_mass"] == pytest.approx(0.0, abs=1e-5)
        assert res["partial:mass=0.6,max_iter=200,tol=1e-4"]["unmatched_mass"] == pytest.approx(0.4, abs=1e-3)
    for spec, s in record["solvers"].items():
        assert set(s["per_category_measures"]) == {p.category for p in pairs}
        means = s["measures"]
        got = [p["results"][spec]["collision_rate"] for p in record["pairs"]]
        assert means["collision_rate"] == pytest.approx(np.mean(got))


def test_recorded_measures_equal_the_diagnostics_recomputed(record, model, pairs):
    pair = pairs[1]
    hs, ht = model.hyperpixels(pair.src_path), model.hyperpixels(pair.trg_path)
    folder = MaskFolder(FCN)
    fg = diagnostics.mask_foreground(hs, ht, folder.load_for_image(pair.src_path),
                                     folder.load_for_image(pair.trg_path))
    corr = model.match_hyperpixels(hs, ht)  # pot-sinkhorn, SCOT's default
    r = next(p for p in record["pairs"] if p["pair_id"] == pair.pair_id)["results"]["pot-sinkhorn"]
    M = len(ht)
    assert r["collision_rate"] == pytest.approx(diagnostics.collision_rate(corr.matches, M))
    assert r["effective_target_ratio"] == pytest.approx(diagnostics.effective_target_ratio(corr.matches, M))
    assert r["mutual_nn_rate"] == pytest.approx(diagnostics.mutual_nn_rate(corr.matches, corr.scores))
    into_bg = fg.src & ~fg.trg[corr.matches]
    assert r["background_rate"] == pytest.approx(float(into_bg.sum()) / float(fg.src.sum()))


def test_without_masks_the_foreground_is_the_keypoint_box_and_the_record_says_so(model, pairs):
    rec = evaluate(model, pairs[:1], ["pot-sinkhorn"], progress=False)
    assert rec["foreground"] == {"source": "keypoint-box", "margin": 0.1} and rec["config"]["masks"] is None
    assert 0.0 <= rec["pairs"][0]["results"]["pot-sinkhorn"]["background_rate"] <= 1.0


def test_table_prints_the_measures_and_names_the_foreground(record):
    text = format_table(record)
    assert re.search(r"coll\s+eff/N\s+mutual\s+bg\s+unmatch", text)
    assert "foreground from masks in" in text and "s/pair" in text


# ----------------------------------------------------------------------------- marginals
def test_mask_marginals_are_the_staircase_of_the_mask_and_change_the_plan(model, pairs):
    pair = pairs[0]
    folder = MaskFolder(FCN)
    recs = {m: evaluate(model, [pair], ["pot-sinkhorn"], progress=False, masks=folder, marginals=m)
            for m in ("cam", "mask", "uniform")}
    assert {m: r["config"]["marginals"] for m, r in recs.items()} == {m: m for m in recs}
    mask = folder.load_for_image(pair.src_path)
    hp = model.hyperpixels(pair.src_path, mask=mask)
    assert set(torch.unique(hp.weights).tolist()) <= {0.5, 1.0}
    H, W = hp.cam.shape
    small = torch.nn.functional.interpolate(mask[None, None].float(), size=(H, W), mode="nearest")[0, 0]
    cx, cy = hp.centres[:, 0].long().clamp(0, W - 1), hp.centres[:, 1].long().clamp(0, H - 1)
    assert torch.equal(hp.weights, staircase(small[cy, cx]))
    res = {m: r["pairs"][0]["results"]["pot-sinkhorn"] for m, r in recs.items()}
    assert len({json.dumps(r["collision_rate"]) for r in res.values()}) == 3  # three different matchings


def test_mask_marginals_need_masks_and_a_pair_without_a_mask_is_skipped(model, pairs, tmp_path):
    with pytest.raises(ValueError, match="--marginals mask: needs the masks"):
        evaluate(model, pairs[:1], ["pot-sinkhorn"], progress=False, marginals="mask")
    with pytest.raises(ValueError, match="--marginals: expected one of cam, mask, uniform"):
        evaluate(model, pairs[:1], ["pot-sinkhorn"], progress=False, marginals="fcn")
    sub = tmp_path / "masks" / Path(pairs[0].src_path).parent.name
    sub.mkdir(parents=True)
    for p in pairs[1:]:  # masks for every image but those of pair 0
        for path in (p.src_path, p.trg_path):
            d = tmp_path / "masks" / Path(path).parent.name
            d.mkdir(exist_ok=True)
            (d / f"{Path(path).stem}.png").write_bytes((FCN / Path(path).parent.name / f"{Path(path).stem}.png")
                                                        .read_bytes())
    rec = evaluate(model, pairs, ["pot-sinkhorn"], progress=False, masks=MaskFolder(tmp_path / "masks"),
                   marginals="mask")
    assert [p["pair_id"] for p in rec["pairs"]] == [p.pair_id for p in pairs[1:]]
    assert len(rec["skipped"]) == 1 and "no mask for" in rec["skipped"][0]


def test_disk_cache_key_follows_the_mask_file(model, pairs, tmp_path):
    src = Path(pairs[0].src_path)
    mask = tmp_path / f"{src.stem}.png"
    mask.write_bytes((FCN / src.parent.name / f"{src.stem}.png").read_bytes())
    cache = DiskCache(tmp_path / "cache", model, mask_file=MaskFolder(tmp_path).path_for)
    before = cache.key(src)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)
    assert cache.key(src) != before
    assert DiskCache(tmp_path / "cache", model).key(src) not in (before, cache.key(src))


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def small_cli(monkeypatch):
    use_small_models(monkeypatch, SIDE)


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _eval(*extra):
    return ["eval", "--dataset", "pf-willow", "--root", WILLOW_DEV, "--every", 90, *extra]


def test_cli_eval_with_masks_mask_marginals_and_a_gallery(capsys, small_cli, tmp_path):
    out, gallery = tmp_path / "r.json", tmp_path / "gallery"
    rc, stdout, err = run_cli(_eval("--limit", 2, "--solver", "pot-sinkhorn", "--solver", "similarity",
                                    "--masks", FCN, "--marginals", "mask", "--out", out,
                                    "--gallery", gallery, "--gallery-size", 1), capsys)
    assert rc == 0, err
    rec = json.loads(out.read_text())
    assert rec["config"]["marginals"] == "mask" and rec["foreground"]["source"] == "masks"
    assert "bg" in stdout and f"wrote {gallery / 'index.html'}" in stdout
    page = (gallery / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    pictures = sorted(p.relative_to(gallery).as_posix() for p in (gallery / "pictures").iterdir())
    assert refs and all((gallery / r).is_file() for r in refs)
    assert sorted(set(r for r in refs if r.startswith("pictures/"))) == pictures

"""Dataset loaders: tiny datasets written in the exact on-disk formats, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from scot_ot.datasets import (
    PF_PASCAL_CLASSES,
    DatasetError,
    Pair,
    available_datasets,
    load_pairs,
)
from scot_ot.datasets.pf_willow import HEADER as WILLOW_HEADER

WILLOW_DEV = Path("/work/shared/data/PF-WILLOW-dev")


def write_image(path: Path, size=(40, 30), fmt=None) -> None:
    """A small solid image of ``size`` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format=fmt)


def fmt_row(cells) -> str:
    return ",".join(str(c) for c in cells)


# ---------------------------------------------------------------- PF-WILLOW


def willow_row(src: str, trg: str, src_kps: np.ndarray, trg_kps: np.ndarray) -> str:
    return fmt_row([src, trg, *src_kps[:, 0], *src_kps[:, 1], *trg_kps[:, 0], *trg_kps[:, 1]])


def make_willow(root: Path, rows) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_pairs.csv").write_text("\n".join([",".join(WILLOW_HEADER), *rows]) + "\n")


def willow_kps(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(5, 35, size=(10, 2)).round(4)  # (10, 2)


def test_willow_header_matches_spec():
    assert WILLOW_HEADER[:3] == ["imageA", "imageB", "XA1"]
    assert WILLOW_HEADER[11:13] == ["XA10", "YA1"]
    assert WILLOW_HEADER[-1] == "YB10" and len(WILLOW_HEADER) == 42


def test_willow_reads_keypoints_category_threshold(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "PF-WILLOW" / "car(G)" / f"{name}.png")
    write_image(tmp_path / "PF-WILLOW" / "duck(S)" / "d.png")
    write_image(tmp_path / "PF-WILLOW" / "duck(S)" / "e.png")
    s0, t0, s1, t1 = willow_kps(0), willow_kps(1), willow_kps(2), willow_kps(3)
    t1[:, 0] = np.linspace(2.0, 12.0, 10)  # box width 10
    t1[:, 1] = np.linspace(5.0, 30.0, 10)  # box height 25 -> threshold 25
    make_willow(
        tmp_path,
        [
            willow_row("PF-WILLOW/car(G)/a.png", "PF-WILLOW/car(G)/b.png", s0, t0),
            willow_row("PF-WILLOW/duck(S)/d.png", "PF-WILLOW/duck(S)/e.png", s1, t1),
        ],
    )
    res = load_pairs("pf-willow", tmp_path)
    assert res.skipped == ()
    assert len(res.pairs) == 2
    p0, p1 = res.pairs
    assert (p0.category, p1.category) == ("car(G)", "duck(S)")
    assert res.categories == ("car(G)", "duck(S)")
    np.testing.assert_allclose(p0.src_kps, s0)
    np.testing.assert_allclose(p0.trg_kps, t0)
    assert p0.src_path == tmp_path / "PF-WILLOW" / "car(G)" / "a.png"
    assert p1.threshold_box == pytest.approx((2.0, 5.0, 12.0, 30.0))
    assert p1.pck_threshold() == pytest.approx(25.0)
    lo, hi = t0.min(0), t0.max(0)
    assert p0.pck_threshold() == pytest.approx(max(hi - lo))
    assert len({p0.pair_id, p1.pair_id}) == 2


def test_willow_nan_keypoints_dropped_in_both(tmp_path):
    write_image(tmp_path / "PF-WILLOW" / "car(G)" / "a.png")
    write_image(tmp_path / "PF-WILLOW" / "car(G)" / "b.png")
    s, t = willow_kps(0), willow_kps(1)
    s[3] = np.nan
    t[7, 1] = np.nan
    make_willow(tmp_path, [willow_row("PF-WILLOW/car(G)/a.png", "PF-WILLOW/car(G)/b.png", s, t)])
    (pair,) = load_pairs("pf-willow", tmp_path).pairs
    keep = [k for k in range(10) if k not in (3, 7)]
    assert pair.n_kps == 8
    np.testing.assert_allclose(pair.src_kps, s[keep])
    np.testing.assert_allclose(pair.trg_kps, t[keep])


def test_willow_hpf_layout_without_prefix_folder(tmp_path):
    write_image(tmp_path / "car(G)" / "a.png")
    write_image(tmp_path / "car(G)" / "b.png")
    row = willow_row("PF-WILLOW/car(G)/a.png", "PF-WILLOW/car(G)/b.png", willow_kps(0), willow_kps(1))
    make_willow(tmp_path, [row])
    (pair,) = load_pairs("pf-willow", tmp_path).pairs
    assert pair.trg_path == tmp_path / "car(G)" / "b.png"


def test_willow_bad_rows_skipped_with_file_and_line(tmp_path):
    write_image(tmp_path / "PF-WILLOW" / "car(G)" / "a.png")
    write_image(tmp_path / "PF-WILLOW" / "car(G)" / "b.png")
    good = willow_row("PF-WILLOW/car(G)/a.png", "PF-WILLOW/car(G)/b.png", willow_kps(0), willow_kps(1))
    missing = willow_row("PF-WILLOW/car(G)/a.png", "PF-WILLOW/car(G)/zz.png", willow_kps(0), willow_kps(1))
    short = ",".join(good.split(",")[:-3])
    text = good.replace("PF-WILLOW/car(G)/b.png,", "PF-WILLOW/car(G)/b.png,oops", 1)
    make_willow(tmp_path, [good, missing, short, text, good])
    res = load_pairs("pf-willow", tmp_path)
    csv_path = tmp_path / "test_pairs.csv"
    assert len(res.pairs) == 2
    assert [(s.file, s.line) for s in res.skipped] == [(csv_path, 3), (csv_path, 4), (csv_path, 5)]
    assert "zz.png" in res.skipped[0].reason and "not found" in res.skipped[0].reason
    assert "columns" in res.skipped[1].reason
    assert "non-numeric" in res.skipped[2].reason
    assert str(res.skipped[0]).startswith(f"{csv_path}:3: ")

    with pytest.raises(DatasetError, match=r"test_pairs\.csv:3: image not found") as info:
        load_pairs("pf-willow", tmp_path, strict=True)
    assert info.value.line == 3 and info.value.file == csv_path


def test_willow_missing_root_and_csv(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*test_pairs.csv"):
        load_pairs("pf-willow", tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"missing .*test_pairs\.csv"):
        load_pairs("pf-willow", tmp_path)
    with pytest.raises(DatasetError, match="no split 'trn'"):
        load_pairs("pf-willow", tmp_path, split="trn")
    (tmp_path / "test_pairs.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"test_pairs\.csv:1: header"):
        load_pairs("pf-willow", tmp_path)


@pytest.mark.skipif(not WILLOW_DEV.is_dir(), reason=f"{WILLOW_DEV} not present")
def test_willow_dev_split_real_data():
    res = load_pairs("pf-willow", WILLOW_DEV)
    assert res.skipped == ()
    assert len(res.pairs) == 360
    assert res.categories == ("car(G)", "car(M)", "car(S)", "duck(S)")
    assert all(p.n_kps == 10 for p in res.pairs)
    assert all(p.src_path.is_file() and p.trg_path.is_file() for p in res.pairs)
    assert len({p.pair_id for p in res.pairs}) == 360
    first = res.pairs[0]
    assert first.src_path.name == "Cars_006a.png" and first.trg_path.name == "Cars_007a.png"
    np.testing.assert_allclose(first.src_kps[0], [61.9963, 126.9519])
    np.testing.assert_allclose(first.trg_kps[0], [47.6755, 197.4213])
    with Image.open(first.trg_path) as im:
        w, h = im.size
    assert np.all(first.trg_kps >= 0) and np.all(first.trg_kps <= [w, h])


# ---------------------------------------------------------------- PF-PASCAL


def make_pascal_images(root: Path, sizes) -> None:
    for name, size in sizes.items():
        write_image(root / "JPEGImages" / f"{name}.jpg", size=size, fmt="JPEG")


def write_mat(root: Path, cls: str, name: str, kps: np.ndarray, bbox) -> None:
    path = root / "Annotations" / cls / f"{name}.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"kps": kps, "bbox": np.array([bbox], dtype=np.float64)})


def test_pascal_hpf_layout(tmp_path):
    make_pascal_images(tmp_path, {"2009_000001": (50, 40), "2009_000002": (30, 70), "2010_000003": (64, 48)})
    nan = np.nan
    k1 = np.array([[1.0, 2.0], [3.0, 4.0], [nan, nan], [7.0, 8.0]])
    k2 = np.array([[11.0, 12.0], [nan, nan], [15.0, 16.0], [17.0, 18.0]])
    k3 = np.array([[5.0, 5.0], [6.0, 6.0]])
    write_mat(tmp_path, "aeroplane", "2009_000001", k1, [0, 1, 40, 30])
    write_mat(tmp_path, "aeroplane", "2009_000002", k2, [2, 3, 20, 60])
    write_mat(tmp_path, "tvmonitor", "2010_000003", k3, [1, 1, 50, 40])
    write_mat(tmp_path, "tvmonitor", "2009_000001", k3[::-1], [1, 1, 10, 10])
    (tmp_path / "trn_pairs.csv").write_text(
        "source_image,target_image,class,flip\n"
        "PF-dataset-PASCAL/JPEGImages/2009_000001.jpg,PF-dataset-PASCAL/JPEGImages/2009_000002.jpg,1,0\n"
        "PF-dataset-PASCAL/JPEGImages/2010_000003.jpg,PF-dataset-PASCAL/JPEGImages/2009_000001.jpg,20,1\n"
    )
    res = load_pairs("pf-pascal", tmp_path, split="trn")
    assert res.skipped == ()
    p0, p1 = res.pairs
    assert p0.category == "aeroplane" and p1.category == "tvmonitor"
    np.testing.assert_array_equal(p0.src_kps, [[1.0, 2.0], [7.0, 8.0]])  # rows 0 and 3 in both
    np.testing.assert_array_equal(p0.trg_kps, [[11.0, 12.0], [17.0, 18.0]])
    assert p0.src_bbox == (0.0, 1.0, 40.0, 30.0) and p0.trg_bbox == (2.0, 3.0, 20.0, 60.0)
    assert p0.threshold_box == (0.0, 0.0, 30.0, 70.0)  # whole target image (W, H) = (30, 70)
    assert p0.pck_threshold() == 70.0
    assert p1.pck_threshold() == 50.0  # target 2009_000001 is 50 x 40
    np.testing.assert_array_equal(p1.trg_kps, k3[::-1])  # class folder tvmonitor, not aeroplane
    assert p0.extra["flip"] is False and p1.extra["flip"] is True
    assert p0.src_path == tmp_path / "JPEGImages" / "2009_000001.jpg"


def test_pascal_inline_semicolon_variant(tmp_path):
    make_pascal_images(tmp_path, {"a": (20, 90), "b": (80, 60)})
    (tmp_path / "test_pairs.csv").write_text(
        "source_image,target_image,class,XA,YA,XB,YB\n"
        "PF-dataset-PASCAL/JPEGImages/a.jpg,PF-dataset-PASCAL/JPEGImages/b.jpg,8,1;2;3,4;5;6,7;8;9,10;11;12\n"
        "PF-dataset-PASCAL/JPEGImages/a.jpg,PF-dataset-PASCAL/JPEGImages/b.jpg,8,1;2,4;5;6,7;8;9,10;11;12\n"
    )
    res = load_pairs("pf-pascal", tmp_path)
    (pair,) = res.pairs
    assert pair.category == "cat"
    np.testing.assert_array_equal(pair.src_kps, [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(pair.trg_kps, [[7, 10], [8, 11], [9, 12]])
    assert pair.pck_threshold() == 80.0 and pair.trg_bbox is None
    (skip,) = res.skipped
    assert skip.line == 3 and "2, 3, 3, 3" in skip.reason


def test_pascal_problems_skipped_or_strict(tmp_path):
    make_pascal_images(tmp_path, {"a": (20, 20), "b": (20, 20)})
    k = np.array([[1.0, 1.0], [2.0, 2.0]])
    write_mat(tmp_path, "dog", "a", k, [0, 0, 5, 5])
    write_mat(tmp_path, "dog", "b", k, [0, 0, 5, 5])
    write_mat(tmp_path, "cat", "a", np.full((2, 2), np.nan), [0, 0, 5, 5])
    write_mat(tmp_path, "cat", "b", k, [0, 0, 5, 5])
    rows = [
        "x/a.jpg,x/b.jpg,12",  # line 2: good (dog)
        "x/a.jpg,x/missing.jpg,12",  # line 3: no annotation for missing
        "x/a.jpg,x/b.jpg,21",  # line 4: class out of range
        "x/a.jpg,x/b.jpg",  # line 5: too few columns
        "x/a.jpg,x/b.jpg,8",  # line 6: cat, no keypoint in both
        "x/a.jpg,x/b.jpg,dog",  # line 7: good, class given by name
    ]
    (tmp_path / "val_pairs.csv").write_text("source_image,target_image,class\n" + "\n".join(rows) + "\n")
    write_mat(tmp_path, "dog", "missing", k, [0, 0, 5, 5])  # annotation present, image absent
    res = load_pairs("pf-pascal", tmp_path, split="val")
    assert [p.category for p in res.pairs] == ["dog", "dog"]
    assert [s.line for s in res.skipped] == [3, 4, 5, 6]
    reasons = [s.reason for s in res.skipped]
    assert "image not found" in reasons[0] and "missing.jpg" in reasons[0]
    assert "outside 1..20" in reasons[1]
    assert "columns" in reasons[2]
    assert "no keypoint" in reasons[3]
    with pytest.raises(DatasetError, match=r"val_pairs\.csv:3: image not found"):
        load_pairs("pf-pascal", tmp_path, split="val", strict=True)


def test_pascal_missing_annotation_reported(tmp_path):
    make_pascal_images(tmp_path, {"a": (20, 20), "b": (20, 20)})
    (tmp_path / "test_pairs.csv").write_text("source_image,target_image,class\nx/a.jpg,x/b.jpg,3\n")
    res = load_pairs("pf-pascal", tmp_path)
    assert res.pairs == ()
    (skip,) = res.skipped
    assert skip.line == 2 and "annotation not found" in skip.reason and "bird" in skip.reason


def test_pascal_classes_voc_order():
    assert len(PF_PASCAL_CLASSES) == 20
    assert PF_PASCAL_CLASSES[0] == "aeroplane" and PF_PASCAL_CLASSES[10] == "diningtable"
    assert PF_PASCAL_CLASSES[-1] == "tvmonitor"


# ---------------------------------------------------------------- SPair-71k


def spair_ann(src: str, trg: str, cat: str, src_kps, trg_kps, src_box, trg_box) -> dict:
    return {
        "pair_id": 1,
        "src_imname": src,
        "trg_imname": trg,
        "src_imsize": [40, 30, 3],
        "trg_imsize": [40, 30, 3],
        "src_bndbox": src_box,
        "trg_bndbox": trg_box,
        "category": cat,
        "src_pose": 0,
        "trg_pose": 2,
        "src_kps": src_kps,
        "trg_kps": trg_kps,
        "kps_ids": ["0", "3"],
        "mirror": 0,
        "viewpoint_variation": 1,
        "scale_variation": 0,
        "truncation": 0,
        "occlusion": 1,
    }


def make_spair(root: Path, split: str, entries) -> None:
    """entries: (layout line, annotation dict or raw json text or None)."""
    layout = root / "Layout" / "large"
    layout.mkdir(parents=True, exist_ok=True)
    ann_dir = root / "PairAnnotation" / split
    ann_dir.mkdir(parents=True, exist_ok=True)
    (layout / f"{split}.txt").write_text("\n".join(line for line, _ in entries) + "\n")
    for line, ann in entries:
        if ann is None:
            continue
        text = ann if isinstance(ann, str) else json.dumps(ann)
        (ann_dir / f"{line}.json").write_text(text)


def test_spair_reads_pairs(tmp_path):
    images = [("aeroplane", "2008_002719.jpg"), ("aeroplane", "2008_004100.jpg"), ("cat", "c1.jpg"), ("cat", "c2.jpg")]
    for cat, name in images:
        write_image(tmp_path / "JPEGImages" / cat / name, fmt="JPEG")
    l1 = "000001-2008_002719-2008_004100:aeroplane"
    l2 = "000002-c1-c2:cat"
    a1 = spair_ann(
        "2008_002719.jpg", "2008_004100.jpg", "aeroplane",
        [[1, 2], [3, 4]], [[5, 6], [7, 8]], [0, 0, 30, 20], [2, 3, 12, 33],
    )  # fmt: skip
    a2 = spair_ann("c1.jpg", "c2.jpg", "cat", [[1, 1]], [[2, 2]], [0, 0, 5, 5], [0, 0, 16, 4])
    make_spair(tmp_path, "test", [(l1, a1), (l2, a2)])
    res = load_pairs("spair", tmp_path)
    assert res.skipped == ()
    p1, p2 = res.pairs
    assert p1.pair_id == l1 and p1.category == "aeroplane"
    assert p1.src_path == tmp_path / "JPEGImages" / "aeroplane" / "2008_002719.jpg"
    np.testing.assert_array_equal(p1.src_kps, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(p1.trg_kps, [[5, 6], [7, 8]])
    assert p1.trg_bbox == (2.0, 3.0, 12.0, 33.0) == p1.threshold_box
    assert p1.pck_threshold() == 30.0
    assert p2.pck_threshold() == 16.0
    assert p1.extra["viewpoint_variation"] == 1 and p1.extra["kps_ids"] == ("0", "3")
    assert res.categories == ("aeroplane", "cat")


def test_spair_problems(tmp_path):
    write_image(tmp_path / "JPEGImages" / "dog" / "a.jpg", fmt="JPEG")
    write_image(tmp_path / "JPEGImages" / "dog" / "b.jpg", fmt="JPEG")
    good = spair_ann("a.jpg", "b.jpg", "dog", [[1, 1]], [[2, 2]], [0, 0, 5, 5], [0, 0, 6, 6])
    no_img = spair_ann("a.jpg", "gone.jpg", "dog", [[1, 1]], [[2, 2]], [0, 0, 5, 5], [0, 0, 6, 6])
    bad_kps = spair_ann("a.jpg", "b.jpg", "dog", [[1, 1], [2, 2]], [[2, 2]], [0, 0, 5, 5], [0, 0, 6, 6])
    entries = [
        ("000001-a-b:dog", good),  # line 1
        ("000002-a-gone:dog", no_img),  # line 2: image missing
        ("000003-a-b:dog", None),  # line 3: no json
        ("000004-a-b:dog", "{\n  \"src_imname\": \n}"),  # line 4: malformed json (its line 3)
        ("000005-a-b:dog", bad_kps),  # line 5: keypoint counts differ
        ("no-category-here", None),  # line 6: malformed layout line
    ]
    make_spair(tmp_path, "val", entries)
    res = load_pairs("spair", tmp_path, split="val")
    assert [p.pair_id for p in res.pairs] == ["000001-a-b:dog"]
    layout = tmp_path / "Layout" / "large" / "val.txt"
    ann_dir = tmp_path / "PairAnnotation" / "val"
    got = [(s.file, s.line) for s in res.skipped]
    assert got == [
        (layout, 2),
        (layout, 3),
        (ann_dir / "000004-a-b:dog.json", 3),
        (ann_dir / "000005-a-b:dog.json", None),
    ] + [(layout, 6)]
    assert "gone.jpg" in res.skipped[0].reason
    assert "annotation not found" in res.skipped[1].reason
    assert "malformed json" in res.skipped[2].reason and "val.txt:4" in res.skipped[2].reason
    assert "different numbers of keypoints" in res.skipped[3].reason and "val.txt:5" in res.skipped[3].reason
    with pytest.raises(DatasetError, match=r"val\.txt:2: image not found"):
        load_pairs("spair", tmp_path, split="val", strict=True)


def test_spair_missing_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"missing .*Layout/large/test\.txt"):
        load_pairs("spair", tmp_path)


# ---------------------------------------------------------------- registry and record


def test_registry():
    assert available_datasets() == ("pf-pascal", "pf-willow", "spair")
    with pytest.raises(DatasetError, match="unknown dataset 'willow'.*pf-willow"):
        load_pairs("willow", ".")


def test_pair_record_validates_and_is_read_only(tmp_path):
    kps = np.array([[1.0, 2.0], [3.0, 5.0]])
    pair = Pair("p", "c", "a.png", "b.png", kps, kps + 1, threshold_box=(0, 0, 4, 9))
    assert pair.src_path == Path("a.png") and pair.pck_threshold() == 9.0 and pair.n_kps == 2
    with pytest.raises(ValueError):
        pair.src_kps[0, 0] = 7.0
    kps[0, 0] = 99.0
    assert pair.src_kps[0, 0] == 1.0  # the record owns a copy
    with pytest.raises(TypeError):
        pair.extra["x"] = 1
    with pytest.raises(ValueError, match="src_kps must have shape"):
        Pair("p", "c", "a", "b", np.zeros(4), kps, threshold_box=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        Pair("p", "c", "a", "b", kps[:1], kps, threshold_box=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="trg_kps must be finite"):
        Pair("p", "c", "a", "b", kps, np.full((2, 2), np.nan), threshold_box=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="degenerate"):
        Pair("p", "c", "a", "b", kps, kps, threshold_box=(3, 3, 3, 3))
    with pytest.raises(ValueError, match="x1 >= x0"):
        Pair("p", "c", "a", "b", kps, kps, threshold_box=(3, 3, 1, 5))

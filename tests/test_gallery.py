"""The failure gallery: which pairs it picks, a page that links only what exists, escaped strings, clear errors."""

import copy
import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from scot_ot.evaluation.gallery import PICTURES, safe_name, select_pairs, unique_name, write_gallery

WILLOW_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PF-WILLOW-dev"
needs_willow = pytest.mark.skipif(not WILLOW_DEV.is_dir(), reason="PF-WILLOW-dev is not beside the checkout")
SOLVERS = ["pot-sinkhorn", "similarity"]
# odd pair ids: markup, quotes, parentheses, a path, and two that sanitise to the same file name
ODD_IDS = ['<script>x</script> car(G) & "1"', "car(G)/../x", "car_G_/.._x"]


# ------------------------------------------------------------------ selection on a hand-made record
def _record(pcks, solvers=("a", "b")):
    """A record whose pair ``k`` has PCK@0.10 ``pcks[k][s]`` per solver (``None``: failed)."""
    pairs = []
    for k, by_solver in enumerate(pcks):
        results = {s: ({"failed": "FloatingPointError: nan"} if v is None
                       else {"pck": {"0.05": 0.0, "0.1": v, "0.15": 1.0}, "ot_time_s": 0.01, "n_iters": 3})
                   for s, v in zip(solvers, by_solver)}
        pairs.append({"pair_id": f"p{k}", "category": "c", "results": results})
    return {"config": {"solvers": list(solvers), "alphas": [0.05, 0.1, 0.15]}, "pairs": pairs}


def test_select_pairs_orders_excludes_and_caps():
    rec = _record([(0.5, 0.5), (0.2, 0.9), (None, 0.1), (0.2, 0.3), (0.0, None), (0.9, 0.0), (0.7, 0.6)])
    sel = select_pairs(rec, 3, compare=("a", "b"))
    # worst by solver "a": 0.0 (p4), then the tie 0.2 in pair order (p1, p3); p2 failed for "a"
    assert sel["worst"] == ["p4", "p1", "p3"]
    # gaps: p1 0.7, p3 0.1, p5 0.9, p6 0.1; p0 equal (left out); p2 / p4 failed for one solver
    assert sel["differ"] == ["p5", "p1", "p3"]
    assert select_pairs(rec, 100, compare=("b", "a"))["differ"] == ["p5", "p1", "p3", "p6"]
    assert select_pairs(rec, 100)["worst"] == ["p4", "p1", "p3", "p0", "p6", "p5"]
    assert select_pairs(rec, 1) == {"worst": ["p4"], "differ": []}


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "3", None])
def test_select_pairs_bad_size(size):
    with pytest.raises(ValueError, match="--gallery-size"):
        select_pairs(_record([(0.5, 0.5)]), size)


@pytest.mark.parametrize("compare", [("a", "z"), ("a", "a"), ("a",), "ab", ("a", "b", "a")])
def test_select_pairs_bad_compare(compare):
    with pytest.raises(ValueError, match="--gallery-compare"):
        select_pairs(_record([(0.5, 0.5)]), 2, compare=compare)


def test_select_pairs_needs_pck_010():
    rec = _record([(0.5, 0.5)])
    rec["config"]["alphas"] = [0.05]
    with pytest.raises(ValueError, match="PCK@0.10"):
        select_pairs(rec, 2)


def test_file_names_are_safe_and_unique():
    used = set()
    names = [unique_name(safe_name(t), ".png", used) for t in ("car(G)", "car_G_", "CAR_G_", "..", "a/b c")]
    assert names == ["car_G_.png", "car_G_-2.png", "CAR_G_-3.png", "_..png", "a_b_c.png"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and not n.startswith(".") for n in names)
    assert len(safe_name("x" * 500)) == 80


# ------------------------------------------------------------------ real pairs, small model
@pytest.fixture(scope="module")
def willow_run():
    """3 PF-WILLOW-dev pairs under odd ids, a 96-px model, and its evaluation record."""
    from fast_models import small_scot

    from scot_ot.datasets import load_pairs
    from scot_ot.evaluation.run import evaluate

    pairs = [dataclasses.replace(p, pair_id=pid)
             for p, pid in zip(load_pairs("pf-willow", WILLOW_DEV).pairs[:3], ODD_IDS)]
    model = small_scot(96)
    record = evaluate(model, pairs, SOLVERS, progress=False)
    return model, pairs, record


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]


@needs_willow
def test_gallery_page_links_only_existing_files(willow_run, tmp_path):
    model, pairs, record = willow_run
    record = copy.deepcopy(record)
    results = record["pairs"][0]["results"]
    results["similarity"] = {"failed": "FloatingPointError: <nan> & more"}
    results["pot-sinkhorn"].update({"unmatched_mass": 0.25, "collision_rate": None})
    out = tmp_path / "gallery"
    index = write_gallery(model, pairs, record, out, size=3, compare=tuple(SOLVERS),
                          foreground=lambda pair, hs, ht: None, progress=False)
    assert index == out / "index.html"
    page = index.read_text(encoding="utf-8")

    parser = _Links()
    parser.feed(page)
    assert parser.links, "the page shows no picture"
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), f"not a relative link: {link}"
        assert (out / link).is_file(), f"index.html links {link}, which does not exist"
    written = {p.relative_to(out).as_posix() for p in (out / PICTURES).iterdir()}
    assert written == set(parser.links)
    # every pair drawn for each solver that did not fail in the record: 3 x 2 - 1
    assert len(written) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", Path(n).name) for n in written)

    # escaped strings, the measures that are present, "–" for those that are not
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt; car(G) &amp; &quot;1&quot;" in page
    assert "failed: FloatingPointError: &lt;nan&gt; &amp; more" in page
    assert "unmatched mass" in page and "25.0%" in page and "–" in page
    assert "keypoint-box" in page and "PCK@0.15" in page


@needs_willow
def test_gallery_of_an_older_record_without_compare(willow_run, tmp_path):
    model, pairs, record = willow_run
    record = copy.deepcopy(record)  # as an older record, without the failure measures
    for p in record["pairs"]:
        for res in p["results"].values():
            for key in ("unmatched_mass", "collision_rate", "effective_target_ratio", "mutual_nn_rate",
                        "background_rate"):
                res.pop(key, None)
    index = write_gallery(model, pairs, record, tmp_path / "g", size=1, progress=False)
    page = index.read_text(encoding="utf-8")
    assert len(list((tmp_path / "g" / PICTURES).iterdir())) == len(SOLVERS)
    assert "unmatched mass" not in page and "differ most" not in page
    assert page.count("<td>–</td>") == 4 * len(SOLVERS)


@needs_willow
def test_gallery_bad_arguments_write_nothing(willow_run, tmp_path):
    model, pairs, record = willow_run
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--gallery "):
        write_gallery(model, pairs, record, a_file, progress=False)
    out = tmp_path / "g"
    with pytest.raises(ValueError, match="--gallery-size"):
        write_gallery(model, pairs, record, out, size=0, progress=False)
    with pytest.raises(ValueError, match="--gallery-compare"):
        write_gallery(model, pairs, record, out, compare=("pot-sinkhorn", "torch-log"), progress=False)
    assert not out.exists()


@needs_willow
def test_plot_wrappers_still_write_files(willow_run, tmp_path):
    from scot_ot.diagnostics import keypoint_foreground
    from scot_ot.plotting import plot_background_matches, plot_in_degree, plot_matches

    model, pairs, _ = willow_run
    pair = pairs[0]
    hs, ht = model.hyperpixels(pair.src_path, "src"), model.hyperpixels(pair.trg_path, "trg")
    src, trg = model.prepare(pair.src_path)[0].cpu(), model.prepare(pair.trg_path)[0].cpu()
    corr = model.match_hyperpixels(hs, ht)
    fg = keypoint_foreground(hs, ht, pair.src_kps, pair.trg_kps)
    outs = [plot_matches(corr, src, trg, tmp_path / "m.png", src_kps=pair.src_kps,
                         pred_kps=corr.transfer(pair.src_kps), gt_kps=pair.trg_kps, title="t"),
            plot_in_degree(corr, trg, tmp_path / "d.svg"),
            plot_background_matches(corr, src, trg, fg, tmp_path / "b.png")]
    assert outs == [tmp_path / "m.png", tmp_path / "d.svg", tmp_path / "b.png"]
    assert outs[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in outs[1].read_bytes()[:500]

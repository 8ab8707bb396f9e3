"""Diagnostics on hand-built matchings with known answers, and ``scot-ot diagnose`` end to end."""

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scot_ot import diagnostics as dg


def one_hot_scores(matches: torch.Tensor, M: int) -> torch.Tensor:
    s = torch.zeros(len(matches), M)
    s[torch.arange(len(matches)), matches] = 1.0
    return s


# ----------------------------------------------------------------------- many-to-one
def test_one_to_one():
    N = 7
    m = torch.randperm(N)
    assert dg.collision_rate(m, N) == 0.0
    assert dg.max_in_degree(m, N) == 1
    assert dg.effective_target_ratio(m, N) == pytest.approx(1.0)
    assert dg.mutual_nn_rate(m, one_hot_scores(m, N)) == 1.0
    assert dg.in_degree_histogram(m, N).tolist() == [0, N]


def test_all_to_one():
    N, M = 6, 9
    m = torch.full((N,), 4)
    assert dg.collision_rate(m, M) == 1.0
    assert dg.max_in_degree(m, M) == N
    assert dg.effective_targets(m, M) == pytest.approx(1.0)
    assert dg.effective_target_ratio(m, M) == pytest.approx(1 / N)
    # target 4's best source is the first of the tied sources only
    assert dg.mutual_nn_rate(m, one_hot_scores(m, M)) == pytest.approx(1 / N)
    assert dg.in_degree_histogram(m, M).tolist() == [M - 1] + [0] * (N - 1) + [1]


def test_two_to_one_pairs():
    # sources 0,1 -> 0 and 2,3 -> 1: both hit targets collide, 2 effective targets of 4
    m = torch.tensor([0, 0, 1, 1])
    assert dg.collision_rate(m, 5) == 1.0
    assert dg.effective_targets(m, 5) == pytest.approx(2.0)
    # one more source alone on target 2: 2 of 3 hit targets collide
    m = torch.tensor([0, 0, 1, 1, 2])
    assert dg.collision_rate(m, 5) == pytest.approx(2 / 3)
    q = torch.tensor([0.4, 0.4, 0.2])
    assert dg.effective_targets(m, 5) == pytest.approx(math.exp(-(q * q.log()).sum().item()))


def test_mutual_nn_with_real_scores():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7]])
    m = scores.argmax(1)  # [0, 0, 1]; best source of target 0 is 0, of target 1 is 2
    assert dg.mutual_nn_rate(m, scores) == pytest.approx(2 / 3)


def test_bad_matches_rejected():
    with pytest.raises(ValueError, match="indices must lie"):
        dg.collision_rate(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="integer"):
        dg.collision_rate(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="scores"):
        dg.mutual_nn_rate(torch.tensor([0, 1]), torch.zeros(3, 2))


# ----------------------------------------------------------------------- background
def test_half_into_background():
    # 4 foreground sources (0-3), 2 background sources; targets 0-1 foreground, 2-3 background
    m = torch.tensor([0, 1, 2, 3, 0, 2])
    src_fg = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    trg_fg = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert dg.background_rate(m, src_fg, trg_fg) == 0.5
    assert dg.background_rate(m, src_fg, torch.ones(4, dtype=torch.bool)) == 0.0
    assert math.isnan(dg.background_rate(m, torch.zeros(6, dtype=torch.bool), trg_fg))


class FakeHyperpixels:
    """The geometry fields the foreground helpers read: a 2 x 3 grid on a 60 x 40 image."""

    def __init__(self, cam=None):
        xs, ys = torch.meshgrid(torch.tensor([10.0, 30.0, 50.0]), torch.tensor([10.0, 30.0]), indexing="xy")
        self.centres = torch.stack([xs.flatten(), ys.flatten()], 1)  # row-major (h=2, w=3)
        self.size = (60, 40)
        self.scale = (0.5, 0.5)  # original image 120 x 80
        self.cam = cam


def test_foreground_sources():
    cam = torch.zeros(40, 60)
    cam[:20, :40] = 0.9  # top-left 2 of the 3 top cells
    hp = FakeHyperpixels(cam)
    assert dg.cam_mask(hp, 0.5).tolist() == [True, True, False, False, False, False]
    # keypoints in original pixels span x in [20, 60], y in [20, 20] -> resized x in [10, 30], y = 10
    kps = torch.tensor([[20.0, 20.0], [60.0, 20.0]])
    assert dg.keypoint_mask(hp, kps, margin=0.0).tolist() == [True, True, False, False, False, False]
    # a mask at another resolution (original size): right column only
    mask = torch.zeros(80, 120)
    mask[:, 80:] = 1
    assert dg.user_mask(hp, mask).tolist() == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="no CAM"):
        dg.cam_mask(FakeHyperpixels(None))


# ----------------------------------------------------------------------- plan statistics
def test_plan_statistics():
    N = 5
    perm = torch.eye(N)[torch.randperm(N)] / N
    assert dg.plan_entropy(perm) == pytest.approx(math.log(N))
    assert dg.argmax_mass(perm) == pytest.approx(1.0)
    assert dg.plan_marginal_error(perm) == pytest.approx(0.0, abs=1e-6)  # float32 1/N
    uniform = torch.full((N, 3), 1.0 / (3 * N))
    assert dg.plan_entropy(uniform) == pytest.approx(math.log(3 * N))
    assert dg.argmax_mass(uniform) == pytest.approx(1 / 3)
    assert dg.plan_marginal_error(uniform * 2) == pytest.approx(2.0)


# ----------------------------------------------------------------------- properties
matchings = st.integers(1, 30).flatmap(
    lambda M: st.tuples(st.just(M), st.lists(st.integers(0, M - 1), min_size=1, max_size=40)))


def counted(ms, M):
    """The statistics by hand: counts of each target in a Python list, nothing from torch."""
    counts = Counter(ms)  # target -> in-degree, hit targets only
    N, hit = len(ms), len(counts)
    degree = [counts.get(j, 0) for j in range(M)]
    hist = [degree.count(k) for k in range(max(degree) + 1)]
    entropy = -sum(c / N * math.log(c / N) for c in counts.values())
    return {"in_degree": degree, "histogram": hist, "max_in_degree": max(degree),
            "collision_rate": sum(c >= 2 for c in counts.values()) / hit,
            "effective_targets": math.exp(entropy), "effective_target_ratio": math.exp(entropy) / N}


def test_counted_by_hand():
    """The hand count itself, on one case worked out on paper: targets 3, 3, 3, 0, 5 of 6."""
    c = counted([3, 3, 3, 0, 5], 6)
    assert c["in_degree"] == [1, 0, 0, 3, 0, 1] and c["histogram"] == [3, 2, 0, 1]
    assert c["collision_rate"] == 1 / 3 and c["max_in_degree"] == 3
    # q = (0.6, 0.2, 0.2): exp(0.306495 + 0.643775) = exp(0.950270) = 2.58641
    assert c["effective_targets"] == pytest.approx(2.58641, rel=2e-6)


@settings(max_examples=60, deadline=None)
@given(matchings)
def test_statistics_equal_the_hand_count(case):
    M, ms = case
    m = torch.tensor(ms)
    N = len(ms)
    c = counted(ms, M)
    assert dg.in_degree(m, M).tolist() == c["in_degree"]
    assert dg.in_degree_histogram(m, M).tolist() == c["histogram"]
    assert dg.max_in_degree(m, M) == c["max_in_degree"]
    assert dg.collision_rate(m, M) == c["collision_rate"]  # a ratio of two counts: exact
    assert dg.effective_targets(m, M) == pytest.approx(c["effective_targets"], rel=1e-5)  # float32 log
    assert dg.effective_target_ratio(m, M) == pytest.approx(c["effective_target_ratio"], rel=1e-5)
    # injective exactly when there is no collision, exactly when eff = N
    injective = len(set(ms)) == N
    assert (dg.collision_rate(m, M) == 0.0) == injective
    assert (abs(dg.effective_targets(m, M) - N) < 1e-4 * N) == injective


@settings(max_examples=40, deadline=None)
@given(matchings, st.integers(0, 2**31 - 1))
def test_relabelling_targets_changes_nothing(case, seed):
    M, ms = case
    m = torch.tensor(ms)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    for f in (dg.collision_rate, dg.effective_targets, dg.max_in_degree):
        assert f(perm[m], M) == pytest.approx(f(m, M))
    scores = torch.rand(len(ms), M, generator=torch.Generator().manual_seed(seed))
    assert dg.mutual_nn_rate(scores.argmax(1), scores) == pytest.approx(
        dg.mutual_nn_rate(scores[:, perm].argmax(1), scores[:, perm]))


# ----------------------------------------------------------------------- diagnose CLI
def test_diagnose_cli_sample_pair(tmp_path, capsys):
    from scot_ot.cli import main
    from scot_ot.data import sample_pair

    pair = sample_pair()
    src_kps, trg_kps = tmp_path / "src.json", tmp_path / "trg.json"
    src_kps.write_text(json.dumps(pair.src_kps.tolist()))
    trg_kps.write_text(json.dumps(pair.trg_kps.tolist()))
    out = tmp_path / "diag"
    # SCOT's single iteration against a converged run, in one call (a spec overrides --max-iter)
    solvers = ["pot-sinkhorn", "torch-absorb:max_iter=200,tol=1e-4"]
    rc = main(["diagnose", str(pair.src_path), str(pair.trg_path), "--solvers", ",".join(solvers),
               "--keypoints", str(src_kps), "--trg-keypoints", str(trg_kps), "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["foreground"]["method"] == "keypoint-box"
    assert list(record["solvers"]) == solvers
    assert record["solvers"][solvers[0]]["n_iters"] == 1
    assert record["solvers"][solvers[1]]["converged"] and record["solvers"][solvers[1]]["n_iters"] > 1
    for s, folder in zip(solvers, ["pot-sinkhorn", "torch-absorb_max_iter=200_tol=1e-4"]):
        d = record["solvers"][s]
        for key in ("collision_rate", "max_in_degree", "background_rate", "n_iters", "time_s",
                    "effective_target_ratio", "mutual_nn_rate", "plan_entropy", "argmax_mass",
                    "marginal_error", "pck@0.1"):
            assert key in d, key
        # the statistics agree with the in-degree histogram they came from
        hist = d["in_degree_histogram"]
        hit = sum(hist[1:])
        assert sum(k * h for k, h in enumerate(hist)) == d["n_src"] and sum(hist) == d["n_trg"]
        assert d["hit_targets"] == hit and d["max_in_degree"] == len(hist) - 1 and hist[-1] > 0
        assert d["collision_rate"] == sum(hist[2:]) / hit
        assert d["effective_target_ratio"] == pytest.approx(d["effective_targets"] / d["n_src"], rel=1e-12)
        assert 1 <= d["effective_targets"] <= hit + 1e-6
        # a count of foreground sources matched into the background, over the foreground sources
        n_fg = round(record["foreground"]["src_fraction"] * d["n_src"])
        assert n_fg > 0 and abs(d["background_rate"] * n_fg - round(d["background_rate"] * n_fg)) < 1e-6
        for png in ("matches.png", "in_degree.png", "background.png"):
            assert (out / folder / png).stat().st_size > 1000
    assert "collision" in capsys.readouterr().out
    # an unknown solver fails before any computation and writes nothing
    bad = tmp_path / "bad"
    assert main(["diagnose", str(pair.src_path), str(pair.trg_path), "--solvers", "pot-sinkhorn,magic",
                 "--out", str(bad)]) == 2
    assert "unknown solver 'magic'" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob(".bad-*"))

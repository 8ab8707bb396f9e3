"""Keypoint transfer rules, bidirectional matching and named presets (issue 15).

Transfer rules and the soft-argmax refinement against hand-computed answers;
bidirectional scores against the two one-way problems solved separately; presets
against the constructor they stand for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fast_models import small_scot
from scot_ot.data import sample_pair
from scot_ot.matching.scot import PRESETS, SCOT
from scot_ot.matching.transfer import (TRANSFER_RULES, consensus_transfer, median_transfer, refine_keypoints,
                                       soft_offsets, transfer_keypoints, voters)

SRC = torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
TRG = torch.tensor([[100.0, 0.0, 110.0, 10.0], [0.0, 30.0, 10.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
MATCHES = torch.tensor([0, 1, 2])  # shifts (100, 0), (-6, 30) and (-40, -40)


# ----------------------------------------------------------------------------- transfer
def test_weighted_votes_follow_the_confidences():
    kps = torch.tensor([[8.0, 4.0]])  # in boxes 0 and 1
    # weights 3 : 1 -> shift (3 (100, 0) + (-6, 30)) / 4 = (73.5, 7.5)
    out = transfer_keypoints(kps, SRC, TRG, MATCHES, weights=torch.tensor([3.0, 1.0, 5.0]))
    assert torch.allclose(out, torch.tensor([[81.5, 11.5]]))
    # equal weights are SCOT's rule; zero weights on every containing box fall back to it
    scot = transfer_keypoints(kps, SRC, TRG, MATCHES)
    assert torch.equal(transfer_keypoints(kps, SRC, TRG, MATCHES, weights=torch.full((3,), 2.0)), scot)
    assert torch.equal(transfer_keypoints(kps, SRC, TRG, MATCHES, weights=torch.tensor([0.0, 0.0, 1.0])), scot)


def test_offsets_move_every_vote():
    kps = torch.tensor([[8.0, 4.0], [3.0, 3.0]])
    offsets = torch.tensor([[2.0, -1.0], [4.0, 1.0], [0.0, 0.0]])
    out = transfer_keypoints(kps, SRC, TRG, MATCHES, offsets=offsets)
    base = transfer_keypoints(kps, SRC, TRG, MATCHES)
    assert torch.allclose(out - base, torch.tensor([[3.0, 0.0], [2.0, -1.0]]))  # mean of the boxes' offsets


def test_median_votes_ignore_a_minority_of_wrong_matches():
    """Three boxes contain the keypoint; one is matched far away. The mean follows it, the median does not."""
    src = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [4.0, 0.0, 14.0, 10.0],
                        [40.0, 40.0, 50.0, 50.0]])
    trg = src + torch.tensor([20.0, 10.0, 20.0, 10.0])  # every box translated by (20, 10) ...
    trg[2] = torch.tensor([100.0, 80.0, 110.0, 90.0])  # ... but box 2's target: shift (96, 80)
    matches = torch.arange(4)
    kps = torch.tensor([[8.0, 5.0]])  # in boxes 0, 1 and 2
    assert torch.equal(median_transfer(kps, src, trg, matches), torch.tensor([[28.0, 15.0]]))
    mean = transfer_keypoints(kps, src, trg, matches)
    assert torch.allclose(mean, torch.tensor([[8.0 + (20 + 20 + 96) / 3, 5.0 + (10 + 10 + 80) / 3]]))
    # an even count of votes: the mean of the two middle ones (boxes 0 and 1 only contain (1, 5))
    kps = torch.tensor([[3.0, 5.0]])
    trg[1] = torch.tensor([26.0, 14.0, 36.0, 24.0])  # box 1's shift (24, 14)
    assert torch.equal(median_transfer(kps, src, trg, matches), torch.tensor([[25.0, 17.0]]))


def test_voting_boxes_scale_about_their_centres():
    """Scale 1: the boxes themselves; 2: twice as wide about the same centre; 0: the nearest centre alone."""
    kps = torch.tensor([[8.5, 4.0], [3.0, 3.0], [20.0, 5.0]])
    assert torch.equal(voters(kps, SRC), torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool))
    # doubled: box 0 spans (-5, -5)-(15, 15), box 1 (1, -5)-(21, 15), box 2 (35, 35)-(55, 55)
    assert torch.equal(voters(kps, SRC, 2.0), torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool))
    # scale 0: the nearest centre, (5, 5) or (11, 5)
    assert torch.equal(voters(kps, SRC, 0.0), torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool))
    # transfer with scale 0 moves each keypoint with its nearest hyperpixel's match
    out = transfer_keypoints(kps, SRC, TRG, MATCHES, box_scale=0.0)
    assert torch.equal(out, kps + torch.tensor([[-6.0, 30.0], [100.0, 0.0], [-6.0, 30.0]]))
    assert torch.equal(median_transfer(kps, SRC, TRG, MATCHES, 0.0), out)


def _reference_voters(k, src, scale):
    centres, half = (src[:, :2] + src[:, 2:]) / 2, scale * (src[:, 2:] - src[:, :2]) / 2
    inside = np.all((k >= centres - half) & (k <= centres + half), axis=1)
    if not inside.any():
        inside = np.arange(len(src)) == np.argmin(np.linalg.norm(centres - k, axis=1))
    return inside


def _reference_transfer(kps, src, trg, matches, scale, vote, offsets=0.0):
    """float64 numpy: each keypoint's voters found one by one, then their mean or median shift."""
    shift = trg[matches, :2] - src[:, :2] + offsets
    return np.array([k + vote(shift[_reference_voters(k, src, scale)], axis=0) for k in kps])


def _reference_consensus(kps, src, trg, matches, scale, offsets=0.0):
    """float64 numpy, keypoint by keypoint: the median shift at 2 s, then the mean of the agreeing shifts at s."""
    shift = trg[matches, :2] - src[:, :2] + offsets
    radius = scale * np.max(src[:, 2:] - src[:, :2], axis=1) / 2
    out = []
    for k in kps:
        med = np.median(shift[_reference_voters(k, src, 2 * scale)], axis=0)
        agree = _reference_voters(k, src, scale) & (np.linalg.norm(shift - med, axis=1) <= radius)
        out.append(k + (shift[agree].mean(axis=0) if agree.any() else med))
    return np.array(out)


def test_consensus_keeps_the_agreeing_votes_and_averages_them():
    """Four unit boxes contain the keypoint (scale 1); three agree within half a box, one is far off."""
    src = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [4.0, 0.0, 14.0, 10.0],
                        [6.0, 2.0, 16.0, 12.0]])
    shifts = torch.tensor([[20.0, 10.0], [22.0, 10.0], [21.0, 12.0], [90.0, 60.0]])
    trg = src + shifts.repeat(1, 2)
    matches = torch.arange(4)
    kps = torch.tensor([[8.0, 5.0]])
    # the median at scale 2 (all four boxes): (21.5, 11); within 5 px of it: the first three
    out = consensus_transfer(kps, src, trg, matches, 1.0)
    assert torch.allclose(out, kps + torch.tensor([[21.0, 32.0 / 3]]))
    assert torch.allclose(median_transfer(kps, src, trg, matches, 2.0), kps + torch.tensor([[21.5, 11.0]]))
    # no vote within the radius: the median itself
    shifts = torch.tensor([[0.0, 0.0], [30.0, 0.0], [60.0, 0.0], [90.0, 0.0]])
    trg = src + shifts.repeat(1, 2)
    assert torch.allclose(consensus_transfer(kps, src, trg, matches, 1.0), kps + torch.tensor([[45.0, 0.0]]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.integers(0, 2**31 - 1))
@example(n=7, k=3, scale=1.0, seed=0)
def test_mean_and_median_transfer_match_a_float64_reference(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    corner = rng.integers(0, 60, (n, 2)).astype(np.float64)  # integer corners: ties on box borders happen
    src = np.concatenate([corner, corner + rng.integers(4, 30, (n, 1))], axis=1)
    m = int(rng.integers(1, 40))
    tc = rng.uniform(0, 100, (m, 2))
    trg = np.concatenate([tc, tc + 18.0], axis=1)
    matches = rng.integers(0, m, n)
    kps = rng.uniform(0, 80, (k, 2))
    args = [torch.from_numpy(a) for a in (kps, src, trg, matches)]
    np.testing.assert_allclose(median_transfer(*args, scale).numpy(),
                               _reference_transfer(kps, src, trg, matches, scale, np.median), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(transfer_keypoints(*args, box_scale=scale).numpy(),
                               _reference_transfer(kps, src, trg, matches, scale, np.mean), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(consensus_transfer(*args, scale).numpy(),
                               _reference_consensus(kps, src, trg, matches, scale), rtol=1e-12, atol=1e-9)
    off = rng.uniform(-3, 3, (n, 2))  # refined votes (the "-soft" rules)
    np.testing.assert_allclose(median_transfer(*args, scale, torch.from_numpy(off)).numpy(),
                               _reference_transfer(kps, src, trg, matches, scale, np.median, off),
                               rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(consensus_transfer(*args, scale, torch.from_numpy(off)).numpy(),
                               _reference_consensus(kps, src, trg, matches, scale, off), rtol=1e-12, atol=1e-9)


def test_median_works_through_blocks_of_keypoints(monkeypatch):
    """Many keypoints go through the median in blocks; the blocks change nothing."""
    import scot_ot.matching.transfer as transfer

    g = torch.Generator().manual_seed(7)
    corner = torch.rand(50, 2, generator=g, dtype=torch.float64) * 60
    src = torch.cat([corner, corner + 18], 1)
    trg = src[torch.randperm(50, generator=g)] + 5
    kps, matches = torch.rand(23, 2, generator=g, dtype=torch.float64) * 70, torch.randint(0, 50, (50,), generator=g)
    whole = median_transfer(kps, src, trg, matches, 2.0)
    monkeypatch.setattr(transfer, "MEDIAN_BLOCK", 300)  # 3 keypoints per block: 8 blocks, the last one ragged
    assert torch.equal(median_transfer(kps, src, trg, matches, 2.0), whole)


def test_soft_offsets_are_the_score_weighted_mean_position_around_the_match():
    h, w = 3, 4
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0, torch.arange(w) * 8.0, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], 1)  # (12, 2), 8 px apart
    scores = torch.zeros(3, h * w)
    scores[0, 5] = 2.0  # match at (row 1, col 1) ...
    scores[0, 6] = 1.0  # ... and its right neighbour at half the score: offset 8 / 3 in x
    scores[0, 11] = 9.0  # outside the 3 x 3 window of cell 5: ignored
    scores[1, 0] = 1.0  # corner cell: the window is clipped to the grid
    scores[1, 4] = 1.0  # the cell below: offset 4 in y
    matches = torch.tensor([5, 0, 7])  # source 2: all scores 0 -> no offset
    off = soft_offsets(scores, matches, centres, (h, w))
    assert torch.allclose(off, torch.tensor([[8.0 / 3, 0.0], [0.0, 4.0], [0.0, 0.0]]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_soft_offsets_stay_inside_the_window(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.stack(torch.meshgrid(torch.arange(w) * 4.0, torch.arange(h) * 4.0, indexing="xy"), -1)
    centres = centres.reshape(-1, 2)
    scores = torch.rand(6, h * w, generator=g)
    matches = torch.randint(0, h * w, (6,), generator=g)
    off = soft_offsets(scores, matches, centres, (h, w))
    assert bool((off.abs() <= 4.0 + 1e-5).all())  # within one cell of the match


# ----------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def hyperpixels():
    model = small_scot(128)
    pair = sample_pair()
    return model, model.hyperpixels(pair.src_path), model.hyperpixels(pair.trg_path), pair


def test_bidirectional_scores_are_the_geometric_mean_of_both_directions(hyperpixels):
    model, hs, ht, _ = hyperpixels
    model.bidirectional = True
    try:
        corr = model.match_hyperpixels(hs, ht)
    finally:
        model.bidirectional = False
    t = {"cost": 0.0, "ot": 0.0, "rhm": 0.0}
    C = model.cost(hs, ht, t)
    C_back = model.cost(ht, hs, t)  # its own buffer: the pipeline's transposed view must give the same
    _, fwd, res = model.transport(C, hs, ht, t)
    _, back, _ = model.transport(C_back, ht, hs, t)
    torch.testing.assert_close(C, model.cost(hs, ht, t))  # transport leaves the cost unchanged
    want = (fwd * back.T).sqrt()
    assert torch.allclose(corr.scores, want) and torch.equal(corr.matches, want.argmax(dim=1))
    assert torch.equal(corr.plan, res.plan)  # the source-to-target plan
    assert corr.timings["ot"] > 0 and set(corr.timings) == {"cost", "ot", "rhm"}


@pytest.mark.parametrize("rule", TRANSFER_RULES)
def test_every_rule_transfers_through_the_correspondence(hyperpixels, rule):
    model, hs, ht, pair = hyperpixels
    model.transfer = rule
    try:
        corr = model.match_hyperpixels(hs, ht)
    finally:
        model.transfer = "scot"
    assert corr.transfer_rule == rule and corr.transfer_box == 1.0
    pred = corr.transfer(pair.src_kps)
    assert pred.shape == pair.src_kps.shape and bool(torch.isfinite(pred).all())
    if rule != "scot":  # the rules differ on real matches
        scot = model.match_hyperpixels(hs, ht).transfer(pair.src_kps)
        assert not torch.equal(pred, scot)


def test_the_voting_boxes_reach_the_transfer(hyperpixels):
    """SCOT(transfer_box=) goes into the correspondence and scales the boxes the keypoints vote with."""
    model, hs, ht, pair = hyperpixels
    model.transfer, model.transfer_box = "median", 2.0
    try:
        corr = model.match_hyperpixels(hs, ht)
    finally:
        model.transfer, model.transfer_box = "scot", 1.0
    assert (corr.transfer_rule, corr.transfer_box) == ("median", 2.0)
    kps = pair.src_kps * torch.tensor(hs.scale)  # the resized source frame
    want = median_transfer(kps, hs.boxes, ht.boxes, corr.matches, 2.0) / torch.tensor(ht.scale)
    assert torch.allclose(corr.transfer(pair.src_kps), want)
    assert not torch.allclose(corr.transfer(pair.src_kps),
                              median_transfer(kps, hs.boxes, ht.boxes, corr.matches, 1.0) / torch.tensor(ht.scale))


@pytest.mark.parametrize("rule", ["median-soft", "consensus-soft"])
def test_refined_robust_rules_vote_with_the_soft_offsets(hyperpixels, rule):
    """``"<vote>-soft"`` is ``<vote>`` on votes moved by the soft-argmax offsets of the final scores."""
    model, hs, ht, pair = hyperpixels
    model.transfer, model.transfer_box = rule, 1.5
    try:
        corr = model.match_hyperpixels(hs, ht)
    finally:
        model.transfer, model.transfer_box = "scot", 1.0
    vote = {"median-soft": median_transfer, "consensus-soft": consensus_transfer}[rule]
    offsets = soft_offsets(corr.scores, corr.matches, ht.centres, ht.grid)
    assert offsets.abs().max() > 0
    kps = pair.src_kps * torch.tensor(hs.scale)
    want = vote(kps, hs.boxes, ht.boxes, corr.matches, 1.5, offsets) / torch.tensor(ht.scale)
    assert torch.allclose(corr.transfer(pair.src_kps), want)


@pytest.mark.parametrize("rule", ["scot", "median"])
def test_the_appearance_refinement_reaches_the_transfer(hyperpixels, rule):
    """SCOT(transfer_refine=R) moves the rule's keypoints by :func:`refine_keypoints` on the images' features."""
    model, hs, ht, pair = hyperpixels
    refining = copy.copy(model)
    refining.transfer, refining.transfer_refine = rule, 2
    corr = refining.match_hyperpixels(hs, ht)
    assert corr.transfer_refine == 2
    plain = dataclasses.replace(corr, transfer_refine=0).transfer(pair.src_kps)
    kps = pair.src_kps * torch.tensor(hs.scale)
    want = refine_keypoints(kps, plain * torch.tensor(ht.scale), hs.feats, hs.centres, hs.grid, ht.feats,
                            ht.centres, ht.grid, 2) / torch.tensor(ht.scale)
    got = corr.transfer(pair.src_kps)
    assert torch.allclose(got, want) and not torch.allclose(got, plain)
    # every refined keypoint is a target hyperpixel's centre within 2 cells of the unrefined one
    resized = got * torch.tensor(ht.scale)
    assert bool((torch.cdist(resized, ht.centres).min(dim=1).values < 1e-3).all())
    jump = float(ht.centres[1, 0] - ht.centres[0, 0])
    assert bool(((resized - plain * torch.tensor(ht.scale)).abs() <= 2.5 * jump + 1e-3).all())


def test_transfer_box_is_checked_and_recorded():
    assert small_scot(96).config()["transfer_box"] == 1.0
    for bad in (-0.5, float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ValueError, match="transfer_box: must be a finite number >= 0"):
            SCOT(transfer_box=bad)


# ----------------------------------------------------------------------------- presets
def test_faithful_preset_is_the_constructor_and_names_itself():
    faithful = small_scot(96)
    assert PRESETS["faithful"] == {}
    model = SCOT.preset("faithful", image_side=96)
    assert model.preset_name == "faithful (with image_side changed)"
    want = {**faithful.config(), "preset": model.preset_name}
    assert model.config() == want
    assert SCOT.preset("faithful", solver="pot-sinkhorn").preset_name == "faithful"  # the same value: no change
    json.dumps(model.config())


def test_accurate_preset_is_what_the_recorded_study_selected():
    """The preset in the code and the configuration the committed study record selected are one."""
    record = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy" / "round9" / "accuracy.json"
    selected = json.loads(record.read_text())["selected_config"]
    assert set(PRESETS["accurate"]) <= set(selected)  # the preset sets nothing the study did not choose
    config = SCOT.preset("accurate").config()
    assert {k: config[k] for k in selected} == selected
    assert config["preset"] == "accurate"


def test_unknown_preset_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match="preset: unknown preset 'fast'; available: faithful, accurate"):
        SCOT.preset("fast")
    with pytest.raises(ValueError, match="transfer: expected one of scot, weighted, soft, median, median-soft, "
                                         "consensus, consensus-soft, got 'mean'"):
        SCOT(transfer="mean")
    with pytest.raises(ValueError, match="bidirectional: expected True or False"):
        SCOT(bidirectional=1)

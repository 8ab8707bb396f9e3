"""Keypoint transfer rules, bidirectional matching and named presets (issue 15).

Transfer rules and the soft-argmax refinement against hand-computed answers;
bidirectional scores against the two one-way problems solved separately; presets
against the constructor they stand for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fast_models import small_scot
from scot_ot.data import sample_pair
from scot_ot.matching.scot import PRESETS, SCOT
from scot_ot.matching.transfer import TRANSFER_RULES, soft_offsets, transfer_keypoints

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
    assert corr.transfer_rule == rule
    pred = corr.transfer(pair.src_kps)
    assert pred.shape == pair.src_kps.shape and bool(torch.isfinite(pred).all())
    if rule != "scot":  # the rules differ on real matches
        scot = model.match_hyperpixels(hs, ht).transfer(pair.src_kps)
        assert not torch.equal(pred, scot)


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
    record = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy" / "round4" / "accuracy.json"
    selected = json.loads(record.read_text())["selected_config"]
    assert set(PRESETS["accurate"]) <= set(selected)  # the preset sets nothing the study did not choose
    config = SCOT.preset("accurate").config()
    assert {k: config[k] for k in selected} == selected
    assert config["preset"] == "accurate"


def test_unknown_preset_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match="preset: unknown preset 'fast'; available: faithful, accurate"):
        SCOT.preset("fast")
    with pytest.raises(ValueError, match="transfer: expected one of scot, weighted, soft, got 'mean'"):
        SCOT(transfer="mean")
    with pytest.raises(ValueError, match="bidirectional: expected True or False"):
        SCOT(bidirectional=1)

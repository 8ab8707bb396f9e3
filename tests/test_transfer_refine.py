"""The appearance refinement of transferred keypoints (``transfer_refine``, issue 15 round 9).

Bilinear feature sampling against its closed form; the refinement against a float64
brute force over every target cell (fresh random grids, features and points drawn by
hypothesis); a planted match inside / just outside the window; the model's argument
checked and recorded (tests/test_presets.py: it reaches :meth:`Correspondence.transfer`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fast_models import small_scot
from scot_ot.matching.scot import SCOT
from scot_ot.matching.transfer import refine_keypoints, sample_features


def grid_centres(h: int, w: int, origin=(3.5, 1.5), jump=(4.0, 4.0)) -> torch.Tensor:
    """(h*w, 2) xy centres of a row-major grid: ``origin + jump * (c, r)``."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([origin[0] + jump[0] * c.flatten(), origin[1] + jump[1] * r.flatten()], dim=1).float()


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def test_features_at_a_cell_centre_are_that_cells():
    gen = torch.Generator().manual_seed(0)
    h, w = 5, 7
    centres, feats = grid_centres(h, w), unit_rows(h * w, 16, gen)
    idx = torch.tensor([0, 6, 17, 34])  # corners and an inner cell
    assert torch.allclose(sample_features(feats, centres, (h, w), centres[idx]), feats[idx], atol=1e-6)


def test_features_between_cells_are_the_normalised_bilinear_mix():
    gen = torch.Generator().manual_seed(1)
    h, w = 4, 6
    centres, feats = grid_centres(h, w, origin=(2.0, 2.0), jump=(4.0, 4.0)), unit_rows(h * w, 8, gen)
    # a point a quarter of the way from cell (1, 2) to (1, 3) and half way to (2, 2): x = 2 + 4 * 2.25, y = 2 + 4 * 1.5
    point = torch.tensor([[11.0, 8.0]])
    mix = (0.75 * 0.5 * feats[1 * w + 2] + 0.25 * 0.5 * feats[1 * w + 3]
           + 0.75 * 0.5 * feats[2 * w + 2] + 0.25 * 0.5 * feats[2 * w + 3])
    want = mix / mix.norm()
    assert torch.allclose(sample_features(feats, centres, (h, w), point)[0], want, atol=1e-6)
    # beyond the grid: clamped to the border cell
    outside = torch.tensor([[-50.0, -50.0]])
    assert torch.allclose(sample_features(feats, centres, (h, w), outside)[0], feats[0], atol=1e-6)
    # a grid one cell wide: bilinear along the other axis only
    column = grid_centres(h, 1, origin=(2.0, 2.0))
    got = sample_features(feats[:h], column, (h, 1), torch.tensor([[7.0, 8.0]]))[0]  # row 1.5
    mix = feats[1] + feats[2]
    assert torch.allclose(got, mix / mix.norm(), atol=1e-6)


def brute_force(kps, moved, src_feats, src_centres, src_grid, trg_feats, trg_centres, trg_grid, radius):
    """float64, one keypoint at a time: the nearest target cell by distance, every cell within
    ``radius`` rows and columns of it, the one of highest cosine with the sampled source features."""
    h, w = trg_grid
    out = []
    f = sample_features(src_feats.double(), src_centres.double(), src_grid, kps.double()).double()
    for k in range(len(kps)):
        near = int(((trg_centres.double() - moved[k].double()) ** 2).sum(dim=1).argmin())
        r0, c0 = divmod(near, w)
        best, best_sim = None, -float("inf")
        for j in range(h * w):
            r, c = divmod(j, w)
            if abs(r - r0) <= radius and abs(c - c0) <= radius:
                sim = float(trg_feats[j].double() @ f[k])
                if sim > best_sim:
                    best, best_sim = j, sim
        out.append(trg_centres[best])
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 8), w=st.integers(1, 8), sh=st.integers(1, 8),
       sw=st.integers(1, 8), radius=st.integers(1, 3), k=st.integers(1, 6))
def test_refinement_is_the_best_cosine_within_the_window(seed, h, w, sh, sw, radius, k):
    gen = torch.Generator().manual_seed(seed)
    src_grid, trg_grid = (sh, sw), (h, w)
    src_centres = grid_centres(*src_grid, origin=(1.5, 2.5), jump=(3.0, 3.0))
    trg_centres = grid_centres(*trg_grid, origin=(3.5, 1.5), jump=(4.0, 4.0))
    src_feats, trg_feats = unit_rows(len(src_centres), 12, gen), unit_rows(len(trg_centres), 12, gen)
    kps = torch.rand(k, 2, generator=gen) * torch.tensor([3.0 * sw, 3.0 * sh])
    # transferred points anywhere over the target image, and a little beyond it
    moved = torch.rand(k, 2, generator=gen) * torch.tensor([4.0 * w + 8, 4.0 * h + 8]) - 2.0
    got = refine_keypoints(kps, moved, src_feats, src_centres, src_grid, trg_feats, trg_centres, trg_grid, radius)
    want = brute_force(kps, moved, src_feats, src_centres, src_grid, trg_feats, trg_centres, trg_grid, radius)
    assert torch.equal(got, want)


def test_a_planted_match_is_found_inside_the_window_and_not_outside():
    gen = torch.Generator().manual_seed(2)
    h, w = 9, 9
    centres = grid_centres(h, w)
    src_feats, trg_feats = unit_rows(h * w, 32, gen), unit_rows(h * w, 32, gen)
    kp = centres[4 * w + 4][None]  # a source keypoint on a cell centre: its features are that cell's
    moved = centres[4 * w + 4][None] + 0.3  # transferred near target cell (4, 4)
    for radius in (1, 2, 3):
        for planted in ((4 + radius) * w + 4, 4 * w + 4 - radius):  # on the window's edge
            trg = trg_feats.clone()
            trg[planted] = src_feats[4 * w + 4]
            out = refine_keypoints(kp, moved, src_feats, centres, (h, w), trg, centres, (h, w), radius)
            assert torch.equal(out[0], centres[planted])
        outside = (4 + radius + 1) * w + 4  # one row beyond the window: not reachable
        trg = trg_feats.clone()
        trg[outside] = src_feats[4 * w + 4]
        out = refine_keypoints(kp, moved, src_feats, centres, (h, w), trg, centres, (h, w), radius)
        assert not torch.equal(out[0], centres[outside])
        assert (out[0] - centres[4 * w + 4]).abs().max() <= 4.0 * radius  # within the window


def test_radius_zero_leaves_the_keypoints_alone():
    gen = torch.Generator().manual_seed(3)
    centres, feats = grid_centres(3, 3), unit_rows(9, 4, gen)
    moved = torch.rand(5, 2, generator=gen) * 12
    assert refine_keypoints(moved, moved, feats, centres, (3, 3), feats, centres, (3, 3), 0) is moved


# ----------------------------------------------------------------------------- the model
def test_transfer_refine_is_checked_and_recorded():
    assert small_scot(96).config()["transfer_refine"] == 0
    for bad in (-1, 1.5, "2", True, None):
        with pytest.raises(ValueError, match="transfer_refine: must be an integer >= 0"):
            SCOT(transfer_refine=bad)

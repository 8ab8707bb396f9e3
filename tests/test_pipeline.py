"""The SCOT pipeline: image input, geometry (RHM, transfer, CAM staircase), end to end on real photos."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from scot_ot.data import sample_pair
from scot_ot.matching import SCOT, ImageError, cosine_cost, load_image
from scot_ot.matching.cam import staircase
from scot_ot.matching.rhm import gaussian_filter, hough_bins, regularized_hough_matching
from scot_ot.matching.transfer import transfer_keypoints


@pytest.fixture(scope="module")
def model():
    return SCOT()


# ------------------------------------------------------------------ images


def test_load_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")

    x = load_image(tmp_path / "rgb.png")
    assert x.shape == (3, 20, 30) and torch.allclose(x * 255, torch.from_numpy(rgb).permute(2, 0, 1).float())
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (3, 20, 30) and torch.equal(g[0], g[1])
    w = load_image(tmp_path / "rgba.png")
    assert torch.allclose(w, torch.ones_like(w))  # transparent over white
    assert load_image(torch.from_numpy(rgb).permute(2, 0, 1)).shape == (3, 20, 30)  # uint8 tensor


def test_bad_images_name_the_file(tmp_path, model):
    with pytest.raises(ImageError, match="no such file.*missing.png"):
        load_image(tmp_path / "missing.png", "src")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="cannot read.*notes.png"):
        load_image(bad, "src")
    with pytest.raises(ImageError, match="src: expected"):
        load_image(torch.zeros(2, 5, 5, 5), "src")
    thin = tmp_path / "thin.png"
    Image.new("RGB", (600, 20)).save(thin)
    with pytest.raises(ImageError, match="trg: .*too small"):
        model.match(sample_pair().src_path, thin)


# ------------------------------------------------------------------ pieces


def test_cosine_cost_range_and_diagonal():
    x = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    C = cosine_cost(x, x)
    assert C.min() >= 0 and C.max() <= 1
    assert torch.allclose(torch.diagonal(C), torch.zeros(50), atol=1e-6)


def test_staircase_matches_scot_thresholds():
    v = torch.tensor([0.0, 0.4, 0.41, 0.5, 0.55, 0.6, 0.61, 1.0])
    assert staircase(v).tolist() == pytest.approx([0.5, 0.5, 0.8, 0.8, 0.9, 0.9, 1.0, 1.0])


def _grid(h, w, jump, off=0.0):
    ys, xs = torch.meshgrid(torch.arange(h) * jump + off, torch.arange(w) * jump + off, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()


@pytest.mark.parametrize("seed", range(3))
def test_hough_bins_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    hs, ws, ht, wt = (int(v) for v in torch.randint(3, 12, (4,), generator=g))
    jump = float(torch.randint(2, 9, (1,), generator=g))
    sc, tc = _grid(hs, ws, jump, 1.5), _grid(ht, wt, jump, 0.5)
    src_size, trg_size = (int(ws * jump), int(hs * jump)), (int(wt * jump), int(ht * jump))
    bins, ny, nx = hough_bins(sc, tc, (hs, ws), (ht, wt), src_size, trg_size, ncells=64)
    cell = math.sqrt((src_size[0] + trg_size[0]) * (src_size[1] + trg_size[1]) / 64)
    off = torch.tensor(src_size, dtype=torch.float32) - sc[:, None] + tc[None]
    ref = (off[..., 1] / cell).floor().long().clamp(0, ny - 1) * nx + (off[..., 0] / cell).floor().long().clamp(0, nx - 1)
    assert torch.equal(bins, ref)


def test_gaussian_filter_normalised_and_symmetric():
    k = gaussian_filter(7)
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
    assert k[3, 3] == k.max()


def test_rhm_favours_the_consistent_offset():
    """Votes for a common translation reinforce each other; a lone outlier does not."""
    h = w = 8
    c = _grid(h, w, 4.0)
    N = h * w
    votes = torch.zeros(N, N)
    shift = 1  # every source cell matches the cell one to the right ...
    for i in range(N):
        y, x = divmod(i, w)
        votes[i, y * w + min(x + shift, w - 1)] = 1.0
    votes[0, N - 1] = 1.0  # ... and source 0 has an equally strong outlier far away
    out = regularized_hough_matching(votes, c, c, (h, w), (h, w), (32, 32), (32, 32), ncells=256)
    assert out[0, 1] > 5 * out[0, N - 1]


def test_transfer_identity_and_translation():
    boxes = torch.cat([_grid(10, 10, 8.0) - 12, _grid(10, 10, 8.0) + 12], 1)  # (100, 4)
    kps = torch.tensor([[10.0, 20.0], [40.5, 33.0], [70.0, 5.0]])
    ident = torch.arange(100)
    assert torch.allclose(transfer_keypoints(kps, boxes, boxes, ident), kps)
    moved = boxes + torch.tensor([16.0, 8.0, 16.0, 8.0])  # target boxes translated by (16, 8)
    assert torch.allclose(transfer_keypoints(kps, boxes, moved, ident), kps + torch.tensor([16.0, 8.0]))


def test_transfer_outside_every_box_uses_nearest():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    kps = torch.tensor([[15.0, 5.0]])  # in neither box; nearest centre is a tie -> first
    out = transfer_keypoints(kps, boxes, boxes + 100.0, torch.tensor([0, 1]))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ end to end


def test_self_match_returns_keypoints(model):
    """Matching a photo to itself must send keypoints (almost) to themselves."""
    pair = sample_pair()
    corr = model.with_solver("torch-absorb", max_iter=100, tol=1e-6).match(pair.src_path, pair.src_path)
    pred = corr.transfer(pair.src_kps)
    err = (pred - pair.src_kps).norm(dim=1)
    assert err.max() < 0.05 * pair.threshold


def test_match_real_pair_and_transfer(model):
    pair = sample_pair(1)  # two different cars
    corr = model.match(pair.src_path, pair.trg_path)
    N, M = len(corr.src), len(corr.trg)
    assert corr.plan.shape == corr.scores.shape == (N, M)
    assert corr.matches.shape == corr.confidences.shape == (N,)
    assert corr.ot.n_iters == 1 and corr.ot.solver == "pot-sinkhorn"
    assert corr.plan.sum().item() == pytest.approx(1.0, rel=1e-4)
    pred = corr.transfer(pair.src_kps)
    assert pred.shape == (10, 2) and torch.isfinite(pred).all()
    pck = ((pred - pair.trg_kps).norm(dim=1) <= 0.1 * pair.threshold).float().mean()
    assert pck >= 0.5  # a real different-instance pair; measured 1.0 with the default
    with pytest.raises(ValueError, match="keypoints: outside the source image"):
        corr.transfer(torch.tensor([[1e4, 5.0]]))
    with pytest.raises(ValueError, match="keypoints: expected shape"):
        corr.transfer(torch.zeros(3))


def test_cam_weights_prefer_the_object(model):
    """CAM marginal weights are higher on the keypoints' box than outside it."""
    pair = sample_pair()
    hp = model.hyperpixels(pair.src_path)
    box = torch.cat([pair.src_kps.min(0).values, pair.src_kps.max(0).values]) * torch.tensor(hp.scale * 2)
    c = hp.centres
    inside = (c[:, 0] >= box[0]) & (c[:, 0] <= box[2]) & (c[:, 1] >= box[1]) & (c[:, 1] <= box[3])
    assert hp.weights[inside].mean() > hp.weights[~inside].mean() + 0.1


def test_uniform_marginals_without_cam():
    m = SCOT(use_cam=False)
    hp = m.hyperpixels(sample_pair().src_path)
    assert hp.cam is None and torch.equal(hp.weights, torch.ones(len(hp)))


def test_unknown_solver_and_bad_exponent():
    with pytest.raises(ValueError, match="unknown solver 'sinkhorn'.*torch-log"):
        SCOT(solver="sinkhorn")
    with pytest.raises(ValueError, match="exponent"):
        SCOT(exponent=0)


def test_batched_hyperpixels_equal_unbatched(model):
    """Equal shapes share a backbone batch; every result matches its one-image extraction."""
    pair = sample_pair(0)
    src = Image.open(pair.src_path).convert("RGB")
    images = [src, src.transpose(Image.FLIP_LEFT_RIGHT), Image.open(pair.trg_path), src.rotate(3)]
    batched = model.hyperpixels_many(images, batch_size=3)
    for img, hb in zip(images, batched):
        h1 = model.hyperpixels(img)
        assert hb.grid == h1.grid and hb.size == h1.size and hb.scale == h1.scale
        torch.testing.assert_close(hb.feats, h1.feats, rtol=0, atol=2e-5)
        torch.testing.assert_close(hb.cam, h1.cam, rtol=0, atol=2e-5)
        assert torch.equal(hb.boxes, h1.boxes)
        assert float((hb.weights != h1.weights).float().mean()) < 0.01  # a staircase step may flip by rounding
    assert not torch.allclose(batched[0].feats, batched[1].feats)  # the flip is a different image
    with pytest.raises(ValueError, match="batch_size"):
        model.hyperpixels_many(images, batch_size=0)

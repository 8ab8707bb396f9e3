"""Fidelity to SCOT's official code, stage by stage (issue 9; table in docs/fidelity.md).

Each test writes the official rule out by hand (plain torch / numpy from the rule's
statement, not the library's helper) and compares the library to it. The backbone in
the CAM tests is a small stand-in (a fixed 1x1 projection of 8x8 average pools), so
that the CAM arithmetic is checked apart from any network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scot_ot.evaluation.pck import pck_per_pair
from scot_ot.features import BackboneFeatures, ReceptiveField, get_backbone
from scot_ot.matching.hyperpixels import HyperpixelExtractor, Hyperpixels, hyperpixel_features
from scot_ot.matching.image import resize_longest
from scot_ot.matching.scot import Correspondence

# ------------------------------------------------------------------ resize


def official_ratio(H: int, W: int, side: int = 300) -> np.float32:
    """SCOT's ``util.resize``: ``side / max(imsize)`` on a float32 size tensor."""
    return np.float32(side) / np.float32(max(H, W))


# PF-WILLOW-dev images where rounding gave one pixel more: (W, H) -> official (W', H')
RESIZE_EXAMPLES = [
    ((400, 266), (300, 199)),  # car(G)/Cars_008b
    ((395, 296), (300, 224)),  # car(G)/Cars_017b
    ((377, 310), (300, 246)),  # car(G)/Cars_019b
    ((400, 314), (300, 235)),  # car(M)/Cars_014b
    ((330, 247), (300, 224)),  # car(M)/Cars_015a
]


@pytest.mark.parametrize("wh, expected", RESIZE_EXAMPLES)
def test_resize_truncates_with_one_float32_ratio(wh, expected):
    W, H = wh
    r = official_ratio(H, W)
    ref = (int(np.float32(W) * r), int(np.float32(H) * r))  # truncation
    assert ref == expected
    img = torch.rand(3, H, W, generator=torch.Generator().manual_seed(W * H))
    out, scale = resize_longest(img, 300)
    assert (out.shape[2], out.shape[1]) == expected
    assert scale == (float(r), float(r))  # one ratio on both axes, not (W'/W, H'/H)
    ref_img = F.interpolate(img[None], size=(expected[1], expected[0]), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref_img, rtol=0, atol=0)


def _grid_boxes(w: int, h: int, jump: float, half: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) * jump, torch.arange(w) * jump, indexing="ij")
    c = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
    return torch.cat([c - half, c + half], 1)


def _hyperpixels(size, scale, boxes) -> Hyperpixels:
    n = len(boxes)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return Hyperpixels(torch.zeros(n, 1), boxes, centres, (1, n), size, scale, torch.ones(n), None)


def test_keypoints_scale_by_the_one_ratio_both_ways():
    """SCOT: ``k_s' = r_s k_s`` into the resized source, transfer, and compare with
    ``r_t k_t`` in the resized target; in original target pixels that is ``k' / r_t``.
    With matching identical boxes the transfer is the identity, so the result is
    ``k r_s / r_t`` on *both* axes."""
    (Ws, Hs), (Wt, Ht) = (400, 266), (330, 247)
    src_img, src_scale = resize_longest(torch.rand(3, Hs, Ws), 300)
    trg_img, trg_scale = resize_longest(torch.rand(3, Ht, Wt), 300)
    boxes = _grid_boxes(20, 15, 16.0, 13.0)
    src = _hyperpixels((src_img.shape[2], src_img.shape[1]), src_scale, boxes)
    trg = _hyperpixels((trg_img.shape[2], trg_img.shape[1]), trg_scale, boxes)
    n = len(boxes)
    corr = Correspondence(src, trg, torch.eye(n), torch.eye(n), torch.arange(n), torch.ones(n), None)
    kps = np.array([[10.0, 20.0], [399.0, 265.5], [200.25, 133.0]], dtype=np.float32)
    r_s, r_t = official_ratio(Hs, Ws), official_ratio(Ht, Wt)
    ref = kps * r_s / r_t  # float32 throughout, like SCOT
    np.testing.assert_allclose(corr.transfer(kps).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        corr.transfer(np.array([[10.0, 268.0]], dtype=np.float32))  # below the 266-px image


def test_pck_threshold_scales_like_the_keypoints():
    """SCOT scores in the resized target: ``||p' - r g|| <= alpha * r * tau``. Ours scores
    ``p = p' / r`` against ``g`` with ``tau`` in original pixels: the same decisions."""
    g = torch.Generator().manual_seed(0)
    r = float(official_ratio(247, 330))
    gt = torch.rand(40, 2, generator=g) * 300
    pred_resized = gt * r + torch.randn(40, 2, generator=g) * 12
    tau = 180.0
    for alpha in (0.05, 0.1, 0.15):
        official = float(((pred_resized - gt * r).norm(dim=1) <= alpha * tau * r).float().mean())
        ours = pck_per_pair(pred_resized / r, gt, tau, alphas=(alpha,))[alpha]
        assert ours == pytest.approx(official)
        assert 0 < official < 1  # the case separates correct from wrong keypoints


# ------------------------------------------------------------------ boxes, centres


def test_boxes_use_the_integer_half_width():
    """SCOT's ``receptive_fields``: ``box = (j x - rf // 2, j y - rf // 2, j x + rf // 2,
    j y + rf // 2)``; its centre ``x0 + (x1 - x0) // 2`` is ``j x``."""
    rf = ReceptiveField(jump=4.0, size=27.0, offset=(0.0, 0.0))  # ResNet id 2 (HPF table)
    boxes = rf.boxes(3, 5)  # (15, 4)
    ref = torch.tensor([[4 * x - 13, 4 * y - 13, 4 * x + 13, 4 * y + 13] for y in range(3) for x in range(5)],
                       dtype=torch.float32)
    assert torch.equal(boxes, ref)
    centre = boxes[:, :2] + torch.div(boxes[:, 2:] - boxes[:, :2], 2, rounding_mode="floor")
    assert torch.equal(centre, rf.centres(3, 5))
    r101 = get_backbone("resnet101", pretrained=False).receptive_field(2, (240, 300))
    assert (r101.jump, r101.size, r101.offset) == (4, 27, (0, 0))


def test_weights_sample_the_mask_at_the_centre_pixel():
    """SCOT reads the map at ``mask[int(cy), int(cx)]`` and applies its staircase; here a
    mask is 0.61 exactly on the centre pixels (4 y, 4 x) of ResNet id 2 and 0 elsewhere."""
    backbone = get_backbone("resnet50", pretrained=False)
    ex = HyperpixelExtractor(backbone, [2, 5], use_cam=False)
    mask = torch.zeros(64, 80)
    mask[::4, ::4] = 0.61
    hp = ex(torch.rand(3, 64, 80), (1.0, 1.0), mask=mask)
    assert hp.grid == (16, 20)
    assert torch.equal(hp.weights, torch.ones(16 * 20))
    mask = torch.roll(mask, 1, dims=1)  # one pixel to the right of every centre
    assert torch.equal(ex(torch.rand(3, 64, 80), (1.0, 1.0), mask=mask).weights, torch.full((320,), 0.5))
    assert torch.equal(hp.boxes, torch.cat([hp.centres - 13, hp.centres + 13], 1))


@pytest.mark.parametrize("value, weight", [(0.0, 0.5), (0.4, 0.5), (0.401, 0.8), (0.5, 0.8), (0.501, 0.9),
                                           (0.6, 0.9), (0.601, 1.0), (1.0, 1.0)])
def test_staircase_is_strictly_above_each_threshold(value, weight):
    backbone = get_backbone("resnet50", pretrained=False)
    hp = HyperpixelExtractor(backbone, [2], use_cam=False)(torch.rand(3, 32, 32), (1.0, 1.0),
                                                           mask=torch.full((32, 32), value))
    assert torch.equal(hp.weights, torch.full((64,), weight))


def test_hyperpixels_concatenate_on_the_first_grid():
    """Maps are resized to the first chosen layer's grid (bilinear, align_corners=True) and
    concatenated; the cosine of SCOT's cost then sees each row L2-normalised."""
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(1, 4, 8, 10, generator=g), torch.randn(1, 6, 4, 5, generator=g)]
    up = F.interpolate(maps[1], size=(8, 10), mode="bilinear", align_corners=True)
    ref = torch.cat([maps[0], up], 1)[0].reshape(10, -1).T  # (80, 10)
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(hyperpixel_features(maps), ref)


# ------------------------------------------------------------------ CAM


class StandIn:
    """A backbone stand-in: final = ReLU(P avgpool_8(x)), 5 channels; a 1000-way classifier.

    Records every input of ``forward_features``.
    """

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(5, 3, generator=g)
        self.weight = torch.rand(1000, 5, generator=g)  # positive: class maps have max > 0
        self.bias = torch.randn(1000, generator=g) * 3
        self.inputs = []

    def final(self, x):
        return torch.einsum("dc,bchw->bdhw", self.proj, F.avg_pool2d(x, 8, ceil_mode=True)).relu()

    def forward_features(self, x, layer_ids=None):
        self.inputs.append(x.clone())
        return BackboneFeatures([x], self.final(x))

    def classifier(self):
        return self.weight, self.bias


def official_cam(img, final_fn, weight, bias, scales=(1.0, 1.5, 2.0)):
    """``get_CAM_multi`` written out, with our rule (skip) where SCOT's fallback breaks."""
    _, _, H, W = img.shape
    total = torch.zeros(H, W)
    for s in scales:
        if s > 1.0:
            if s * s * H * W > 800 * 800:
                continue
            img = F.interpolate(img, (int(s * H), int(s * W)), mode="bilinear", align_corners=True)
        fmap = final_fn(img)[0]  # (C, h, w)
        logits = weight @ fmap.mean(dim=(1, 2)) + bias
        per_class = []
        for c in torch.softmax(logits, 0).topk(2).indices:
            cam = (weight[c] @ fmap.reshape(fmap.shape[0], -1)).reshape(1, 1, *fmap.shape[1:])
            cam = F.interpolate(cam, (H, W), mode="bilinear", align_corners=True)[0, 0]
            per_class.append((cam - cam.min()) / cam.max())
        total += torch.stack(per_class).max(0).values
    return total / (total.max() + 1e-5)


def test_cam_divides_by_the_unshifted_max_and_ranks_classes_with_the_bias():
    """Hand-made 2x2 final map. Classes 5 and 7 win through their bias; class 9 would
    win without it. Class 5's map [1, 2, 3, 4] gives (m - 1) / 4 = [0, .25, .5, .75],
    class 7's [6, 2, 2, 2] gives [2/3, 0, 0, 0]; their max [2/3, .25, .5, .75] over
    its peak (+1e-5). Normalising by max - min would give [1, 1/3, 2/3, 1]."""
    fmap = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[3.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2)

    class HandMade(StandIn):
        def final(self, x):
            return fmap[None].expand(x.shape[0], -1, -1, -1)

    bb = HandMade()
    bb.weight = torch.zeros(1000, 2)
    bb.weight[5] = torch.tensor([1.0, 0.0])
    bb.weight[7] = torch.tensor([0.0, 2.0])
    bb.weight[9] = torch.tensor([-1.0, 4.0])  # logit 3 + 0 > 2.5 + 0 without biases ...
    bb.bias = torch.zeros(1000)
    bb.bias[5] = bb.bias[7] = 10.0  # ... but 12.5 and 13.5 with them
    ex = HyperpixelExtractor(bb, [0], cam_scales=(1.0,))
    img = torch.rand(1, 3, 2, 2)
    cam = ex.class_activation_maps(img, bb.final(img))[0]
    expected = torch.tensor([[2 / 3, 0.25], [0.5, 0.75]]) / (0.75 + 1e-5)
    torch.testing.assert_close(cam, expected)


@pytest.mark.parametrize("hw", [(199, 300), (224, 300), (300, 300)])
def test_cam_scales_resize_the_previous_scale(hw):
    """Scales 1, 1.5, 2 at the 300-px side: the 2x image is the 1.5x image resized, to
    ``(int(2 H), int(2 W))``; the whole map equals the rule written out."""
    H, W = hw
    bb = StandIn()
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(H))
    ex = HyperpixelExtractor(bb, [0])
    cam = ex.class_activation_maps(img, bb.final(img))
    shapes = [tuple(x.shape[-2:]) for x in bb.inputs]
    assert shapes == [(int(1.5 * H), int(1.5 * W)), (2 * H, 2 * W)]
    x15 = F.interpolate(img, shapes[0], mode="bilinear", align_corners=True)
    x2 = F.interpolate(x15, shapes[1], mode="bilinear", align_corners=True)
    torch.testing.assert_close(bb.inputs[1], x2)
    direct = F.interpolate(img, shapes[1], mode="bilinear", align_corners=True)
    assert (bb.inputs[1] - direct).abs().max() > 1e-3  # the chain is not the direct resize
    torch.testing.assert_close(cam[0], official_cam(img, bb.final, bb.weight, bb.bias), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw, computed", [
    ((400, 400), [1.5, 2.0]),  # 4 * 160000 = 640000: not above 800 x 800
    ((450, 450), [1.5]),  # 4 * 202500 > 640000 >= 2.25 * 202500
    ((600, 450), [1.5]),  # 2.25 * 270000 = 607500
    ((600, 480), []),  # 2.25 * 288000 = 648000
])
def test_cam_skips_scales_above_800_by_800(hw, computed):
    """SCOT's limit is ``s^2 H W > 800 * 800`` (not the FCN mask's 1200 x 800); its fallback
    refers to undefined names, so a scale over the limit is skipped."""
    H, W = hw
    bb = StandIn()
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(W))
    cam = HyperpixelExtractor(bb, [0]).class_activation_maps(img, bb.final(img))
    assert [tuple(x.shape[-2:]) for x in bb.inputs] == [(int(s * H), int(s * W)) for s in computed]
    torch.testing.assert_close(cam[0], official_cam(img, bb.final, bb.weight, bb.bias), rtol=0, atol=1e-6)


def test_cam_batch_equals_one_by_one():
    bb = StandIn()
    imgs = torch.rand(3, 3, 120, 160, generator=torch.Generator().manual_seed(3))
    ex = HyperpixelExtractor(bb, [0])
    batch = ex.class_activation_maps(imgs, bb.final(imgs))
    for k in range(3):
        ref = official_cam(imgs[k:k + 1], bb.final, bb.weight, bb.bias)
        torch.testing.assert_close(batch[k], ref, rtol=0, atol=1e-6)


# ------------------------------------------------------- cost, OT, post-processing, argmax


def test_cost_marginals_one_sinkhorn_iteration_exponent_argmax():
    """SCOT's ``appearance_similarityOT`` + ``perform_sinkhorn`` (niter=1) written out:
    ``C = 1 - max(cos, 0)``, ``mu = w_s / sum w_s``, ``nu = w_t / sum w_t``,
    ``K = exp(-C / 0.05)``, from ``u = 1/N``: ``v = nu / K^T u``, ``u = mu / K v``,
    ``P = diag(u) K diag(v)``; scores ``(N P)_+^0.5``; each source row's argmax (RHM off)."""
    from scot_ot.matching import SCOT

    g = torch.Generator().manual_seed(4)
    N, M, D = 14, 11, 6
    steps = torch.tensor([0.5, 0.8, 0.9, 1.0])

    def hp(n):
        feats = F.normalize(torch.randn(n, D, generator=g), dim=1)
        boxes = _grid_boxes(n, 1, 4.0, 13.0)
        w = steps[torch.randint(0, 4, (n,), generator=g)]
        return Hyperpixels(feats, boxes, (boxes[:, :2] + boxes[:, 2:]) / 2, (1, n), (4 * n, 4), (1.0, 1.0), w, None)

    src, trg = hp(N), hp(M)
    corr = SCOT(use_cam=False, rhm=False).match_hyperpixels(src, trg)
    x, y = src.feats.double().numpy(), trg.feats.double().numpy()
    cost = 1 - np.clip(x @ y.T, 0, None)  # (N, M)
    mu = src.weights.double().numpy() / src.weights.double().sum().item()  # (N,)
    nu = trg.weights.double().numpy() / trg.weights.double().sum().item()  # (M,)
    K = np.exp(-cost / 0.05)
    u = np.full(N, 1.0 / N)
    v = nu / (K.T @ u)
    u = mu / (K @ v)
    plan = u[:, None] * K * v[None, :]
    scores = np.clip(N * plan, 0, None) ** 0.5
    np.testing.assert_allclose(corr.plan.double().numpy(), plan, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(corr.scores.double().numpy(), scores, rtol=2e-5)
    assert corr.matches.tolist() == scores.argmax(axis=1).tolist()
    assert not np.allclose(plan.sum(axis=0), nu)  # one iteration: the column marginal is not met yet

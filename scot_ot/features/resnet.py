r"""ResNet-50 / ResNet-101 backbones on torchvision's architecture.

Hyperpixel ids as in HPF/SCOT: id 0 is the output of the stem's max-pool (stride 4),
id ``k >= 1`` the k-th bottleneck counted across layer1..layer4 (ResNet-50:
3+4+6+3 = 16 bottlenecks, ids 0..16; ResNet-101: 3+4+23+3 = 33, ids 0..33).

A bottleneck computes ``y = ReLU(s)`` with the residual sum

.. math:: s = \mathrm{bn_3}(\mathrm{conv_3}(\dots)) + \mathrm{shortcut}(x), \qquad
    \mathrm{shortcut} = \mathrm{downsample}\ \text{(first block of a stage)},
    \ \text{else the identity}

and hyperpixel id ``k >= 1`` is ``s``, *before* the ReLU, as SCOT's and HPF's
hand-unrolled forward store it (``feats.append(feat.clone())`` between ``feat += res``
and the ReLU); about a third of its entries are negative. Here it is read at the FX
node ``layer{s}.{j}.add``; the ReLUs are made out-of-place so that no later node
overwrites that tensor. The final conv features (for CAM) are layer4's output, after
its last ReLU, as in SCOT.

Weights: torchvision's ``IMAGENET1K_V1`` (the ``pretrained=True`` weights SCOT used),
read from the file torchvision itself would download,
``<torch.hub.get_dir()>/checkpoints/<basename of the weights URL>`` (e.g.
``~/.cache/torch/hub/checkpoints/resnet101-63fe2227.pth``), or from ``weights=PATH``.
Nothing is downloaded. Input normalisation: ImageNet mean / std.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights, ResNet101_Weights

from .backbone import Backbone, Layer, WeightsNotFoundError, register_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET_WEIGHTS = {
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
}

# Published hyperpixel ids (SCOT, CVPR 2020, and HPF, ICCV 2019).
RESNET_PRESETS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "resnet101": {
        "pf-pascal": (2, 22, 24, 25, 27, 28, 29),
        "pf-willow": (2, 22, 24, 25, 27, 28, 29),
        "spair": (0, 19, 27, 28, 29, 30),
    },
    "resnet50": {
        "spair": (0, 11, 12, 13),
    },
}
RESNET_DEFAULT = {"resnet101": "pf-willow", "resnet50": "spair"}


def cached_weights_path(name: str) -> str:
    """Where torchvision caches the ``IMAGENET1K_V1`` weights of ``name`` (may not exist)."""
    filename = os.path.basename(urlparse(RESNET_WEIGHTS[name].url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def default_weights_path(name: str) -> str:
    """:func:`cached_weights_path` if the file exists, else ``WeightsNotFoundError``."""
    path = cached_weights_path(name)
    if not os.path.isfile(path):
        enum = type(RESNET_WEIGHTS[name]).__name__
        raise WeightsNotFoundError(
            f"{name}: no ImageNet weights available offline. Either put torchvision's file at "
            f"{path} (what torchvision.models.{name}(weights={enum}.IMAGENET1K_V1) downloads "
            f"from {RESNET_WEIGHTS[name].url}), or pass get_backbone({name!r}, weights=PATH) "
            f"with a {name} state-dict file."
        )
    return path


def resnet_backbone(name: str) -> Backbone:
    """Randomly initialised torchvision ``name`` wrapped as a :class:`Backbone`."""
    net = getattr(torchvision.models, name)(weights=None)
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # an in-place ReLU would overwrite the residual sums we return
    layers = [Layer("maxpool", (net.conv1, net.maxpool))]
    for s in range(1, 5):
        for j, block in enumerate(getattr(net, f"layer{s}")):
            # the residual sum before the block's last ReLU (SCOT's hyperpixel); torchvision's
            # v1.5 bottleneck: the stride sits on the 3x3 conv2.
            layers.append(Layer(f"layer{s}.{j}.add", (block.conv1, block.conv2, block.conv3)))
    presets = RESNET_PRESETS[name]
    return Backbone(
        name,
        net,
        layers,
        final_node="layer4",
        fc=net.fc,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_layers=presets[RESNET_DEFAULT[name]],
        layer_presets=presets,
    )


for _name in RESNET_WEIGHTS:
    register_backbone(
        _name,
        build=lambda n=_name: resnet_backbone(n),
        default_weights=lambda n=_name: default_weights_path(n),
    )
del _name

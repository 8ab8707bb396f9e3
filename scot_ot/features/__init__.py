"""Backbones: pretrained CNNs as stacks of hyperpixel layers, found by name.

Example::

    bb = get_backbone("efficientnet-lite0")            # the default; weights ship with pip
    maps, final = bb.forward_features(x01, bb.default_layers)  # x01: (B, 3, H, W) in [0, 1]
    rf = bb.receptive_field(bb.default_layers[0], x01.shape[-2:])
    centres = rf.centres(*maps[0].shape[-2:])          # (h*w, 2) as (x, y), input pixels
"""

from . import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers efficientnet-lite0/1/2)
from . import resnet as _resnet  # noqa: F401  (registers resnet50/101)
from .backbone import (
    Backbone,
    BackboneFeatures,
    CheckpointError,
    WeightsNotFoundError,
    available_backbones,
    get_backbone,
    load_checkpoint,
)
from .receptive_field import ReceptiveField

DEFAULT_BACKBONE = "efficientnet-lite0"

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneFeatures",
    "CheckpointError",
    "ReceptiveField",
    "WeightsNotFoundError",
    "available_backbones",
    "get_backbone",
    "load_checkpoint",
]

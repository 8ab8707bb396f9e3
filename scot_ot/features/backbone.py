"""A pretrained CNN seen as a stack of hyperpixel layers, and the registry of backbones.

Conventions
-----------
- Input: RGB in ``[0, 1]``, (B, 3, H, W) float. Each backbone owns its normalisation
  (:meth:`Backbone.normalize`), so callers never pass normalised images.
- Layer ("hyperpixel") ids count as in HPF/SCOT: an id names the output of one
  block; the backbone modules document which (ResNet: 0 = after the stem max-pool,
  k = k-th bottleneck's residual sum before its last ReLU, as SCOT; EfficientNet-Lite:
  k = MBConv block k, which ends without an activation).
- :meth:`Backbone.forward_features` always also returns the final conv features (for
  CAM), and computes nothing past them (no pooling, no classifier). Intermediate
  outputs are read with torchvision's ``create_feature_extractor`` (one FX graph per
  distinct set of ids, cached).
- Memory layout: weights and inputs are channels-last (NHWC), which the CPU
  convolution kernels run faster (Lite0 at 600 x 450 px: about 80 instead of 90-120
  ms here); outputs differ from NCHW by float rounding only (about 1e-6 relative).
- Geometry: :meth:`Backbone.receptive_field` walks the architecture (see
  :mod:`scot_ot.features.receptive_field` for the coordinate convention).

Weights are always read with ``torch.load(..., weights_only=True)`` and must match the
architecture exactly (``strict``); nothing is downloaded.
"""

from __future__ import annotations

import numbers
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from .receptive_field import ReceptiveField, walk_receptive_field

PathLike = Union[str, "os.PathLike[str]"]


class WeightsNotFoundError(FileNotFoundError):
    """No weights for a backbone are available offline (the message says where to put them)."""


class CheckpointError(RuntimeError):
    """A weights file cannot be read, or does not fit the architecture (names the file)."""


class Layer(NamedTuple):
    """One hyperpixel id: the FX node whose output it is, and the spatial layers
    (convolutions and pools on the main path) between the previous id and this one."""

    node: str
    spatial: Tuple[nn.Module, ...]


class BackboneFeatures(NamedTuple):
    maps: List[torch.Tensor]  # (B, C_k, H_k, W_k) per requested id, in the order given
    final: torch.Tensor  # (B, C_final, h, w), the input of global pooling + classifier


class Backbone(nn.Module):
    """A CNN classifier wrapped for hyperpixel extraction (built by :func:`get_backbone`).

    Args:
        name: registry name.
        net: the classifier network (expects normalised input).
        layers: hyperpixel id ``k`` -> :class:`Layer`.
        final_node: FX node of the final conv features (before global pooling).
        fc: the linear classifier on the pooled final features.
        mean, std: per-channel normalisation ``(x01 - mean) / std``.
        default_layers: the ids used when the caller does not choose.
        layer_presets: published / tuned id sets, by benchmark name.
        leaf_modules: module types FX must not trace into.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        layers: Sequence[Layer],
        final_node: str,
        fc: nn.Linear,
        mean: Sequence[float],
        std: Sequence[float],
        default_layers: Sequence[int],
        layer_presets: Mapping[str, Sequence[int]],
        leaf_modules: Sequence[Type[nn.Module]] = (),
    ):
        super().__init__()
        self.name = name
        self.net = net
        self._layers = tuple(layers)
        self._final_node = final_node
        self._fc = fc
        self._leaf_modules = list(leaf_modules)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.default_layers = self.check_layer_ids(default_layers)
        self.layer_presets = {k: self.check_layer_ids(v) for k, v in layer_presets.items()}
        # Plain dict, not a ModuleDict: the graphs share self.net's modules and must not
        # appear twice in state_dict(); they follow .to()/.eval() through those modules.
        self._extractors: Dict[Tuple[str, ...], nn.Module] = {}

    @property
    def n_layer_ids(self) -> int:
        """Number of hyperpixel ids; valid ids are ``0 .. n_layer_ids - 1``."""
        return len(self._layers)

    def check_layer_ids(self, layer_ids: Sequence[int]) -> Tuple[int, ...]:
        """``layer_ids`` (any iterable of integers) as a tuple of ints, or ValueError if it is not one, is
        empty or is out of range."""
        items = list(layer_ids) if isinstance(layer_ids, Iterable) and not isinstance(layer_ids, (str, bytes)) else None
        ok = items is not None and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items)
        ids = tuple(int(i) for i in items) if ok else None
        if not ids or any(i < 0 or i >= self.n_layer_ids for i in ids):
            raise ValueError(f"{self.name}: layer ids must be a non-empty subset of 0..{self.n_layer_ids - 1}, "
                             f"got {ids if ok else repr(layer_ids)}")
        return ids

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the network's input."""
        return (x01 - self.mean) / self.std

    def _extractor(self, nodes: Tuple[str, ...]) -> nn.Module:
        if nodes not in self._extractors:
            self._extractors[nodes] = create_feature_extractor(
                self.net,
                return_nodes={n: n for n in nodes},
                tracer_kwargs={"leaf_modules": self._leaf_modules},
            )
        return self._extractors[nodes]

    def forward_features(self, x01: torch.Tensor, layer_ids: Optional[Sequence[int]] = None) -> BackboneFeatures:
        """Feature maps of ``layer_ids`` (default: :attr:`default_layers`) and the final conv map.

        ``x01``: (B, 3, H, W) RGB in [0, 1]. Runs under the caller's grad mode.
        """
        if x01.dim() != 4 or x01.shape[1] != 3 or not x01.is_floating_point():
            raise ValueError(
                f"{self.name}: expected a float (B, 3, H, W) RGB batch, got {tuple(x01.shape)} {x01.dtype}"
            )
        ids = self.default_layers if layer_ids is None else self.check_layer_ids(layer_ids)
        nodes = tuple(dict.fromkeys([self._layers[i].node for i in ids] + [self._final_node]))
        x = self.normalize(x01).contiguous(memory_format=torch.channels_last)
        out = self._extractor(nodes)(x)
        return BackboneFeatures([out[self._layers[i].node] for i in ids], out[self._final_node])

    def classifier(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ImageNet classifier on pooled final features: weight (1000, C_final), bias (1000,)."""
        return self._fc.weight, self._fc.bias

    def receptive_field(self, layer_id: int, input_hw: Tuple[int, int]) -> ReceptiveField:
        """Jump, receptive-field size and cell-0 centre of ``layer_id`` for an (H, W) input."""
        (k,) = self.check_layer_ids([layer_id])
        path = [m for layer in self._layers[: k + 1] for m in layer.spatial]
        return walk_receptive_field(path, input_hw)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_layer_ids={self.n_layer_ids}, default_layers={self.default_layers}"


# ----------------------------------------------------------------------------- weights


def load_checkpoint(net: nn.Module, path: PathLike) -> None:
    """Load the state dict in ``path`` into ``net``; every key and shape must match."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"weights file not found: {path}")
    arch = type(net).__name__
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # permissions, I/O
        raise CheckpointError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many unrelated types on foreign files
        # torch's own message is not shown: for a file holding objects other than
        # tensors it advises weights_only=False, which would run code from the file
        raise CheckpointError(
            f"weights file {path} is not a state dict of the expected backbone ({arch}): torch.load "
            f"cannot read it as a file of tensors ({type(e).__name__}); give a state dict saved with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = type(state).__name__ if not isinstance(state, Mapping) else "a dict with non-tensor values"
        raise CheckpointError(
            f"weights file {path} is not a state dict of the expected backbone ({arch}): it holds {got}, "
            "not a dict of parameter name -> tensor"
        )
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"weights file {path} is not a state dict of the expected backbone ({arch}): "
                              + "; ".join(parts))
    net.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], Backbone]  # the architecture, randomly initialised
    default_weights: Callable[[], str]  # path of the pretrained weights, or WeightsNotFoundError


_REGISTRY: Dict[str, BackboneSpec] = {}


def register_backbone(name: str, build: Callable[[], Backbone], default_weights: Callable[[], str]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = BackboneSpec(build, default_weights)


def available_backbones() -> List[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_backbone(
    name: str,
    weights: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    pretrained: bool = True,
) -> Backbone:
    """The backbone ``name`` in eval mode, without gradients, on ``device``.

    ``weights``: a state-dict file to load instead of the default pretrained weights
    (which are found offline: see each backbone module). ``pretrained=False`` keeps
    the random initialisation (tests, shape checks).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backbone: unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    if weights is not None and not pretrained:
        raise ValueError("backbone: weights=PATH given with pretrained=False")
    spec = _REGISTRY[name]
    backbone = spec.build()
    if pretrained:
        load_checkpoint(backbone.net, spec.default_weights() if weights is None else weights)
    return backbone.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

"""Test helpers shared by the CLI-level test modules: one backbone load per process, small images.

``use_small_models(monkeypatch, side)`` makes :func:`scot_ot.features.get_backbone`
return a cached backbone (weights files still load fresh) and the CLI build its
models at ``side`` px, so tables of CLI cases run in seconds.
"""

from __future__ import annotations

from typing import Any, Dict

import scot_ot.cli as cli
import scot_ot.features as features

_BACKBONES: Dict[tuple, object] = {}
uncached_backbone = features.get_backbone


def cached_backbone(name, weights=None, device="cpu", pretrained=True):
    if weights is not None:
        return uncached_backbone(name, weights=weights, device=device, pretrained=pretrained)
    key = (name, str(device), pretrained)
    if key not in _BACKBONES:
        _BACKBONES[key] = uncached_backbone(name, device=device, pretrained=pretrained)
    return _BACKBONES[key]


def use_small_models(monkeypatch, side: int) -> None:
    monkeypatch.setattr(features, "get_backbone", cached_backbone)
    build = cli.build_model

    def small(args, solver):
        model = build(args, solver)
        model.image_side = side
        return model

    monkeypatch.setattr(cli, "build_model", small)


def small_scot(side: int):
    """A default :class:`scot_ot.matching.SCOT` at ``side`` px on the cached backbone."""
    from scot_ot.matching import SCOT

    features.get_backbone, saved = cached_backbone, features.get_backbone
    try:
        return SCOT(image_side=side)
    finally:
        features.get_backbone = saved


def drop_timings(obj: Any) -> Any:
    """``obj`` (a results record or part of one) without its measured times: every key ending in ``time_s``.

    Times are measurements; records made of the same work must agree on everything else.
    """
    if isinstance(obj, dict):
        return {k: drop_timings(v) for k, v in obj.items() if not k.endswith("time_s")}
    if isinstance(obj, list):
        return [drop_timings(v) for v in obj]
    return obj

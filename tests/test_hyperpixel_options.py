"""Hyperpixel options of the accuracy study's round 2 (docs/accuracy.md): per-layer
normalisation and backbone ensembles, and the command line's preset defaults.

The closed form under test: with normalisation groups ``g`` (layers, or backbones),
the hyperpixel cosine is the mean of the groups' cosines. Checked on fresh random
maps of very different magnitudes, on random-weight backbones, and with the real
Lite0 + Lite2 weights against two single-backbone models.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from scot_ot.cli import main as cli_main
from scot_ot.data import sample_pair
from scot_ot.features import get_backbone
from scot_ot.matching import SCOT
from scot_ot.matching.hyperpixels import HyperpixelExtractor, hyperpixel_features
from scot_ot.matching.scot import PRESETS, cosine_cost


def _cos(feats: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine of the rows."""
    f = F.normalize(feats, dim=1)
    return f @ f.T


def _grid_feats(m: torch.Tensor, hw) -> torch.Tensor:
    """(1, C, h, w) map on the (H, W) grid as (H * W, C) rows."""
    if m.shape[-2:] != hw:
        m = F.interpolate(m, size=hw, mode="bilinear", align_corners=True)
    return m[0].flatten(1).T


@pytest.mark.parametrize("seed", range(3))
def test_groups_make_the_cosine_the_mean_of_the_groups_cosines(seed):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed else 7)
    scales = (1e-3, 1.0, 50.0)  # very different magnitudes: joint normalisation would follow the largest
    maps = [s * torch.randn(1, c, h, w, generator=g)
            for s, c, (h, w) in zip(scales, (3, 5, 4), ((6, 8), (3, 4), (6, 8)))]
    rows = [_grid_feats(m, (6, 8)) for m in maps]
    per_layer = sum(_cos(r) for r in rows) / 3
    torch.testing.assert_close(_cos(hyperpixel_features(maps, [1, 1, 1])), per_layer, rtol=1e-5, atol=1e-5)
    two_groups = (_cos(torch.cat(rows[:2], 1)) + _cos(rows[2])) / 2
    torch.testing.assert_close(_cos(hyperpixel_features(maps, [2, 1])), two_groups, rtol=1e-5, atol=1e-5)
    one = hyperpixel_features(maps)
    torch.testing.assert_close(hyperpixel_features(maps, [3]), one)
    torch.testing.assert_close(_cos(one), _cos(torch.cat(rows, 1)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_cos(one), per_layer, atol=1e-2)  # the options really differ here


def test_groups_must_cover_the_maps():
    maps = [torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)]
    with pytest.raises(ValueError, match=r"groups: \[1, 2\] do not add up to the 2 maps"):
        hyperpixel_features(maps, [1, 2])


def test_extractor_norms_and_companions_on_random_backbones():
    """Per-layer norm and one or two companion backbones (random weights) against the closed form."""
    main = get_backbone("efficientnet-lite0", pretrained=False)
    other = get_backbone("efficientnet-lite2", pretrained=False)
    third = get_backbone("efficientnet-lite1", pretrained=False)
    img = torch.rand(3, 64, 80)
    with torch.no_grad():
        maps = main.forward_features(img[None], main.default_layers).maps
        other_maps = other.forward_features(img[None], other.default_layers).maps
        third_maps = third.forward_features(img[None], third.default_layers).maps
    hw = tuple(maps[0].shape[-2:])
    assert tuple(other_maps[0].shape[-2:]) == hw == tuple(third_maps[0].shape[-2:])  # stride 4, TF "same"
    rows = [_grid_feats(m, hw) for m in maps]
    other_rows = [_grid_feats(m, hw) for m in other_maps]
    third_rows = [_grid_feats(m, hw) for m in third_maps]

    def feats(**kw):
        return HyperpixelExtractor(main, main.default_layers, use_cam=False, **kw)(img, (1.0, 1.0)).feats

    torch.testing.assert_close(_cos(feats()), _cos(torch.cat(rows, 1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_cos(feats(norm="layer")), sum(_cos(r) for r in rows) / len(rows),
                               rtol=1e-4, atol=1e-4)
    both = (_cos(torch.cat(rows, 1)) + _cos(torch.cat(other_rows, 1))) / 2
    torch.testing.assert_close(_cos(feats(companions=[other])), both, rtol=1e-4, atol=1e-4)
    three = (_cos(torch.cat(rows, 1)) + _cos(torch.cat(other_rows, 1)) + _cos(torch.cat(third_rows, 1))) / 3
    torch.testing.assert_close(_cos(feats(companions=[other, third])), three, rtol=1e-4, atol=1e-4)
    all_layers = sum(_cos(r) for r in rows + other_rows) / (len(rows) + len(other_rows))
    torch.testing.assert_close(_cos(feats(norm="layer", companions=[other])), all_layers, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="norm: expected one of joint, layer, got 'l1'"):
        HyperpixelExtractor(main, main.default_layers, norm="l1")


def test_companion_layers_choose_each_companions_maps():
    """``companion_layers`` (round 8: ``SCOT(ensemble_layers=...)``): the chosen blocks of each companion,
    strides 8 and 32 included, resized to the first backbone's grid, against the closed form; the
    default is each companion's default layers; a wrong count or id is a ValueError naming it."""
    main = get_backbone("efficientnet-lite0", pretrained=False)
    other = get_backbone("efficientnet-lite2", pretrained=False)
    img = torch.rand(3, 64, 96)
    ids = (6, 12, 18)  # strides 8, 16 and 32 of Lite2
    with torch.no_grad():
        maps = main.forward_features(img[None], main.default_layers).maps
        other_maps = other.forward_features(img[None], ids).maps
    hw = tuple(maps[0].shape[-2:])
    assert [tuple(m.shape[-2:]) for m in other_maps] == [(8, 12), (4, 6), (2, 3)]
    want = (_cos(torch.cat([_grid_feats(m, hw) for m in maps], 1))
            + _cos(torch.cat([_grid_feats(m, hw) for m in other_maps], 1))) / 2
    ex = HyperpixelExtractor(main, main.default_layers, use_cam=False, companions=[other],
                             companion_layers=[list(ids)])
    assert ex.companion_layers == (ids,)
    torch.testing.assert_close(_cos(ex(img, (1.0, 1.0)).feats), want, rtol=1e-4, atol=1e-4)
    default = HyperpixelExtractor(main, main.default_layers, use_cam=False, companions=[other])
    assert default.companion_layers == (other.default_layers,)
    assert not torch.allclose(_cos(default(img, (1.0, 1.0)).feats), want, atol=1e-3)  # the ids matter
    with pytest.raises(ValueError, match=r"companion_layers: one id list per companion backbone \(1\), got 2"):
        HyperpixelExtractor(main, main.default_layers, companions=[other], companion_layers=[ids, ids])
    with pytest.raises(ValueError, match=r"efficientnet-lite2: layer ids must be a non-empty subset of 0..20"):
        HyperpixelExtractor(main, main.default_layers, companions=[other], companion_layers=[(3, 21)])


@pytest.fixture(scope="module")
def pretrained_models():
    return {name: SCOT(image_side=128, **kw) for name, kw in
            (("lite0", {}), ("lite2", {"backbone": "efficientnet-lite2"}),
             ("ensemble", {"ensemble": ["efficientnet-lite2"]}))}


def test_ensemble_cost_is_the_mean_of_the_two_backbones_costs(pretrained_models):
    """Real Lite0 and Lite2 weights: the ensemble's similarity is the mean of the two single
    models' on the same grid, and boxes, grid and CAM weights stay Lite0's."""
    pair = sample_pair()
    hp = {name: (m.hyperpixels(pair.src_path), m.hyperpixels(pair.trg_path))
          for name, m in pretrained_models.items()}
    sim = {name: hs.feats @ ht.feats.T for name, (hs, ht) in hp.items()}
    torch.testing.assert_close(sim["ensemble"], (sim["lite0"] + sim["lite2"]) / 2, rtol=1e-4, atol=1e-4)
    (e_src, e_trg), (l_src, _) = hp["ensemble"], hp["lite0"]
    assert e_src.grid == l_src.grid and torch.equal(e_src.boxes, l_src.boxes)
    torch.testing.assert_close(e_src.weights, l_src.weights)
    assert e_src.feats.shape[1] == l_src.feats.shape[1] + hp["lite2"][0].feats.shape[1]
    corr = pretrained_models["ensemble"].match_hyperpixels(e_src, e_trg)
    torch.testing.assert_close(corr.plan.sum(), torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    assert torch.all(cosine_cost(e_src.feats, e_trg.feats) >= 0)
    cfg = pretrained_models["ensemble"].config()
    assert cfg["ensemble"] == ["efficientnet-lite2"] and cfg["hyperpixel_norm"] == "joint"
    json.dumps(cfg)


def _model_of_command(options, tmp_path, monkeypatch) -> SCOT:
    """The model ``scot-ot match <sample pair> OPTIONS`` builds; the command is stopped before any image
    is read (Ctrl-C: exit 130, nothing written)."""
    import scot_ot.cli as cli

    seen = {}
    build = cli.build_model

    def spy(args, solver):
        seen["model"] = build(args, solver)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_model", spy)
    pair = sample_pair()
    rc = cli_main(["match", str(pair.src_path), str(pair.trg_path), *options, "--out", str(tmp_path / "m.png")])
    assert rc == 130 and list(tmp_path.iterdir()) == []
    return seen["model"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_command_line_preset_alone_reproduces_the_preset(preset, tmp_path, monkeypatch):
    """Every model option the command line leaves unset takes the preset's value, so
    ``--preset NAME`` records exactly ``SCOT.preset(NAME).config()``."""
    got = _model_of_command(["--preset", preset], tmp_path, monkeypatch).config()
    want = SCOT.preset(preset).config()
    assert got == want and got["preset"] == preset


def test_command_line_options_change_the_preset(tmp_path, monkeypatch):
    cfg = _model_of_command(["--eps", "0.1", "--hyperpixel-norm", "layer", "--cost-precision", "bfloat16",
                             "--solver", "matrix-scaling"], tmp_path, monkeypatch).config()
    assert cfg["eps"] == 0.1 and cfg["hyperpixel_norm"] == "layer" and cfg["cost_precision"] == "bfloat16"
    assert cfg["solver"] == "matrix-scaling"
    assert cfg["preset"] == "faithful (with cost_precision, eps, hyperpixel_norm, solver changed)"


def test_command_line_ensemble_layers_reach_the_model(tmp_path, monkeypatch):
    cfg = _model_of_command(["--ensemble", "efficientnet-lite1,efficientnet-lite2", "--ensemble-layers", "3,6,12/4,6",
                             "--layers", "2,4,8"], tmp_path, monkeypatch).config()
    assert cfg["layers"] == [2, 4, 8] and cfg["ensemble"] == ["efficientnet-lite1", "efficientnet-lite2"]
    assert cfg["ensemble_layers"] == [[3, 6, 12], [4, 6]]
    assert cfg["preset"] == "faithful (with ensemble, ensemble_layers, layers changed)"

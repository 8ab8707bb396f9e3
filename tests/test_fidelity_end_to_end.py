"""End to end, the defaults reproduce SCOT's official pipeline (issue: faithful SCOT).

One randomly initialised ResNet-101 state dict is loaded into ``scot_ot`` and into the
independent reference of the official rules (``tests/reference_scot.py``); on real
PF-WILLOW-dev pairs, including one whose resized size depends on truncation
(Cars_008b, 400 x 266 -> 300 x 199), the argmax matches must agree on at least 99 % of
the source hyperpixels and the transferred keypoints within 1 px.
``benchmarks/fidelity.py`` runs the same check on more pairs and records it.
"""

from pathlib import Path

import pytest
import torch

import reference_scot as ref
from scot_ot.datasets import load_pairs
from scot_ot.matching import SCOT

WILLOW_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PF-WILLOW-dev"
LAYERS = (2, 22, 24, 25, 27, 28, 29)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    net = ref.random_resnet("resnet101", seed=0)
    weights = tmp_path_factory.mktemp("weights") / "resnet101.pth"
    torch.save(net.state_dict(), weights)
    return net, SCOT(backbone="resnet101", weights=str(weights), layers=LAYERS)


@pytest.mark.slow
@pytest.mark.skipif(not WILLOW_DEV.is_dir(), reason="PF-WILLOW-dev is not beside the checkout")
@pytest.mark.parametrize("trg_name", ["Cars_008b.png", "Cars_009b.png"])
def test_defaults_reproduce_the_official_pipeline(models, trg_name):
    net, model = models
    pairs = [p for p in load_pairs("pf-willow", WILLOW_DEV).pairs
             if p.src_path.name == "Cars_006a.png" and p.trg_path.name == trg_name]
    assert len(pairs) == 1
    pair = pairs[0]
    kps = torch.as_tensor(pair.src_kps, dtype=torch.float32)
    ref_matches, ref_kps = ref.match(net, pair.src_path, pair.trg_path, LAYERS, kps)
    corr = model.match(pair.src_path, pair.trg_path)
    assert corr.matches.shape == ref_matches.shape
    agreement = float((corr.matches.cpu() == ref_matches).float().mean())
    assert agreement >= 0.99, f"argmax agreement {agreement:.3f}"
    diff = float((corr.transfer(kps) - ref_kps).norm(dim=1).max())
    assert diff <= 1.0, f"transferred keypoints differ by up to {diff:.2f} px"

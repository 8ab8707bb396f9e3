"""The bfloat16 cost (``cost_precision="bfloat16"``, docs/accuracy.md round 3).

Against the closed form: for unit rows, each entry of the bfloat16 cost lies within
``3u + 4u^2`` (``u = 2^-8``, bfloat16's unit roundoff; plus the float32 sums) of the
float64 cosine cost; checked on fresh random features, and on the real hyperpixels of
the sample pair through the pipeline.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scot_ot.data import sample_pair
from scot_ot.matching import SCOT, cosine_cost

U = 2.0 ** -8


def bound(d: int) -> float:
    """Rounded inputs and product, plus float32 sums of ``d`` terms."""
    return 3 * U + 4 * U * U + d * 2.0 ** -24


@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_cost_is_within_the_rounding_bound_of_the_float64_cost(seed):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 + seed)
    n, m, d = (int(v) for v in torch.randint(20, 300, (3,), generator=g))
    x = F.normalize(torch.randn(n, d, generator=g).relu_() + 0.01, dim=1)  # non-negative, like ReLU features
    y = F.normalize(torch.randn(m, d, generator=g), dim=1)  # signed: the clamp at 0 is exercised too
    exact = cosine_cost(x.double(), y.double())
    C = cosine_cost(x, y, "bfloat16")
    assert C.dtype == torch.float32 and C.shape == (n, m)
    assert float(C.min()) >= 0.0 and float(C.max()) <= 1.0
    err = (C.double() - exact).abs().max().item()
    assert err <= bound(d)
    assert err > 0  # it really rounded: the full-precision product is exact to ~1e-7
    assert (cosine_cost(x, y).double() - exact).abs().max().item() < 1e-5


def test_the_pipeline_uses_the_chosen_precision():
    pair = sample_pair()
    full = SCOT(image_side=200)
    half = SCOT(image_side=200, cost_precision="bfloat16")
    hs, ht = full.hyperpixels(pair.src_path), full.hyperpixels(pair.trg_path)
    t = {"cost": 0.0}
    C_full, C_half = full.cost(hs, ht, t), half.cost(hs, ht, t)
    diff = (C_full - C_half).abs().max().item()
    assert 0 < diff <= bound(hs.feats.shape[1]) + 1e-6  # + float32 rounding of the cost itself
    corr = half.match_hyperpixels(hs, ht)
    agree = (corr.matches == full.match_hyperpixels(hs, ht).matches).float().mean().item()
    assert agree > 0.9  # the same matches almost everywhere: a rounding, not another method
    assert half.config()["cost_precision"] == "bfloat16" and full.config()["cost_precision"] == "full"


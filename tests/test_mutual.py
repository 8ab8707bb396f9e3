"""The soft mutual nearest-neighbour filter (``mutual_filter=True``, docs/accuracy.md round 4).

Against the closed form ``S_ij^3 / (max_k S_ik * max_k S_kj)`` in float64 on fresh
random scores; its properties (never above the input, mutual nearest neighbours kept,
all-zero rows and columns left at 0); and through the pipeline on the sample pair.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fast_models import small_scot
from scot_ot.data import sample_pair
from scot_ot.matching.mutual import soft_mutual_filter


def closed_form(S: torch.Tensor) -> torch.Tensor:
    S = S.double()
    return S**3 / (S.amax(dim=1, keepdim=True) * S.amax(dim=0, keepdim=True))


@pytest.mark.parametrize("seed", range(3))
def test_filter_is_the_closed_form(seed):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 + seed)
    n, m = (int(v) for v in torch.randint(2, 200, (2,), generator=g))
    S = torch.rand(n, m, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,), generator=g))  # any scale
    out = soft_mutual_filter(S.clone())
    torch.testing.assert_close(out.double(), closed_form(S), rtol=1e-5, atol=1e-30)


def test_filter_works_in_place_and_keeps_mutual_nearest_neighbours():
    S = torch.tensor([[4.0, 1.0, 0.0],
                      [3.0, 2.0, 0.0],
                      [0.0, 0.0, 0.0]])  # (0, 0) is mutual; row 1's best target belongs to row 0
    out = soft_mutual_filter(S)
    assert out.data_ptr() == S.data_ptr()
    torch.testing.assert_close(out[0, 0], torch.tensor(4.0))  # its row's and column's maximum: kept
    torch.testing.assert_close(out[1], torch.tensor([27.0 / 12, 8.0 / 6, 0.0]))
    assert out[1].argmax() == 0  # 27/12 = 2.25 > 8/6: still the better target of row 1 ...
    S = torch.tensor([[4.0, 1.0], [3.0, 2.8]])  # row 1: 27/12 = 2.25 < 2.8^3 / (3 * 2.8) = 2.61
    assert S[1].argmax() == 0 and soft_mutual_filter(S)[1].argmax() == 1  # ... not once the other is close
    assert torch.equal(soft_mutual_filter(torch.zeros(3, 2)), torch.zeros(3, 2))  # no 0/0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_filter_never_raises_a_score_and_keeps_every_row_maximum_that_is_mutual(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) > 0.3)  # with zeros
    out = soft_mutual_filter(S.clone())
    assert bool((out >= 0).all()) and bool((out <= S * (1 + 1e-6)).all())
    mutual = (S == S.amax(dim=1, keepdim=True)) & (S == S.amax(dim=0, keepdim=True)) & (S > 0)
    torch.testing.assert_close(out[mutual], S[mutual])


def test_the_pipeline_filters_its_final_scores():
    model = small_scot(128)
    pair = sample_pair()
    hs, ht = model.hyperpixels(pair.src_path), model.hyperpixels(pair.trg_path)
    plain = model.match_hyperpixels(hs, ht)
    model.mutual_filter = True
    try:
        filtered = model.match_hyperpixels(hs, ht)
    finally:
        model.mutual_filter = False
    want = soft_mutual_filter(plain.scores.clone())
    torch.testing.assert_close(filtered.scores, want)
    assert torch.equal(filtered.matches, want.argmax(dim=1))
    assert not torch.equal(filtered.matches, plain.matches)  # it moves real matches
    assert torch.equal(filtered.plan, plain.plan)  # the OT plan itself is untouched


def test_mutual_filter_must_be_a_bool():
    from scot_ot.matching import SCOT

    with pytest.raises(ValueError, match="mutual_filter: expected True or False, got 1"):
        SCOT(mutual_filter=1)

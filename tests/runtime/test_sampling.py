"""Sampling (SPEC §4): greedy, top-k ties, top-p prefix and boundary, fp32, seeds, and a chi-square check."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError
from caramba.runtime.sampling import (
    SamplingError,
    apply_temperature,
    greedy,
    make_generator,
    probs_after_filters,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from tests.helpers import ALPHA, chi_square_pvalue


def test_chi_square_pvalue_rejects_a_wrong_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert chi_square_pvalue(torch.tensor([50_000, 30_000, 20_000, 0]), probs) == pytest.approx(1.0)
    assert chi_square_pvalue(torch.tensor([52_000, 29_000, 19_000, 0]), probs) < ALPHA
    with pytest.raises(AssertionError, match="outside the support"):
        chi_square_pvalue(torch.tensor([50_000, 30_000, 19_999, 1]), probs)


def _sampling(temperature=1.0, top_k=None, top_p=None) -> GenerateConfig:
    return GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p)


def _support(probs: torch.Tensor) -> list[int]:
    return torch.nonzero(probs > 0).flatten().tolist()


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_temperature_at_or_below_zero_is_argmax_and_draws_nothing(temperature):
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    g = make_generator(3)
    state = g.get_state()
    assert torch.equal(sample_next(logits, _sampling(temperature, top_k=2, top_p=0.5), g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)
    probs = probs_after_filters(logits, temperature)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 11).float())


def test_greedy_breaks_ties_to_the_lowest_id():
    assert greedy(torch.tensor([[1.0, 3.0, 3.0, 2.0]])).tolist() == [1]


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 4.0, -1.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[True, False, True, True, False], [True, True, True, False, False]]
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])
    assert _support(probs_after_filters(logits[:1], 1.0, top_k=2)[0]) == [0, 2, 3]


def test_top_k_at_least_vocab_changes_nothing():
    logits = torch.randn(3, 6)
    assert torch.equal(top_k_filter(logits, 6), logits) and torch.equal(top_k_filter(logits, 100), logits)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()[:, [2, 0, 3, 1]]  # probs 0.2, 0.5, 0.1, 0.2
    assert _support(probs_after_filters(logits, 1.0, top_p=0.6)[0]) == [0, 1]  # 0.5 + the first 0.2 by id
    assert _support(probs_after_filters(logits, 1.0, top_p=0.75)[0]) == [0, 1, 3]
    assert _support(probs_after_filters(logits, 1.0, top_p=0.95)[0]) == [0, 1, 2, 3]


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    for p in (1e-9, 0.1, 0.5):
        probs = probs_after_filters(logits, 1.0, top_p=p)
        assert probs.tolist() == [[0.0, 1.0, 0.0]]
        assert sample_next(logits, _sampling(top_p=p), make_generator(0)).tolist() == [1]


def test_top_p_boundary_is_exact():
    """A prefix whose mass equals p exactly (in the fp32 the filter computes) is enough; one ulp more needs the
    next token."""
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]])
    probs = logits.softmax(-1)[0]
    top2 = (probs[0] + probs[2]).reshape(1)  # fp32, as the filter's cumulative sum computes it
    assert _support(probs_after_filters(logits, 1.0, top_p=float(top2))[0]) == [0, 2]
    above = float(torch.nextafter(top2, torch.ones(1)))
    below = float(torch.nextafter(top2, torch.zeros(1)))
    assert _support(probs_after_filters(logits, 1.0, top_p=above)[0]) == [0, 1, 2]
    assert _support(probs_after_filters(logits, 1.0, top_p=below)[0]) == [0, 2]


def test_top_p_one_keeps_even_tokens_after_the_sum_rounds_to_one():
    logits = torch.cat([torch.tensor([[30.0]]), torch.zeros(1, 1000)], dim=1)  # tail mass ~1e-10 each
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert (probs_after_filters(logits, 1.0, top_p=1.0) > 0).all()


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = torch.tensor([[0.40, 0.35, 0.25]]).log()
    # after top-k 2: 0.533, 0.467, so p = 0.5 keeps one token; on the unfiltered probs it would keep two
    assert _support(probs_after_filters(logits, 1.0, top_k=2, top_p=0.5)[0]) == [0]
    assert _support(probs_after_filters(logits, 1.0, top_p=0.5)[0]) == [0, 1]


def test_temperature_scales_logits_and_tiny_temperature_stays_finite():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    expected = (logits / 0.5).softmax(-1)
    assert torch.allclose(probs_after_filters(logits, 0.5), expected, rtol=1e-6, atol=0)
    tiny = probs_after_filters(logits, 1e-30)
    assert tiny.tolist() == [[0.0, 0.0, 1.0]]
    assert torch.equal(apply_temperature(logits, 1e-30)[0, 2], torch.tensor(0.0))


def test_minus_inf_logits_and_rows_with_one_survivor():
    logits = torch.tensor([[-math.inf, 1.0, -math.inf, 0.5], [-math.inf, -math.inf, 3.0, -math.inf]])
    probs = probs_after_filters(logits, 0.8, top_k=3, top_p=0.9)
    assert probs[0, [0, 2]].tolist() == [0.0, 0.0] and probs[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    draws = sample_next(logits[1:].expand(200, 4), _sampling(0.8, top_k=1), make_generator(1))
    assert (draws == 2).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_filtered_in_fp32(dtype):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    probs = probs_after_filters(logits, 0.7, top_k=20, top_p=0.8)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, probs_after_filters(logits.float(), 0.7, top_k=20, top_p=0.8))


def test_any_leading_dims():
    logits = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(2))
    probs = probs_after_filters(logits, 0.9, top_k=4, top_p=0.7)
    assert probs.shape == (2, 3, 9)
    assert torch.equal(probs[1], probs_after_filters(logits[1], 0.9, top_k=4, top_p=0.7))


def test_same_seed_same_tokens():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    config = GenerateConfig(temperature=1.3, top_k=50, top_p=0.95, seed=1234)
    first = [sample_next(logits, config, make_generator(config.seed)) for _ in range(2)]
    other = sample_next(logits, config, make_generator(4321))
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)


def test_empirical_frequencies_match_probs_after_filters():
    logits = torch.tensor([[1.2, -0.3, 0.8, 2.0, 0.8, -2.0, 0.1, 1.5]])
    # top-k 4 keeps both 0.8s (ids 2 and 4); top-p 0.85 then needs 4 tokens, and of the tied pair takes id 2
    config = _sampling(temperature=0.8, top_k=4, top_p=0.85)
    probs = probs_after_filters(logits, config.temperature, config.top_k, config.top_p)[0]
    assert _support(probs) == [0, 2, 3, 7]
    n = 200_000
    draws = sample_next(logits.expand(n, -1), config, make_generator(7))
    counts = torch.bincount(draws, minlength=8)
    assert chi_square_pvalue(counts, probs) > ALPHA


def test_bad_inputs_raise():
    with pytest.raises(GenerateConfigError, match="top_p: expected a number in"):
        sample_next(torch.zeros(1, 4), SimpleNamespace(temperature=1.0, top_k=None, top_p=0.0))
    with pytest.raises(GenerateConfigError, match="top_p: expected a number in"):
        sample_next(torch.zeros(1, 4), SimpleNamespace(temperature=0.0, top_k=None, top_p=2.0))
    with pytest.raises(GenerateConfigError, match="top_k: expected an integer >= 1"):
        probs_after_filters(torch.zeros(1, 4), 1.0, top_k=0)
    with pytest.raises(SamplingError, match=r"logits must be \(B, V\)"):
        sample_next(torch.zeros(4), _sampling())
    with pytest.raises(SamplingError, match="floating-point"):
        sample_next(torch.zeros(2, 4, dtype=torch.long), _sampling())

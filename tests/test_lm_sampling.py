"""Sampling is numerically safe for every accepted temperature: the distribution is finite and sums to
1, a tiny temperature gives the argmax (its limit), a huge one tends to uniform; at ordinary settings
it equals the reference's temperature / top-k / top-p warpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lm.sampling import SamplingParams, next_token_probs, sample, token_logprobs

TINY = [5e-324, 1e-320, 1e-45, 1e-40, 7e-38, 1.2e-38, 1e-30, 1e-12]
HUGE = [1e30, 1e300, 1.7976931348623157e308]


def logits_row(seed: int, vocab: int = 1000, scale: float = 30.0) -> torch.Tensor:
    """Logits as large as real ones get (tens), so that logits / tiny would overflow float32."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.5}])
def test_a_tiny_temperature_is_the_argmax(temperature, filters):
    for seed in range(3):
        logits = logits_row(seed)
        params = SamplingParams(temperature=temperature, seed=seed, **filters)
        probs = next_token_probs(logits, params)
        assert bool(torch.isfinite(probs).all()) and float(probs.sum()) == pytest.approx(1.0)
        assert int(torch.argmax(probs)) == int(torch.argmax(logits)) and float(probs.max()) == 1.0
        generator = torch.Generator().manual_seed(seed)
        assert [sample(logits, params, generator) for _ in range(5)] == [int(torch.argmax(logits))] * 5


@pytest.mark.parametrize("temperature", HUGE)
def test_a_huge_temperature_tends_to_uniform(temperature):
    logits = logits_row(0)
    probs = next_token_probs(logits, SamplingParams(temperature=temperature))
    assert bool(torch.isfinite(probs).all())
    assert torch.allclose(probs, torch.full_like(probs, 1 / probs.numel()), rtol=1e-4)
    top = next_token_probs(logits, SamplingParams(temperature=temperature, top_k=10))
    kept = torch.topk(logits, 10).indices
    assert bool(torch.isfinite(top).all()) and torch.allclose(top[kept], torch.full((10,), 0.1))
    assert float(top.sum()) == pytest.approx(1.0)
    nucleus = next_token_probs(logits, SamplingParams(temperature=temperature, top_p=0.5))
    kept = int((nucleus > 0).sum())
    assert bool(torch.isfinite(nucleus).all()) and abs(kept - probs.numel() // 2) <= 2
    assert torch.equal(torch.sort((nucleus > 0).nonzero()[:, 0]).values,  # the best tokens, not arbitrary ones
                       torch.sort(torch.topk(logits, kept).indices).values)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 20, 1.0), (0.6, 20, 0.95), (1.0, 0, 0.8)])
def test_ordinary_settings_equal_the_reference_warpers(temperature, top_k, top_p):
    logits = logits_row(4, scale=3.0)
    scores = logits[None].clone()  # (1, vocab), what the reference's warpers take
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:  # the order transformers' generate applies them in
        scores = warper(None, scores)
    expected = torch.softmax(scores, dim=-1)[0]
    got = next_token_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(got > 0, expected > 0)  # the same tokens survive the filters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_an_error_not_a_token(bad, temperature):
    logits = logits_row(1)
    logits[7] = bad
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.05), (0.7, 0.2), (1.5, 0.5)])
def test_min_p_equals_the_reference_warper(temperature, min_p):
    from transformers import MinPLogitsWarper

    logits = logits_row(5, scale=3.0)
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    expected = torch.softmax(MinPLogitsWarper(min_p)(None, scores), dim=-1)[0]
    got = next_token_probs(logits, SamplingParams(temperature=temperature, min_p=min_p))
    assert torch.equal(got > 0, expected > 0) and 1 < int((got > 0).sum()) < logits.numel()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_the_reference_processor(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    from lm.sampling import apply_penalties

    logits = logits_row(6, vocab=50, scale=3.0)
    token_ids = [3, 7, 7, 12, 40, 3]  # prompt [3, 7, 7], output [12, 40, 3]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([token_ids]), logits[None].clone())[0]
    got = apply_penalties(logits, SamplingParams(repetition_penalty=penalty), token_ids, prompt_len=3)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits)


def test_repetition_penalty_skips_prompt_ids_past_the_vocabulary():
    """An image placeholder id beyond the vocabulary (the test VLMs: id 262,144 with 262,144 logits) has no
    logit: the penalty is the reference processor's over the other ids (it was an IndexError)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from lm.sampling import apply_penalties

    logits = logits_row(8, vocab=50, scale=3.0)
    token_ids = [3, 50, 50, 50, 7, 12]  # prompt [3, placeholders x3, 7], output [12]
    inside = [t for t in token_ids if t < 50]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([inside]), logits[None].clone())[0]
    got = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), token_ids, prompt_len=5)
    torch.testing.assert_close(got, expected)


def test_presence_and_frequency_penalties_follow_the_output_counts():
    """OpenAI's definition: logit - frequency x count - presence x (count > 0), over output tokens only."""
    from lm.sampling import apply_penalties

    logits = logits_row(7, vocab=20, scale=3.0)
    token_ids = [1, 2, 2] + [5, 5, 5, 9, 1]  # prompt, then output: 5 three times, 9 and 1 once
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, params, token_ids, prompt_len=3)
    expected = logits.clone()
    for token, count in ((5, 3), (9, 1), (1, 1)):
        expected[token] -= 0.25 * count + 0.5
    torch.testing.assert_close(got, expected)  # 2 (prompt only) and the rest unchanged
    assert params.penalized and not SamplingParams().penalized


@pytest.mark.parametrize("field,value", [("min_p", 1.5), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
                                         ("repetition_penalty", 0.0), ("min_p", float("nan"))])
def test_out_of_range_penalties_are_refused_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_an_allowed_mask_restricts_greedy_and_sampled_choices():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    allowed = torch.tensor([False, False, True, True, False])
    assert sample(logits, SamplingParams(), None, allowed) == 2  # the best allowed, not the best
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=5.0), generator, allowed) for _ in range(200)}
    assert draws == {2, 3}
    probs = next_token_probs(logits, SamplingParams(temperature=1.0), allowed)
    assert probs[[0, 1, 4]].sum() == 0 and torch.isclose(probs[2] / probs[3], torch.tensor(math.e))
    with pytest.raises(ValueError, match="allows no token"):
        sample(logits, SamplingParams(), None, torch.zeros(5, dtype=torch.bool))


def test_token_logprobs_are_the_log_softmax_with_the_best_alternatives():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    logprobs = torch.log_softmax(logits, -1)
    record = token_logprobs(logprobs, 2, 2)
    assert record.token_id == 2 and record.logprob == pytest.approx(float(logprobs[2]))
    assert [i for i, _ in record.top] == [1, 2] and record.top[0][1] == pytest.approx(float(logprobs[1]))
    assert token_logprobs(logprobs, 0, 0).top == ()
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("rows", [1, 2, 8, 9, 16, 64])
def test_greedy_and_finite_equal_torch_on_the_heads_layout(rows):
    """As the CPU head hands them out (the transpose of a (vocab, R) product), with ties, values in
    the last partial block, and rows holding a NaN, +inf or -inf: the argmax of every finite row equals
    torch's (first on ties) and exactly the rows with a non-finite value are flagged."""
    from lm.layers import linear_transposed
    from lm.sampling import greedy_and_finite

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, 16, generator=generator)  # 1000 = 15 blocks of 64 + a partial one
    weight[700] = weight[300]  # every row ties between 300 and 700 ...
    hidden = torch.randn(rows, 16, generator=generator)
    logits = linear_transposed(hidden, weight * 1e-3)  # the layout of a real head (over SMALL_WEIGHT)
    assert logits.T.is_contiguous() == (rows > 1)  # above 8 rows: the kernel's layout
    logits[:, 300] = logits[:, 700] = 10.0  # ... at its maximum: the first wins
    if rows > 1:
        logits[rows // 2, 999] = 20.0  # the maximum in the last, partial block
    logits[0, 500:600] = 3e38  # finite values whose sum overflows float32: still a finite row
    logits[0, 300] = logits[0, 700] = 3.3e38
    bad = {}
    if rows >= 8:
        bad = {1: float("nan"), 3: float("inf"), 5: float("-inf")}
        for row, value in bad.items():
            logits[row, 123] = value
    choices, finite = greedy_and_finite(logits)
    expected = torch.argmax(logits, dim=-1).tolist()
    assert finite == [row not in bad for row in range(rows)]
    assert [c for row, c in enumerate(choices) if row not in bad] == [c for row, c in enumerate(expected) if row not in bad]
    assert choices[0] == 300
    if rows > 1:
        assert choices[rows // 2] == 999


@pytest.mark.parametrize("rows", [3, 12])
def test_greedy_and_finite_on_rows_that_are_contiguous(rows):
    from lm.sampling import finite_rows, greedy_and_finite

    logits = torch.randn(rows, 500, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = float("nan")
    logits[0, :200] = -3e38  # sums to -inf, all finite
    choices, finite = greedy_and_finite(logits)
    assert finite == finite_rows(logits) == [row != 2 for row in range(rows)]
    assert [c for row, c in enumerate(choices) if row != 2] == [c for row, c in enumerate(torch.argmax(logits, -1).tolist()) if row != 2]

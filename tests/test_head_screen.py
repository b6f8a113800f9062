"""The greedy head screen (lm.head_screen): the token it picks is the float head's argmax (the first on
ties) on heads built to be hard for it: rows of very different sizes, zero rows, exact ties, near ties
and outlier activations; it screens (few candidates), refuses what it cannot decide, and the engine's
greedy answers with it equal recomputation from scratch."""

from __future__ import annotations

import gc

import pytest
import torch

from lm.engine import EngineConfig
from lm import head_screen
from lm.head_screen import SCREEN_MAX_ROWS, GreedyHeadScreen
from lm.layers import linear
from lm.models.gemma3 import Gemma3TextModel
from lm.quantize import quantize_model
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from test_engine_paged import greedy_alone, paged_engine, run, text_requests
from test_lm_engine import TILE, image_prompt, model_and_config, tiny_config  # noqa: F401 - fixture


def hard_head(vocab: int, hidden: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Rows scaled over four orders of magnitude, a few zero rows and heavy-tailed columns."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator)
    weight *= torch.logspace(-2, 2, vocab)[torch.randperm(vocab, generator=generator)][:, None] ** 0.5
    weight[:, :3] *= 20  # columns that outlier channels of x multiply
    weight[torch.randint(0, vocab, (5,), generator=generator)] = 0
    return weight.to(dtype)


def hidden_states(rows: int, hidden: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator)
    x[:, 0] *= 60  # an outlier channel, as Gemma's final hidden states have
    return x.to(dtype)


def crowded_head(weight: torch.Tensor, x: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """`weight` with `rows` random rows projected so that their logits for x (1, hidden) lie within 1e-3
    of each other, above every other row's: the int8 estimates of those rows are ordered by their
    rounding errors, not by their logits, so only a sound bound keeps the true winner a candidate."""
    generator = torch.Generator().manual_seed(seed)
    weight = weight.clone()
    direction = x[0] / x[0].dot(x[0])
    picked = torch.randperm(weight.shape[0], generator=generator)[:rows]
    targets = float((weight @ x[0]).max()) + 1 + 1e-3 * torch.rand(rows, generator=generator)
    weight[picked] += (targets - weight[picked] @ x[0])[:, None] * direction
    return weight


def full_argmax(x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    return torch.argmax(linear(x, weight).float(), dim=-1).tolist()


@pytest.mark.parametrize("seed", range(6))
def test_the_screen_picks_the_full_heads_argmax(seed):
    weight = hard_head(5000, 64, seed)
    screen = GreedyHeadScreen(weight)
    for rows in (1, 3, SCREEN_MAX_ROWS):
        x = hidden_states(rows, 64, 100 * seed + rows)
        assert screen.argmax(x) == full_argmax(x, weight)


def test_both_product_kernels_give_the_screen_the_same_candidates():
    """The screen's int32 sums come from lm.matvec.int8_products up to `products_rows` rows (measured at
    build: which is faster here) and from torch._int_mm above; both are exact, so every row count
    gives the same candidates whichever kernel the measurement chose."""
    weight = hard_head(5000, 64, 11)
    screen = GreedyHeadScreen(weight)
    assert 0 <= screen.products_rows <= SCREEN_MAX_ROWS
    x = hidden_states(5, 64, 12)
    found = {}
    for rows in (0, SCREEN_MAX_ROWS):
        screen.products_rows = rows
        found[rows] = [candidates.tolist() for candidates in screen.candidates(x)]
    assert found[0] == found[SCREEN_MAX_ROWS] and screen.argmax(x) == full_argmax(x, weight)


@pytest.mark.parametrize("seed", range(4))
def test_the_screen_finds_the_winner_among_rows_its_estimates_cannot_order(seed):
    x = hidden_states(1, 64, seed)
    weight = crowded_head(hard_head(5000, 64, seed), x, 300, seed)
    assert GreedyHeadScreen(weight).argmax(x) == full_argmax(x, weight)


def test_exact_ties_go_to_the_first_row_and_near_ties_are_decided_by_the_float_head():
    weight = hard_head(5000, 64, 7)
    x = hidden_states(1, 64, 8)
    winner = full_argmax(x, weight)[0]
    tied = weight.clone()
    tied[17] = tied[winner]  # an identical row before the winner: torch.argmax takes the first
    tied[4000] = tied[winner]
    assert GreedyHeadScreen(tied).argmax(x) == full_argmax(x, tied) == [min(17, winner)]
    near = weight.clone()
    near[17] = near[winner] * (1 - 1e-4)  # ~800 fp32 steps below: inside every int8 bound
    near[4001] = near[winner] * (1 + 1e-4)
    assert GreedyHeadScreen(near).argmax(x) == full_argmax(x, near) == [4001]


def test_a_bf16_heads_pick_has_the_largest_bf16_logit():
    """In bf16 many logits round to the same value; the pick must be the first of the largest."""
    weight = hard_head(5000, 64, 9, torch.bfloat16)
    screen = GreedyHeadScreen(weight)
    for seed in range(10):
        x = hidden_states(2, 64, seed, torch.bfloat16)
        logits = linear(x, weight).float()
        for row, token in enumerate(screen.argmax(x)):
            assert logits[row, token] == logits[row].max()


def test_the_screen_screens_out_nearly_every_row():
    """Without the screen ruling rows out, `argmax` would only be the full head, slower."""
    weight = hard_head(20000, 64, 3)
    screen = GreedyHeadScreen(weight)
    x = hidden_states(4, 64, 4)
    for candidates in screen.candidates(x):
        assert 1 <= len(candidates) < 200  # of 20,000


def test_what_the_screen_cannot_decide_goes_back_to_the_full_head():
    weight = hard_head(5000, 64, 5)
    screen = GreedyHeadScreen(weight)
    x = hidden_states(2, 64, 6)
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 5] = value
        assert screen.argmax(bad) is None  # the full head reports the non-finite logits
    assert screen.argmax(torch.zeros(1, 64)) is None  # every row ties at 0: all would be candidates
    assert screen.argmax(hidden_states(SCREEN_MAX_ROWS + 1, 64, 1)) is None
    with pytest.raises(ValueError, match="not finite"):
        GreedyHeadScreen(torch.full((4, 8), float("inf")))



def test_no_screen_where_the_int8_product_is_wrong(monkeypatch, model_and_config):
    """torch._int_mm gives garbage at an inner size of 1 (PyTorch 2.13, CPU): the screen checks the
    product at its own size before trusting it."""
    exact = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: exact(a, b) + 1)  # off by one everywhere
    with pytest.raises(ValueError, match="not exact"):
        GreedyHeadScreen(hard_head(500, 64, 1))
    assert GreedyHeadScreen.for_model(model_and_config[0], force=True) is None


def test_a_row_with_too_many_candidates_sends_the_step_to_the_full_head():
    """Half the head is one repeated row: for a state that favours it, every copy ties for the largest
    logit (far more candidates than the screen takes); another state of the batch is screened, but the
    step goes to the full head (one call for all rows costs about what one row's does)."""
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(4000, 64, generator=generator) * 0.1
    direction = torch.randn(64, generator=generator)
    weight[2000:] = direction
    x = torch.stack([direction * 3, -direction * 3]) + 0.1 * torch.randn(2, 64, generator=generator)
    screen = GreedyHeadScreen(weight)
    found = screen.candidates(x)
    assert found[0] is None and found[1] is not None and len(found[1]) < 500
    assert screen.argmax(x) is None and screen.argmax(x[1:]) == full_argmax(x[1:], weight)


def test_the_engine_backs_off_a_screen_that_cannot_decide(model_and_config):
    """After a step the screen could not decide, it sits out 1, then 2, 4 ... steps (each failure costs the
    screen and the full head), and one success resets the back-off."""
    model, config = model_and_config
    runner = paged_engine(model, config, greedy_head_screen=True).runner
    answers = iter([None] * 4 + [[5]] * 3)
    calls = []
    runner.screen.argmax = lambda hidden: calls.append(len(calls)) or next(answers)
    hidden = torch.randn(1, config.hidden_size)
    tried = []
    for _ in range(20):
        before = len(calls)
        runner.greedy(hidden)
        tried.append(len(calls) > before)
    # fail, skip 1, fail, skip 2, fail, skip 4, fail, skip 8, then three successes in a row
    assert tried == [True, False, True, False, False, True] + [False] * 4 + [True] + [False] * 8 + [True]
    assert runner.greedy(hidden) == [5] and runner.greedy(hidden) == [5]  # reset: tried every step


def test_tiny_states_go_to_the_full_head():
    """Below 1e-30 the fp32 scales of the bound lose precision (subnormals): the full head decides."""
    screen = GreedyHeadScreen(hard_head(3000, 64, 14))
    assert screen.argmax(hidden_states(1, 64, 15) * 1e-32) is None
    assert screen.argmax(hidden_states(1, 64, 15) * 1e-20) == full_argmax(hidden_states(1, 64, 15) * 1e-20,
                                                                           screen.weight)


def test_a_head_changed_after_the_engine_started_is_read_in_full(model_and_config):
    """The screen's int8 copy does not follow the head: an in-place change or a replaced weight must
    send greedy tokens to the full head (else they would come from neither head)."""
    base_model, config = model_and_config
    for change in ("in place", "replaced"):
        model = Gemma3TextModel(config).eval()
        model.load_state_dict(base_model.state_dict())
        engine = paged_engine(model, config, greedy_head_screen=True)
        requests = text_requests(3, new_tokens=12)
        run(engine, requests[:1])
        with torch.no_grad():
            if change == "in place":
                model.embed_tokens.weight[40:80] *= 3
            else:
                model.embed_tokens.weight = torch.nn.Parameter(model.embed_tokens.weight * -1)
        assert engine.runner.greedy(torch.randn(1, config.hidden_size)) is None
        handles = run(engine, requests[1:])
        for request, handle in zip(requests[1:], handles):
            assert handle.result().token_ids == greedy_alone(model, config, request), (change, request.request_id)


def test_engines_of_one_head_share_its_screen_until_it_changes(model_and_config):
    base_model, config = model_and_config
    model = Gemma3TextModel(config).eval()
    model.load_state_dict(base_model.state_dict())
    first = paged_engine(model, config, greedy_head_screen=True).runner.screen
    assert paged_engine(model, config, greedy_head_screen=True).runner.screen is first  # built once
    with torch.no_grad():
        model.embed_tokens.weight[3] += 1
    rebuilt = paged_engine(model, config, greedy_head_screen=True).runner.screen
    assert rebuilt is not first and first.stale and not rebuilt.stale
    entries = len(head_screen._SCREENS)
    del first, rebuilt
    gc.collect()
    assert len(head_screen._SCREENS) < entries  # no engine holds them: the shared entries go


def test_a_screen_that_raises_is_dropped_and_the_step_still_samples(model_and_config):
    base_model, config = model_and_config
    model = Gemma3TextModel(config).eval()  # a head of its own: screens are shared per head
    model.load_state_dict(base_model.state_dict())
    engine = paged_engine(model, config, greedy_head_screen=True)

    def broken(hidden):
        raise RuntimeError("int8 product unavailable")

    engine.runner.screen.argmax = broken
    request = text_requests(1, new_tokens=6)[0]
    (handle,) = run(engine, [request])
    assert handle.result().token_ids == greedy_alone(model, config, request) and engine.runner.screen is None


def test_only_float_cpu_heads_without_softcapping_get_a_screen(model_and_config):
    model, config = model_and_config
    assert GreedyHeadScreen.for_model(model) is None  # a tiny head: under MIN_SCREEN_BYTES
    assert GreedyHeadScreen.for_model(model, force=True) is not None
    capped = Gemma3TextModel(tiny_config(final_logit_softcapping=30.0))
    assert GreedyHeadScreen.for_model(capped, force=True) is None
    quantized = Gemma3TextModel(config)
    quantized.load_state_dict(model.state_dict())
    quantize_model(quantized, "int8")
    assert GreedyHeadScreen.for_model(quantized, force=True) is None


def test_engine_greedy_answers_with_the_screen_equal_recompute(model_and_config):
    """Text requests batched with image requests, a budget that forces preemption; the screen must
    decide the tokens (the full head is never computed for these greedy requests)."""
    model, config = model_and_config
    engine = paged_engine(model, config, blocks=40, max_batch=6, greedy_head_screen=True)
    assert engine.runner.screen is not None
    full_head_calls = []
    original = engine.runner.logits
    engine.runner.logits = lambda hidden: full_head_calls.append(hidden.shape[0]) or original(hidden)
    ids, mask = image_prompt([1, 2])
    soft = torch.randn(3, TILE, config.hidden_size, generator=torch.Generator().manual_seed(3))
    requests = text_requests(4, new_tokens=24) + [
        GenerationRequest(ids, SamplingParams(max_new_tokens=16), soft_tokens=soft, image_mask=torch.tensor(mask),
                          request_id="image")]
    handles = run(engine, requests)
    assert engine.stats().preemptions > 0
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request), request.request_id
    assert not full_head_calls


def test_requests_that_need_logits_still_get_the_full_head(model_and_config):
    model, config = model_and_config
    engine = paged_engine(model, config, greedy_head_screen=True)
    full_head_calls = []
    original = engine.runner.logits
    engine.runner.logits = lambda hidden: full_head_calls.append(hidden.shape[0]) or original(hidden)
    (greedy,) = run(engine, text_requests(1, new_tokens=4))
    assert not full_head_calls
    request = GenerationRequest(text_requests(1)[0].prompt_ids, SamplingParams(max_new_tokens=4, logprobs=2))
    (handle,) = run(engine, [request])
    assert len(full_head_calls) == 4 and handle.result().token_ids == greedy.result().token_ids
    assert EngineConfig().greedy_head_screen is None  # on by default for heads of 8 MiB and more

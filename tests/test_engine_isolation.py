"""No request can poison or take down another in the engine: non-finite soft tokens are refused with
their position, freed KV blocks never leak into the requests that reuse them (even NaN ones), tiny
temperatures decode as greedy, and a failure in one row of a batch (sampling, stop handling,
detokenising) ends that request alone while the others finish exactly as they would alone."""

from __future__ import annotations

import pytest
import torch

import lm.engine.engine
from lm.engine import Engine, EngineConfig
from lm.requests import GenerationRequest, InvalidRequest
from lm.sampling import SamplingParams
from lm.sequence import Sequence
from lm.tokenizer import IncrementalDecoder
from test_lm_engine import (  # noqa: F401 - model_and_config is a fixture shared with the engine tests
    TILE, CharTokenizer, image_prompt, make_engine, model_and_config, prompt_of, reference_greedy,
)


def image_request(tiles: int, soft_tokens: torch.Tensor, new_tokens: int = 4) -> GenerationRequest:
    ids, mask = image_prompt([tiles])
    return GenerationRequest(ids, SamplingParams(max_new_tokens=new_tokens), soft_tokens=soft_tokens,
                             image_mask=torch.tensor(mask))


def small_soft_tokens(tiles: int, hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tiles, TILE, hidden, generator=torch.Generator().manual_seed(seed)) * 0.05


# ----- non-finite soft tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_soft_tokens_are_refused_naming_the_first_position(model_and_config, value, shown):
    model, config = model_and_config
    soft = small_soft_tokens(2, config.hidden_size)
    soft[1, 2, 7] = value
    soft[1, 3, 0] = value  # a later one: the first in row-major order is named
    engine = make_engine(model, config)
    with pytest.raises(InvalidRequest) as error:
        engine.submit(image_request(2, soft))
    assert f"non-finite value ({shown}) at tile 1, token 2, channel 7" in str(error.value)
    assert engine.stats().waiting == 0  # refused before it was queued


def test_soft_tokens_that_overflow_the_engine_dtype_are_refused(model_and_config):
    model, config = model_and_config
    soft = small_soft_tokens(1, config.hidden_size)
    soft[0, 1, 2] = 1e5  # finite in float32, beyond float16's largest value (65504)
    engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24), dtype=torch.float16)
    with pytest.raises(InvalidRequest, match=r"\(inf\) at tile 0, token 1, channel 2 \(as float16\)"):
        engine.submit(image_request(1, soft))


# ----- a poisoned slot never leaks into its next tenant --------------------------------------------


def blocks_holding_nan(engine) -> set[int]:
    """Block ids whose storage holds a NaN in any layer."""
    found = set()
    for tensor in engine.storage.keys + engine.storage.values:  # (blocks, block_size, kv, head_dim)
        found |= set(torch.isnan(tensor).flatten(1).any(dim=1).nonzero().flatten().tolist())
    return found


def run_recording_blocks(engine, handles) -> set[int]:
    """Step until `handles` are done; return every block id their requests held."""
    used = set()
    while not all(h.done for h in handles):
        engine.step()
        engine.check_blocks()
        for sequence in engine.scheduler.running:
            used |= {b for table in sequence.block_tables for b in table if b is not None}
    return used


def test_a_nan_request_that_bypassed_validation_does_not_poison_the_blocks_it_leaves(model_and_config, monkeypatch):
    """Soft tokens with a NaN are forced into the cache through a test hook (validation bypassed): that
    request ends in error (its logits are NaN) and leaves NaN in the blocks it freed (they are not
    zeroed); the next request, given those very blocks (the budget holds only a few), answers exactly as
    on a fresh engine: attention reads only positions a request has written itself."""
    model, config = model_and_config
    engine = make_engine(model, config, max_batch=1, kv_budget_bytes=small_budget(engine_of(model, config), 30))
    monkeypatch.setattr(lm.engine.engine, "non_finite_soft_token", lambda soft_tokens: None)
    soft = small_soft_tokens(2, config.hidden_size)
    soft[0, 1, 3] = float("nan")
    poisoned = engine.generate(image_request(2, soft))
    assert poisoned.finish_reason == "error" and "not finite" in poisoned.error
    monkeypatch.undo()
    poisoned_blocks = blocks_holding_nan(engine)
    assert poisoned_blocks, "the poisoned request left no NaN behind: the test proves nothing"
    prompt = prompt_of(40, 5)
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=12)))
    used = run_recording_blocks(engine, [handle])
    assert used & poisoned_blocks, "the next request got none of the poisoned blocks: the test proves nothing"
    after = handle.result()
    fresh = make_engine(model, config, max_batch=1).generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=12)))
    assert after.finish_reason == fresh.finish_reason == "length"
    assert after.token_ids == fresh.token_ids == reference_greedy(model, config, prompt, 12)


def test_nan_left_in_freed_blocks_never_reaches_the_requests_that_reuse_them(model_and_config):
    """A long request's blocks are filled with NaN while it decodes (as a poisoned request would leave
    them), then it is cancelled: a short request decoding beside it and a longer one admitted into its
    freed blocks both answer as they would alone."""
    model, config = model_and_config
    engine = make_engine(model, config, max_batch=3, kv_budget_bytes=small_budget(engine_of(model, config), 24))
    long_prompt, short_prompt, longer_prompt = prompt_of(60, 1), prompt_of(5, 2), prompt_of(70, 3)
    doomed = engine.submit(GenerationRequest(long_prompt, SamplingParams(max_new_tokens=30), request_id="doomed"))
    short = engine.submit(GenerationRequest(short_prompt, SamplingParams(max_new_tokens=40), request_id="short"))
    while any(s.prefilling for s in engine.scheduler.running) or engine.stats().running < 2:
        engine.step()
    doomed_sequence = next(s for s in engine.scheduler.running if s.request.request_id == "doomed")
    doomed_blocks = {b for table in doomed_sequence.block_tables for b in table if b is not None}
    for tensor in engine.storage.keys + engine.storage.values:
        tensor[sorted(doomed_blocks)] = float("nan")
    doomed.cancel()
    engine.step()
    assert doomed.result().finish_reason == "cancelled"
    longer = engine.submit(GenerationRequest(longer_prompt, SamplingParams(max_new_tokens=10)))
    used = run_recording_blocks(engine, [short, longer])
    assert used & doomed_blocks, "no request reused the NaN blocks: the test proves nothing"
    assert short.result().token_ids == reference_greedy(model, config, short_prompt, 40)
    assert longer.result().token_ids == reference_greedy(model, config, longer_prompt, 10)


def test_unwritten_cells_full_of_nan_are_never_read(model_and_config):
    """Every cell of a fresh cache is NaN (as garbage left by any earlier tenant may be): requests of
    different lengths decoding together, whose last blocks are partly unwritten (and padded to each
    other's width in one attention call), answer exactly as recomputation does."""
    model, config = model_and_config
    engine = make_engine(model, config, max_batch=4, block_size=4)
    for tensor in engine.storage.keys + engine.storage.values:
        tensor.fill_(float("nan"))
    prompts = [prompt_of(n, seed) for seed, n in enumerate((5, 9, 14, 30))]
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=11))) for p in prompts]
    while not all(h.done for h in handles):
        engine.step()
    for prompt, handle in zip(prompts, handles):
        assert handle.result().token_ids == reference_greedy(model, config, prompt, 11)


def test_a_padded_decode_batch_never_meets_nan_left_in_its_blocks(model_and_config):
    """In bfloat16 the cache is gathered (not read in place): decode rows of different lengths share a
    padded call that reads the masked tails of their last blocks. A cache full of NaN gives the same
    tokens as a fresh one: blocks are zeroed when allocated there (a float32 CPU cache, read exactly,
    skips that)."""
    import copy

    model, config = model_and_config
    model = copy.deepcopy(model).to(torch.bfloat16)
    prompts = [prompt_of(n, seed) for seed, n in enumerate((5, 9, 14, 30))]

    def answers(poisoned: bool) -> list[list[int]]:
        engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=4,
                                                    block_size=4, stop_token_ids=()), dtype=torch.bfloat16)
        assert engine.runner.reads_unwritten_cells
        for tensor in engine.storage.keys + engine.storage.values:
            tensor.fill_(float("nan") if poisoned else 0.0)
        handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=11))) for p in prompts]
        while not all(h.done for h in handles):
            engine.step()
        return [h.result().token_ids for h in handles]

    assert answers(poisoned=True) == answers(poisoned=False)


def engine_of(model, config):
    return make_engine(model, config)


def small_budget(engine, blocks: int) -> int:
    """A KV budget of `blocks` blocks of `engine`'s layout."""
    return blocks * engine.layout.block_bytes(engine.config, engine.dtype)


# ----- tiny temperatures -----------------------------------------------------------------------------


def test_tiny_temperatures_decode_the_greedy_answer_beside_a_greedy_request(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config)
    prompt = prompt_of(9, 7)
    temperatures = [1e-40, 7e-38, 1e-30, 1e-300, 5e-324]
    handles = [engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=15, temperature=t, seed=i)))
               for i, t in enumerate(temperatures)]
    greedy = engine.submit(GenerationRequest(prompt_of(6, 8), SamplingParams(max_new_tokens=15)))
    while not all(h.done for h in handles + [greedy]):
        engine.step()
    expected = reference_greedy(model, config, prompt, 15)
    for t, handle in zip(temperatures, handles):
        assert (handle.result().finish_reason, handle.result().token_ids) == ("length", expected), t
    assert greedy.result().token_ids == reference_greedy(model, config, prompt_of(6, 8), 15)


# ----- a failure in one row fails that row only -------------------------------------------------------


class FaultyDecoders(CharTokenizer):
    """CharTokenizer whose decoder for the `faulty`-th request created fails at `push` (after `after`
    tokens) or at `flush`."""

    def __init__(self, faulty: int | None = None, where: str = "push", after: int = 3):
        self.created, self.faulty, self.where, self.after = 0, faulty, where, after

    def incremental_decoder(self):
        decoder = IncrementalDecoder(self)
        index, self.created = self.created, self.created + 1
        if index != self.faulty:
            return decoder
        pushes = []

        def push(token_id):
            pushes.append(token_id)
            if self.where == "push" and len(pushes) > self.after:
                raise UnicodeError("injected detokeniser failure")
            return IncrementalDecoder.push(decoder, token_id)

        def flush():
            raise UnicodeError("injected detokeniser failure at the end")

        decoder.push = push
        if self.where == "flush":
            decoder.flush = flush
        return decoder


FAULTY_SEED = 666


def batch_requests(all_greedy: bool) -> list[GenerationRequest]:
    sampled = dict(temperature=0.9) if not all_greedy else {}
    return [
        GenerationRequest(prompt_of(6, 1), SamplingParams(max_new_tokens=12), request_id="a"),
        GenerationRequest(prompt_of(8, 2), SamplingParams(max_new_tokens=12, seed=FAULTY_SEED, **sampled),
                          request_id="faulty"),
        GenerationRequest(prompt_of(9, 3), SamplingParams(max_new_tokens=14, seed=5, **sampled), request_id="c"),
        GenerationRequest(prompt_of(12, 4), SamplingParams(max_new_tokens=10), request_id="d"),
    ]


BATCH_SETTINGS = EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=8, prefill_chunk=64,
                              stop_token_ids=())


@pytest.fixture(scope="module")
def solo_results(model_and_config):
    """Each healthy request of `batch_requests(all_greedy)` run alone on a fresh engine."""
    model, config = model_and_config
    return {
        all_greedy: {
            r.request_id: Engine(model, config, BATCH_SETTINGS, tokenizer=CharTokenizer()).generate(r)
            for r in batch_requests(all_greedy) if r.request_id != "faulty"
        }
        for all_greedy in (False, True)
    }


@pytest.mark.parametrize("fault,all_greedy", [
    ("sampling", False), ("sampling_first_token", False), ("stop_handling", True), ("detokenising", False),
    ("flush", True),
])
def test_a_failure_in_one_row_fails_that_request_only(model_and_config, solo_results, monkeypatch, fault,
                                                      all_greedy):
    model, config = model_and_config
    alone = solo_results[all_greedy]
    tokenizer = FaultyDecoders(faulty=1 if fault in ("detokenising", "flush") else None,
                               where="flush" if fault == "flush" else "push")
    if fault.startswith("sampling"):
        real_sample, calls = lm.engine.engine.sample, []

        def sample(logits, params, generator, *rest):
            if params.seed == FAULTY_SEED:
                calls.append(1)
                if fault == "sampling_first_token" or len(calls) > 3:
                    raise RuntimeError("injected sampling failure")
            return real_sample(logits, params, generator, *rest)

        monkeypatch.setattr(lm.engine.engine, "sample", sample)
    if fault == "stop_handling":
        real_append = Sequence.append

        def append(self, token_id, *rest):
            if self.request.request_id == "faulty" and len(self.generated) >= 3:
                raise RuntimeError("injected stop-handling failure")
            return real_append(self, token_id, *rest)

        monkeypatch.setattr(Sequence, "append", append)

    engine = Engine(model, config, BATCH_SETTINGS, tokenizer=tokenizer)
    handles = {r.request_id: engine.submit(r) for r in batch_requests(all_greedy)}
    running = []
    while not all(h.done for h in handles.values()):
        engine.step()  # never raises: the failure stays inside its row
        running.append(engine.stats().running)
    assert max(running) >= 3  # the requests really decoded together

    faulty = handles.pop("faulty").result()
    assert faulty.finish_reason == "error" and "injected" in faulty.error
    for request_id, handle in handles.items():
        result, expected = handle.result(), alone[request_id]
        assert (result.finish_reason, result.token_ids, result.text) == \
            (expected.finish_reason, expected.token_ids, expected.text), request_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_logits_end_the_request_with_a_hint_in_float16(model_and_config, dtype, monkeypatch, caplog):
    """Logits that are not finite end the request with a warning, not a traceback; in a float16 engine the
    error says what usually causes it there (activations past float16's range: Gemma 3 in float16)."""
    import copy

    model, config = model_and_config
    model = copy.deepcopy(model).to(dtype)
    engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, stop_token_ids=()),
                    dtype=dtype)
    monkeypatch.setattr(engine.runner, "greedy", lambda hidden: None)
    monkeypatch.setattr(engine.runner, "logits", lambda hidden: torch.full((hidden.shape[0], config.vocab_size),
                                                                           float("inf")))
    with caplog.at_level("WARNING"):
        result = engine.generate(GenerationRequest(prompt_of(10, 1), SamplingParams(max_new_tokens=2)))
    assert result.finish_reason == "error" and "not finite" in result.error
    assert ("run it in bfloat16" in result.error) == (dtype == torch.float16)
    assert "Traceback" not in caplog.text and all(record.exc_info is None for record in caplog.records)


def test_a_kv_budget_the_machine_cannot_allocate_is_a_value_error_naming_it(model_and_config):
    model, config = model_and_config
    with pytest.raises(ValueError, match=r"the KV budget of 1,048,576,000 MiB could not be allocated on cpu: lower it"):
        Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1000 << 40, stop_token_ids=()))

"""Engine behaviour on a tiny random decoder: cache vs recompute, batching, chunking, images,
sampling, stopping, streaming, cancellation, limits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from lm.attention import FullAttention, tile_ids_from_mask
from lm.models.gemma3 import Gemma3DecoderConfig
from lm.engine import Engine, EngineConfig
from lm.models.gemma3 import Gemma3TextModel
from lm.requests import EngineOverloaded, GenerationRequest, InvalidRequest, PromptTooLong
from lm.sampling import SamplingParams
from lm.tokenizer import IncrementalDecoder

TILE = 4  # tokens per image tile in the tiny config
IMAGE_ID = 90


def tiny_config(**overrides) -> Gemma3DecoderConfig:
    fields = dict(
        model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, max_position_embeddings=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3,
        eos_token_id=1, final_logit_softcapping=None,
    )
    fields.update(overrides)
    return Gemma3DecoderConfig.from_dict({"model_type": "gemma3", "mm_tokens_per_image": TILE,
                                 "image_token_index": IMAGE_ID, "text_config": fields})


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config()
    torch.manual_seed(0)
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in name else 0.2)
    return model, config


def make_engine(model, config, **overrides) -> Engine:
    settings = dict(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=8, prefill_chunk=16,
                    stop_token_ids=())
    settings.update(overrides)
    return Engine(model, config, EngineConfig(**settings))


@torch.inference_mode()
def reference_greedy(model, config, prompt, new_tokens, soft_tokens=None, image_mask=None):
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    ids = list(prompt)
    mask = None if image_mask is None else torch.tensor(image_mask)
    for _ in range(new_tokens):
        seq = torch.tensor(ids)[None]
        positions = torch.arange(len(ids))[None]
        full_mask = None
        tiles = None
        if mask is not None:
            full_mask = torch.cat([mask, torch.zeros(len(ids) - len(mask), dtype=torch.bool)])[None]
            tiles = tile_ids_from_mask(full_mask, config.mm_tokens_per_image)
        hidden = model(seq, positions, FullAttention(config, positions, tiles), soft_tokens=soft_tokens,
                       image_mask=full_mask)
        ids.append(int(torch.argmax(model.logits(hidden[:, -1]))))
    return ids[len(prompt):]


def prompt_of(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 80, (length - 1,), generator=generator).tolist()


@pytest.mark.parametrize("prompt_len,new_tokens", [(5, 20), (30, 25), (40, 40)])
def test_cached_decoding_equals_recompute(model_and_config, prompt_len, new_tokens):
    # window 8, chunk 16: prompts longer than the window and than a chunk, generation crossing the window
    model, config = model_and_config
    prompt = prompt_of(prompt_len, prompt_len)
    engine = make_engine(model, config)
    result = engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=new_tokens)))
    assert result.token_ids == reference_greedy(model, config, prompt, new_tokens)
    assert result.finish_reason == "length"


def test_batch_of_eight_matches_each_alone(model_and_config):
    model, config = model_and_config
    prompts = [prompt_of(3 + 5 * i, 100 + i) for i in range(8)]
    lengths = [12 + 3 * i for i in range(8)]
    alone = []
    for prompt, n in zip(prompts, lengths):
        engine = make_engine(model, config)
        alone.append(engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=n))).token_ids)
    engine = make_engine(model, config)
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=n))) for p, n in zip(prompts, lengths)]
    batch_sizes = []
    while not all(h.done for h in handles):
        engine.step()
        batch_sizes.append(engine.stats().running)
    assert max(batch_sizes) >= 6  # the requests really decoded together
    assert [h.result().token_ids for h in handles] == alone


def image_prompt(tiles_per_image: list[int]) -> tuple[list[int], list[bool]]:
    ids, mask = [2, 10, 11], [False] * 3
    for tiles in tiles_per_image:
        for _ in range(tiles):
            ids += [12] + [IMAGE_ID] * TILE + [13]
            mask += [False] + [True] * TILE + [False]
        ids += [14, 15]
        mask += [False, False]
    return ids, mask


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_images_match_recompute_and_tiles_are_never_split(model_and_config, chunk):
    model, config = model_and_config
    ids, mask = image_prompt([1, 3])
    soft = torch.randn(4, TILE, config.hidden_size, generator=torch.Generator().manual_seed(7))
    engine = make_engine(model, config, prefill_chunk=chunk)
    chunks = []
    original = engine.model.forward

    def spy(input_ids, positions, attention, soft_tokens=None, image_mask=None):
        if input_ids.shape[1] > 1 or image_mask is not None:
            chunks.append((int(positions[0, 0]), int(positions[0, -1]) + 1))
        return original(input_ids, positions, attention, soft_tokens=soft_tokens, image_mask=image_mask)

    engine.model.forward = spy
    try:
        result = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=12), soft_tokens=soft,
                                                   image_mask=torch.tensor(mask)))
    finally:
        del engine.model.forward
    assert result.token_ids == reference_greedy(model, config, ids, 12, soft, mask)
    boundaries = {end for _, end in chunks}
    for pos in range(len(ids)):
        if mask[pos] and pos + 1 < len(ids) and mask[pos + 1]:
            assert pos + 1 not in boundaries, f"a chunk ended inside a tile at {pos + 1}"


def test_short_prompts_share_one_steps_prefill_budget(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config, prefill_chunk=16)
    prompts = [prompt_of(5, 60 + i) for i in range(4)]
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=6))) for p in prompts]
    engine.step()
    stats = engine.stats()
    # 5 + 5 + 5 tokens fit the budget of 16; the 4th prompt got the 1 token left and goes on next step
    # (running counts every admitted request, the one still prefilling included)
    assert (stats.running, stats.prefilling, stats.waiting) == (4, 1, 0)
    while not all(h.done for h in handles):
        engine.step()
    for prompt, handle in zip(prompts, handles):
        alone = make_engine(model, config).generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=6)))
        assert handle.result().token_ids == alone.token_ids


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(model_and_config):
    model, config = model_and_config
    prompt = prompt_of(10, 3)

    def run(seed, **batch_mates):
        engine = make_engine(model, config)
        handle = engine.submit(GenerationRequest(prompt, SamplingParams(
            max_new_tokens=24, temperature=1.5, top_k=40, top_p=0.95, seed=seed)))
        for i in range(batch_mates.get("others", 0)):
            engine.submit(GenerationRequest(prompt_of(6, 50 + i), SamplingParams(max_new_tokens=30, temperature=1.0)))
        while not handle.done:
            engine.step()
        return handle.result().token_ids

    first = run(1234)
    assert run(1234) == first
    assert run(1234, others=3) == first  # batch mates with their own sampling do not disturb it
    assert run(99) != first


def test_top_k_one_is_greedy(model_and_config):
    model, config = model_and_config
    prompt = prompt_of(9, 9)
    greedy = make_engine(model, config).generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=15)))
    top1 = make_engine(model, config).generate(
        GenerationRequest(prompt, SamplingParams(max_new_tokens=15, temperature=0.7, top_k=1, seed=5)))
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ends_generation(model_and_config):
    model, config = model_and_config
    prompt = prompt_of(12, 4)
    free = make_engine(model, config).generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=20)))
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    stopped = make_engine(model, config).generate(
        GenerationRequest(prompt, SamplingParams(max_new_tokens=20, stop_token_ids=(stop_at,))))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:first + 1]


class CharTokenizer:
    """Token t decodes to one character; tokens 80..95 form 2-byte UTF-8 characters in pairs."""

    def incremental_decoder(self):
        return IncrementalDecoder(self)

    def decode(self, ids, skip_special_tokens=False):
        data = bytearray()
        for t in ids:
            data += bytes([0xC3, 0x80 + (t - 80)]) if 80 <= t < 96 else bytes([0xC3]) if t == 79 else chr(97 + t % 26).encode()
        return data.decode("utf-8", errors="replace")


def test_streamed_text_never_splits_characters_and_honours_stop_strings(model_and_config):
    model, config = model_and_config
    engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, stop_token_ids=()),
                    tokenizer=CharTokenizer())
    prompt = prompt_of(8, 21)
    full = engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=30)))
    assert full.text == CharTokenizer().decode(full.token_ids)
    stop = full.text[10:12]
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=30, stop=(stop,))))
    while not handle.done:
        engine.step()
    deltas = [event.text for event in handle]
    result = handle.result()
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == result.text == full.text[:full.text.index(stop)]
    assert result.finish_reason == "stop"


class BlockedTokenizer(CharTokenizer):
    """CharTokenizer whose detokenizer waits for `release` before decoding anything."""

    def __init__(self):
        self.release = threading.Event()

    def decode(self, ids, skip_special_tokens=False):
        assert self.release.wait(timeout=60), "never released"
        return super().decode(ids, skip_special_tokens)


def test_detokenization_is_off_the_steps_critical_path(model_and_config):
    """With the detokenizer stalled, the engine still computes every token (steps never wait for text);
    once it runs, the text and the stop string are applied as usual: the Completion ends at the stop
    string although the engine computed past it."""
    model, config = model_and_config
    plain = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, stop_token_ids=()),
                   tokenizer=CharTokenizer())
    prompt = prompt_of(8, 21)
    full = plain.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=20)))
    tokenizer = BlockedTokenizer()
    engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, stop_token_ids=()),
                    tokenizer=tokenizer)
    stop = full.text[5:7]
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=20, stop=(stop,))))
    engine.step()
    (sequence,) = engine.scheduler.running
    while engine.scheduler.running:  # to max_new_tokens: the engine cannot see the stop string yet
        engine.step()
    assert sequence.generated == full.token_ids and not handle.done  # all 20 computed, none detokenized
    tokenizer.release.set()
    result = handle.result(timeout=60)
    assert result.finish_reason == "stop" and result.text == full.text[:full.text.index(stop)]
    assert result.token_ids == full.token_ids[:len(result.token_ids)] and len(result.token_ids) < 20
    assert engine.stats().running == 0 and engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_cancel_frees_the_slot_at_once_and_others_continue(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config, max_batch=2)
    a = engine.submit(GenerationRequest(prompt_of(6, 1), SamplingParams(max_new_tokens=50)))
    b = engine.submit(GenerationRequest(prompt_of(6, 2), SamplingParams(max_new_tokens=10)))
    c = engine.submit(GenerationRequest(prompt_of(6, 3), SamplingParams(max_new_tokens=10)))
    for _ in range(4):
        engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    a.cancel()
    engine.step()
    assert a.result().finish_reason == "cancelled"
    assert engine.stats().waiting == 0  # c took a's slot in the same step
    while not (b.done and c.done):
        engine.step()
    alone = make_engine(model, config).generate(GenerationRequest(prompt_of(6, 3), SamplingParams(max_new_tokens=10)))
    assert c.result().token_ids == alone.token_ids


def test_background_thread_streams_tokens(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config)
    engine.start()
    try:
        handle = engine.submit(GenerationRequest(prompt_of(7, 8), SamplingParams(max_new_tokens=16)))
        tokens = [event.token_id for event in handle]
        result = handle.result(timeout=30)
    finally:
        engine.stop()
    assert tokens == result.token_ids == reference_greedy(model, config, prompt_of(7, 8), 16)


EXIT_MID_STEP = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from test_lm_engine import tiny_config
    from lm.engine import Engine, EngineConfig
    from lm.models.gemma3 import Gemma3TextModel
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams
    config = tiny_config(hidden_size=128, intermediate_size=512, max_position_embeddings=4096)
    engine = Engine(Gemma3TextModel(config).eval(), config, EngineConfig(
        max_seq_len=4096, kv_budget_bytes=1 << 27, prefill_chunk=1024, stop_token_ids=()))
    engine.start()
    for _ in range(4):  # about a second of steps, each a 1,024-token chunk
        engine.submit(GenerationRequest([3] * 3000, SamplingParams(max_new_tokens=100)))
    time.sleep(0.3)
    print("main thread ends", flush=True)
""")


def test_exit_while_a_step_runs_ends_the_process_normally():
    """A program that ends while its engine thread is inside a forward exits with status 0: the engine's
    thread finishes its step first (a daemon thread ended inside PyTorch by the interpreter's
    finalization aborts the process: "terminate called without an active exception", status 134)."""
    done = subprocess.run([sys.executable, "-c", EXIT_MID_STEP, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=120)
    assert "main thread ends" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 0 and "terminate" not in done.stderr, (done.returncode, done.stderr[-2000:])


def test_limits_give_clear_errors(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config, max_seq_len=32, max_queue=2)
    with pytest.raises(PromptTooLong, match="32"):
        engine.submit(GenerationRequest(prompt_of(40, 1)))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit(GenerationRequest([]))
    for bad in (-1, config.vocab_size):
        with pytest.raises(InvalidRequest, match=f"stop_token_ids \\[{bad}\\] lie outside the vocabulary"):
            engine.submit(GenerationRequest(prompt_of(5, 1), SamplingParams(stop_token_ids=(1, bad))))
    ids, mask = image_prompt([1])
    with pytest.raises(InvalidRequest, match="placeholders"):
        engine.submit(GenerationRequest(ids, image_mask=torch.tensor(mask)))
    engine.submit(GenerationRequest(prompt_of(5, 1)))
    engine.submit(GenerationRequest(prompt_of(5, 2)))
    with pytest.raises(EngineOverloaded, match="overloaded"):
        engine.submit(GenerationRequest(prompt_of(5, 3)))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_generation_stops_at_the_context_limit(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config, max_seq_len=24)
    result = engine.generate(GenerationRequest(prompt_of(20, 5), SamplingParams(max_new_tokens=50)))
    assert result.finish_reason == "length" and len(result.token_ids) == 4


def test_budget_too_small_is_refused(model_and_config):
    model, config = model_and_config
    with pytest.raises(ValueError, match="budget"):
        make_engine(model, config, kv_budget_bytes=1000)


def test_a_failing_request_does_not_take_others_down(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config)
    good = engine.submit(GenerationRequest(prompt_of(6, 1), SamplingParams(max_new_tokens=8)))
    bad = engine.submit(GenerationRequest([2, 5, 500], SamplingParams(max_new_tokens=8)))  # id beyond vocab
    while not (good.done and bad.done):
        engine.step()
    assert bad.result().finish_reason == "error" and "IndexError" in bad.result().error
    assert good.result().finish_reason == "length"
    assert good.result().token_ids == reference_greedy(model, config, prompt_of(6, 1), 8)  # undisturbed


def test_submit_is_thread_safe(model_and_config):
    model, config = model_and_config
    engine = make_engine(model, config)
    engine.start()
    handles, lock = {}, threading.Lock()

    def client(i):
        handle = engine.submit(GenerationRequest(prompt_of(5, i), SamplingParams(max_new_tokens=6)))
        with lock:
            handles[i] = handle

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a submitting thread hung"
        results = {i: h.result(timeout=60) for i, h in handles.items()}
    finally:
        engine.stop()
    assert sorted(results) == list(range(12))
    assert all(r.finish_reason == "length" for r in results.values())
    # each client got its own prompt's answer, not a neighbour's or a mixture
    for i, result in results.items():
        assert result.token_ids == reference_greedy(model, config, prompt_of(5, i), 6), i


def test_a_scheduling_failure_fails_running_requests_instead_of_hanging(model_and_config, monkeypatch):
    model, config = model_and_config
    engine = make_engine(model, config)
    engine.start()
    try:
        first = engine.submit(GenerationRequest(prompt_of(6, 1), SamplingParams(max_new_tokens=200)))
        assert first.next_event(timeout=30) is not None  # it is decoding

        def broken():
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.scheduler, "schedule", broken)
        result = first.result(timeout=30)
        assert result.finish_reason == "error" and "boom" in result.error
        monkeypatch.undo()
        later = engine.submit(GenerationRequest(prompt_of(6, 2), SamplingParams(max_new_tokens=4)))
        # the engine thread survived and serves new work correctly
        assert later.result(timeout=30).token_ids == reference_greedy(model, config, prompt_of(6, 2), 4)
    finally:
        engine.stop()


def test_greedy_with_penalties_equals_recompute_with_the_same_penalties(model_and_config):
    """The engine applies the penalties to each row before its argmax: equal to recomputing the whole
    sequence and applying lm.sampling.apply_penalties at every step."""
    from lm.sampling import apply_penalties

    model, config = model_and_config
    params = SamplingParams(max_new_tokens=20, repetition_penalty=1.5, frequency_penalty=0.8, presence_penalty=0.3)
    prompt = prompt_of(12, 31)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(20):
            positions = torch.arange(len(ids))[None]
            hidden = model(torch.tensor([ids]), positions, FullAttention(config, positions))
            logits = apply_penalties(model.logits(hidden[0, -1]), params, ids, len(prompt))
            ids.append(int(torch.argmax(logits)))
    engine = make_engine(model, config)
    penalized = engine.generate(GenerationRequest(prompt, params)).token_ids
    assert penalized == ids[len(prompt):]
    assert penalized != reference_greedy(model, config, prompt, 20)  # the penalties changed something

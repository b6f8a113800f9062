"""The paged engine on the tiny Gemma 3 decoder (window 8, 4-token image tiles, full and sliding layers):
greedy tokens equal recomputation from scratch with prefix caching on and off, under forced preemption,
across block boundaries, the window boundary and image tiles spanning blocks; prefix hits share blocks for
the same image and text and never for a different image; sliding-window groups hold only the window;
the block accounting invariant holds after every step through finish, cancel and preemption."""

from __future__ import annotations

import pytest
import torch

from lm.engine import Engine, EngineConfig
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from test_lm_engine import (  # noqa: F401 - model_and_config is a fixture shared with the engine tests
    IMAGE_ID, TILE, image_prompt, model_and_config, prompt_of, reference_greedy,
)


def paged_engine(model, config, *, blocks: int | None = None, **overrides) -> Engine:
    settings = dict(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=8, prefill_chunk=16, stop_token_ids=(),
                    block_size=4)
    settings.update(overrides)
    engine = Engine(model, config, EngineConfig(**settings))
    if blocks is not None:  # the same engine with a budget of exactly `blocks` blocks
        settings["kv_budget_bytes"] = blocks * engine.layout.block_bytes(config, engine.dtype)
        engine = Engine(model, config, EngineConfig(**settings))
    return engine


def run(engine: Engine, requests: list[GenerationRequest], *, on_step=None):
    """Submit all, step until done checking the block invariant after every step; the handles."""
    handles = [engine.submit(request) for request in requests]
    steps = 0
    while not all(handle.done for handle in handles):
        stats = engine.stats()
        if not (stats.running or stats.waiting):
            engine.output.drain()  # all computed: the output thread completes the last ones
            continue
        engine.step()
        engine.check_blocks()
        if on_step is not None:
            on_step(engine, steps)
        steps += 1
        assert steps < 10_000, "the engine made no progress"
    return handles


def text_requests(n: int, new_tokens: int = 20, shared: list[int] | None = None) -> list[GenerationRequest]:
    prefix = shared or []
    return [GenerationRequest(prefix + prompt_of(9 + 7 * i, 40 + i)[1:], SamplingParams(max_new_tokens=new_tokens),
                              request_id=f"r{i}") for i in range(n)]


def greedy_alone(model, config, request: GenerationRequest) -> list[int]:
    soft, mask = request.soft_tokens, request.image_mask
    return reference_greedy(model, config, request.prompt_ids, request.params.max_new_tokens, soft,
                            None if mask is None else mask.tolist())


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_equals_recompute_across_block_and_window_boundaries(model_and_config, block_size, prefix_caching):
    """Prompts of 9 to 37 tokens (past the window of 8) sharing a 10-token prefix, 20 new tokens each."""
    model, config = model_and_config
    engine = paged_engine(model, config, block_size=block_size, enable_prefix_caching=prefix_caching)
    requests = text_requests(5, shared=prompt_of(10, 99))
    handles = run(engine, requests)
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request), request.request_id


def test_preemption_keeps_every_answer_and_every_streamed_token(model_and_config):
    """A budget far below what six requests need at once: requests are preempted (recomputed later
    from prompt + generated tokens), and each answer and its stream equal the request run alone."""
    model, config = model_and_config
    engine = paged_engine(model, config, blocks=40, max_batch=6)
    requests = text_requests(6, new_tokens=30)
    handles = run(engine, requests)
    assert engine.stats().preemptions > 0, "nothing was preempted: the test proves nothing"
    for request, handle in zip(requests, handles):
        result = handle.result()
        streamed = [event.token_id for event in handle]
        assert result.finish_reason == "length"
        assert streamed == result.token_ids == greedy_alone(model, config, request), request.request_id


def test_images_spanning_blocks_match_recompute_with_preemption_and_prefix_hits(model_and_config):
    """Image tiles (4 placeholders) across 3-token blocks; the same image and text asked twice (the second
    hits the cache), then a different image with the same text; the budget forces preemption."""
    model, config = model_and_config
    ids, mask = image_prompt([1, 2])
    soft = torch.randn(3, TILE, config.hidden_size, generator=torch.Generator().manual_seed(3))
    other = torch.randn(3, TILE, config.hidden_size, generator=torch.Generator().manual_seed(4))
    requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=16), soft_tokens=s, image_mask=torch.tensor(mask),
                                  request_id=name) for name, s in (("a", soft), ("a-again", soft), ("b", other))]
    requests += text_requests(3, new_tokens=16)
    engine = paged_engine(model, config, block_size=3, blocks=60, max_batch=6, prefill_chunk=9)
    handles = run(engine, requests)
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0, "no preemption or no hit: the test proves less"
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request), request.request_id


def image_request(ids, mask, soft, name):
    return GenerationRequest(ids, SamplingParams(max_new_tokens=4), soft_tokens=soft, image_mask=torch.tensor(mask),
                             request_id=name)


def test_the_same_image_and_text_share_blocks_and_a_different_image_never_does(model_and_config):
    model, config = model_and_config
    ids, mask = image_prompt([2])  # text, two tiles, text: 3 + 2 * 6 + 2 = 17 tokens
    first_placeholder = mask.index(True)
    soft = torch.randn(2, TILE, config.hidden_size, generator=torch.Generator().manual_seed(5))
    other = soft.clone()
    other[1, 2, 0] += 1.0  # one value of the second tile differs
    engine = paged_engine(model, config, block_size=2)
    computed = []
    original = engine.runner.run

    def spy(chunks):
        computed.extend((c.sequence.request.request_id, c.start, c.end) for c in chunks)
        return original(chunks)

    engine.runner.run = spy
    expected = greedy_alone(model, config, image_request(ids, mask, soft, "x"))
    for name, tensor in (("first", soft), ("same", soft.clone()), ("other", other)):
        hits_before = engine.stats().prefix_cache_hit_tokens
        (handle,) = run(engine, [image_request(ids, mask, tensor, name)])
        hit = engine.stats().prefix_cache_hit_tokens - hits_before
        starts = [start for request_id, start, _ in computed if request_id == name]
        if name == "first":
            assert hit == 0 and min(starts) == 0
            assert handle.result().token_ids == expected
        elif name == "same":  # everything but the last prompt token's block came from the cache
            assert hit >= len(ids) - 2 and min(starts) == hit
            assert handle.result().token_ids == expected
        else:  # the second tile differs: only blocks before it may be shared
            second_tile = first_placeholder + TILE + 2
            assert hit <= second_tile and min(starts) == hit
            assert handle.result().token_ids == greedy_alone(model, config, image_request(ids, mask, other, "y"))


def test_a_shared_prefix_is_computed_once(model_and_config):
    """Eight requests with the same 40-token prefix, one after the other: the first computes it, the
    others hit the cache for all its full blocks."""
    model, config = model_and_config
    engine = paged_engine(model, config, block_size=4, max_seq_len=128)
    shared = prompt_of(40, 7)
    requests = [GenerationRequest(shared + [20 + i, 30 + i], SamplingParams(max_new_tokens=5), request_id=str(i))
                for i in range(8)]
    for request in requests:
        (handle,) = run(engine, [request])
        assert handle.result().token_ids == greedy_alone(model, config, request)
    stats = engine.stats()
    assert stats.prefix_cache_queries == 8 and stats.prefix_cache_hits == 7
    assert stats.prefix_cache_hit_tokens == 7 * 40  # 40 = 10 full blocks of 4


def test_sliding_groups_hold_only_the_window(model_and_config):
    """While a 90-token request decodes, each sliding-window group holds at most ceil(window / block) + 1
    blocks, and a full group one block per block_size tokens."""
    model, config = model_and_config
    engine = paged_engine(model, config, block_size=4, max_seq_len=128, prefill_chunk=8)
    windows = [group.window for group in engine.layout.groups]
    assert None in windows and config.sliding_window in windows
    held = []

    def record(engine, step):
        for sequence in engine.scheduler.running:
            held.append([(sum(b is not None for b in table), sequence.num_computed_tokens)
                         for table in sequence.block_tables])

    run(engine, [GenerationRequest(prompt_of(60, 3), SamplingParams(max_new_tokens=30))], on_step=record)
    assert held
    for groups in held:
        for window, (blocks, computed) in zip(windows, groups):
            if window is None:
                assert blocks == -(-computed // 4)
            else:
                assert blocks <= -(-window // 4) + 1


def test_cancel_and_finish_in_any_order_leave_every_block_free_or_cached(model_and_config):
    model, config = model_and_config
    engine = paged_engine(model, config, blocks=40, max_batch=4)
    requests = text_requests(6, new_tokens=25)

    def cancel_some(engine, step):
        if step in (3, 9):
            for sequence in list(engine.scheduler.running)[:1] + list(engine.scheduler.waiting)[:1]:
                sequence.handle.cancel()

    handles = run(engine, requests, on_step=cancel_some)
    reasons = [h.result().finish_reason for h in handles]
    assert "cancelled" in reasons and "length" in reasons
    stats = engine.stats()
    assert stats.running == stats.waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    for request, handle in zip(requests, handles):
        if handle.result().finish_reason == "length":
            assert handle.result().token_ids == greedy_alone(model, config, request)


def _spy_decode(monkeypatch, path: str) -> list[tuple[int, list[int], bool]]:
    """Record the decode-row attention calls of the given path: "in_place" (lm.layers.fused reads the
    paged cache where it lies, float32 CPU) or "gathered" (blocks gathered, then SDPA; the path of other
    devices and dtypes, forced here). Each call: (rows, keys each row attends to, masked)."""
    from lm.engine import model_runner
    from lm.layers import fused

    calls = []
    if path == "gathered":
        monkeypatch.setattr(fused, "reads_in_place", lambda q, keys: False)
        original = model_runner.sdpa

        def spy(q, k, v, mask, scale):
            if q.shape[2] == 1:  # decode rows: (R, H, 1, D) against their padded blocks
                calls.append((q.shape[0], [k.shape[2]] * q.shape[0], mask is not None))
            return original(q, k, v, mask, scale)

        monkeypatch.setattr(model_runner, "sdpa", spy)
    else:  # decode rows with prompt chunks in their step: decode_attention; alone: decode_rows_attention
        original, original_rows = fused.decode_attention, fused.decode_rows_attention

        def spy(q, keys, values, blocks, start, length, scale):
            calls.append((q.shape[0], length.tolist(), False))
            return original(q, keys, values, blocks, start, length, scale)

        def spy_rows(qkv, *args):
            calls.append((qkv.shape[0], args[-2].tolist(), False))  # args[-2]: length
            return original_rows(qkv, *args)

        monkeypatch.setattr(fused, "decode_attention", spy)
        monkeypatch.setattr(fused, "decode_rows_attention", spy_rows)
    return calls


@pytest.mark.parametrize("path", ["in_place", "gathered"])
def test_decode_cost_follows_each_requests_own_context(model_and_config, monkeypatch, path):
    """A decode step reads, per request, its own blocks (its window in sliding groups): beside a 90-token
    request, a 5-token one attends to its own 6 or 7 positions (read in place), or to them rounded up to
    whole 4-token blocks (gathered), never to the 90-token request's length (the two are too far apart
    to share a batch)."""
    model, config = model_and_config
    engine = paged_engine(model, config, max_seq_len=128, prefill_chunk=128)
    calls = _spy_decode(monkeypatch, path)
    run(engine, [GenerationRequest(prompt_of(90, 1), SamplingParams(max_new_tokens=3)),
                 GenerationRequest(prompt_of(5, 2), SamplingParams(max_new_tokens=3))])
    decode_keys = {keys for _, lengths, _ in calls for keys in lengths}
    assert ({6, 7} if path == "in_place" else {8}) <= decode_keys  # the short request's own context
    assert max(decode_keys) <= 92 + 4 - 92 % 4


@pytest.fixture(scope="module")
def fused_model_and_config(model_and_config):
    """The same weights with q/k/v and gate/up fused, as every loaded checkpoint is: the path on which a
    step of decode rows takes lm.layers.fused.decode_rows_attention."""
    import copy

    from lm.layers import fuse_projections

    model, config = model_and_config
    return fuse_projections(copy.deepcopy(model)), config


@pytest.mark.parametrize("path", ["in_place", "gathered"])
def test_decode_rows_share_calls_without_reading_each_others_keys(fused_model_and_config, monkeypatch, path):
    """Gathered (one gather and one SDPA per call, padded and masked to each row's own keys): decode rows
    whose block counts are within PagedAttention.BATCH_SPREAD of each other share a call, and a row with
    many more blocks gets one of its own. Read in place (float32 CPU), where nothing is padded, every
    decode row of a step is one call. Either way each row reads only its own keys and equals its request
    computed alone."""
    model, config = fused_model_and_config
    engine = paged_engine(model, config, max_seq_len=128, prefill_chunk=128)
    calls = _spy_decode(monkeypatch, path)
    requests = [GenerationRequest(prompt_of(length, 50 + length), SamplingParams(max_new_tokens=6))
                for length in (9, 11, 14, 16, 80)]
    handles = run(engine, requests)
    if path == "gathered":
        together = [(lengths, masked) for rows, lengths, masked in calls if rows == 4]  # the four short requests
        assert together and all(masked for _, masked in together)
        assert max(keys for lengths, _ in together for keys in lengths) < 40  # never padded to the long one
        assert any(rows == 1 and max(lengths) > 80 for rows, lengths, _ in calls)  # the long one alone
    else:
        together = [sorted(lengths) for rows, lengths, _ in calls if rows == 5]  # all five in one call
        assert together and all(lengths[3] < 40 for lengths in together)  # the short rows' own keys
        assert any(lengths[4] > 80 for lengths in together)  # and the long one's, in the full layers
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request)


@pytest.mark.parametrize("block_size", [1, 4])
def test_a_tile_longer_than_the_chunk_fits_the_smallest_budget(model_and_config, block_size):
    """With prefill_chunk 1 a 4-token tile is still computed whole: the smallest budget the engine
    accepts (lm.kv_cache.request_budget_bytes) must hold the tile's chunk, or a lone image request would
    preempt itself forever and block the queue behind it."""
    from lm.kv_cache import request_budget_bytes

    model, config = model_and_config
    budget = request_budget_bytes(config, 60, torch.float32, block_size=block_size, prefill_chunk=1)
    engine = paged_engine(model, config, max_seq_len=60, prefill_chunk=1, block_size=block_size,
                          kv_budget_bytes=budget)
    ids, mask = image_prompt([1])
    ids, mask = prompt_of(40, 3) + ids[1:], [False] * 40 + mask[1:]
    soft = torch.randn(1, TILE, config.hidden_size, generator=torch.Generator().manual_seed(1))
    request = GenerationRequest(ids, SamplingParams(max_new_tokens=5), soft_tokens=soft, image_mask=torch.tensor(mask))
    text = GenerationRequest(prompt_of(6, 4), SamplingParams(max_new_tokens=5))
    image_handle, text_handle = run(engine, [request, text])
    assert image_handle.result().token_ids == greedy_alone(model, config, request)
    assert text_handle.result().token_ids == greedy_alone(model, config, text)


@pytest.mark.parametrize("layout", ["separated", "adjacent"])
def test_tiles_in_a_range_are_those_of_its_positions(model_and_config, layout):
    """Sequence.tiles_overlapping (what prefix keys hash) names, for any range of positions, each tile
    present there once, at its first position in the range, as a scan of the per-position tile ids does."""
    model, config = model_and_config
    if layout == "separated":
        ids, mask = image_prompt([2, 1])
    else:  # two tiles back to back, then text
        ids, mask = [2, 10] + [90] * (2 * TILE) + [14, 15], [False] * 2 + [True] * (2 * TILE) + [False] * 2
    tiles = sum(mask) // TILE
    soft = torch.randn(tiles, TILE, config.hidden_size, generator=torch.Generator().manual_seed(3))
    sequence = paged_engine(model, config)._make_sequence(image_request(ids, mask, soft, "s"))
    tile_of = sequence.tile_ids.tolist()
    assert len(set(sequence.tile_hashes)) == tiles
    for start in range(len(ids)):
        for end in range(start + 1, len(ids) + 3):
            expected = [(p, sequence.tile_hashes[tile_of[p]], tile_of.index(tile_of[p]))
                        for p in range(start, min(end, len(ids)))
                        if tile_of[p] >= 0 and (p == start or tile_of[p - 1] != tile_of[p])]
            assert sequence.tiles_overlapping(start, end) == expected


def test_the_one_call_decode_path_equals_recompute(fused_model_and_config, monkeypatch):
    """With fused projections a step of decode rows goes from the qkv projection to the o projection in
    one call (norm, rotation, cache write, attention): across block and window boundaries, with prefix
    hits, image tiles spanning blocks and preemption, every answer equals its request recomputed alone."""
    from lm.layers import fused

    model, config = fused_model_and_config
    calls = []
    original = fused.decode_rows_attention

    def spy(qkv, *args):
        calls.append(qkv.shape[0])
        return original(qkv, *args)

    monkeypatch.setattr(fused, "decode_rows_attention", spy)
    ids, mask = image_prompt([1, 2])
    soft = torch.randn(3, TILE, config.hidden_size, generator=torch.Generator().manual_seed(3))
    requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=16), soft_tokens=soft,
                                  image_mask=torch.tensor(mask), request_id=name) for name in ("a", "a-again")]
    requests += text_requests(5, new_tokens=24, shared=prompt_of(10, 99))
    engine = paged_engine(model, config, block_size=3, blocks=70, max_batch=6, prefill_chunk=9)
    handles = run(engine, requests)
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0, "the test must preempt and hit the cache"
    assert max(calls) > 1, "no step of several decode rows took the one-call path"
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request), request.request_id


def test_the_caches_arrays_follow_its_tensors(model_and_config):
    """PagedKVStorage.arrays: numpy views of the cache made once, and made again for a tensor replaced."""
    import numpy as np

    model, config = model_and_config
    storage = paged_engine(model, config).storage
    keys, values = storage.arrays(0)
    assert np.shares_memory(keys, storage.keys[0].numpy()) and storage.arrays(0)[0] is keys
    storage.keys[0] = torch.zeros_like(storage.keys[0])
    assert np.shares_memory(storage.arrays(0)[0], storage.keys[0].numpy())
    assert np.shares_memory(storage.arrays(0)[1], values)  # the values tensor is still the same one


def test_latencies_count_from_submission_including_its_checks(model_and_config, monkeypatch):
    """A request's time to first token and total time start when `submit` is called: the checks and
    image hashing it does in the caller's thread are part of them."""
    import time

    import lm.engine.engine as engine_module

    model, config = model_and_config
    ids, mask = image_prompt([1])
    soft = torch.randn(1, TILE, config.hidden_size, generator=torch.Generator().manual_seed(4))
    content_hash = engine_module._content_hash
    monkeypatch.setattr(engine_module, "_content_hash", lambda tile: time.sleep(0.05) or content_hash(tile))
    engine = paged_engine(model, config)
    handle = engine.submit(image_request(ids, mask, soft, "slow-checks"))
    while not handle.done:
        engine.step()
    result = handle.result()
    assert result.time_to_first_token_s >= 0.05 and result.total_time_s >= result.time_to_first_token_s


def test_after_each_step_only_the_computed_blocks_need_registering_or_releasing(model_and_config, monkeypatch):
    """BlockManager.computed looks only at the blocks a step computed (from the chunk's start): a look at
    every block of the request right after it, the way it worked before, releases nothing more and
    registers only blocks that were refused when they became full (another block held their key then:
    two requests computed the same prefix at once; as in vLLM, such a copy is not cached later), through
    images across blocks, sliding windows, prefix hits and preemption."""
    from lm.engine.block_manager import BlockManager, BlockPool

    model, config = model_and_config
    computed, register = BlockManager.computed, BlockPool.register
    refused, looked = set(), []

    def logged(self, group, key, block):
        register(self, group, key, block)
        if self.key_of[block] != (group, key):
            refused.add(block)

    def checked(self, sequence, start=0):
        computed(self, sequence, start)
        keys, counts, tables = list(self.pool.key_of), list(self.pool.ref_count), [list(t) for t in sequence.block_tables]
        computed(self, sequence, 0)
        assert [list(t) for t in sequence.block_tables] == tables and list(self.pool.ref_count) == counts
        registered_late = {b for b, (old, new) in enumerate(zip(keys, self.pool.key_of)) if old != new}
        assert registered_late <= refused and all(keys[b] is None for b in registered_late)
        looked.append(start)

    monkeypatch.setattr(BlockPool, "register", logged)
    monkeypatch.setattr(BlockManager, "computed", checked)
    ids, mask = image_prompt([1, 2])
    soft = torch.randn(3, TILE, config.hidden_size, generator=torch.Generator().manual_seed(3))
    requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=16), soft_tokens=soft, image_mask=torch.tensor(mask),
                                  request_id=name) for name in ("a", "a-again")]
    requests += text_requests(4, new_tokens=16, shared=prompt_of(10, 99))
    engine = paged_engine(model, config, block_size=3, blocks=60, max_batch=6, prefill_chunk=9)
    run(engine, requests)
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0 and max(looked) > 0


def test_a_chunks_mask_is_the_attention_rule_for_every_window_and_tile_layout():
    """PagedAttention builds a chunk's mask from each query's range of keys: the same mask as
    lm.attention.attention_mask (causal, the window, image tiles both ways) over the chunk's keys, for
    random tile layouts, chunks that never split a tile, and windows shorter and longer than a tile."""
    import random

    import numpy as np

    from lm.attention import additive_mask, attention_mask
    from lm.engine.model_runner import PagedAttention, ScheduledChunk

    class Tiled:  # what the mask reads of a Sequence: its tiles' [start, end)
        def __init__(self, spans):
            self.tile_spans = spans

    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        length, spans, position = rng.randint(1, 300), [], rng.randint(0, 12)
        while position + TILE * 8 <= length and rng.random() < 0.7:  # tiles of 32 tokens, some adjacent
            spans.append((position, position + TILE * 8))
            position += TILE * 8 + rng.choice([0, 0, 1, 5])
        tile_ids = np.full(length, -1)
        for tile, (start, end) in enumerate(spans):
            tile_ids[start:end] = tile
        cuts = sorted({0, length, *(rng.randint(0, length) for _ in range(3))})
        cuts = [c for c in cuts if not any(start < c < end for start, end in spans)]
        for start, end in zip(cuts, cuts[1:]):
            chunk = ScheduledChunk(Tiled(spans), start, end)
            for window in (None, 1, 7, 32, 100):
                lo = 0 if window is None else max(0, start - window + 1)
                expected = attention_mask(torch.arange(start, end)[None], torch.arange(lo, end)[None],
                                          sliding_window=window, q_tile=torch.from_numpy(tile_ids[start:end])[None],
                                          k_tile=torch.from_numpy(tile_ids[lo:end])[None])
                for dtype in (torch.float32, torch.bfloat16):
                    got = PagedAttention._mask(chunk, window, torch.device("cpu"), dtype)
                    assert got.dtype == dtype and torch.equal(got, additive_mask(expected, dtype))
                checked += 1
    assert checked > 1000


def test_a_prompt_that_cannot_grow_waits_instead_of_bouncing(model_and_config):
    """Three text requests and one with a 16-token tile after 4 text tokens, in a budget of one longest
    request and 4-token chunks: a prompt that cannot get blocks for its next chunk while it is the newest
    keeps its blocks and waits (it used to preempt itself, be re-admitted at once for the chunk its freed
    blocks allowed, and stall at the same place: the image request did so every step until the tile's
    blocks were free). No prefilling request preempts itself; every answer equals the request alone."""
    import dataclasses

    model, config = model_and_config
    tile = 16
    config = dataclasses.replace(config, mm_tokens_per_image=tile)
    sizing = paged_engine(model, config, block_size=2, max_seq_len=64, prefill_chunk=4)
    engine = paged_engine(model, config, block_size=2, max_seq_len=64, prefill_chunk=4, max_batch=4,
                          blocks=sizing.layout.blocks_for_request(64, tile))
    ids, mask = [2, 10, 11, 12] + [IMAGE_ID] * tile + [13, 14], [False] * 4 + [True] * tile + [False] * 2
    soft = torch.randn(1, tile, config.hidden_size, generator=torch.Generator().manual_seed(5))
    requests = text_requests(3, new_tokens=30) + [GenerationRequest(
        ids, SamplingParams(max_new_tokens=6), soft_tokens=soft, image_mask=torch.tensor(mask), request_id="image")]
    growing, self_preempted = [], []
    grow, preempt = engine.scheduler.block_manager.grow, engine.scheduler._preempt

    def recording_grow(sequence, start, end):
        growing[:] = [sequence]
        return grow(sequence, start, end)

    def recording_preempt(victim):
        if growing and victim is growing[0] and victim.prefilling:
            self_preempted.append(victim.request.request_id)
        preempt(victim)

    engine.scheduler.block_manager.grow, engine.scheduler._preempt = recording_grow, recording_preempt
    handles = run(engine, requests)
    assert engine.stats().preemptions > 0, "nothing was preempted: the budget is not tight, the test proves nothing"
    assert not self_preempted, f"prompts preempted themselves: {self_preempted}"
    for request, handle in zip(requests, handles):
        assert handle.result().token_ids == greedy_alone(model, config, request), request.request_id


@pytest.mark.parametrize("block_size", [3, 4, 5])
def test_a_prefix_hit_may_end_inside_an_image_tile(model_and_config, block_size):
    """The same one-image request twice, and a longer one that extends it: with a 16-token tile (longer
    than the window of 8) and blocks that end inside it, the second request's cached prefix ends inside
    the tile (every cacheable length did before, so a repeated caption prompt never hit); its next
    chunk computes the rest of the tile, seeing the cached part. Answers equal each request alone."""
    import dataclasses

    model, config = model_and_config
    tile = 16
    config = dataclasses.replace(config, mm_tokens_per_image=tile)
    # one token after the tile: the longest cacheable prefix (all but the last token) ends inside it
    ids, mask = [2, 10, 11] + [IMAGE_ID] * tile + [13], [False] * 3 + [True] * tile + [False]
    soft = torch.randn(1, tile, config.hidden_size, generator=torch.Generator().manual_seed(6))

    def request(extra: list[int], name: str) -> GenerationRequest:
        return GenerationRequest(ids + extra, SamplingParams(max_new_tokens=8), soft_tokens=soft,
                                 image_mask=torch.tensor(mask + [False] * len(extra)), request_id=name)

    engine = paged_engine(model, config, block_size=block_size, prefill_chunk=6)
    hits = []
    for current in (request([], "first"), request([], "again"), request([20, 21, 22], "longer")):
        before = engine.stats().prefix_cache_hit_tokens
        handle = run(engine, [current])[0]
        hits.append(engine.stats().prefix_cache_hit_tokens - before)
        assert handle.result().token_ids == greedy_alone(model, config, current), current.request_id
    assert hits[0] == 0 and hits[1] > 0 and hits[2] >= hits[1]
    assert 3 < hits[1] < 3 + tile, f"the repeat's hit of {hits[1]} tokens does not end inside the tile"

"""`tessera bench engine`: what the paged engine buys — concurrency at a fixed KV budget, prefix caching
on shared prefixes and multi-turn image chats, and decode cost per request's own context.

Parts (`--part`, default all):
- concurrency: random weights with Gemma 3 4B's attention geometry (34 layers, 5 sliding : 1 full,
  4 KV heads, head_dim 256, window 1024; 4 query heads instead of 8 and a 128-wide residual stream,
  since this measures memory and scheduling, not compute), fp32, a 1 GiB KV budget, `--requests`
  requests of prompt lengths log-uniform in [50, 4000] and 16-256 new tokens, all submitted at once.
  Printed: peak concurrent sequences, tokens/s, preemptions; the peak over `--draws` workloads of the
  same distribution (the first is the real run's) from the scheduler alone (`SchedulingOnly` in place of
  the network, checked step for step against the real run on that first one); and the slot design's
  concurrency at the same budget, exact by its own sizing rule: every sequence reserved `max_seq_len` positions in
  each full layer and a `window` ring in each sliding layer, so it ran min(max_batch, budget // slot)
  sequences (`kv_bytes_for_context(config, max_seq_len, windowed=True)` per slot; that engine is gone).
- prefix: time to first token with prefix caching on vs off, side by side: (a) the embedded 270M,
  16 requests one after another sharing a 2,000-token prefix (mean TTFT of requests 2-16); (b) the tiny
  random-weight vision-language checkpoint, a two-turn chat about one image (Pan & Scan, 3 tiles): the
  second turn's TTFT. The vision encode is done once and reused by both turns (the vision service's
  soft-token cache does the same), so only the language model's prefill is compared.
- decode: the embedded 270M in fp32, the mean decode step time of 8 requests with one 4,000-token and
  seven 100-token contexts against 8 requests of 100 tokens (goal <= 1.5x); 32 steps of each, in
  alternating runs of 4, medians.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from service.bench import non_negative_int, positive_int

REPEATS = 5  # two-turn image chats per setting (medians reported)
GOALS = {"concurrency": 4.0, "prefix": 5.0, "decode": 1.5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=["all", "concurrency", "prefix", "decode"], default="all")
    parser.add_argument("--requests", type=positive_int, default=64, help="concurrency part: requests (default 64)")
    parser.add_argument("--kv-budget-mib", type=positive_int, default=1024,
                        help="concurrency part: KV budget (default 1024)")
    parser.add_argument("--draws", type=non_negative_int, default=10,
                        help="concurrency part: workloads (seeds --seed, --seed + 1, ...) whose peak concurrency the "
                             "scheduler alone measures; the first is the one run with the network, checked step for "
                             "step (default 10; 0: none)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    parts = ["concurrency", "prefix", "decode"] if args.part == "all" else [args.part]
    ratios = []
    for part in parts:
        ratios += {"concurrency": concurrency, "prefix": prefix, "decode": decode}[part](args)
    print()
    for line in ratios:
        print(line)
    return 0


# ----- concurrency at a fixed budget ----------------------------------------------------------------

def geometry_4b_config():
    """Gemma 3 4B's attention geometry (published config) with a small residual stream and vocabulary."""
    from lm.models.gemma3 import Gemma3DecoderConfig
    from lm.presets import PUBLISHED_CONFIGS

    raw = PUBLISHED_CONFIGS["gemma3-4b"]
    text = {**raw["text_config"], "hidden_size": 128, "intermediate_size": 256, "vocab_size": 1024,
            "num_attention_heads": 4}
    return Gemma3DecoderConfig.from_dict({**raw, "text_config": text})


def random_model(config, seed: int):
    import torch

    from lm.models.gemma3 import Gemma3TextModel

    torch.manual_seed(seed)
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in name else 0.05)
    return model


class SchedulingOnly:
    """Stands in for the network where only the engine's scheduling is measured (lm.models.base's calls:
    `model(input_ids, positions, attention, ...)` -> zeros (1, N, hidden), `logits(hidden)` -> zeros
    (R, vocab) fp32, so every greedy token is id 0). Everything else is the real engine: scheduler, block
    manager, KV storage. When every request ends by length (no stop tokens), no step's decisions depend
    on what the network computes: admission, growth and preemption read token counts and free blocks, and
    prefix keys hash each request's own tokens (random prompts share none), so a run replays the real
    one's steps exactly (`concurrency` checks this on the draw it also runs for real)."""

    def __init__(self, config):
        self.config = config

    def __call__(self, input_ids, positions, attention, soft_tokens=None, image_mask=None):
        import torch

        return torch.zeros(1, input_ids.shape[1], self.config.hidden_size)

    def logits(self, hidden):
        import torch

        return torch.zeros(hidden.shape[0], self.config.vocab_size)


def concurrency_workload(requests: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """The concurrency part's requests for one seed: (prompt token ids, new tokens) per request, prompt
    lengths log-uniform in [50, 4000], 16-256 new tokens."""
    rng = random.Random(seed)
    prompts = [round(math.exp(rng.uniform(math.log(50), math.log(4000)))) for _ in range(requests)]
    new_tokens = [rng.randint(16, 256) for _ in range(requests)]
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in prompts], new_tokens


def run_workload(model, config, workload, *, budget: int, max_seq_len: int, prefill_chunk: int = 512) -> dict:
    """Submit every request of `workload` at once to an engine of `budget` KV bytes and step until all
    finish: peak running and decoding sequences, the running count after each step, steps, preemptions,
    seconds, generated tokens, blocks and block size."""
    from lm.engine import Engine, EngineConfig
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams

    prompts, new_tokens = workload
    engine = Engine(model, config, EngineConfig(max_seq_len=max_seq_len, kv_budget_bytes=budget,
                                                max_batch=len(prompts), prefill_chunk=prefill_chunk,
                                                stop_token_ids=()))
    handles = [engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=m)))
               for ids, m in zip(prompts, new_tokens)]
    peak_decoding, running = 0, []
    started = time.perf_counter()
    stats = engine.stats()
    while stats.running or stats.waiting:  # the steps with work (the output thread completes the handles)
        engine.step()
        stats = engine.stats()
        running.append(stats.running)
        peak_decoding = max(peak_decoding, stats.running - stats.prefilling)
    results = [h.result(timeout=60) for h in handles]
    seconds = time.perf_counter() - started
    engine.stop()
    assert all(r.finish_reason == "length" for r in results), "a request did not finish normally"
    return {"peak": max(running), "peak_decoding": peak_decoding, "running": running, "steps": len(running),
            "preemptions": stats.preemptions, "seconds": seconds, "generated": sum(len(r.token_ids) for r in results),
            "blocks": engine.storage.num_blocks, "block_size": engine.layout.block_size}


def concurrency(args: argparse.Namespace) -> list[str]:
    import torch

    from lm.kv_cache import kv_bytes_for_context

    config = geometry_4b_config()
    max_seq_len = 4000 + 256
    budget = args.kv_budget_mib << 20
    slot = kv_bytes_for_context(config, max_seq_len, torch.float32, windowed=True)
    slot_sequences = min(args.requests, budget // slot)
    workload = concurrency_workload(args.requests, args.seed)
    lengths = [len(ids) for ids in workload[0]]
    print(f"concurrency: 4B attention geometry ({config.num_hidden_layers} layers, "
          f"{config.layer_types.count('full_attention')} full, window {config.sliding_window}, "
          f"{config.num_key_value_heads} KV heads x {config.head_dim}), fp32, KV budget {args.kv_budget_mib} MiB, "
          f"{args.requests} requests, prompts {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}), "
          f"{sum(workload[1])} new tokens in all (seed {args.seed})")
    real = run_workload(random_model(config, args.seed), config, workload, budget=budget, max_seq_len=max_seq_len)
    print(f"  paged engine: {real['blocks']} blocks of {real['block_size']} tokens; peak {real['peak']} sequences "
          f"holding KV ({real['peak_decoding']} decoding at once); {real['steps']} steps in {real['seconds']:.1f} s: "
          f"{real['generated'] / real['seconds']:.1f} generated tok/s, "
          f"{(sum(lengths) + real['generated']) / real['seconds']:.1f} tok/s computed; "
          f"{real['preemptions']} preemptions")
    print(f"  slot design: {slot / 2**20:.1f} MiB reserved per sequence of max_seq_len {max_seq_len}: "
          f"{slot_sequences} sequences at once")
    # One draw's peak is one sample of a random variable (it moves 2x between draws): the scheduler alone
    # (SchedulingOnly: the same steps as a real run) over --draws workloads of the same distribution.
    peaks = []
    for draw in range(args.draws):
        replay = run_workload(SchedulingOnly(config), config, concurrency_workload(args.requests, args.seed + draw),
                              budget=budget, max_seq_len=max_seq_len)
        if draw == 0 and (replay["running"], replay["preemptions"]) != (real["running"], real["preemptions"]):
            raise AssertionError("the scheduling-only run did not replay the real one's steps")
        peaks.append(replay["peak"])
    if peaks:
        print(f"  scheduling only, {args.draws} workloads (seeds {args.seed}-{args.seed + args.draws - 1}; the first "
              f"replays the run above step for step): peak sequences {peaks}, median {statistics.median(peaks):g}")
    lines = [f"ratio peak concurrent sequences paged / slot design, seed {args.seed}: "
             f"{real['peak'] / max(slot_sequences, 1):.1f}x (goal >= {GOALS['concurrency']:g}x)"]
    if peaks:
        ratios = [peak / max(slot_sequences, 1) for peak in peaks]
        lines.append(f"ratio peak concurrent sequences paged / slot design, median of {args.draws} workloads: "
                     f"{statistics.median(ratios):.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x; "
                     f"goal >= {GOALS['concurrency']:g}x)")
    return lines


# ----- prefix caching -------------------------------------------------------------------------------

def _serial_ttft(engine, requests) -> list[float]:
    """Each request submitted after the previous one finished; time to first token of each, in seconds."""
    ttfts = []
    for request in requests:
        handle = engine.submit(request)
        while not handle.done:
            engine.step()
        ttfts.append(handle.result().time_to_first_token_s)
    return ttfts


def prefix(args: argparse.Namespace) -> list[str]:
    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.runtime import load_language_model
    from lm.sampling import SamplingParams

    lm = load_language_model("gemma3-270m", progress=False)
    words = ("the river city market bridge evening light story northern harbour winter garden old "
             "stone road music house morning bread").split()
    rng = random.Random(args.seed)
    ids: list[int] = lm.tokenizer.encode("Background notes for every question below.", add_bos=True)
    while len(ids) < 2000:
        ids += lm.tokenizer.encode(" " + " ".join(rng.choice(words) for _ in range(40)) + ".", add_bos=False)
    shared = ids[:2000]
    questions = [shared + lm.tokenizer.encode(f"\nQuestion {i}: what happened on day {i}?\nAnswer:", add_bos=False)
                 for i in range(16)]
    results = {}
    for caching in (True, False):
        engine = lm.engine(EngineConfig(max_seq_len=2200, kv_budget_bytes=512 << 20, max_batch=4,
                                        stop_token_ids=(), enable_prefix_caching=caching))
        ttfts = _serial_ttft(engine, [GenerationRequest(q, SamplingParams(max_new_tokens=8)) for q in questions])
        results[caching] = ttfts
        stats = engine.stats()
        print(f"prefix (270M, 2,000-token shared prefix, 16 requests one after another), prefix caching "
              f"{'on ' if caching else 'off'}: first TTFT {ttfts[0]:.3f} s, mean of the 15 others "
              f"{statistics.mean(ttfts[1:]):.3f} s; cache hit tokens {stats.prefix_cache_hit_tokens}")
    text_ratio = statistics.mean(results[False][1:]) / statistics.mean(results[True][1:])
    image_ratio = _image_chat(args)
    return [f"ratio shared-prefix TTFT off / on (270M): {text_ratio:.1f}x (goal >= {GOALS['prefix']:g}x)",
            f"ratio second-turn TTFT off / on (tiny VLM, one image): {image_ratio:.1f}x "
            f"(goal >= {GOALS['prefix']:g}x)"]


def _image_chat(args: argparse.Namespace) -> float:
    import torch

    from lm.engine import EngineConfig
    from lm.prompt import layout_chat
    from lm.requests import GenerationRequest
    from lm.runtime import load_language_model
    from lm.sampling import SamplingParams
    from service.pipeline import encode_images
    from service.tiny_checkpoints import write_tiny_captioning_checkpoint
    from vision.sample import synthetic_photo

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_tiny_captioning_checkpoint(Path(directory) / "tiny-vlm", seed=args.seed)
        lm = load_language_model(str(checkpoint), progress=False)
        photo = Path(directory) / "photo.png"
        synthetic_photo(seed=args.seed).save(photo)
        images = encode_images(lm, [str(photo)], pan_and_scan=True)
    turn_one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    ttft: dict[bool, list[float]] = {True: [], False: []}
    hits: dict[bool, int] = {}
    floor: list[float] = []  # TTFT of the second turn sent again, nearly all of it cached
    floor_hit = 0
    for _ in range(REPEATS):
        for caching in (True, False):  # a fresh engine per chat: turn one, then the timed turn two
            engine = lm.engine(EngineConfig(max_seq_len=2048, kv_budget_bytes=256 << 20, max_batch=4,
                                            stop_token_ids=(), enable_prefix_caching=caching))
            prompt = layout_chat(lm.tokenizer, turn_one, images.tiles_per_image)
            first = engine.generate(GenerationRequest(prompt.token_ids, SamplingParams(max_new_tokens=24),
                                                      soft_tokens=images.soft_tokens,
                                                      image_mask=torch.tensor(prompt.image_mask)))
            turn_two = turn_one + [{"role": "assistant", "content": first.text},
                                   {"role": "user", "content": "And what is in the top left corner?"}]
            second = layout_chat(lm.tokenizer, turn_two, images.tiles_per_image)
            second_turn = GenerationRequest(second.token_ids, SamplingParams(max_new_tokens=8),
                                            soft_tokens=images.soft_tokens, image_mask=torch.tensor(second.image_mask))
            ttft[caching] += _serial_ttft(engine, [second_turn])
            hits[caching] = engine.stats().prefix_cache_hit_tokens  # of the second turn (the first has none)
            if caching:  # the same turn again: all but its last block cached, what a turn costs besides compute
                floor += _serial_ttft(engine, [second_turn])
                floor_hit = engine.stats().prefix_cache_hit_tokens - hits[caching]
    for caching in (True, False):
        print(f"prefix (tiny VLM, 2-turn chat, {sum(images.tiles_per_image)} tiles, second prompt "
              f"{len(second.token_ids)} tokens, {REPEATS} chats), prefix caching {'on ' if caching else 'off'}: "
              f"second-turn TTFT median {statistics.median(ttft[caching]) * 1e3:.1f} ms"
              f"; cache hit tokens {hits[caching]}")
    print(f"prefix (tiny VLM), the second turn sent again ({floor_hit} of {len(second.token_ids)} tokens cached): "
          f"TTFT median {statistics.median(floor) * 1e3:.1f} ms; off / this: "
          f"{statistics.median(ttft[False]) / statistics.median(floor):.1f}x, the ratio if the cached turn's own "
          f"tokens cost nothing")
    return statistics.median(ttft[False]) / statistics.median(ttft[True])


# ----- decode cost per context ----------------------------------------------------------------------

def decode(args: argparse.Namespace) -> list[str]:
    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.runtime import load_language_model
    from lm.sampling import SamplingParams

    lm = load_language_model("gemma3-270m", progress=False)
    rng = random.Random(args.seed)

    def prefilled_engine(lengths: list[int]):
        engine = lm.engine(EngineConfig(max_seq_len=4200, kv_budget_bytes=1 << 30, max_batch=8, prefill_chunk=1024,
                                        stop_token_ids=(), enable_prefix_caching=False))
        for n in lengths:
            engine.submit(GenerationRequest([2] + [rng.randrange(1000, 200_000) for _ in range(n - 1)],
                                            SamplingParams(max_new_tokens=200)))
        while engine.stats().prefilling or engine.stats().waiting:
            engine.step()
        for _ in range(2):  # warm-up
            engine.step()
        return engine

    engines = {"short": prefilled_engine([100] * 8), "mixed": prefilled_engine([4000] + [100] * 7)}
    times: dict[str, list[float]] = {"short": [], "mixed": []}
    for _ in range(8):  # the two alternate, so that load from elsewhere hits both
        for name, engine in engines.items():
            for _ in range(4):
                started = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - started)
    for engine in engines.values():
        engine.stop()
    short, mixed = statistics.median(times["short"]), statistics.median(times["mixed"])
    print(f"decode (270M fp32, batch 8): median step {short * 1e3:.1f} ms with eight 100-token contexts, "
          f"{mixed * 1e3:.1f} ms with one 4,000-token and seven 100-token contexts")
    return [f"ratio decode step one-long / all-short: {mixed / short:.2f}x (goal <= {GOALS['decode']:g}x)"]

"""`tessera bench lm`: the engine (fp32 and each quantisation scheme of lm/quantize.py: int8 weight-only,
int8 x int8 dynamic, int4) against transformers and llama.cpp on one model (the embedded Gemma 3 270M by
default; `--model` any supported family), side by side in one process.

Figures: decode tok/s at batch 1 (the fastest of --decode-repeats runs, for every contender), aggregate decode tok/s with 8 concurrent requests, prefill tok/s
for a 2,048-token prompt, time to first token, load time (quantisation included), resident-memory
growth while each contender runs, and the ratios. Cold and warm start (`start_seconds`): a fresh
Python process, from its spawn to its first generated token, first with empty on-disk caches (the
GGUF conversion cache and numba's compiled kernels: a new machine), then again with the caches the
first one filled. Accuracy of each scheme against fp32: greedy agreement (teacher-forced along
fp32's greedy continuations, 64 tokens x 8 prompts) and logits cosine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.bench import positive_int

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper who",
    "Explain how a refrigerator works in simple terms:",
    "The three most important ideas in computer science are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of the forest,",
    "A recipe for bread needs flour, water, salt and",
    "The main differences between cats and dogs are",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gemma3-270m", help="model id, .gguf file or checkpoint directory")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per decode measurement")
    parser.add_argument("--prefill-tokens", type=positive_int, default=2048)
    parser.add_argument("--decode-repeats", type=positive_int, default=3,
                        help="batch-1 decode measurements per engine, ours and llama.cpp's alike; the fastest is "
                             "reported (as timeit does: the run the machine disturbed least)")
    parser.add_argument("--skip-reference", action="store_true", help="skip transformers (slow)")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--quantize", default="int8,int8-dynamic,int4",
                        help="comma-separated schemes to run beside fp32 (lm/quantize.py; empty: none)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only each scheme's load time and accuracy against fp32 (no speed, no reference)")
    parser.add_argument("--skip-start", action="store_true",
                        help="skip the cold and warm start of each contender (two fresh processes each: ~1 min "
                             "for the 270M; a cold 1.5B first converts its 1.1 GB GGUF into a temporary directory)")


class PeakRSS:
    """Peak resident-set growth (bytes) over a `with` block, sampled every 5 ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.base


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_prompt_ids(tokenizer, length: int) -> list[int]:
    text = " ".join(PROMPTS) + " "
    ids = tokenizer.encode(text * (length // 40 + 2))
    return ids[:length]


# ----- the project -----------------------------------------------------------------------------

def bench_engine(lm, args, label: str) -> dict:
    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams

    new = args.new_tokens
    config = EngineConfig(max_seq_len=args.prefill_tokens + new + 8, kv_budget_bytes=2 << 30, max_batch=8,
                          prefill_chunk=512, stop_token_ids=())
    engine = lm.engine(config)
    tokenizer = lm.tokenizer
    greedy = SamplingParams(max_new_tokens=new)
    engine.generate(GenerationRequest(tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=4)))  # warm-up

    with PeakRSS() as memory:
        # decode at batch 1: time for `new` tokens minus time to the first one, fastest of the repeats
        decode_1 = ttft = 0.0
        for repeat in range(max(1, args.decode_repeats)):
            result = engine.generate(GenerationRequest(tokenizer.encode(PROMPTS[1]), greedy))
            decode_1 = max(decode_1, (new - 1) / (result.total_time_s - result.time_to_first_token_s))
            ttft = ttft if repeat else result.time_to_first_token_s

        handles = [engine.submit(GenerationRequest(tokenizer.encode(p), greedy)) for p in PROMPTS]
        started = time.perf_counter()
        while not all(h.done for h in handles):
            engine.step()
        elapsed = time.perf_counter() - started
        aggregate_8 = sum(h.result().completion_tokens for h in handles) / elapsed

        ids = long_prompt_ids(tokenizer, args.prefill_tokens)
        result = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=1)))
        prefill = len(ids) / result.time_to_first_token_s
    return {"name": label, "decode_tok_s": decode_1, "aggregate_8_tok_s": aggregate_8, "prefill_tok_s": prefill,
            "ttft_s": ttft, "peak_rss_growth_mib": memory.growth / 2**20, "weights_mib": _tensor_mib(lm.model),
            "kv_cache_mib": engine.storage.total_bytes / 2**20}


def quantized_accuracy(fp32_lm, quantized_lm, new_tokens: int) -> dict:
    """Teacher-forced agreement: along fp32's greedy continuation of each prompt, how often the
    quantised model's argmax equals fp32's, and the cosine of their logits at every generated position."""
    import torch

    from lm.attention import FullAttention
    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams

    engine = fp32_lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=1 << 30, max_batch=1, stop_token_ids=()))
    agree, total, cosines = 0, 0, []
    for prompt in PROMPTS:
        ids = fp32_lm.tokenizer.encode(prompt)
        generated = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=new_tokens))).token_ids
        sequence = torch.tensor(ids + generated[:-1])[None]  # (1, T)
        positions = torch.arange(sequence.shape[1])[None]
        with torch.inference_mode():
            logits = [m.model.logits(m.model(sequence, positions, FullAttention(m.config, positions))[0, len(ids) - 1:])
                      for m in (fp32_lm, quantized_lm)]  # (new_tokens, vocab) each
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        total += logits[0].shape[0]
        cosines += torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1).tolist()
    return {"greedy_agreement": agree / total, "logits_cosine_min": min(cosines),
            "logits_cosine_mean": sum(cosines) / len(cosines)}


START_TIMEOUT_S = 1800  # one fresh process's start; a cold 1.5B converts ~1 GB first


def start_seconds(model: str, scheme: str | None, threads: int, *, llama_cpp: bool = False,
                  directory: str | Path | None = None) -> tuple[float, float]:
    """(cold, warm) seconds from spawning a fresh Python process to its first generated token (greedy,
    the first prompt; `scheme` one of lm.quantize.SCHEMES or None for fp32; `llama_cpp`: llama.cpp's
    Llama instead, `model` then a GGUF file, which it reads as it is, keeping no on-disk cache).
    Cold: a new conversion cache and NUMBA_CACHE_DIR, both empty, as on a new machine; warm: the same
    process again with what the cold one left there. The OS page cache is warm for both (the files
    were just read). `directory`: where the two caches go (an empty directory; default a temporary
    one, removed after). Raises ValueError for a `directory` that is not an empty directory (the cold
    start would find caches there, or numba none at all), RuntimeError, naming the process's last
    error line, when a process fails or exceeds START_TIMEOUT_S."""
    if directory is not None and (not Path(directory).is_dir() or any(Path(directory).iterdir())):
        raise ValueError(f"start_seconds needs an empty directory for its caches; {directory} is not one")
    command = [sys.executable, "-m", "service.bench.lm", "--first-token", model, "--threads", str(threads)]
    if scheme:
        command += ["--quantize", scheme]
    if llama_cpp:
        command.append("--llama-cpp")
    times = []
    with contextlib.nullcontext(directory) if directory else tempfile.TemporaryDirectory(prefix="tessera-start-") \
            as directory:
        env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(directory) / "numba"), OMP_NUM_THREADS=str(threads))
        for _ in range(2):
            started = time.perf_counter()
            try:
                done = subprocess.run(command + ["--cache-dir", str(Path(directory) / "models")], env=env,
                                      capture_output=True, text=True, timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"starting {' '.join(command[4:])} took over {START_TIMEOUT_S} s") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"starting {' '.join(command[4:])} failed (exit {done.returncode}): {last}")
            times.append(time.perf_counter() - started)
    return times[0], times[1]


def _first_token(argv: list[str]) -> int:
    """The process `start_seconds` spawns: load, then generate one greedy token, then exit."""
    parser = argparse.ArgumentParser(prog="python -m service.bench.lm --first-token")
    parser.add_argument("model")
    parser.add_argument("--threads", type=positive_int, required=True)
    parser.add_argument("--quantize")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--llama-cpp", action="store_true")
    args = parser.parse_args(argv)
    if args.llama_cpp:  # `model` is the GGUF file itself; nothing of the project is imported
        from llama_cpp import Llama

        llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=256,
                    verbose=False)
        next(iter(llm.generate(llm.tokenize(PROMPTS[0].encode()), temp=0.0, top_k=1, reset=True)))
        return 0
    import torch

    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.runtime import load_language_model
    from lm.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    lm = load_language_model(args.model, quantize=args.quantize, cache_dir=args.cache_dir, progress=False)
    engine = lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=64 << 20, max_batch=1, stop_token_ids=()))
    engine.generate(GenerationRequest(lm.tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=1)))
    return 0


# ----- the reference: transformers -------------------------------------------------------------

def bench_transformers(path, tokenizer, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    new = args.new_tokens

    def run(batch_ids: list[list[int]], max_new: int) -> float:
        width = max(len(i) for i in batch_ids)
        input_ids = torch.tensor([[0] * (width - len(i)) + i for i in batch_ids])  # left padding
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in batch_ids])
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)
        return time.perf_counter() - started

    run([tokenizer.encode(PROMPTS[0])], 2)  # warm-up
    with PeakRSS() as memory:
        one = [tokenizer.encode(PROMPTS[1])]
        ttft = run(one, 1)
        decode_1 = max((new - 1) / (run(one, new) - run(one, 1)) for _ in range(max(1, args.decode_repeats)))
        batch = [tokenizer.encode(p) for p in PROMPTS]
        first = run(batch, 1)
        aggregate_8 = len(batch) * (new - 1) / (run(batch, new) - first)
        ids = long_prompt_ids(tokenizer, args.prefill_tokens)
        prefill = len(ids) / run([ids], 1)
    weights = _tensor_mib(model)
    del model
    return {"name": "transformers fp32", "decode_tok_s": decode_1, "aggregate_8_tok_s": aggregate_8,
            "prefill_tok_s": prefill, "ttft_s": ttft, "peak_rss_growth_mib": memory.growth / 2**20,
            "weights_mib": weights, "kv_cache_mib": None}


# ----- llama.cpp -------------------------------------------------------------------------------

def bench_llama_cpp(gguf_file, tokenizer, args) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: skipped (install the bench extra: pip install -e '.[bench]')")
        return None
    new = args.new_tokens
    with PeakRSS() as memory:
        llm = Llama(model_path=str(gguf_file), n_threads=args.threads, n_threads_batch=args.threads,
                    n_ctx=args.prefill_tokens + new + 8, n_batch=512, verbose=False)

        def run(ids: list[int], max_new: int) -> float:
            llm.reset()
            started = time.perf_counter()
            produced = 0
            for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                produced += 1
                if produced >= max_new:
                    break
            return time.perf_counter() - started

        run(tokenizer.encode(PROMPTS[0]), 2)
        one = tokenizer.encode(PROMPTS[1])
        ttft = run(one, 1)
        decode_1 = max((new - 1) / (run(one, new) - run(one, 1)) for _ in range(max(1, args.decode_repeats)))
        ids = long_prompt_ids(tokenizer, args.prefill_tokens)
        prefill = len(ids) / run(ids, 1)
    return {"name": "llama.cpp Q4_K_M", "decode_tok_s": decode_1, "aggregate_8_tok_s": None,
            "prefill_tok_s": prefill, "ttft_s": ttft, "peak_rss_growth_mib": memory.growth / 2**20,
            "weights_mib": gguf_file.stat().st_size / 2**20, "kv_cache_mib": None}


def _tensor_mib(module) -> float:
    """Bytes held by a module's parameters and buffers (shared storage counted once) and by fbgemm's
    packed weights (lm.quantize.Int8DynamicLinear.packed_nbytes)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    total += sum(part.packed_nbytes() for part in module.modules() if hasattr(part, "packed_nbytes"))
    return total / 2**20


def _kernel_choices(model) -> str:
    """Which kernel each kind of quantised layer of `model` runs, by shape: int8_matvec up to its
    measured rows (lm.quantize.Int8DynamicLinear.choose_matvec_rows), its other kernel above."""
    from lm.quantize import Int4Linear, Int8DynamicLinear

    choices: dict[str, str] = {}
    for name, module in model.named_modules():
        shape = f"{getattr(module, 'out_features', 0)}x{getattr(module, 'in_features', 0)}"
        if isinstance(module, Int8DynamicLinear):
            kind = "head" if not module.per_token else "projection"
            other = "fbgemm" if module.kernel == "fbgemm" else "_int_mm"
            choices.setdefault(f"{kind} {shape}", f"int8_matvec at <= {module.matvec_rows} rows, {other} above"
                               if module.matvec_rows else other)
        elif isinstance(module, Int4Linear):
            choices.setdefault(f"projection {shape}", "ATen int4 (_weight_int4pack_mm_for_cpu)")
    return "; ".join(f"{key}: {value}" for key, value in choices.items()) or "none quantised"


# ----- driver ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    import torch

    from lm.runtime import load_language_model

    from lm.quantize import SCHEMES

    torch.set_num_threads(args.threads)
    schemes = [name for name in args.quantize.split(",") if name]
    unknown = [name for name in schemes if name not in SCHEMES]
    if unknown or (args.accuracy_only and not schemes):
        print(f"tessera bench lm: {'unknown scheme ' + ', '.join(unknown) if unknown else '--accuracy-only needs --quantize'}"
              f"; choose from {', '.join(SCHEMES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    fp32 = load_language_model(args.model)
    loads = {"fp32": time.perf_counter() - started}
    rows = [] if args.accuracy_only else [bench_engine(fp32, args, "tessera fp32")]
    accuracy, kernels = {}, {}
    for scheme in schemes:
        started = time.perf_counter()
        quantized = load_language_model(args.model, quantize=scheme)
        loads[scheme] = time.perf_counter() - started
        kernels[scheme] = _kernel_choices(quantized.model)
        if not args.accuracy_only:
            rows.append(bench_engine(quantized, args, f"tessera {scheme}"))
        accuracy[scheme] = quantized_accuracy(fp32, quantized, args.new_tokens)
        del quantized
    if args.accuracy_only:
        for scheme, figures in accuracy.items():
            print(f"{_accuracy_line(scheme, figures, args.new_tokens)}; load {loads[scheme]:.1f} s "
                  f"(fp32 {loads['fp32']:.1f} s)")
        if args.json:
            print(json.dumps({"accuracy": accuracy, "load_s": loads}))
        return 0
    for row in rows:
        row["load_s"] = loads[row["name"].removeprefix("tessera ")]
    reference = None if args.skip_reference else bench_transformers(fp32.path, fp32.tokenizer, args)
    if reference:
        rows.append(reference)
    llama = None
    if not args.skip_llama_cpp:
        gguf_file = _gguf_file(args.model)
        llama = bench_llama_cpp(gguf_file, fp32.tokenizer, args) if gguf_file else None
        if llama:
            rows.append(llama)
    if not args.skip_start:  # after the in-process figures: these processes would disturb them
        for row in rows:
            if row["name"].startswith("tessera") or row is llama:
                scheme = row["name"].removeprefix("tessera ")
                row["start_cold_s"], row["start_warm_s"] = start_seconds(
                    str(gguf_file) if row is llama else args.model,
                    None if scheme == "fp32" or row is llama else scheme, args.threads, llama_cpp=row is llama)

    print(f"{'':24}{'decode tok/s':>14}{'8-req tok/s':>13}{'prefill tok/s':>15}{'TTFT s':>9}{'load s':>8}"
          f"{'weights MiB':>13}{'KV MiB':>8}{'RSS +MiB':>10}{'cold s':>8}{'warm s':>8}")
    for row in rows:
        agg = "-" if row["aggregate_8_tok_s"] is None else f"{row['aggregate_8_tok_s']:.1f}"
        kv = "-" if row["kv_cache_mib"] is None else f"{row['kv_cache_mib']:.0f}"
        load = "-" if row.get("load_s") is None else f"{row['load_s']:.1f}"
        cold, warm = ("-" if row.get(key) is None else f"{row[key]:.1f}" for key in ("start_cold_s", "start_warm_s"))
        print(f"{row['name']:24}{row['decode_tok_s']:14.1f}{agg:>13}{row['prefill_tok_s']:15.1f}"
              f"{row['ttft_s']:9.3f}{load:>8}{row['weights_mib']:13.0f}{kv:>8}{row['peak_rss_growth_mib']:10.0f}"
              f"{cold:>8}{warm:>8}")
    print(f"decode tok/s: the fastest of {max(1, args.decode_repeats)} runs of {args.new_tokens} tokens, for every "
          "contender alike; weights: parameter, buffer and fbgemm-packed bytes (llama.cpp: the GGUF file; int8-dynamic's "
          "projections are held packed for fbgemm, and row-major too where lm.matvec takes decode's few rows; "
          "the int8 head both packed and plain for the embedding's lookups); KV: the engine's preallocated cache; "
          "RSS +MiB: peak resident growth while the measurements ran (llama.cpp's includes loading its model); "
          "load s: checkpoint to ready model; cold s / warm s: a fresh process from its spawn to its first token, "
          "with empty conversion and numba caches, then with the caches the first one filled (llama.cpp keeps none; "
          "the OS page cache is warm for both)")
    for scheme, choice in kernels.items():
        print(f"{scheme} kernels (measured at load): {choice}")
    for scheme, figures in accuracy.items():
        print(_accuracy_line(scheme, figures, args.new_tokens))
    ratios = {}
    if reference:
        ratios["fp32 decode / transformers"] = rows[0]["decode_tok_s"] / reference["decode_tok_s"]
        ratios["fp32 8-req / transformers 8-req"] = rows[0]["aggregate_8_tok_s"] / reference["aggregate_8_tok_s"]
        ratios["fp32 prefill / transformers"] = rows[0]["prefill_tok_s"] / reference["prefill_tok_s"]
    if llama:
        ours = [row for row in rows if row["name"].startswith("tessera")]
        for row in ours[1:]:
            ratios[f"{row['name'].removeprefix('tessera ')} decode / llama.cpp"] = row["decode_tok_s"] / llama["decode_tok_s"]
        ratios["best 8-req / llama.cpp single"] = max(r["aggregate_8_tok_s"] for r in ours) / llama["decode_tok_s"]
        ratios["best prefill / llama.cpp"] = max(r["prefill_tok_s"] for r in ours) / llama["prefill_tok_s"]
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")
    if args.json:
        print(json.dumps({"rows": rows, "accuracy": accuracy, "ratios": ratios}))
    return 0


def _accuracy_line(scheme: str, figures: dict, new_tokens: int) -> str:
    return (f"{scheme} vs fp32: greedy agreement {figures['greedy_agreement']:.1%} over {new_tokens} tokens x "
            f"{len(PROMPTS)} prompts; logits cosine mean {figures['logits_cosine_mean']:.4f}, "
            f"min {figures['logits_cosine_min']:.4f}")


def _gguf_file(spec: str):
    from lm.checkpoints import DEFAULT_MODEL, PACKAGED_MODELS, embedded_gguf, packaged_gguf

    if spec == DEFAULT_MODEL:
        return embedded_gguf()
    if spec in PACKAGED_MODELS:
        return packaged_gguf(spec, progress=False)
    path = Path(spec)
    return path if path.suffix.lower() == ".gguf" else None


if __name__ == "__main__":  # only `start_seconds`'s processes run this module
    if sys.argv[1:2] != ["--first-token"]:
        sys.exit("usage: python -m service.bench.lm --first-token MODEL --threads N --cache-dir DIR "
                 "[--quantize SCHEME] [--llama-cpp] (the benchmark itself: tessera bench lm)")
    sys.exit(_first_token(sys.argv[2:]))

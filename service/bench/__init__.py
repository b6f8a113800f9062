"""`tessera bench TARGET`: each benchmark runs the project and the reference side by side in one
process and prints throughputs and ratios. Targets register here by module path.

The benchmarks live in this package, beside the CLI and outside the serving path: `lm` and `vision`
never import them (lower layers never import higher ones), and nothing serving a request does."""

from __future__ import annotations

import argparse
import importlib

# target -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
TARGETS: dict[str, tuple[str, str]] = {
    "lm": ("service.bench.lm", "decode/prefill tok/s vs transformers and llama.cpp on the embedded 270M"),
    "preprocess": ("service.bench.preprocess", "image preprocessing tiles/s vs Gemma3ImageProcessorPil"),
    "vision": ("service.bench.vision", "SigLIP + projector tiles/s (torch, ONNX fp32/int8) vs transformers"),
    "serve": ("service.bench.serve", "gateway over gRPC vs the engine in process: req/s, p50/p99 at 1/4/16 clients"),
    "caption": ("service.bench.caption", "batch captioning images/s vs a transformers loop, one image at a time"),
    "hostile": ("service.bench.hostile", "health and stream latency of `serve all` while hostile requests arrive"),
    "engine": ("service.bench.engine", "paged engine: concurrency at a fixed KV budget, prefix-cache TTFT, decode "
                                       "step per context length"),
    "kernels": ("service.bench.kernels", "each quantised linear (int8, int8 x int8, int4) vs fp32 F.linear on a "
                                         "model's shapes at 1/8/64 rows"),
    "moe": ("service.bench.moe", "one Qwen3-30B-A3B MoE layer tokens/s at 1/8/512 tokens vs Qwen3MoeSparseMoeBlock"),
}


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, threads), else argparse's usage error (exit 2)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, else argparse's usage error (exit 2)."""
    return _int_at_least(text, 0)


def positive_ints(text: str) -> str:
    """argparse type: comma-separated integers >= 1 ("1,8,64"), returned as given."""
    for part in text.split(","):
        positive_int(part.strip())
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module_name, help_text) in TARGETS.items():
        sub = targets.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    import sys

    if isinstance(getattr(args, "model", None), str):  # a bench with --model: a bad one is named before any work
        from lm.checkpoints import check_model_spec

        try:
            check_model_spec(args.model)
        except (OSError, ValueError) as error:
            print(f"tessera bench {args.target}: --model {args.model}: {error}", file=sys.stderr)
            return 2
    return int(importlib.import_module(args._bench_module).run(args) or 0)

"""`tessera generate`: text (and images, with a vision-language checkpoint) in, a continuation out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lm.commands import QUANTIZATION_SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gemma3-270m",
                        help="gemma3-270m (the embedded default), qwen2.5-coder-1.5b-instruct (the qwen25-coder "
                             "extra), a .gguf file or a checkpoint directory of a supported family")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the user's message (sent as one chat turn unless --raw)")
    source.add_argument("--messages", type=Path, help="JSON file: a list of chat messages {role, content}")
    parser.add_argument("--raw", action="store_true",
                        help="send --prompt as plain text, without the chat format; images go at its "
                             "<start_of_image> markers, or before the text when it has none")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image (repeatable); needs a vision-language checkpoint")
    parser.add_argument("--pan-and-scan", action="store_true", help="add Pan & Scan crops of wide or tall images")
    add_sampling_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantize", choices=QUANTIZATION_SCHEMES, help="weight quantisation (CPU; lm/quantize.py)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    thinking = parser.add_argument_group("reasoning models (Qwen 3)")
    thinking.add_argument("--thinking-budget", type=int, metavar="N",
                          help="most tokens of thinking; then the block is closed and the model answers (0: none)")
    thinking.add_argument("--no-thinking", action="store_true",
                          help="render the chat with enable_thinking=false (the template's empty <think> block)")
    thinking.add_argument("--template-kwarg", action="append", default=[], metavar="NAME=JSON",
                          help='a chat-template variable, e.g. enable_thinking=false (repeatable)')


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float,
                        help="0 = greedy (default: the checkpoint's generation_config.json if it samples, else 0)")
    parser.add_argument("--top-k", type=int, help="0 = off (default: the checkpoint's, else 0)")
    parser.add_argument("--top-p", type=float, help="1 = off (default: the checkpoint's, else 1)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]; 0 = off")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]; 0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="(0, 10]; 1 = off")


def sampling_params(args: argparse.Namespace, defaults: dict | None = None):
    """The flags as SamplingParams; `defaults` (the checkpoint's, lm.sampling.checkpoint_sampling_defaults)
    fill temperature, top_k and top_p left unset, else greedy / off. Raises ValueError."""
    from lm.sampling import SamplingParams, sampling_choices

    chosen = sampling_choices(defaults or {}, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return SamplingParams(max_new_tokens=args.max_new_tokens, **chosen, seed=args.seed, stop=tuple(args.stop),
                          thinking_budget=getattr(args, "thinking_budget", None), min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty)


def template_kwargs(args: argparse.Namespace) -> dict:
    """--template-kwarg NAME=JSON entries and --no-thinking as chat-template variables. Raises ValueError."""
    from lm.prompt import template_kwargs_from_json

    texts = {}
    for entry in args.template_kwarg:
        name, sep, text = entry.partition("=")
        if not sep:
            raise ValueError(f"--template-kwarg {entry!r}: expected NAME=JSON, e.g. enable_thinking=false")
        texts[name] = text
    kwargs = template_kwargs_from_json(texts, source="--template-kwarg")
    if args.no_thinking:
        kwargs["enable_thinking"] = False
    return kwargs


def run(args: argparse.Namespace) -> int:
    try:
        if args.raw and args.messages is not None:
            raise ValueError("--raw applies to --prompt (plain text without the chat format); --messages is "
                             "always laid out as a chat: drop one of them")
        if args.pan_and_scan and not args.image:
            raise ValueError("--pan-and-scan crops the --image files, and none is given")
        params = sampling_params(args)
        messages = _messages(args)
    except (ValueError, OSError) as error:
        print(f"tessera generate: {error}", file=sys.stderr)
        return 2

    import torch

    from lm.requests import EngineError, GenerationRequest
    from lm.runtime import DTYPES, load_language_model
    from service.pipeline import ImageInputError, encode_images, plan_tiles

    try:
        lm = load_language_model(args.model, device=args.device, dtype=DTYPES[args.dtype], quantize=args.quantize)
    except (ValueError, OSError) as error:
        print(f"tessera generate: cannot load model {args.model!r}: {error}", file=sys.stderr)
        return 2
    try:
        params = sampling_params(args, lm.sampling_defaults)
        if args.image and not lm.config.accepts_images:
            raise ValueError(f"model {args.model!r} is text-only (it takes no images): drop --image, or use a "
                             "vision-language checkpoint")
        # The prompt is laid out and its length checked with the tile counts from the image headers,
        # so that a prompt too long for the model is refused before any image is decoded or encoded.
        prompt = _layout(lm, args, messages, plan_tiles(args.image, pan_and_scan=args.pan_and_scan))
        _check_context(lm, len(prompt.token_ids))
        images = encode_images(lm, args.image, pan_and_scan=args.pan_and_scan)
        request = GenerationRequest(prompt.token_ids, params, soft_tokens=images.soft_tokens,
                                    image_mask=torch.tensor(prompt.image_mask))
        engine = lm.engine(_engine_config(lm, len(prompt.token_ids), params.max_new_tokens))
        engine.start()
        try:
            handle = engine.submit(request)
            if not args.json:
                print_sections((event.text, event.reasoning) for event in handle)
            result = handle.result()
        finally:
            engine.stop()
    except (ImageInputError, EngineError, ValueError) as error:
        print(f"tessera generate: {error}", file=sys.stderr)
        return 2
    if result.finish_reason == "error":
        print(f"tessera generate: generation failed: {result.error}", file=sys.stderr)
        return 1
    decode_s = result.total_time_s - (result.time_to_first_token_s or 0.0)
    summary = {
        "text": result.text, "reasoning_text": result.reasoning_text, "reasoning_tokens": result.reasoning_tokens,
        "reasoning_truncated": result.reasoning_truncated,
        "token_ids": result.token_ids, "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "images": [{"image": p, "tiles": t} for p, t in zip(args.image, images.tiles_per_image)],
        "timings": {"load_s": round(lm.load_seconds, 3), "encode_s": round(images.seconds, 3),
                    "time_to_first_token_s": round(result.time_to_first_token_s or 0.0, 3),
                    "total_s": round(result.total_time_s, 3),
                    "decode_tokens_per_s": round((result.completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None},
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        t = summary["timings"]
        print(f"[{result.finish_reason}; {result.prompt_tokens} prompt + {result.completion_tokens} generated tokens; "
              f"first token {t['time_to_first_token_s']} s; {t['decode_tokens_per_s']} tok/s]", file=sys.stderr)
    return 0


def _engine_config(lm, prompt_tokens: int, max_new_tokens: int):
    """One request: a cache sized for this prompt and continuation, up to the model's context length
    (a prompt longer than the model's context is refused by the engine with the limit named)."""
    from lm.engine import EngineConfig
    from lm.kv_cache import request_budget_bytes

    max_seq_len = max(2, min(lm.config.max_position_embeddings, prompt_tokens + max_new_tokens))
    defaults = EngineConfig()
    budget = request_budget_bytes(lm.config, max_seq_len, lm.dtype, block_size=defaults.block_size,
                                  prefill_chunk=defaults.prefill_chunk)
    return EngineConfig(max_seq_len=max_seq_len, kv_budget_bytes=budget, max_batch=1,
                        stop_token_ids=lm.tokenizer.special.stop_ids)


def _messages(args: argparse.Namespace):
    if args.messages is None:
        return None
    try:
        messages = json.loads(args.messages.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{args.messages}: not valid JSON ({error}); expected a list of {{role, content}} "
                         "objects") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{args.messages}: expected a JSON list of {{role, content}} objects")
    return messages


def _check_context(lm, prompt_tokens: int) -> None:
    from lm.requests import PromptTooLong

    context = lm.config.max_position_embeddings
    if prompt_tokens >= context:
        raise PromptTooLong(f"prompt is {prompt_tokens} tokens; the limit is {context - 1} (the model's context of "
                            f"{context} tokens includes at least one generated token)")


def print_sections(pieces) -> None:
    """Stream (text, is_reasoning) pieces to stdout: a reasoning model's thinking under a "[Thinking]"
    header (dimmed on a terminal), then its answer under "[Answer]"; plain text when nothing is reasoning.
    Shared by `tessera generate` and `tessera query --stream`."""
    dim, reset = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    section = None
    for text, reasoning in pieces:
        if not text:
            continue
        if reasoning != section and (reasoning or section is not None):
            sys.stdout.write(f"{reset}\n" if section else "")
            sys.stdout.write(f"[Thinking]\n{dim}" if reasoning else "[Answer]\n")
        section = reasoning
        sys.stdout.write(text)
        sys.stdout.flush()
    if section:  # the thinking was the last thing streamed: the answer is empty
        sys.stdout.write(f"{reset}\n[Answer]\n")
    sys.stdout.write("\n")
    sys.stdout.flush()


def _layout(lm, args, messages, tiles_per_image):
    """The prompt by the rules every entry point shares (`lm.prompt.layout_request`)."""
    from lm.prompt import layout_request

    return layout_request(lm.tokenizer, prompt=args.prompt or "", raw=args.raw, messages=messages,
                          image_tiles=tiles_per_image, tokens_per_tile=lm.config.mm_tokens_per_image,
                          template_kwargs=template_kwargs(args))

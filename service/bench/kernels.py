"""`tessera bench kernels`: each quantised linear of lm/quantize.py against the fp32 product
(torch.nn.functional.linear, the reference) on one model's projection and head shapes (the embedded
270M's by default), at 1, 8 and 64 rows: milliseconds per call, the ratio to fp32 and the relative error
against the fp32 product. The evidence behind each scheme's choice of kernel per layer kind.
"""

from __future__ import annotations

import argparse
import time

from service.bench import positive_int, positive_ints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gemma3-270m", help="model id, .gguf file or checkpoint directory "
                                                                 "(its config gives the shapes; weights are random)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rows", type=positive_ints, default="1,8,64", help="comma-separated batch sizes (rows of x)")


def _best_ms(call, repeats: int) -> float:
    call()
    call()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best * 1e3


def run(args: argparse.Namespace) -> int:
    import functools

    import torch
    import torch.nn.functional as F

    from lm.checkpoints import resolve_model
    from lm.models import load_config
    from lm.quantize import Int4Linear, Int8DynamicLinear, Int8Linear

    torch.set_num_threads(args.threads)
    config = load_config(resolve_model(args.model, progress=False))
    hidden, inner = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (q_out, hidden), "k/v_proj": (kv_out, hidden), "o_proj": (hidden, q_out),
              "gate/up_proj": (inner, hidden), "down_proj": (hidden, inner), "lm_head": (config.vocab_size, hidden)}
    kernels = {"int8 (weight-only, bf16 x)": Int8Linear,
               "int8 x int8 per token (fbgemm)": functools.partial(Int8DynamicLinear, kernel="fbgemm"),
               "int8 x int8 per token (_int_mm)": functools.partial(Int8DynamicLinear, kernel="int_mm"),
               "int8 x int8 per tensor (fbgemm)": functools.partial(Int8DynamicLinear, per_token=False),
               "int4 g32 (bf16 x)": Int4Linear}
    rows = [int(r) for r in args.rows.split(",")]
    print(f"tessera bench kernels: {args.model} shapes, torch threads {args.threads}; ms per call "
          "(ratio = fp32 ms / kernel ms; err = |y - y_fp32| / |y_fp32|)")
    torch.manual_seed(0)
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features) * 0.05
        layers = {label: make(weight) for label, make in kernels.items()}
        for m in rows:
            x = torch.randn(m, in_features)
            repeats = 3 if out_features * in_features > 50_000_000 else 50
            reference = F.linear(x, weight)
            fp32_ms = _best_ms(lambda: F.linear(x, weight), repeats)
            cells = [f"fp32 {fp32_ms:.3f}"]
            for label, layer in layers.items():
                ms = _best_ms(lambda layer=layer: layer(x), repeats)
                error = float((layer(x) - reference).norm() / reference.norm())
                cells.append(f"{label.split(' (')[0]}{' ' + label.split()[-1] if 'per' in label else ''} "
                             f"{ms:.3f} ({fp32_ms / ms:.2f}x, err {error:.3f})")
            print(f"{name:>12} {out_features}x{in_features} M={m:<3} " + " | ".join(cells), flush=True)
    return 0

"""`tessera bench moe`: one Mixture-of-Experts layer at Qwen3-30B-A3B's shapes (hidden 2048, 128
experts of width 768, top-8, renormalised, SiLU), fp32, Tessera's `SparseMoeBlock` against
transformers' `Qwen3MoeSparseMoeBlock` on the same random weights, side by side in one process.

The reference runs two ways: its block's own forward ("eager", what a standalone block runs: a loop
over the experts that received tokens) and transformers' "grouped_mm" experts implementation (what
`from_pretrained` picks by default, torch.nn.functional.grouped_mm). Tokens/s at each token count
(`--tokens`, one forward over that many tokens) is the median of `--repeats` timed runs, the sides
alternating so that load from elsewhere on the machine hits each; the best run is shown too, and the
load average before and after, since the dev machine is shared. `--quantize` adds Tessera with the
experts quantised by lm.quantize, one column per scheme: "int8" (int8 weights, bf16 activations: a
quarter of the weight bytes, which is what bounds the few-token cases) and "int8-dynamic" (the same
weights times int8 activations quantised per token, int8 x int8 GEMMs: what bounds the 512-token case
is arithmetic). Each quantised side's output error relative to the reference is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from service.bench import positive_int, positive_ints

GOAL = 2.0  # Tessera / reference tokens/s at 8 and 512 tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_ints, default="1,8,512",
                        help="comma-separated token counts (default 1,8,512)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed runs per side and token count (default 5)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--hidden-size", type=positive_int, default=2048)
    parser.add_argument("--moe-intermediate-size", type=positive_int, default=768)
    parser.add_argument("--num-experts", type=positive_int, default=128)
    parser.add_argument("--top-k", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", default="",
                        help="comma-separated lm.quantize schemes to time beside fp32 (int8, int8-dynamic, int4)")


def build_blocks(args: argparse.Namespace):
    """(reference model, its MoE block with random fp32 weights, Tessera's block holding a copy).
    The reference block is reached through the public model class: the MLP of a one-layer
    `Qwen3MoeForCausalLM` (a `Qwen3MoeSparseMoeBlock`), whose experts implementation the model's
    `set_experts_implementation` switches."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lm.layers import fuse_projections
    from lm.layers.moe import SparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                            num_experts=args.num_experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                            hidden_act="silu", num_hidden_layers=1, vocab_size=16, intermediate_size=16,
                            num_attention_heads=1, num_key_value_heads=1, head_dim=16)
    model = Qwen3MoeForCausalLM(config).eval()
    reference = model.model.layers[0].mlp
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            # unit-variance outputs per projection; router logits of standard deviation 2
            scale = (2.0 if name == "gate.weight" else 1.0) / tensor.shape[-1] ** 0.5
            tensor.normal_(0.0, scale, generator=generator)
    with torch.device("meta"):  # no initialisation: the weights come from the reference
        ours = SparseMoeBlock(hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                              num_experts=args.num_experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                              activation="silu")
    ours = ours.to_empty(device="cpu").eval()
    ours.load_state_dict(checkpoint_state_dict(reference), strict=True)
    return model, reference, fuse_projections(ours)


def quantized_copy(ours, scheme: str):
    """A copy of `ours` with every expert projection quantised with `scheme` (lm.quantize.quantize_model,
    which takes a whole network: this one has the block as its only layer and a throwaway head)."""
    import copy

    from torch import nn

    from lm.quantize import quantize_model

    network = nn.Module()
    network.layers = nn.ModuleList([copy.deepcopy(ours)])
    network.lm_head = nn.Linear(1, 1, bias=False)
    return quantize_model(network, scheme).layers[0]


def checkpoint_state_dict(reference) -> dict:
    """The reference's fused experts (gate_up_proj (E, 2 * inter, hidden): gate rows, then up rows;
    down_proj (E, hidden, inter)) under the published checkpoints' per-expert names."""
    inter = reference.experts.down_proj.shape[-1]
    state = {"gate.weight": reference.gate.weight.detach()}
    for e, (gate_up, down) in enumerate(zip(reference.experts.gate_up_proj.detach(),
                                            reference.experts.down_proj.detach())):
        state[f"experts.{e}.gate_proj.weight"] = gate_up[:inter]
        state[f"experts.{e}.up_proj.weight"] = gate_up[inter:]
        state[f"experts.{e}.down_proj.weight"] = down
    return state


def run(args: argparse.Namespace) -> int:
    import torch

    if args.top_k > args.num_experts:
        print(f"tessera bench moe: --top-k {args.top_k} must be at most --num-experts ({args.num_experts})",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.tokens.split(",")]
    load_before = os.getloadavg()
    model, reference, ours = build_blocks(args)

    def reference_with(implementation: str):
        def forward(x):
            model.set_experts_implementation(implementation)
            return reference(x)
        return forward

    sides = {"tessera": ours, "transformers eager": reference_with("eager"),
             "transformers grouped_mm": reference_with("grouped_mm")}
    schemes = [scheme for scheme in args.quantize.split(",") if scheme]
    for scheme in schemes:
        sides[f"tessera {scheme}"] = quantized_copy(ours, scheme)
    print(f"MoE layer: hidden {args.hidden_size}, {args.num_experts} experts x {args.moe_intermediate_size}, "
          f"top-{args.top_k}, norm_topk_prob, silu; fp32; torch threads {torch.get_num_threads()}; "
          f"repeats {args.repeats}; load average before {_load(load_before)}")
    print(f"{'tokens':>6}" + "".join(f"{name + ' tok/s':>34}" for name in sides) + f"{'max |diff|':>12}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    references = [name for name in sides if name.startswith("transformers")]
    worst, ratio_lines = 0.0, []
    for n in counts:
        x = torch.randn(1, n, args.hidden_size, generator=generator)  # (B, T, hidden)
        inner = max(1, 16 // n)  # forwards per timed run: a few ms alone is below the timer's noise
        times = {name: [] for name in sides}
        with torch.inference_mode():
            outputs = {name: side(x) for name, side in sides.items()}  # also the warm-up
            expected = outputs["transformers eager"]
            diff = max(float((outputs[name] - expected).abs().max()) for name in ["tessera"] + references)
            for _ in range(args.repeats):
                for name, side in sides.items():
                    started = time.perf_counter()
                    for _ in range(inner):
                        side(x)
                    times[name].append((time.perf_counter() - started) / inner)
        worst = max(worst, diff)
        median = {name: statistics.median(samples) for name, samples in times.items()}
        print(f"{n:>6}" + "".join(f"{n / median[name]:>20.1f} (best {n / min(times[name]):7.1f})" for name in sides)
              + f"{diff:>12.1e}")
        goal = f" (goal >= {GOAL:g}x)" if n in (8, 512) else ""
        ratio_lines.append(f"ratio at {n} tokens: " + ", ".join(
            f"tessera / {name} {median[name] / median['tessera']:.2f}x" for name in references) + goal)
        for scheme in schemes:
            side = f"tessera {scheme}"
            error = float((outputs[side] - expected).norm() / expected.norm())
            ratio_lines.append(f"  {scheme} at {n} tokens: " + ", ".join(
                f"{side} / {name} {median[name] / median[side]:.2f}x" for name in references)
                + goal + f"; output relative error {error:.1e}")
    print(f"load average after {_load(os.getloadavg())}")
    print("\n".join(ratio_lines))
    return 0 if worst <= 1e-4 else 1


def _load(average: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in average)

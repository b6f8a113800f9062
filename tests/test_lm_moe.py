"""The Mixture-of-Experts block (lm/layers/moe.py) against transformers' Qwen 3 MoE block (the MLP of a
one-layer `Qwen3MoeForCausalLM`, under its default experts implementation and "eager") with random weights, fp32: parity at small shapes and with all 128 experts (top-8), for several
tokens, one token and tokens routed unevenly; the grouped (CUDA) path against the loop path; the
checkpoint's key names; fused gate/up experts on both paths; int8 quantisation of the experts (weight-only and
int8 x int8 dynamic).

Weights reach our block through `load_state_dict(strict=True)` under the checkpoint's names.
transformers 5 holds a layer's experts fused in memory, `experts.gate_up_proj` (E, 2 * inter,
hidden), expert e's gate_proj rows then its up_proj rows, and `experts.down_proj` (E, hidden, inter);
its checkpoint conversion for qwen3_moe (`conversion_mapping.py`, "qwen2_moe": MergeModulelist(dim=0)
then Concatenate(dim=1)) builds them from the per-expert keys on load, and `save_pretrained` splits
them back. `checkpoint_state_dict` below is that split.

Tolerance: both sides compute in fp32 with the same matmuls, but in different groupings (gate and up
as one fused matmul or two, a sum over an expert's rows or over a token's k experts), so results
differ by rounding: measured ~1e-7 at outputs of magnitude ~1. atol = rtol = 1e-5 (~80 ulps) allows
for other BLAS blockings and is still far below the O(0.1) change a wrong expert, a wrong weight or a
missing renormalisation makes (test_a_wrong_routing_weight_is_detected shows the margin)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lm.layers import fuse_projections
from lm.layers.moe import SparseMoeBlock
from lm.quantize import Int8DynamicLinear, Int8Linear, quantize_model

ATOL = RTOL = 1e-5
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def reference_block(*, hidden_size, moe_intermediate_size, num_experts, top_k, norm_topk_prob,
                    experts_implementation=None):
    """transformers' Qwen 3 MoE block, reached through the public model class: the MLP of a one-layer
    `Qwen3MoeForCausalLM` (random weights, fp32). `experts_implementation` None keeps transformers'
    default for the machine (`grouped_mm`); "eager" is the block's loop over experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                            hidden_act="silu", num_hidden_layers=1, vocab_size=16, intermediate_size=16,
                            num_attention_heads=1, num_key_value_heads=1, head_dim=16)
    model = Qwen3MoeForCausalLM(config).eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model.model.layers[0].mlp


def make_pair(*, hidden_size=64, moe_intermediate_size=32, num_experts=8, top_k=2, norm_topk_prob=True, seed=0,
              experts_implementation=None):
    """(reference Qwen 3 MoE block with random weights, our block holding the same weights)."""
    reference = reference_block(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                                num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                                experts_implementation=experts_implementation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            fan_in = tensor.shape[-1]
            # a router twice as sharp as unit-variance logits, so the top-k choices are clear-cut
            scale = 2.0 if name == "gate.weight" else 1.0
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale / fan_in**0.5)
    ours = SparseMoeBlock(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                          num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                          activation="silu").eval()
    ours.load_state_dict(checkpoint_state_dict(reference), strict=True)
    return reference, ours


def checkpoint_state_dict(reference) -> dict[str, torch.Tensor]:
    """The reference block's weights under the published checkpoints' per-expert names."""
    inter = reference.experts.down_proj.shape[-1]
    state = {"gate.weight": reference.gate.weight.detach()}
    for e, (gate_up, down) in enumerate(zip(reference.experts.gate_up_proj.detach(),
                                            reference.experts.down_proj.detach())):
        state[f"experts.{e}.gate_proj.weight"] = gate_up[:inter]  # (inter, hidden)
        state[f"experts.{e}.up_proj.weight"] = gate_up[inter:]  # (inter, hidden)
        state[f"experts.{e}.down_proj.weight"] = down  # (hidden, inter)
    return state


def expert_counts(ours: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """How many tokens of x each expert receives, by our router."""
    _, experts = ours.gate(x.reshape(-1, x.shape[-1]))
    return torch.bincount(experts.flatten(), minlength=ours.num_experts)


def assert_matches_reference(reference, ours, x):
    with torch.inference_mode():
        expected = reference(x.reshape(-1, 1, x.shape[-1]) if x.dim() == 2 else x).reshape(x.shape)
        out = ours(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("shape", [(2, 5), (1, 1), (7,)], ids=["batch of sequences", "one token", "flat tokens"])
@pytest.mark.parametrize("experts_implementation", [None, "eager"], ids=["default", "eager"])
def test_small_block_matches_the_reference(norm_topk_prob, shape, experts_implementation):
    reference, ours = make_pair(norm_topk_prob=norm_topk_prob, experts_implementation=experts_implementation)
    x = torch.randn(*shape, 64, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(reference, ours, x)


def test_router_picks_the_references_experts_and_weights():
    reference, ours = make_pair(num_experts=16, top_k=4)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, ref_weights, ref_experts = reference.gate(x)
        weights, experts = ours.gate(x)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))  # renormalised (norm_topk_prob)


def test_all_128_experts_top_8_match_the_reference():
    """Qwen3-30B-A3B's routing (128 experts, top-8, renormalised) at a narrow hidden size; 96 tokens
    reach most experts, two tokens reach at most 16 and leave the rest without work."""
    reference, ours = make_pair(hidden_size=32, moe_intermediate_size=24, num_experts=128, top_k=8)
    generator = torch.Generator().manual_seed(3)
    many = torch.randn(4, 24, 32, generator=generator)
    few = torch.randn(1, 2, 32, generator=generator)
    assert (expert_counts(ours, many) > 0).sum() > 100
    assert (expert_counts(ours, few) > 0).sum() <= 16
    assert_matches_reference(reference, ours, many)
    assert_matches_reference(reference, ours, few)


def uneven_input(ours: SparseMoeBlock, tokens: int) -> torch.Tensor:
    """Tokens sharing one strong direction that the router's rows 3 and 5 favour: experts 3 and 5
    get nearly every token, most experts get none or one."""
    hidden = ours.gate.weight.shape[1]
    generator = torch.Generator().manual_seed(4)
    direction = torch.randn(hidden, generator=generator)
    with torch.no_grad():
        for e in (3, 5):
            ours.gate.weight[e] = direction / hidden**0.5
    return torch.randn(tokens, hidden, generator=generator) + 3 * direction


def test_unevenly_routed_tokens_match_the_reference():
    reference, ours = make_pair(num_experts=16, top_k=4)
    x = uneven_input(ours, 40)
    reference.gate.weight.data.copy_(ours.gate.weight)
    counts = expert_counts(ours, x)
    assert counts[3] >= 38 and counts[5] >= 38 and (counts <= 1).sum() >= 4, counts
    assert_matches_reference(reference, ours, x)


def test_a_wrong_routing_weight_is_detected():
    """The tolerance's margin: without renormalising the top-k weights (the reference has it on),
    outputs move far beyond ATOL."""
    reference, ours = make_pair(norm_topk_prob=True)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    ours.gate.norm_topk_prob = False
    with torch.inference_mode():
        difference = (ours(x) - reference(x[:, None]).squeeze(1)).abs().max()
    assert difference > 100 * ATOL


@pytest.mark.parametrize("case", ["several tokens", "one token", "uneven"])
def test_grouped_path_equals_the_loop_path(case):
    _, ours = make_pair(num_experts=16, top_k=4)
    generator = torch.Generator().manual_seed(6)
    x = {"several tokens": lambda: torch.randn(3, 11, 64, generator=generator),
         "one token": lambda: torch.randn(1, 1, 64, generator=generator),
         "uneven": lambda: uneven_input(ours, 30)}[case]()
    with torch.inference_mode():
        loop, grouped = ours(x, grouped=False), ours(x, grouped=True)
        automatic = ours(x)  # on the CPU the loop
    assert torch.equal(automatic, loop)
    torch.testing.assert_close(grouped, loop, atol=ATOL, rtol=RTOL)


def test_no_tokens_give_an_empty_output_on_both_paths():
    _, ours = make_pair()
    x = torch.empty(0, 64)
    with torch.inference_mode():
        assert ours(x, grouped=False).shape == ours(x, grouped=True).shape == (0, 64)


def test_parameter_names_are_the_checkpoints():
    """Our block loads, strictly, the keys of one MoE layer exactly as transformers' save_pretrained
    writes a Qwen3-MoE checkpoint (the layout published on the Hub), and then matches that model's
    own MoE block."""
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=6, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, norm_topk_prob=True)
    torch.manual_seed(7)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0, 0.5)  # initialised to zeros: every tie
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        saved = load_file(f"{directory}/model.safetensors")
    prefix = "model.layers.0.mlp."
    layer = {key[len(prefix):]: value for key, value in saved.items() if key.startswith(prefix)}
    ours = SparseMoeBlock(hidden_size=32, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                          norm_topk_prob=True, activation="silu").eval()
    assert set(layer) == set(ours.state_dict())
    ours.load_state_dict(layer, strict=True)
    x = torch.randn(3, 4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), model.model.layers[0].mlp(x), atol=ATOL, rtol=RTOL)


class _Decoder(nn.Module):
    """What lm.quantize.quantize_model reads of a network: its layers and an untied lm_head."""

    def __init__(self, block: SparseMoeBlock, vocab_size: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block])
        self.lm_head = nn.Linear(block.gate.weight.shape[1], vocab_size, bias=False)


@pytest.mark.parametrize("fused", [False, True], ids=["per-projection", "gate-up-fused"])
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_int8_quantisation_covers_every_expert_and_keeps_outputs_close(scheme, fused):
    _, block = make_pair(num_experts=16, top_k=4)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = block(x)
    if fused:  # as a loaded checkpoint is (lm.weights.load_text_model)
        fuse_projections(block)
    router = block.gate.weight.detach().clone()
    quantized = quantize_model(_Decoder(copy.deepcopy(block)), scheme).layers[0]

    kind = {"int8": Int8Linear, "int8-dynamic": Int8DynamicLinear}[scheme]
    for expert in quantized.experts:
        for name in ("gate_up_proj", "down_proj") if fused else PROJECTIONS:
            assert type(getattr(expert, name)) is kind, name
    assert not any(isinstance(module, nn.Linear) for module in quantized.modules())
    # the router stays in fp32 (a quantised one would pick other experts)
    assert quantized.gate.weight.dtype == torch.float32 and torch.equal(quantized.gate.weight, router)
    with torch.inference_mode():
        out = quantized(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    # int8 weights (per-channel scales) and bf16 activations: ~1% relative error expected; int8
    # activations per token (int8-dynamic) add about as much again
    assert (out - expected).norm() / expected.norm() < {"int8": 0.03, "int8-dynamic": 0.05}[scheme]
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.998
    with pytest.raises(ValueError, match="grouped"):
        quantized(x, grouped=True)


def test_fused_gate_up_experts_equal_the_reference_on_both_paths():
    """fuse_projections gives each expert one gate_up_proj (gate rows, then up rows); the loop path and
    the padded batched matmul (grouped, the CUDA path) both read it and equal the reference."""
    reference, ours = make_pair(num_experts=16, top_k=4)
    fuse_projections(ours)
    assert all(expert.gate_up_proj is not None and not hasattr(expert, "gate_proj") for expert in ours.experts)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        expected = reference(x)
        for grouped in (False, True):
            torch.testing.assert_close(ours(x, grouped=grouped), expected, atol=ATOL, rtol=RTOL)


def test_bf16_keeps_the_dtype_and_stays_near_the_reference():
    reference, ours = make_pair()
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    with torch.inference_mode():
        out, expected = ours(x), reference(x)
    assert out.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: a few roundings apart (the sums run in different orders)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_bad_arguments_are_refused_with_what_is_allowed():
    arguments = dict(hidden_size=8, moe_intermediate_size=4, num_experts=4, num_experts_per_tok=2,
                     norm_topk_prob=True, activation="silu")
    with pytest.raises(ValueError, match="'relu'.*allowed: .*silu"):
        SparseMoeBlock(**{**arguments, "activation": "relu"})
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, num_experts=4\], got 5"):
        SparseMoeBlock(**{**arguments, "num_experts_per_tok": 5})


def test_the_expert_count_is_read_under_either_name_transformers_writes():
    """transformers 5 saves a Qwen3-MoE config's expert count as num_local_experts, published configs as
    num_experts: both give the count; two that disagree are refused by name."""
    import json
    import tempfile

    from transformers import Qwen3MoeConfig

    from lm.models.qwen import QwenDecoderConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=6, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16)
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        saved = json.load(open(f"{directory}/config.json"))
    assert QwenDecoderConfig.from_dict(saved).num_experts == 6
    for name in ("num_experts", "num_local_experts"):
        only = {k: v for k, v in saved.items() if k not in ("num_experts", "num_local_experts")}
        assert QwenDecoderConfig.from_dict({**only, name: 6}).num_experts == 6
    with pytest.raises(ValueError, match="num_experts 6 and num_local_experts 8 disagree"):
        QwenDecoderConfig.from_dict({**saved, "num_experts": 6, "num_local_experts": 8})

"""lm.layers.decode_stack: a decode step's layers in one numba call (int8-dynamic projections through
lm.matvec, attention on the paged cache read in place, the gated activation vectorised) gives the values
of the same layers run module by module: the same tokens and log-probabilities within 1e-4 (the
activation is within 2 ulp of ATen's, not bit-identical), across batches of 1 to 6 decode rows, for
Gemma 3 (sliding and full layers, two RoPE tables) and the dense Qwen shapes (q/k norm, q/k/v biases)."""

from __future__ import annotations

import pytest
import torch

import lm.models.gemma3 as gemma3
import lm.models.qwen as qwen
from lm import layers
from lm.engine import Engine, EngineConfig
from lm.layers import fuse_projections
from lm.quantize import Int8DynamicLinear, quantize_model
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from test_lm_engine import tiny_config

QWEN = {"vocab_size": 300, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10_000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu", "eos_token_id": 1}


def _model(family: str):
    torch.manual_seed(0)
    if family == "gemma3":
        config = tiny_config(hidden_size=128, intermediate_size=256, vocab_size=300)
        model = gemma3.Gemma3TextModel(config)
    else:
        fields = {**QWEN, "model_type": family, **({"head_dim": 32} if family == "qwen3" else {})}
        config = qwen.QwenDecoderConfig.from_dict(fields)
        model = qwen.QwenModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3 if "norm" in name or "bias" in name else 0.05 if "proj" in name else 1.0)
    model = quantize_model(fuse_projections(model.eval()), "int8-dynamic")
    for layer in model.modules():
        if isinstance(layer, Int8DynamicLinear):
            layer.set_matvec_rows(8)  # every decode batch through lm.matvec, whatever this machine measured
    return model, config


def _generate(model, config) -> list:
    engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=6,
                                                prefill_chunk=16, stop_token_ids=(), block_size=4))
    generator = torch.Generator().manual_seed(1)
    requests = [GenerationRequest(torch.randint(2, 290, (5 + 7 * i,), generator=generator).tolist(),
                                  SamplingParams(max_new_tokens=6 + 3 * i, logprobs=3), request_id=f"r{i}")
                for i in range(6)]  # finishing one by one: decode batches of 6 down to 1 rows
    handles = [engine.submit(request) for request in requests]
    while not all(handle.done for handle in handles):
        if engine.stats().running or engine.stats().waiting:
            engine.step()
        else:
            engine.output.drain()
    return [(handle.result().token_ids, handle.result().logprobs) for handle in handles]


def _assert_close(fused, modules) -> None:
    """The same tokens and top log-probabilities, each value within 1e-4 (relative to its size past 1)."""
    assert [tokens for tokens, _ in fused] == [tokens for tokens, _ in modules]
    for (_, ours), (_, theirs) in zip(fused, modules):
        for a, b in zip(ours, theirs, strict=True):
            assert a.token_id == b.token_id and [i for i, _ in a.top] == [i for i, _ in b.top]
            for x, y in [(a.logprob, b.logprob)] + [(p, q) for (_, p), (_, q) in zip(a.top, b.top)]:
                assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), (x, y)


_DECODE_STACK = layers.decode_stack


def _spy(monkeypatch) -> list[bool]:
    """Route run_decoder's decode_stack through a spy; the returned list gets, per forward pass, whether
    the fused layers were taken."""
    taken = []

    def spy(*args, **kwargs):
        out = _DECODE_STACK(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(layers, "decode_stack", spy)
    return taken


def _module_by_module(monkeypatch) -> None:
    monkeypatch.setattr(layers, "decode_stack", lambda *args, **kwargs: None)


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "qwen2"])
def test_the_fused_layer_equals_the_layer_module_by_module(family, monkeypatch):
    model, config = _model(family)
    taken = _spy(monkeypatch)
    fused = _generate(model, config)
    assert sum(taken) >= 10 and taken[-1], "the fused layers were not taken"  # every decode step
    _module_by_module(monkeypatch)
    _assert_close(fused, _generate(model, config))


def test_the_layer_operands_follow_the_modules(monkeypatch):
    """decode_stack keeps the layers' operands between steps: a norm weight replaced (another tensor),
    renumbered layers (other caches) and a changed eps or scale are read from then on, and a projection
    that no longer takes int8_matvec at a step's rows sends its layer back to the module path, the
    others staying in one call."""
    model, config = _model("gemma3")
    taken = _spy(monkeypatch)
    before = _generate(model, config)
    with torch.no_grad():
        for layer in model.layers:  # new tensors: the kept operands would still read the old ones
            for norm in (layer.post_attention_layernorm, layer.pre_feedforward_layernorm, layer.self_attn.q_norm):
                norm.weight = torch.nn.Parameter(norm.weight * 1.1 + 0.05, requires_grad=False)
    taken.clear()
    fused = _generate(model, config)
    assert taken[-1] and fused != before
    _module_by_module(monkeypatch)
    _assert_close(fused, _generate(model, config))

    # renumbered: the first (sliding) layer reads the third's cache (full attention), and the other way round
    first, third = model.layers[0].self_attn, model.layers[2].self_attn
    first.layer_idx, third.layer_idx = third.layer_idx, first.layer_idx
    taken = _spy(monkeypatch)
    renumbered = _generate(model, config)
    assert taken[-1] and renumbered != fused
    _module_by_module(monkeypatch)
    _assert_close(renumbered, _generate(model, config))
    first.layer_idx, third.layer_idx = third.layer_idx, first.layer_idx

    for layer in model.layers:  # scalars the operands hold: changed, they are read from then on
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm):
            norm.eps = 0.5
        layer.self_attn.scale *= 1.5
    model.norm.eps = 0.5
    taken = _spy(monkeypatch)
    rescaled = _generate(model, config)
    assert taken[-1] and rescaled != fused
    _module_by_module(monkeypatch)
    _assert_close(rescaled, _generate(model, config))

    taken = _spy(monkeypatch)
    model.layers[0].mlp.down_proj.set_matvec_rows(0)  # its other kernel (fbgemm) from now on
    mixed = _generate(model, config)
    segments = layers._STACK_KERNELS[model.layers][1]  # the first layer module by module, the others in one call
    assert [(s.start, s.stop, s.stack is not None) for s in segments] == [(0, 1, False), (1, len(model.layers), True)]
    assert taken[-1]
    _module_by_module(monkeypatch)
    _assert_close(mixed, _generate(model, config))

    model.layers[0].mlp.down_proj.set_matvec_rows(8)
    model.layers[2].self_attn.o_proj.set_matvec_rows(0)  # a module-by-module layer between two runs
    taken = _spy(monkeypatch)
    between = _generate(model, config)
    segments = layers._STACK_KERNELS[model.layers][1]
    assert [(s.start, s.stop, s.stack is not None) for s in segments] == [(0, 2, True), (2, 3, False),
                                                                         (3, len(model.layers), True)]
    assert taken[-1]
    _module_by_module(monkeypatch)
    _assert_close(between, _generate(model, config))


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_greedy_tokens_from_the_int8_heads_product_equal_the_argmax_of_its_logits(family, monkeypatch):
    """Greedy requests take their tokens from the int8 head's own argmax inside int8_matvec
    (Int8DynamicLinear.greedy); the same requests through the full logits and the engine's argmax give
    the same tokens."""
    from lm.engine.model_runner import ModelRunner
    from lm.matvec import Int8Rows

    model, config = _model(family)
    assert isinstance(model.lm_head, Int8DynamicLinear)
    decided = []
    argmax = Int8Rows.argmax
    monkeypatch.setattr(Int8Rows, "argmax", lambda self, x: decided.append(x.shape[0]) or argmax(self, x))

    def tokens():
        engine = Engine(model, config, EngineConfig(max_seq_len=96, kv_budget_bytes=1 << 24, max_batch=6,
                                                    prefill_chunk=16, stop_token_ids=(), block_size=4))
        generator = torch.Generator().manual_seed(2)
        requests = [GenerationRequest(torch.randint(2, 290, (4 + 5 * i,), generator=generator).tolist(),
                                      SamplingParams(max_new_tokens=5 + 2 * i)) for i in range(5)]
        handles = [engine.submit(request) for request in requests]
        while not all(handle.done for handle in handles):
            engine.step() if engine.stats().running or engine.stats().waiting else engine.output.drain()
        return [handle.result().token_ids for handle in handles]

    inside = tokens()
    assert decided and max(decided) > 1, "the head's argmax was not taken"
    monkeypatch.setattr(ModelRunner, "_quantized_greedy", lambda self, hidden: None)
    assert tokens() == inside

"""The Qwen family against the reference (transformers `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`Qwen3MoeForCausalLM`) on random weights, fp32: logits at every position, and 64 greedy tokens of several
prompts decoded by the engine with chunked prefill and batching, teacher-forced through the reference.

Shapes: Qwen2.5-1.5B's and Qwen3-0.6B's layers (two of them, so the suite stays fast); Qwen3-30B-A3B's
attention and experts (all 128, top-8, renormalised, 768 wide) on a 512-wide residual stream, one dense
and one sparse layer. The slow tests run the full 0.6B and one layer of the full 30B-A3B. Also: configs
read as transformers reads them, a YaRN model past its original context, and a checkpoint of one family refused by another
family's network, naming the keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lm.attention import FullAttention
from lm.engine import Engine, EngineConfig
from lm.models import load_config
from lm.presets import PRESETS, PUBLISHED_CONFIGS
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from lm.weights import CheckpointError, load_text_model

GREEDY_TOKENS = 64
QWEN25_15B = {  # Qwen2.5-1.5B-Instruct's config.json, size fields
    "model_type": "qwen2", "vocab_size": 151_936, "hidden_size": 1536, "intermediate_size": 8960,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
    "sliding_window": 32_768, "max_window_layers": 21, "bos_token_id": 151_643, "eos_token_id": 151_645,
}
TWO_LAYERS = {"num_hidden_layers": 2}
SHAPES = {
    "qwen3-0.6b": {**PUBLISHED_CONFIGS["qwen3-0.6b"], **TWO_LAYERS},
    "qwen2.5-1.5b": {**QWEN25_15B, **TWO_LAYERS},
    "qwen3-30b-a3b-narrow": {**PUBLISHED_CONFIGS["qwen3-30b-a3b"], **TWO_LAYERS, "hidden_size": 512,
                             "mlp_only_layers": [0], "intermediate_size": 1024},
}
FULL_SHAPES = {  # slow
    "qwen3-0.6b-full": PUBLISHED_CONFIGS["qwen3-0.6b"],
    "qwen3-30b-a3b-one-layer": {**PUBLISHED_CONFIGS["qwen3-30b-a3b"], "num_hidden_layers": 1},
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every part of the network count: projections N(0, 0.02), biases N(0, 0.1), norm
    weights 1 + N(0, 0.1), and embeddings N(0, 1) so the (tied) head's logits are well separated and a
    greedy choice is never a near tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                parameter.copy_(noise)
            else:
                parameter.copy_(0.02 * noise)


def _random_checkpoint(name: str, fields: dict, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**fields)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    _randomise(reference, seed=len(name))
    directory = tmp_path_factory.mktemp(name)
    reference.save_pretrained(directory)
    return directory, reference


@pytest.fixture(scope="module", params=[*sorted(SHAPES), *[pytest.param(n, marks=pytest.mark.slow)
                                                          for n in sorted(FULL_SHAPES)]])
def checkpoint(request, tmp_path_factory):
    """(directory, reference model) of a random model at the named shapes (SHAPES, FULL_SHAPES); the
    directory (GBs at real vocabulary sizes) is removed when the module is done with it."""
    directory, reference = _random_checkpoint(request.param, {**SHAPES, **FULL_SHAPES}[request.param],
                                              tmp_path_factory)
    yield directory, reference
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_text_model(checkpoint[0], dtype=torch.float32)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 151_643, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_equal_the_reference_at_every_position(checkpoint, ours):
    _, reference = checkpoint
    config, model = ours
    for seed, length in ((0, 1), (1, 7), (2, 61)):
        ids = torch.tensor([_prompt(seed, length)])
        positions = torch.arange(length)[None]
        with torch.no_grad():
            expected = reference(ids).logits[0].float()
            got = model.logits(model(ids, positions, FullAttention(config, positions)))[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kernels", ["fused", "aten"])  # aten: the path of other devices and dtypes
@pytest.mark.parametrize("length", [1, 40])
def test_the_decoder_loop_equals_each_layer_then_the_final_norm(ours, length, kernels, monkeypatch):
    """lm.layers.run_decoder computes each layer's closing add and the next norm in one call: bit for bit
    what each layer's forward, one after another, then the final norm give."""
    from lm.layers import fused

    if kernels == "aten":
        monkeypatch.setattr(fused, "usable", lambda *tensors: False)
    config, model = ours
    ids, positions = torch.tensor([_prompt(5, length)]), torch.arange(length)[None]
    with torch.inference_mode():
        got = model(ids, positions, FullAttention(config, positions))
        x = model.embed_tokens(ids)
        cos, sin = model.rope.tables(positions, x.dtype)
        for layer in model.layers:
            x = layer(x, cos, sin, FullAttention(config, positions))
        expected = model.norm(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("paging", ["default", "tight"])
def test_engine_greedy_tokens_equal_the_reference_with_chunked_prefill_and_batching(checkpoint, ours, paging):
    """Three prompts (one longer than a prefill chunk) decoded together; the reference, given each prompt
    plus our 64 tokens in one forward, picks our token at every step. "tight": 4-token blocks, two prompts
    sharing a 24-token prefix (prefix-cache hits) and a budget too small for all three at full length
    (preemption)."""
    _, reference = checkpoint
    config, model = ours
    settings = dict(max_seq_len=160, kv_budget_bytes=64 << 20, max_batch=4, prefill_chunk=16, stop_token_ids=())
    prompts = [_prompt(10, 5), _prompt(11, 40), _prompt(12, 17)]
    if paging == "tight":
        prompts[2] = prompts[1][:24] + prompts[2]
        probe = Engine(model, config, EngineConfig(**settings, block_size=4))
        settings["kv_budget_bytes"] = 60 * probe.layout.block_bytes(config, probe.dtype)  # 240 tokens
        settings["block_size"] = 4
    engine = Engine(model, config, EngineConfig(**settings))
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=GREEDY_TOKENS)))
                   for p in prompts]
        results = [handle.result(timeout=300) for handle in handles]
    finally:
        engine.stop()
    if paging == "tight":
        stats = engine.stats()
        assert stats.preemptions > 0 and stats.prefix_cache_hits > 0, stats
    for prompt, result in zip(prompts, results):
        assert len(result.token_ids) == GREEDY_TOKENS
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + result.token_ids])).logits[0]
        picks = logits[len(prompt) - 1:-1].argmax(dim=-1).tolist()
        assert picks == result.token_ids


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-30b-a3b"])
def test_presets_read_as_transformers_reads_them(name):
    from transformers import AutoConfig

    reference = AutoConfig.for_model(**PUBLISHED_CONFIGS[name])
    ours = PRESETS[name]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                  "rms_norm_eps", "sliding_window", "bos_token_id"):
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.rope_theta == reference.rope_parameters["rope_theta"]
    assert ours.eos_token_ids == (reference.eos_token_id,)
    assert ours.layer_types == tuple(getattr(reference, "layer_types", None) or ["full_attention"] * 48)
    if name == "qwen3-30b-a3b":
        for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "decoder_sparse_step"):
            assert getattr(ours, field) == getattr(reference, field), field
        assert all(ours.is_sparse(i) for i in range(ours.num_hidden_layers))


def test_yarn_and_sliding_window_settings_are_read(tmp_path):
    raw = {**PUBLISHED_CONFIGS["qwen3-0.6b"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 32_768},
           "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 20}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert config.rope_scaling["rope_type"] == "yarn" and config.sliding_window == 64
    assert config.layer_types == ("full_attention",) * 20 + ("sliding_attention",) * 8


def test_a_yarn_model_loads_and_equals_the_reference(tmp_path):
    """A whole model whose config asks for YaRN (built on the meta device, then loaded), positions past
    the original context included."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    fields = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 256, "rope_scaling": scaling, "tie_word_embeddings": True}
    directory, reference = _random_checkpoint("yarn", fields, _Factory(tmp_path))
    config, model = load_text_model(directory)
    assert config.rope_scaling["rope_type"] == "yarn"
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(150)[None]
    with torch.no_grad():
        expected = reference(ids).logits[0].float()
        got = model.logits(model(ids, positions, FullAttention(config, positions)))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


class _Factory:
    """tmp_path_factory's mktemp over one test's tmp_path."""

    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        path = self.root / name
        path.mkdir()
        return path


def test_a_checkpoint_of_one_family_is_refused_by_another_naming_the_keys(checkpoint, tmp_path):
    """Qwen's post_attention_layernorm is its pre-MLP norm; Gemma 3 has a post-attention norm and a
    pre-feedforward one besides: stating the wrong model_type must fail on the key set, not load."""
    directory, _ = checkpoint
    wrong = tmp_path / "as-gemma"
    wrong.mkdir()
    for file in directory.iterdir():  # the weights linked, not copied (GBs)
        (wrong / file.name).symlink_to(file)
    config = json.loads((directory / "config.json").read_text())
    (wrong / "config.json").unlink()
    gemma = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": config["hidden_size"]
             // config["num_attention_heads"], **{k: config[k] for k in (
                 "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads")}, "sliding_window": 512, "query_pre_attn_scalar": 128}
    (wrong / "config.json").write_text(json.dumps(gemma))
    with pytest.raises(CheckpointError, match=r"missing keys: .*pre_feedforward_layernorm"):
        load_text_model(wrong)

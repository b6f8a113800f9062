"""Gemma3DecoderConfig parsing of every released Gemma 3 config.json format, checked against the sizes in
DESIGN.md section 4 and against how transformers' own config classes read the same files."""

from __future__ import annotations

import dataclasses

import pytest

from lm.models.base import FULL, SLIDING
from lm.models.gemma3 import Gemma3DecoderConfig
from lm.presets import PRESETS, preset

# The published config.json files (decoder-relevant fields, as released; the 4B/12B/27B text_config
# states only these and leaves the rest to Gemma3TextConfig's defaults).
_TEXT_ONLY = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "bos_token_id": 2, "pad_token_id": 0,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512, "vocab_size": 262144,
}
PUBLISHED = {
    "270m": {**_TEXT_ONLY, "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
             "num_hidden_layers": 18, "num_key_value_heads": 1, "eos_token_id": 1, "_sliding_window_pattern": 6,
             "layer_types": [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18)]},
    "1b": {**_TEXT_ONLY, "hidden_size": 1152, "intermediate_size": 6912, "num_attention_heads": 4,
           "num_hidden_layers": 26, "num_key_value_heads": 1, "eos_token_id": [1, 106], "sliding_window_pattern": 6},
}
for _size, _text in {
    "4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256},
    "12b": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256},
    "27b": {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
            "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168},
}.items():
    PUBLISHED[_size] = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "mm_tokens_per_image": 256,
        "text_config": {**_text, "model_type": "gemma3_text", "sliding_window": 1024,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }

# DESIGN.md section 4: layers, d_model, heads, kv heads, head_dim, window, global linear RoPE factor.
DESIGN_SIZES = {
    "270m": (18, 640, 4, 1, 256, 512, 1.0),
    "1b": (26, 1152, 4, 1, 256, 512, 1.0),
    "4b": (34, 2560, 8, 4, 256, 1024, 8.0),
    "12b": (48, 3840, 16, 8, 256, 1024, 8.0),
    "27b": (62, 5376, 32, 16, 128, 1024, 8.0),
}


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_configs_parse_to_the_design_sizes(size):
    config = Gemma3DecoderConfig.from_dict(PUBLISHED[size])
    layers, hidden, heads, kv_heads, head_dim, window, factor = DESIGN_SIZES[size]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
    assert (config.num_key_value_heads, config.head_dim, config.sliding_window) == (kv_heads, head_dim, window)
    assert config.rope_global_scaling == factor
    assert (config.rope_local_theta, config.rope_global_theta) == (1e4, 1e6)
    assert [config.is_global(i) for i in range(layers)] == [(i + 1) % 6 == 0 for i in range(layers)]
    assert config.query_pre_attn_scalar == (168 if size == "27b" else 256)
    vlm = "text_config" in PUBLISHED[size]
    assert config.image_token_index == (262144 if vlm else None)
    assert config.eos_token_ids == ((1,) if size == "270m" else (1, 106))
    assert preset(f"gemma3-{size}") == config


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_configs_read_as_transformers_reads_them(size):
    from transformers import Gemma3Config, Gemma3TextConfig

    raw = PUBLISHED[size]
    if "text_config" in raw:
        fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
        reference = Gemma3Config(**fields).text_config
    else:
        reference = Gemma3TextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    ours = Gemma3DecoderConfig.from_dict(raw)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "sliding_window", "rms_norm_eps", "max_position_embeddings",
                 "query_pre_attn_scalar", "final_logit_softcapping", "tie_word_embeddings"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.layer_types == tuple(reference.layer_types)
    rope = reference.rope_parameters
    assert ours.rope_local_theta == rope[SLIDING]["rope_theta"]
    assert ours.rope_global_theta == rope[FULL]["rope_theta"]
    assert ours.rope_global_scaling == rope[FULL].get("factor", 1.0)


@pytest.mark.parametrize("size", PUBLISHED)
def test_transformers_5_format_gives_the_same_config(size):
    """The same checkpoint config re-saved by transformers 5 (layer_types, rope_parameters)."""
    from transformers import Gemma3Config, Gemma3TextConfig

    raw = PUBLISHED[size]
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    resaved = (Gemma3Config if "text_config" in raw else Gemma3TextConfig)(**fields).to_dict()
    assert "rope_parameters" in (resaved.get("text_config") or resaved)
    assert Gemma3DecoderConfig.from_dict(resaved) == Gemma3DecoderConfig.from_dict(raw)


def test_every_preset_is_one_of_the_published_configs_checked_here():
    assert {name for name in PRESETS if name.startswith("gemma3-")} == {f"gemma3-{size}" for size in PUBLISHED}


def test_head_dim_is_read_not_derived():
    raw = dict(PUBLISHED["1b"], head_dim=96)
    assert Gemma3DecoderConfig.from_dict(raw).head_dim == 96


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
        ({"hidden_activation": "relu"}, "relu"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"model_type": "gemma2"}, "gemma2"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_unsupported_configs_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        Gemma3DecoderConfig.from_dict({**PUBLISHED["1b"], **change})


def test_load_config_names_the_missing_file_and_an_unsupported_family(tmp_path):
    from lm.models import load_config

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match=r"model_type 'llama' \(architectures: LlamaForCausalLM\).*gemma3.*qwen3"):
        load_config(tmp_path)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("gemma3-4b").sliding_window = 4  # type: ignore[misc]

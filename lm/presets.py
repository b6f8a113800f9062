"""Released decoders as named configs, for sizing (KV-cache memory, FLOPs) and for tests at the real
layer shapes, without a checkpoint at hand.

Each preset is parsed by its family (lm.models) from the size fields of the published config.json
(Gemma 3 text-only 270M/1B: `Gemma3ForCausalLM`; 4B/12B/27B: the `text_config` of
`Gemma3ForConditionalGeneration`, which leaves every other field at the reference defaults; Qwen 3
0.6B and 30B-A3B: `Qwen3ForCausalLM` and `Qwen3MoeForCausalLM`), so a preset is exactly what loading
that checkpoint's config would give.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from lm.models import family_of
from lm.models.base import DecoderConfig

_TEXT_ONLY_COMMON: dict[str, Any] = {
    "model_type": "gemma3_text",
    "vocab_size": 262_144,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
}


def _vlm(text_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_type": "gemma3",
        "image_token_index": 262_144,
        "boi_token_index": 255_999,
        "eoi_token_index": 256_000,
        "mm_tokens_per_image": 256,
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 1024,
            **text_config,
        },
    }


# The published config.json of each size, reduced to the fields that decide the decoder's shape.
PUBLISHED_CONFIGS: MappingProxyType[str, dict[str, Any]] = MappingProxyType({
    "gemma3-270m": {
        **_TEXT_ONLY_COMMON, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "eos_token_id": 1,
    },
    "gemma3-1b": {
        **_TEXT_ONLY_COMMON, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "eos_token_id": [1, 106],
    },
    "gemma3-4b": _vlm({
        "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    }),
    "gemma3-12b": _vlm({
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
    }),
    "gemma3-27b": _vlm({
        "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
        "query_pre_attn_scalar": 168,  # = hidden / heads, not head_dim
    }),
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151_936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40_960, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "bos_token_id": 151_643, "eos_token_id": 151_645,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40_960,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 151_643, "eos_token_id": 151_645,
    },
})

PRESETS: MappingProxyType[str, DecoderConfig] = MappingProxyType(
    {name: family_of(config).config_from_dict(config) for name, config in PUBLISHED_CONFIGS.items()}
)


def preset(name: str) -> DecoderConfig:
    """The config of a released model, e.g. `preset("gemma3-4b")`; ValueError for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

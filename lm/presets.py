"""The released Gemma 3 decoders as named `TextConfig`s, for sizing (KV-cache memory, FLOPs) without
a checkpoint at hand.

Each preset is parsed from the size fields of the published config.json (text-only 270M/1B:
`Gemma3ForCausalLM`; 4B/12B/27B: the `text_config` of `Gemma3ForConditionalGeneration`, which leaves
every other field at the reference defaults), so a preset is exactly what loading that checkpoint's
config would give.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from lm.config import TextConfig

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
})

PRESETS: MappingProxyType[str, TextConfig] = MappingProxyType(
    {name: TextConfig.from_dict(config) for name, config in PUBLISHED_CONFIGS.items()}
)


def preset(name: str) -> TextConfig:
    """The `TextConfig` of a released Gemma 3 size, e.g. `preset("gemma3-4b")`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Gemma 3 preset {name!r}; known: {', '.join(PRESETS)}") from None

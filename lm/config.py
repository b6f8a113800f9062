"""Gemma 3 text-decoder configuration, read from a checkpoint's config.json.

Two layouts are accepted: a text-only `Gemma3ForCausalLM` config (model_type `gemma3_text`, 270M/1B)
and a vision-language `Gemma3ForConditionalGeneration` config whose decoder lives in `text_config`
(4B/12B/27B). The published vision-language `text_config` states only what differs from the
reference's `Gemma3TextConfig` defaults, so every field omitted there takes that default here.

Both generations of the format are read: the published one (`rope_theta`, `rope_local_base_freq`,
`rope_scaling`, `sliding_window_pattern`, no `layer_types`) and the transformers-5 one
(`layer_types`, `rope_parameters` keyed by layer type).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"  # local layer: causal within `sliding_window`
FULL = "full_attention"  # global layer: causal over the whole sequence
LAYER_TYPES = (SLIDING, FULL)

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)  # GeGLU with the tanh approximation of gelu

# Defaults of the reference `Gemma3TextConfig` (transformers/models/gemma3/configuration_gemma3.py):
# the published 4B/12B/27B `text_config` omits these and relies on them.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
_DEFAULT_GLOBAL_THETA = 1_000_000.0
_DEFAULT_LOCAL_THETA = 10_000.0
_DEFAULT_PATTERN = 6  # every 6th layer global: layer i is global when (i + 1) % 6 == 0
# Defaults of the reference `Gemma3Config` for the vision-language fields.
_VLM_DEFAULTS: dict[str, Any] = {
    "image_token_index": 262_144,
    "boi_token_index": 255_999,
    "eoi_token_index": 256_000,
    "mm_tokens_per_image": 256,
}


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int  # rows of the embedding table (= columns of the tied LM head)
    hidden_size: int  # d_model, width of the residual stream
    intermediate_size: int  # GeGLU hidden width
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: each serves heads / kv_heads query heads)
    head_dim: int  # per-head width; read from the checkpoint, not hidden / heads (27B: 128 ≠ 5376/32)
    query_pre_attn_scalar: float  # attention scores are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: int  # local layers attend to keys with q_pos - k_pos < sliding_window
    rms_norm_eps: float  # epsilon inside every RMSNorm
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" (local) or "full_attention" (global)
    rope_local_theta: float  # RoPE base of local layers (1e4), never scaled
    rope_global_theta: float  # RoPE base of global layers (1e6)
    rope_global_scaling: float  # linear RoPE factor of global layers (positions / factor); 1.0 if none
    max_position_embeddings: int  # longest context the checkpoint was trained for
    hidden_activation: str  # MLP gate activation; only "gelu_pytorch_tanh" exists in Gemma 3
    tie_word_embeddings: bool  # LM head shares the embedding matrix (true for every Gemma 3)
    final_logit_softcapping: float | None  # logits -> c * tanh(logits / c) when set (None in Gemma 3)
    attn_logit_softcapping: float | None  # attention-score soft-capping (None in Gemma 3; unsupported)
    image_token_index: int | None  # placeholder id of image soft tokens; None for a text-only checkpoint
    boi_token_index: int | None  # <start_of_image> id (vision-language checkpoints), else None
    eoi_token_index: int | None  # <end_of_image> id (vision-language checkpoints), else None
    mm_tokens_per_image: int  # soft tokens per image tile (256)
    bos_token_id: int | None  # <bos>
    eos_token_ids: tuple[int, ...]  # ids that end generation (config.json's eos_token_id, int or list)
    pad_token_id: int | None  # <pad>

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                     "max_position_embeddings", "mm_tokens_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"text config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"text config: head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"text config: layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"text config: unknown layer types {unknown}; allowed: {list(LAYER_TYPES)}")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"text config: hidden_activation {self.hidden_activation!r} is not supported; "
                f"allowed: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        for name in ("query_pre_attn_scalar", "rope_local_theta", "rope_global_theta", "rope_global_scaling"):
            if not getattr(self, name) > 0:
                raise ValueError(f"text config: {name} must be positive, got {getattr(self, name)!r}")

    def is_global(self, layer_idx: int) -> bool:
        """True for a full-attention (global) layer, False for a sliding-window (local) one."""
        return self.layer_types[layer_idx] == FULL

    @property
    def num_query_groups(self) -> int:
        """Query heads served by each key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TextConfig":
        """From a parsed config.json: a `gemma3_text` config, or a `gemma3` one with `text_config`."""
        outer = config if "text_config" in config else {}
        text = config["text_config"] if outer else config
        if not isinstance(text, dict):
            raise ValueError("config.json: `text_config` must be an object")
        _check_model_type(outer, text)
        if text.get("use_bidirectional_attention"):
            raise ValueError("config.json: use_bidirectional_attention is true (an embedding model); "
                             "only causal Gemma 3 decoders are supported")
        if text.get("attention_bias"):
            raise ValueError("config.json: attention_bias is true; Gemma 3 projections have no bias")

        def get(name: str) -> Any:
            value = text.get(name)
            return _TEXT_DEFAULTS[name] if value is None and name not in text else value

        num_layers = get("num_hidden_layers")
        local_theta, global_theta, global_scaling = _rope(text)
        vlm = {name: outer.get(name, default) for name, default in _VLM_DEFAULTS.items()} if outer else {}
        eos = outer.get("eos_token_id", get("eos_token_id")) if outer else get("eos_token_id")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            sliding_window=get("sliding_window"),
            rms_norm_eps=float(get("rms_norm_eps")),
            layer_types=_layer_types(text, num_layers),
            rope_local_theta=local_theta,
            rope_global_theta=global_theta,
            rope_global_scaling=global_scaling,
            max_position_embeddings=get("max_position_embeddings"),
            hidden_activation=text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(outer.get("tie_word_embeddings", get("tie_word_embeddings"))),
            final_logit_softcapping=get("final_logit_softcapping"),
            attn_logit_softcapping=get("attn_logit_softcapping"),
            image_token_index=vlm.get("image_token_index"),
            boi_token_index=vlm.get("boi_token_index"),
            eoi_token_index=vlm.get("eoi_token_index"),
            mm_tokens_per_image=vlm.get("mm_tokens_per_image", _VLM_DEFAULTS["mm_tokens_per_image"]),
            bos_token_id=outer.get("bos_token_id", get("bos_token_id")) if outer else get("bos_token_id"),
            eos_token_ids=_id_tuple(eos),
            pad_token_id=outer.get("pad_token_id", get("pad_token_id")) if outer else get("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "TextConfig":
        """From a config.json file, or a checkpoint directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a Hugging Face Gemma 3 config.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(config)


def _check_model_type(outer: dict[str, Any], text: dict[str, Any]) -> None:
    if outer and outer.get("model_type", "gemma3") != "gemma3":
        raise ValueError(
            f"config.json: model_type {outer['model_type']!r} is not a Gemma 3 checkpoint (gemma3)"
        )
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(
            f"config.json: text model_type {text['model_type']!r} is not a Gemma 3 decoder (gemma3_text)"
        )


def _layer_types(text: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    if text.get("layer_types") is not None:
        return tuple(text["layer_types"])
    pattern = text.get("sliding_window_pattern", text.get("_sliding_window_pattern")) or _DEFAULT_PATTERN
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _rope(text: dict[str, Any]) -> tuple[float, float, float]:
    """(local theta, global theta, global linear factor) from either config generation."""
    per_type = text.get("rope_parameters")
    if per_type is not None:
        if not set(per_type) <= set(LAYER_TYPES):
            raise ValueError(
                f"config.json: rope_parameters must be keyed by layer type {list(LAYER_TYPES)}, "
                f"got keys {sorted(per_type)}"
            )
        local = per_type.get(SLIDING) or {}
        full = per_type.get(FULL) or {}
        local_theta = local.get("rope_theta", _DEFAULT_LOCAL_THETA)
        global_theta = full.get("rope_theta", _DEFAULT_GLOBAL_THETA)
    else:
        local = {}
        full = text.get("rope_scaling") or {}
        local_theta = text.get("rope_local_base_freq", _DEFAULT_LOCAL_THETA)
        global_theta = text.get("rope_theta", _DEFAULT_GLOBAL_THETA)
    if _linear_factor(local, SLIDING) != 1.0:
        raise ValueError("config.json: RoPE scaling on local (sliding_attention) layers is not supported")
    return float(local_theta), float(global_theta), _linear_factor(full, FULL)


def _linear_factor(params: dict[str, Any], layer_type: str) -> float:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return 1.0
    if rope_type == "linear":
        return float(params["factor"])
    raise ValueError(
        f"config.json: RoPE type {rope_type!r} on {layer_type} layers is not supported; "
        "allowed: default, linear"
    )


def _id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)

"""What every model family provides, and what the rest of Tessera may read of it.

A family (one file in lm/models/) gives: its config dataclass, a subclass of `DecoderConfig` parsed
from config.json; the network, an nn.Module with Hugging Face parameter names; where the decoder's keys
live in a checkpoint (`KeyLayout`s); and its GGUF metadata and tensor-name maps. The engine, KV cache,
masks, quantizer, services and CLI read only `DecoderConfig`'s fields and the network's interface:

    hidden = model(input_ids (B, T), positions (B, T), attention, soft_tokens=None, image_mask=None)
    logits = model.logits(hidden)          # (..., vocab_size) fp32
    model.embed_tokens, model.lm_head      # the input table; the head (None when tied)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

SLIDING = "sliding_attention"  # causal within `sliding_window`
FULL = "full_attention"  # causal over the whole sequence
LAYER_TYPES = (SLIDING, FULL)


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of a decoder config that code outside its family reads (the attention spec: heads,
    kv heads, head_dim, per-layer type and window; sizes; special ids; multimodal input)."""

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # d_model, width of the residual stream
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: each serves heads / kv_heads query heads)
    head_dim: int  # per-head width, as the checkpoint states it
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    sliding_window: int | None  # keys with q_pos - k_pos < sliding_window on sliding layers; None if none
    max_position_embeddings: int  # longest context the checkpoint was trained for
    tie_word_embeddings: bool  # the LM head shares the embedding matrix
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # config.json's eos_token_id (int or list)
    pad_token_id: int | None
    image_token_index: int | None  # placeholder id of image soft tokens; None: the model takes no images
    mm_tokens_per_image: int  # soft tokens per image tile (unused without images)

    def check(self, family: str) -> None:
        """ValueError naming the field when a shared field is out of range."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "mm_tokens_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{family} config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{family} config: num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{family} config: head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{family} config: layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"{family} config: unknown layer types {unknown}; allowed: {list(LAYER_TYPES)}")
        if SLIDING in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window >= 1):
            raise ValueError(f"{family} config: sliding layers need a positive sliding_window, "
                             f"got {self.sliding_window!r}")

    def is_global(self, layer_idx: int) -> bool:
        """True for a full-attention layer, False for a sliding-window one."""
        return self.layer_types[layer_idx] == FULL

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    @property
    def num_query_groups(self) -> int:
        """Query heads served by each key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def accepts_images(self) -> bool:
        """Whether the network takes image soft tokens (a vision-language checkpoint)."""
        return self.image_token_index is not None


@dataclass(frozen=True)
class KeyLayout:
    """Where a decoder lives among a checkpoint's keys."""

    name: str  # description for error messages
    prefix: str  # decoder namespace: every key under it must be a decoder weight
    head_key: str  # where an (optional, tied) LM head is stored


@dataclass(frozen=True)
class ModelFamily:
    """One registry entry (lm.models.FAMILIES)."""

    name: str  # e.g. "gemma3"
    model_types: tuple[str, ...]  # config.json `model_type` values it reads
    config_class: type  # its DecoderConfig subclass
    config_from_dict: Callable[[dict[str, Any]], DecoderConfig]  # a parsed config.json -> its config
    network: Callable[[DecoderConfig], Any]  # config -> nn.Module (built on the caller's device)
    key_layouts: tuple[KeyLayout, ...]  # checked in order; the first whose embedding key exists wins
    gguf_architectures: tuple[str, ...] = ()  # GGUF general.architecture values it converts
    gguf_config: Callable[[Any], dict[str, Any]] | None = None  # GGUF metadata -> config.json dict
    gguf_tensor_names: Callable[[dict[str, Any]], dict[str, str]] | None = None  # config.json -> {gguf: hf key}
    gguf_tensor_values: Callable[[str, Any], Any] | None = None  # (gguf name, float32 array) -> HF values
    gguf_chat_template: str | None = None  # written for a GGUF that carries no tokenizer.chat_template
    gguf_stop_tokens: tuple[str, ...] = ()  # token texts generation also stops on (end of turn)


def id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    """config.json's eos_token_id (int, list or absent) as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)

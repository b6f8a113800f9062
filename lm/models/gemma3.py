"""Gemma 3: the text decoder of `Gemma3ForCausalLM` (270M, 1B) and of `Gemma3ForConditionalGeneration`
(4B, 12B, 27B, whose decoder takes image soft tokens).

Architecture (transformers `models/gemma3`): RMSNorm with (1 + w) in fp32; embeddings scaled by
sqrt(hidden) rounded to the model dtype; sandwich norms (a pre-norm and a post-norm around attention
and around the MLP); GeGLU (tanh gelu); QK-norm; attention scaled by query_pre_attn_scalar ** -0.5;
local sliding-window and global layers interleaved 5:1 with two RoPE tables (local θ 10,000 never
scaled; global θ 1e6, linearly scaled in the 4B-27B). Image soft tokens are written unscaled over the
placeholder rows, and the 256 tokens of one tile attend to each other bidirectionally (lm.attention).

Config: two layouts are read, a text-only `gemma3_text` config and a `gemma3` vision-language one whose
decoder lives in `text_config`. The published vision-language `text_config` states only what differs
from the reference's `Gemma3TextConfig` defaults, so every field omitted there takes that default here.
Both generations of the format are read: the published one (`rope_theta`, `rope_local_base_freq`,
`rope_scaling`, `sliding_window_pattern`, no `layer_types`) and the transformers-5 one (`layer_types`,
`rope_parameters` keyed by layer type).

GGUF (llama.cpp's `gemma3` architecture) facts the file does not state and llama.cpp hard-codes:
norm weights are stored as (1 + w), q/k are not permuted, local layers use RoPE θ = 10,000, every 6th
layer is global, and the attention scale is head_dim ** -0.5 except for the 27B (62 layers), where it
is (hidden / heads) ** -0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lm.layers import (Attention, GatedMLP, Linear, RMSNorm, RotaryFrequencies, add_norm, linear,
                       run_decoder)
from lm.models.base import FULL, SLIDING, LAYER_TYPES, DecoderConfig, KeyLayout, ModelFamily, id_tuple

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
# Defaults of the reference `Gemma3DecoderConfig` for the vision-language fields.
_VLM_DEFAULTS: dict[str, Any] = {
    "image_token_index": 262_144,
    "boi_token_index": 255_999,
    "eoi_token_index": 256_000,
    "mm_tokens_per_image": 256,
}
_LAYERS_OF_27B = 62


@dataclass(frozen=True)
class Gemma3DecoderConfig(DecoderConfig):
    intermediate_size: int  # GeGLU hidden width
    query_pre_attn_scalar: float  # attention scores are scaled by query_pre_attn_scalar ** -0.5
    rms_norm_eps: float  # epsilon inside every RMSNorm
    rope_local_theta: float  # RoPE base of local layers (1e4), never scaled
    rope_global_theta: float  # RoPE base of global layers (1e6)
    rope_global_scaling: float  # linear RoPE factor of global layers (positions / factor); 1.0 if none
    hidden_activation: str  # MLP gate activation; only "gelu_pytorch_tanh" exists in Gemma 3
    final_logit_softcapping: float | None  # logits -> c * tanh(logits / c) when set (None in Gemma 3)
    attn_logit_softcapping: float | None  # attention-score soft-capping (None in Gemma 3; unsupported)
    boi_token_index: int | None  # <start_of_image> id (vision-language checkpoints), else None
    eoi_token_index: int | None  # <end_of_image> id (vision-language checkpoints), else None

    def __post_init__(self) -> None:
        self.check("Gemma 3")
        if self.sliding_window is None:
            raise ValueError("Gemma 3 config: sliding_window must be a positive integer, got None")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"Gemma 3 config: hidden_activation {self.hidden_activation!r} is not supported; "
                             f"allowed: {', '.join(SUPPORTED_ACTIVATIONS)}")
        for name in ("query_pre_attn_scalar", "rope_local_theta", "rope_global_theta", "rope_global_scaling"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Gemma 3 config: {name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Gemma3DecoderConfig":
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
            eos_token_ids=id_tuple(eos),
            pad_token_id=outer.get("pad_token_id", get("pad_token_id")) if outer else get("pad_token_id"),
        )


def _check_model_type(outer: dict[str, Any], text: dict[str, Any]) -> None:
    if outer and outer.get("model_type", "gemma3") != "gemma3":
        raise ValueError(f"config.json: model_type {outer['model_type']!r} is not a Gemma 3 checkpoint (gemma3)")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"config.json: text model_type {text['model_type']!r} is not a Gemma 3 decoder (gemma3_text)")


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
            raise ValueError(f"config.json: rope_parameters must be keyed by layer type {list(LAYER_TYPES)}, "
                             f"got keys {sorted(per_type)}")
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
    raise ValueError(f"config.json: RoPE type {rope_type!r} on {layer_type} layers is not supported; "
                     "allowed: default, linear")


# ----- the network ---------------------------------------------------------------------------------

class Gemma3DecoderLayer(nn.Module):
    """Attention and GeGLU, each wrapped in a pre-norm and a post-norm before its residual add."""

    def __init__(self, config: Gemma3DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_global = config.is_global(layer_idx)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset=True)
        self.self_attn = Attention(layer_idx, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                                   num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                                   scale=config.query_pre_attn_scalar**-0.5, qk_norm_eps=eps, norm_offset=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset=True)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=True)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention) -> Tensor:
        return self.step(x, self.input_layernorm(x), cos, sin, attention, None)[0]

    def decode_parts(self) -> tuple:
        """(input norm, attention, MLP, attention branch norm, MLP input norm, MLP branch norm): the layer
        as lm.layers.decode_stack runs it, read from the module dict (each nn.Module attribute lookup of a
        submodule costs ~0.5 us, and this runs every decode step)."""
        modules = self._modules
        return (modules["input_layernorm"], modules["self_attn"], modules["mlp"], modules["post_attention_layernorm"],
                modules["pre_feedforward_layernorm"], modules["post_feedforward_layernorm"])

    def step(self, x: Tensor, normed: Tensor, cos: Tensor, sin: Tensor, attention,
             next_norm: RMSNorm | None) -> tuple[Tensor, Tensor | None]:
        """The layer on x (B, T, hidden) given normed = input_layernorm(x): (its output, next_norm of it,
        or None without next_norm), the closing add and next_norm in one call (lm.layers.run_decoder)."""
        branch = self.self_attn(normed, cos, sin, attention)
        x, normed = add_norm(x, branch, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        return add_norm(x, self.mlp(normed), self.post_feedforward_layernorm, next_norm)


class Gemma3TextModel(nn.Module):
    """The decoder; parameter names are those of `Gemma3ForCausalLM` without its "model." prefix
    (embed_tokens, layers.N.*, norm) plus lm_head for an untied checkpoint."""

    def __init__(self, config: Gemma3DecoderConfig) -> None:
        super().__init__()
        if config.attn_logit_softcapping is not None:
            raise ValueError("attn_logit_softcapping is set in the config: not supported (no Gemma 3 uses it)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=True)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.rope = nn.ModuleDict({
            SLIDING: RotaryFrequencies(config.head_dim, config.rope_local_theta),
            FULL: RotaryFrequencies(config.head_dim, config.rope_global_theta,
                                    {"rope_type": "linear", "factor": config.rope_global_scaling}),
        })

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) absolute positions, for RoPE
        attention,  # lm.attention.AttentionContext
        soft_tokens: Tensor | None = None,  # (num_tiles, tokens_per_tile, hidden)
        image_mask: Tensor | None = None,  # (B, T) True at image placeholder positions
    ) -> Tensor:  # (B, T, hidden) after the final norm
        x = self.embed_inputs(input_ids, soft_tokens, image_mask)
        tables = {kind: self.rope[kind].tables(positions, x.dtype) for kind in set(self.config.layer_types)}
        return run_decoder(self.layers, x, self.norm, lambda layer: tables[FULL if layer.is_global else SLIDING],
                           attention)

    def embed_inputs(self, input_ids: Tensor, soft_tokens: Tensor | None, image_mask: Tensor | None) -> Tensor:
        """(B, T, hidden): scaled text embeddings with soft tokens written over the placeholder rows."""
        dtype = self.norm.weight.dtype  # the model's dtype (the table may be swapped for int8)
        if image_mask is None or soft_tokens is None:
            if soft_tokens is not None or (image_mask is not None and bool(image_mask.any())):
                raise ValueError("soft_tokens and image_mask must be given together")
            return self.embed_tokens(input_ids) * self._embed_scale(dtype)
        self._check_soft_tokens(soft_tokens, image_mask)
        # Placeholder ids may lie beyond the vocabulary: never look them up.
        x = self.embed_tokens(input_ids.masked_fill(image_mask, 0)) * self._embed_scale(dtype)
        rows = soft_tokens.to(device=x.device, dtype=dtype).reshape(-1, x.shape[-1])  # (tiles * tokens, hidden)
        return x.masked_scatter(image_mask[..., None], rows)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., vocab_size) fp32 logits from final-norm hidden states (..., hidden)."""
        # An explicit head module (untied checkpoints, or one swapped in by quantisation) wins.
        head = self.lm_head
        logits = (linear(hidden, self.embed_tokens.weight) if head is None else head(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _embed_scale(self, dtype: torch.dtype) -> Tensor:
        # sqrt(d_model) rounded to the model dtype first, as the reference does (55.43 -> 55.5 in bf16).
        return torch.tensor(self.config.hidden_size**0.5).to(dtype)

    def _check_soft_tokens(self, soft_tokens: Tensor, image_mask: Tensor) -> None:
        if soft_tokens.dim() != 3 or soft_tokens.shape[-1] != self.config.hidden_size:
            raise ValueError(f"soft_tokens must be (num_tiles, tokens_per_tile, {self.config.hidden_size}), "
                             f"got {tuple(soft_tokens.shape)}")
        placeholders = int(image_mask.sum())
        features = soft_tokens.shape[0] * soft_tokens.shape[1]
        if placeholders != features:
            raise ValueError(f"image placeholders and soft tokens differ: {placeholders} placeholder tokens in the "
                             f"input, {features} soft tokens ({soft_tokens.shape[0]} tiles x {soft_tokens.shape[1]})")


# ----- checkpoint and GGUF layouts -----------------------------------------------------------------

KEY_LAYOUTS = (  # "model.language_model." before its own prefix "model."
    KeyLayout("model.language_model.* (newer Gemma3ForConditionalGeneration)", "model.language_model.",
              "lm_head.weight"),
    KeyLayout("language_model.model.* (published Gemma3ForConditionalGeneration)", "language_model.model.",
              "language_model.lm_head.weight"),
    KeyLayout("model.* (Gemma3ForCausalLM)", "model.", "lm_head.weight"),
)

_GGUF_LAYER_TENSORS = {  # llama.cpp name within "blk.N." -> Hugging Face name within "model.layers.N."
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_tensor_names(config: dict[str, Any]) -> dict[str, str]:
    """llama.cpp tensor name -> Hugging Face `Gemma3ForCausalLM` key, for config.json `config`."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}  # output.weight only in files with an untied head
    for layer in range(config["num_hidden_layers"]):
        names.update({f"blk.{layer}.{ours}": f"model.layers.{layer}.{theirs}"
                      for ours, theirs in _GGUF_LAYER_TENSORS.items()})
    return names


def gguf_tensor_values(gguf_name: str, values):
    """llama.cpp stores Gemma's RMSNorm weight as 1 + w; Hugging Face checkpoints hold w."""
    return values - values.dtype.type(1.0) if gguf_name.endswith("norm.weight") else values


def gguf_config(metadata) -> dict[str, Any]:
    """config.json for `Gemma3ForCausalLM` in the published format (rope_theta / rope_local_base_freq /
    rope_scaling, with layer_types spelled out) from a GGUF's `gemma3.*` metadata."""
    arch = "gemma3"
    num_layers = int(metadata.require(f"{arch}.block_count"))
    hidden = int(metadata.require(f"{arch}.embedding_length"))
    heads = int(metadata.require(f"{arch}.attention.head_count"))
    head_dim = int(metadata.require(f"{arch}.attention.key_length"))
    pattern = int(metadata.get(f"{arch}.attention.sliding_window_pattern", _DEFAULT_PATTERN))
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    scaling_factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    rope_scaling = None
    if scaling_type not in (None, "none") and scaling_factor != 1.0:
        if scaling_type != "linear":
            raise ValueError(f"GGUF states RoPE scaling {scaling_type!r}; Gemma 3 uses 'linear' or none")
        rope_scaling = {"rope_type": "linear", "factor": scaling_factor}
    vocab_size = metadata.length("tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(metadata.get(f"{arch}.vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(metadata.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.require(f"{arch}.attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if num_layers == _LAYERS_OF_27B else head_dim,
        "sliding_window": int(metadata.require(f"{arch}.attention.sliding_window")),
        "_sliding_window_pattern": pattern,
        "layer_types": [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)],
        "rms_norm_eps": float(metadata.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(metadata.require(f"{arch}.context_length")),
        "rope_theta": float(metadata.require(f"{arch}.rope.freq_base")),
        "rope_local_base_freq": _DEFAULT_LOCAL_THETA,
        "rope_scaling": rope_scaling,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": "output.weight" not in metadata.tensor_names,
        "bos_token_id": int(metadata.require("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(metadata.require("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


# Gemma 3's chat template as published with the instruction-tuned checkpoints (tokenizer_config.json),
# written for a GGUF without one (the embedded 270M's).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

FAMILY = ModelFamily(
    name="gemma3", model_types=("gemma3", "gemma3_text"), config_class=Gemma3DecoderConfig,
    config_from_dict=Gemma3DecoderConfig.from_dict,
    network=Gemma3TextModel, key_layouts=KEY_LAYOUTS, gguf_architectures=("gemma3",), gguf_config=gguf_config,
    gguf_tensor_names=gguf_tensor_names, gguf_tensor_values=gguf_tensor_values,
    gguf_chat_template=GEMMA3_CHAT_TEMPLATE, gguf_stop_tokens=("<end_of_turn>",),
)

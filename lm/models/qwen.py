"""The Qwen family: Qwen 2 / 2.5 (`Qwen2ForCausalLM`), Qwen 3 dense (`Qwen3ForCausalLM`) and Qwen 3 MoE
(`Qwen3MoeForCausalLM`); text only.

Architecture (transformers `models/qwen2`, `qwen3`, `qwen3_moe`): pre-norm blocks (input_layernorm
before attention, post_attention_layernorm before the MLP), RMSNorm computed in fp32 then cast and
multiplied by w (no +1 offset), unscaled embeddings, grouped-query attention scaled by head_dim ** -0.5,
one RoPE table (θ from the config; linear or YaRN scaling when the config asks), SwiGLU MLP. Qwen 2
has q/k/v biases and no QK-norm; Qwen 3 has a per-head RMSNorm on q and k before RoPE and no biases
(unless config.json's attention_bias says so). Qwen 3 MoE replaces the MLP of its sparse layers with a
Mixture-of-Experts block (lm.layers.moe): every `decoder_sparse_step`-th layer that is not listed in
`mlp_only_layers`.

Config: the published format (`rope_theta`, `rope_scaling`) and transformers 5's (`rope_parameters`)
are both read. Where a field is absent, the reference config class's default applies (its own
`__post_init__` rules: the window only with use_sliding_window, on layers from max_window_layers on;
head_dim = hidden / heads when not stated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lm.layers import (Attention, GatedMLP, Linear, RMSNorm, RotaryFrequencies, add_norm, linear,
                       run_decoder)
from lm.models.base import FULL, SLIDING, DecoderConfig, KeyLayout, ModelFamily, id_tuple

# Defaults of the reference config classes (transformers Qwen2Config, Qwen3Config, Qwen3MoeConfig).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
              "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": True, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "rope_theta": 10_000.0},
    "qwen3": {"vocab_size": 151_936, "hidden_size": 4096, "intermediate_size": 22_016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "rope_theta": 10_000.0},
    "qwen3_moe": {"vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "hidden_act": "silu",
                  "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                  "max_window_layers": None, "rope_theta": 10_000.0, "decoder_sparse_step": 1,
                  "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128,
                  "norm_topk_prob": False, "mlp_only_layers": []},
}


@dataclass(frozen=True)
class QwenDecoderConfig(DecoderConfig):
    model_type: str  # "qwen2", "qwen3" or "qwen3_moe"
    intermediate_size: int  # dense MLP width
    rms_norm_eps: float
    hidden_act: str  # "silu": SwiGLU
    rope_theta: float
    rope_scaling: dict | None = field(default=None, hash=False)  # None, linear or YaRN (lm.layers.rope_inv_freq)
    attention_bias: bool = False  # q/k/v projections carry biases (every Qwen 2)
    qk_norm: bool = True  # per-head RMSNorm of q and k (Qwen 3)
    # Mixture of experts (qwen3_moe only; num_experts 0 elsewhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.check(self.model_type)
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"{self.model_type} config: num_experts_per_tok {self.num_experts_per_tok} must be "
                                 f"between 1 and num_experts {self.num_experts}")
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError(f"{self.model_type} config: moe_intermediate_size and decoder_sparse_step must be "
                                 "positive")

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a Mixture-of-Experts MLP (transformers' Qwen3MoeDecoderLayer rule)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "QwenDecoderConfig":
        model_type = config.get("model_type")
        if model_type not in _DEFAULTS:
            raise ValueError(f"config.json: model_type {model_type!r} is not a Qwen decoder "
                             f"({', '.join(_DEFAULTS)})")
        defaults = _DEFAULTS[model_type]

        def get(name: str) -> Any:
            return config[name] if config.get(name) is not None else defaults.get(name)

        layers, heads, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
        window = get("sliding_window") if config.get("use_sliding_window", defaults["use_sliding_window"]) else None
        layer_types = config.get("layer_types")
        if layer_types is None:
            if model_type == "qwen3_moe":  # one mask for every layer (Qwen3MoeModel)
                layer_types = [SLIDING if window is not None else FULL] * layers
            else:
                start = get("max_window_layers")
                layer_types = [SLIDING if window is not None and i >= start else FULL for i in range(layers)]
        theta, scaling = _rope(config, defaults["rope_theta"])
        moe = {}
        if model_type == "qwen3_moe":
            # transformers 5 saves the expert count as num_local_experts; published configs say num_experts
            counts = {name: config[name] for name in ("num_experts", "num_local_experts")
                      if config.get(name) is not None}
            if len(set(counts.values())) > 1:
                raise ValueError(f"config.json: num_experts {counts['num_experts']} and num_local_experts "
                                 f"{counts['num_local_experts']} disagree")
            moe = dict(num_experts=next(iter(counts.values()), defaults["num_experts"]),
                       num_experts_per_tok=get("num_experts_per_tok"),
                       moe_intermediate_size=get("moe_intermediate_size"),
                       norm_topk_prob=bool(get("norm_topk_prob")), decoder_sparse_step=get("decoder_sparse_step"),
                       mlp_only_layers=tuple(get("mlp_only_layers") or ()))
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            layer_types=tuple(layer_types),
            sliding_window=window,
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=id_tuple(config.get("eos_token_id")),
            pad_token_id=config.get("pad_token_id"),
            image_token_index=None,
            mm_tokens_per_image=256,
            rms_norm_eps=float(get("rms_norm_eps")),
            hidden_act=get("hidden_act"),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(get("attention_bias")),
            qk_norm=model_type != "qwen2",
            **moe,
        )


def _rope(config: dict[str, Any], default_theta: float) -> tuple[float, dict | None]:
    """(θ, scaling dict or None) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = config.get("rope_theta", default_theta)
        scaling = config.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    if scaling is not None and "original_max_position_embeddings" not in scaling \
            and scaling.get("rope_type", scaling.get("type")) == "yarn":
        scaling = {**scaling, "original_max_position_embeddings": config.get("max_position_embeddings")}
    return float(theta), scaling


# ----- the network ---------------------------------------------------------------------------------

class QwenDecoderLayer(nn.Module):
    def __init__(self, config: QwenDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset=False)
        self.self_attn = Attention(layer_idx, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                                   num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                                   scale=config.head_dim**-0.5, qkv_bias=config.attention_bias,
                                   qk_norm_eps=eps if config.qk_norm else None, norm_offset=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset=False)  # the pre-MLP norm
        if config.is_sparse(layer_idx):
            from lm.layers.moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(hidden_size=config.hidden_size,
                                      moe_intermediate_size=config.moe_intermediate_size,
                                      num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                                      norm_topk_prob=config.norm_topk_prob, activation=config.hidden_act)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention) -> Tensor:
        return self.step(x, self.input_layernorm(x), cos, sin, attention, None)[0]

    def decode_parts(self) -> tuple | None:
        """(input norm, attention, MLP, None, MLP input norm, None): the layer as lm.layers.decode_stack runs
        it (no branch norms), read from the module dict (it runs every decode step); None for a MoE layer."""
        modules = self._modules
        mlp = modules["mlp"]
        return (modules["input_layernorm"], modules["self_attn"], mlp, None, modules["post_attention_layernorm"],
                None) if isinstance(mlp, GatedMLP) else None

    def step(self, x: Tensor, normed: Tensor, cos: Tensor, sin: Tensor, attention,
             next_norm: RMSNorm | None) -> tuple[Tensor, Tensor | None]:
        """The layer on x (B, T, hidden) given normed = input_layernorm(x): (its output, next_norm of it,
        or None without next_norm), the closing add and next_norm in one call (lm.layers.run_decoder)."""
        x, normed = add_norm(x, self.self_attn(normed, cos, sin, attention), None, self.post_attention_layernorm)
        return add_norm(x, self.mlp(normed), None, next_norm)


class QwenModel(nn.Module):
    """The decoder; parameter names are those of `Qwen*ForCausalLM` without its "model." prefix
    (embed_tokens, layers.N.*, norm) plus lm_head for an untied checkpoint."""

    def __init__(self, config: QwenDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QwenDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=False)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.rope = RotaryFrequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: Tensor, positions: Tensor, attention, soft_tokens: Tensor | None = None,
                image_mask: Tensor | None = None) -> Tensor:
        """input_ids, positions (B, T) -> (B, T, hidden) after the final norm. Text only: soft tokens
        are a ValueError."""
        if soft_tokens is not None or (image_mask is not None and bool(image_mask.any())):
            raise ValueError(f"{self.config.model_type} is a text-only model: it takes no image soft tokens")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope.tables(positions, x.dtype)
        return run_decoder(self.layers, x, self.norm, lambda layer: (cos, sin), attention)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., vocab_size) fp32 logits from final-norm hidden states (..., hidden)."""
        head = self.lm_head
        return (linear(hidden, self.embed_tokens.weight) if head is None else head(hidden)).float()


# ----- checkpoint and GGUF layouts -----------------------------------------------------------------

KEY_LAYOUTS = (KeyLayout("model.* (Qwen*ForCausalLM)", "model.", "lm_head.weight"),)

_GGUF_LAYER_TENSORS = {  # llama.cpp name within "blk.N." -> Hugging Face name within "model.layers.N."
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


_GGUF_EXPERT_TENSORS = {  # stacked (experts, out, in) in llama.cpp; one tensor per expert in Hugging Face
    "ffn_gate_exps.weight": "mlp.experts.{expert}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{expert}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{expert}.down_proj.weight",
}


def gguf_tensor_names(config: dict[str, Any]) -> dict[str, str]:
    """llama.cpp tensor name -> Hugging Face key, for config.json `config`. A key holding "{expert}" names
    a stacked tensor of all experts, split along its first axis (expert e -> "{expert}" = e)."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = dict(_GGUF_LAYER_TENSORS)
    if config["model_type"] == "qwen3_moe":
        per_layer.update(_GGUF_EXPERT_TENSORS)
        per_layer["ffn_gate_inp.weight"] = "mlp.gate.weight"  # the router
    for layer in range(config["num_hidden_layers"]):
        names.update({f"blk.{layer}.{ours}": f"model.layers.{layer}.{theirs}" for ours, theirs in per_layer.items()})
    return names


_GGUF_MODEL_TYPES = {"qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                     "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM")}


def gguf_config(metadata) -> dict[str, Any]:
    """config.json for `Qwen2ForCausalLM` / `Qwen3ForCausalLM` from a GGUF's `<arch>.*` metadata."""
    arch = metadata.get("general.architecture")
    model_type, architecture = _GGUF_MODEL_TYPES[arch]
    hidden = int(metadata.require(f"{arch}.embedding_length"))
    heads = int(metadata.require(f"{arch}.attention.head_count"))
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(metadata.get(f"{arch}.vocab_size", metadata.length("tokenizer.ggml.tokens"))),
        "hidden_size": hidden,
        "intermediate_size": int(metadata.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(metadata.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.require(f"{arch}.attention.head_count_kv")),
        "head_dim": int(metadata.get(f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(metadata.require(f"{arch}.context_length")),
        "rms_norm_eps": float(metadata.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata.require(f"{arch}.rope.freq_base")),
        "rope_scaling": None,
        "use_sliding_window": False,
        "tie_word_embeddings": "output.weight" not in metadata.tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": int(metadata.require("tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    if arch in ("qwen3", "qwen3moe"):
        config["attention_bias"] = False
    if arch == "qwen3moe":
        layers = config["num_hidden_layers"]
        config.update({
            "num_experts": int(metadata.require(f"{arch}.expert_count")),
            "num_experts_per_tok": int(metadata.require(f"{arch}.expert_used_count")),
            "moe_intermediate_size": int(metadata.require(f"{arch}.expert_feed_forward_length")),
            # llama.cpp renormalises the chosen experts' weights for this architecture (norm_w = true in
            # its qwen3moe graph), as the published Qwen 3 MoE configs state.
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" not in metadata.tensor_names],
        })
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF states RoPE scaling {scaling!r}; converting scaled Qwen GGUFs is not supported")
    return config


_FAMILY = dict(config_class=QwenDecoderConfig, config_from_dict=QwenDecoderConfig.from_dict, network=QwenModel,
               key_layouts=KEY_LAYOUTS, gguf_config=gguf_config, gguf_tensor_names=gguf_tensor_names)
QWEN2 = ModelFamily(name="qwen2", model_types=("qwen2",), gguf_architectures=("qwen2",), **_FAMILY)
QWEN3 = ModelFamily(name="qwen3", model_types=("qwen3",), gguf_architectures=("qwen3",), **_FAMILY)
QWEN3_MOE = ModelFamily(name="qwen3_moe", model_types=("qwen3_moe",), gguf_architectures=("qwen3moe",), **_FAMILY)

"""The Gemma 3 text decoder in plain torch: only the network.

It takes token ids, absolute positions and an `AttentionContext` (which owns any KV cache and decides
the mask) and returns the final-norm hidden states; `logits` applies the tied head. Numerics follow
the reference (`transformers` Gemma 3): RMSNorm in fp32 with (1 + w) then cast back, QK-norm before
RoPE, RoPE tables in fp32 cast to the model dtype, embeddings scaled by sqrt(d_model) rounded to the
model dtype, soft tokens written unscaled over the placeholder rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.attention import AttentionContext
from lm.config import FULL, SLIDING, TextConfig


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) @ weight (out, in)^T, as F.linear computes it.

    On the CPU it is computed as (weight @ x^T)^T over at least two rows: for the few rows of
    decoding, MKL runs that layout about twice as fast as F.linear's (measured on the 2-core dev
    machine: the 270M's projections for one row 23.5 -> 11.9 ms, its 262,144-row tied head 43 -> 17.5 ms;
    the same speed at 512 rows)."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    rows = flat.shape[0]
    if rows == 1:
        flat = torch.cat([flat, flat])  # (2, in): one row would take the slow GEMV path
    out = (weight @ flat.T).T[:rows]  # (N, out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear without bias, through `linear`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel: the same arithmetic as x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32.
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, linear_factor: float) -> Tensor:
    """(head_dim / 2,) fp32 inverse frequencies; linear scaling divides them (= positions / factor).
    Computed on the CPU like the reference, whatever device the model runs on."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents) / linear_factor


class RotaryFrequencies(nn.Module):
    """fp32 RoPE inverse frequencies of one layer type. They follow the model across devices but
    never take its dtype: `model.to(torch.bfloat16)` would otherwise round them and shift every
    angle. Not a weight (never saved or loaded)."""

    def __init__(self, head_dim: int, theta: float, linear_factor: float) -> None:
        super().__init__()
        self.spec = (head_dim, theta, linear_factor)
        self.register_buffer("inv_freq", rope_inv_freq(*self.spec), persistent=False)

    def _apply(self, fn, recurse=True):
        device = fn(self.inv_freq).device  # where the model is going; the dtype is ignored
        self.inv_freq = rope_inv_freq(*self.spec).to(device)
        return self


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, head_dim) for absolute positions (B, T), computed in fp32."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, head_dim) by tables (B, T, head_dim), rotate-half convention."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_width)
        self.k_proj = Linear(hidden, kv_width)
        self.v_proj = Linear(hidden, kv_width)
        self.o_proj = Linear(q_width, hidden)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionContext) -> Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        k, v, mask = attention.kv(self.layer_idx, k, v)  # (B, KV, S, D) x2, (B, 1, T, S)
        # GQA without copying keys/values: each KV head serves H / KV query heads.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, H * D)
        return self.o_proj(out)


class GeGLU(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Attention and GeGLU, each wrapped in a pre-norm and a post-norm before its residual add."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_global = config.is_global(layer_idx)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GeGLU(config)
        self.post_ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionContext) -> Tensor:
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), cos, sin, attention))
        return x + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(x)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.attn_logit_softcapping is not None:
            raise ValueError("attn_logit_softcapping is set in the config: not supported (no Gemma 3 uses it)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        untied = not config.tie_word_embeddings
        self.lm_head = Linear(config.hidden_size, config.vocab_size) if untied else None
        self.rope = nn.ModuleDict({
            SLIDING: RotaryFrequencies(config.head_dim, config.rope_local_theta, 1.0),
            FULL: RotaryFrequencies(config.head_dim, config.rope_global_theta, config.rope_global_scaling),
        })

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) absolute positions, for RoPE
        attention: AttentionContext,
        soft_tokens: Tensor | None = None,  # (num_tiles, tokens_per_tile, hidden)
        image_mask: Tensor | None = None,  # (B, T) True at image placeholder positions
    ) -> Tensor:  # (B, T, hidden) after the final norm
        x = self.embed_tokens(input_ids, soft_tokens, image_mask)
        tables = {  # cos, sin per layer type, computed once for all layers of that type
            kind: rope_tables(positions, self.rope[kind].inv_freq, x.dtype) for kind in set(self.config.layer_types)
        }
        for layer in self.layers:
            cos, sin = tables[FULL if layer.is_global else SLIDING]
            x = layer(x, cos, sin, attention)
        return self.final_norm(x)

    def embed_tokens(self, input_ids: Tensor, soft_tokens: Tensor | None, image_mask: Tensor | None) -> Tensor:
        """(B, T, hidden): scaled text embeddings with soft tokens written over the placeholder rows."""
        dtype = self.final_norm.weight.dtype  # the model's dtype (the table may be swapped for int8)
        if image_mask is None or soft_tokens is None:
            if soft_tokens is not None or (image_mask is not None and bool(image_mask.any())):
                raise ValueError("soft_tokens and image_mask must be given together")
            return self.embed(input_ids) * self._embed_scale(dtype)
        self._check_soft_tokens(soft_tokens, image_mask)
        # Placeholder ids may lie beyond the vocabulary: never look them up.
        x = self.embed(input_ids.masked_fill(image_mask, 0)) * self._embed_scale(dtype)
        rows = soft_tokens.to(device=x.device, dtype=dtype).reshape(-1, x.shape[-1])  # (tiles * tokens, hidden)
        return x.masked_scatter(image_mask[..., None], rows)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., vocab_size) fp32 logits from final-norm hidden states (..., hidden)."""
        # An explicit head module (untied checkpoints, or one swapped in by quantisation) wins.
        logits = (linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _embed_scale(self, dtype: torch.dtype) -> Tensor:
        # sqrt(d_model) rounded to the model dtype first, as the reference does (55.43 -> 55.5 in bf16).
        return torch.tensor(self.config.hidden_size**0.5).to(dtype)

    def _check_soft_tokens(self, soft_tokens: Tensor, image_mask: Tensor) -> None:
        if soft_tokens.dim() != 3 or soft_tokens.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"soft_tokens must be (num_tiles, tokens_per_tile, {self.config.hidden_size}), "
                f"got {tuple(soft_tokens.shape)}"
            )
        placeholders = int(image_mask.sum())
        features = soft_tokens.shape[0] * soft_tokens.shape[1]
        if placeholders != features:
            raise ValueError(
                f"image placeholders and soft tokens differ: {placeholders} placeholder tokens in the "
                f"input, {features} soft tokens ({soft_tokens.shape[0]} tiles x {soft_tokens.shape[1]})"
            )

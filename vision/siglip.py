"""SigLIP vision transformer (So400m/14 at 896 for Gemma 3): patch embedding, learned positions,
pre-LayerNorm blocks, post-LayerNorm, no pooling head. Only the network; weights come from
`vision.weights`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision.config import VisionConfig

# config.json activation name -> function (a dict, not an if/elif chain)
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention over the patch sequence."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        heads = (batch, seq, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k_proj(x).view(heads).transpose(1, 2)  # (B, heads, T, head_dim)
        v = self.v_proj(x).view(heads).transpose(1, 2)  # (B, heads, T, head_dim)
        # SDPA's default scale is head_dim ** -0.5, SigLIP's scale.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(batch, seq, width)  # (B, T, width)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class SiglipBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SiglipAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class SiglipVisionTower(nn.Module):
    """Tiles [B, 3, 896, 896] -> patch features [B, 4096, width] (64x64 patches, row-major)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embed = nn.Parameter(torch.empty(config.num_patches, config.hidden_size))
        self.blocks = nn.ModuleList(SiglipBlock(config) for _ in range(config.num_hidden_layers))
        self.post_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(tiles.to(self.patch_embed.weight.dtype))  # (B, width, 64, 64)
        x = x.flatten(2).transpose(1, 2)  # (B, 4096, width), patches row-major
        x = x + self.position_embed
        for block in self.blocks:
            x = block(x)
        return self.post_norm(x)

"""Gemma 3 multimodal projector, and the tower + projector network that turns tiles into soft tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision.config import VisionConfig
from vision.siglip import SiglipVisionTower


class MultimodalProjector(nn.Module):
    """Patch features [B, 4096, width] -> soft tokens [B, 256, d_model].

    Average-pools the 64x64 patch grid 4x4 to 16x16, RMSNorm (fp32, scaled by 1 + w), then a plain
    matmul into the language model's width. No bias, and no sqrt(d_model) scaling: that belongs to
    text embeddings only."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.pool_kernel = config.pool_kernel
        self.eps = config.layer_norm_eps
        self.norm_weight = nn.Parameter(torch.empty(config.hidden_size))
        self.projection = nn.Parameter(torch.empty(config.hidden_size, config.d_model))  # [width, d_model]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(
            batch, width, self.patches_per_side, self.patches_per_side
        )  # (B, width, 64, 64)
        pooled = F.avg_pool2d(grid, kernel_size=self.pool_kernel, stride=self.pool_kernel)  # (B, width, 16, 16)
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, 256, width), row-major over the 16x16 grid
        normed = self._rms_norm(tokens)
        return torch.matmul(normed, self.projection)  # (B, 256, d_model)

    def _rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model dtype, then back, as the reference does (the (1 + w) product
        # is taken before the cast).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.norm_weight.float())).to(x.dtype)


class VisionToSoftTokens(nn.Module):
    """Tiles [B, 3, 896, 896] -> soft tokens [B, 256, d_model]: the whole vision network."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.tower = SiglipVisionTower(config)
        self.projector = MultimodalProjector(config)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(tiles))

"""Which keys each query may attend to: pure mask functions, and the no-cache attention context.

Attention is causal; sliding-window layers also drop keys `sliding_window` or more
positions back; and the 256 tokens of one image tile see each other bidirectionally (a tile never
sees a later tile, since tiles have distinct ids and causality still holds between them).

The window applies to image tokens too, exactly as in the reference (`transformers`
`create_masks_for_vision_model`: local = window AND (causal OR same tile)): a tile token sees the
later tokens of its own tile, but on a local layer never a key `sliding_window` or more positions
before it. With the released windows (512, 1024) a 256-token tile always fits inside the window, so
this only matters for tiny test configs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lm.models.base import LAYER_TYPES, SLIDING, DecoderConfig


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Attention of layer `layer_idx` for this step: queries q (B, H, T, head_dim) and this step's
        keys/values (B, kv_heads, T, head_dim), already normed and roped. The context stores the keys and
        values if it caches, chooses the keys each query sees and returns (B, H, T, head_dim)."""
        ...


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Scaled dot-product attention with grouped-query heads: q (B, H, T, D), k/v (B, KV, S, D), mask
    (B, 1, T, S) bool (True = attend), additive in q's dtype (`additive_mask`), or None (every key).
    On CPU SDPA serves each KV head to H / KV query heads without copying. On CUDA a mask together with
    `enable_gqa` would fall back to the math kernel, so there the KV heads are repeated and the mask
    made additive, which the memory-efficient kernel takes."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if q.is_cuda and mask is not None:
        if heads != kv_heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        bias = additive_mask(mask, q.dtype) if mask.dtype == torch.bool else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = attend) as SDPA's additive form: 0 where True, -inf where False, in `dtype`
    (the values SDPA turns a boolean mask into on every call; built once, a mask serves every layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    sliding_window: int | None,
    q_tile: Tensor | None = None,
    k_tile: Tensor | None = None,
) -> Tensor:
    """Boolean mask (B, 1, T, S), True = the query may attend to the key.

    q_pos (B, T), k_pos (B, S): absolute positions; a key slot with k_pos < 0 is empty or padding and
    is never attended. q_tile (B, T), k_tile (B, S): id of the image tile a token belongs to, -1 for
    text; tokens of the same tile attend to each other in both directions.
    allowed = valid & (k_pos <= q_pos | same tile) & (window is None | q_pos - k_pos < window)
    """
    if (q_tile is None) != (k_tile is None):
        raise ValueError("attention_mask: give both q_tile and k_tile, or neither")
    q = q_pos[:, None, :, None]  # (B, 1, T, 1)
    k = k_pos[:, None, None, :]  # (B, 1, 1, S)
    allowed = k <= q
    if q_tile is not None:
        qt = q_tile[:, None, :, None]  # (B, 1, T, 1)
        kt = k_tile[:, None, None, :]  # (B, 1, 1, S)
        allowed = allowed | ((qt >= 0) & (qt == kt))
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    return allowed & (k >= 0)


def tile_ids_from_mask(image_mask: Tensor, tokens_per_tile: int, *, first_id: int | Tensor = 0) -> Tensor:
    """Tile id of every token (B, T): the i-th run of `tokens_per_tile` placeholders in a row gets id
    first_id + i, text gets -1. `first_id` (int or (B,)) lets a caller continue the numbering of
    tiles already in its cache. A tile must be contiguous and whole: a placeholder count that is not a
    multiple of `tokens_per_tile`, or a tile interrupted by text, is a ValueError."""
    if image_mask.dtype != torch.bool or image_mask.dim() != 2:
        raise ValueError(
            f"image_mask must be a (B, T) bool tensor, got {image_mask.dtype} {tuple(image_mask.shape)}"
        )
    counts = image_mask.sum(dim=1)  # (B,)
    if bool((counts % tokens_per_tile).any()):
        raise ValueError(
            f"image placeholders per sequence {counts.tolist()} are not multiples of "
            f"{tokens_per_tile} tokens per tile"
        )
    index = image_mask.long().cumsum(dim=1) - 1  # (B, T) running placeholder index
    previous = torch.nn.functional.pad(image_mask, (1, 0))[:, :-1]  # (B, T) placeholder just before
    if bool((image_mask & (index % tokens_per_tile != 0) & ~previous).any()):
        raise ValueError(f"an image tile's {tokens_per_tile} placeholders are interrupted by other tokens")
    first = torch.as_tensor(first_id, device=image_mask.device).reshape(-1, 1)  # (B or 1, 1)
    tiles = index.div(tokens_per_tile, rounding_mode="floor") + first
    return torch.where(image_mask, tiles, torch.full_like(tiles, -1))


def tile_spans_from_mask(image_mask: np.ndarray, tokens_per_tile: int) -> list[tuple[int, int]]:
    """[start, end) of each image tile's placeholders in one sequence's mask (T,) bool, in order: the
    tiles `tile_ids_from_mask` numbers 0, 1, ... for that mask, with its ValueErrors (a placeholder count
    that is not a multiple of tokens_per_tile, a tile interrupted by text), read from the runs of
    placeholders in numpy (a prompt's tiles at submission, 855 tokens: 17 against 58 us for the torch
    version, before its ids are read back into spans). A run of placeholders holds whole tiles exactly
    when its length is a multiple of tokens_per_tile; with the count a multiple, that is the torch
    version's rule that no tile starts after text at an index that is not a multiple."""
    mask = np.asarray(image_mask, dtype=bool).reshape(-1)
    count = int(np.count_nonzero(mask))
    if count % tokens_per_tile:
        raise ValueError(f"image placeholders per sequence {[count]} are not multiples of {tokens_per_tile} "
                         "tokens per tile")
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0)).tolist()  # run starts, ends
    spans = []
    for start, end in zip(edges[0::2], edges[1::2]):
        if (end - start) % tokens_per_tile:
            raise ValueError(f"an image tile's {tokens_per_tile} placeholders are interrupted by other tokens")
        spans.extend((first, first + tokens_per_tile) for first in range(start, end, tokens_per_tile))
    return spans


class FullAttention:
    """No cache: every layer attends over exactly this step's tokens (recompute from scratch).

    positions (B, T), -1 marking padding; tile_ids (B, T) or None for text only. One mask per layer
    type is built once here. A padding query attends to itself alone, so its row stays finite (an
    all-masked row would give NaN) and no real token ever sees it."""

    def __init__(self, config: DecoderConfig, positions: Tensor, tile_ids: Tensor | None = None) -> None:
        self.layer_types = config.layer_types
        padding = positions < 0  # (B, T)
        self_only = torch.diag_embed(padding)[:, None]  # (B, 1, T, T)
        self.masks = {
            layer_type: attention_mask(
                positions, positions,
                sliding_window=config.sliding_window if layer_type == SLIDING else None,
                q_tile=tile_ids, k_tile=tile_ids,
            ) | self_only
            for layer_type in LAYER_TYPES
            if layer_type in set(config.layer_types)
        }

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return sdpa(q, k, v, self.masks[self.layer_types[layer_idx]], scale)

"""The engine's KV cache: fixed sequence slots, window-sized rings for local layers.

Every running sequence owns one slot (a batch row in each layer's buffers). Global layers keep the
whole context, `max_seq_len` positions; local (sliding-window) layers keep a ring of
`min(sliding_window, max_seq_len)` positions, written at `position % window`. Slots are allocated
once, from a byte budget, when the engine starts: a request either gets a slot or waits for one.

The cache also records, per slot and ring cell, the absolute position (-1 when empty) and the image
tile id (-1 for text) of what it holds, so attention masks are computed from stored facts rather
than assumed layouts.

Invariant: every empty cell holds zeros. Attention reads empty cells (a whole ring; global layers
up to the longest sequence of the batch) and masks them out, but masking weighs a value by exactly 0
and 0 × NaN is NaN: a cell left non-finite by an earlier request would poison every later request in
that slot. So freeing a slot zeroes what it wrote, and moving a slot overwrites everything the
destination held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.attention import attention_mask
from lm.models.base import DecoderConfig


def kv_bytes_per_token(config: DecoderConfig, dtype: torch.dtype) -> int:
    """Bytes one token costs across all layers: Σ_layers 2 × kv_heads × head_dim × bytes."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)
    return per_layer * config.num_hidden_layers


def kv_bytes_for_context(config: DecoderConfig, context_len: int, dtype: torch.dtype, *, windowed: bool = True) -> int:
    """Bytes of KV cache for one sequence of `context_len` tokens.

    With `windowed`, local layers hold at most `sliding_window` tokens; otherwise every layer holds
    all of them (what an all-global cache would need)."""
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)
    total = 0
    for layer_idx in range(config.num_hidden_layers):
        held = context_len
        if windowed and not config.is_global(layer_idx):
            held = min(context_len, config.sliding_window)
        total += per_layer_token * held
    return total


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CacheShape:
    """Geometry of the slot cache, decided once at start-up."""

    num_slots: int  # sequences that can run at once (batch rows)
    max_seq_len: int  # longest context (prompt + generated) a slot holds
    ring_len: int  # positions kept by each local layer: min(sliding_window, max_seq_len)

    @classmethod
    def from_budget(cls, config: DecoderConfig, *, budget_bytes: int, max_seq_len: int, dtype: torch.dtype,
                    max_slots: int) -> "CacheShape":
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        ring_len = min(config.sliding_window or max_seq_len, max_seq_len)  # no sliding layers: unused
        per_slot = slot_bytes(config, max_seq_len, dtype)
        num_slots = min(max_slots, budget_bytes // per_slot)
        if num_slots < 1:
            raise ValueError(
                f"KV budget of {budget_bytes / 2**20:.1f} MiB cannot hold one sequence of {max_seq_len} "
                f"tokens ({per_slot / 2**20:.1f} MiB per sequence): raise the budget or lower max_seq_len"
            )
        return cls(num_slots=num_slots, max_seq_len=max_seq_len, ring_len=ring_len)


def slot_bytes(config: DecoderConfig, max_seq_len: int, dtype: torch.dtype) -> int:
    return kv_bytes_for_context(config, max_seq_len, dtype, windowed=True)


class KVCache:
    """Per-layer key/value buffers for `shape.num_slots` sequences, plus per-cell bookkeeping."""

    def __init__(self, config: DecoderConfig, shape: CacheShape, *, dtype: torch.dtype, device: torch.device | str):
        self.config = config
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer_idx in range(config.num_hidden_layers):
            length = shape.max_seq_len if config.is_global(layer_idx) else shape.ring_len
            size = (shape.num_slots, kv_heads, length, head_dim)
            self.keys.append(torch.zeros(size, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(size, dtype=dtype, device=self.device))
        # Absolute position and tile id held by each cell; -1 = empty / text.
        self.full_pos = torch.full((shape.num_slots, shape.max_seq_len), -1, dtype=torch.long, device=self.device)
        self.full_tile = torch.full_like(self.full_pos, -1)
        self.ring_pos = torch.full((shape.num_slots, shape.ring_len), -1, dtype=torch.long, device=self.device)
        self.ring_tile = torch.full_like(self.ring_pos, -1)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def used_positions(self, slot: int) -> int:
        """Cells [0, n) of the global layers that `slot` has written (they fill from position 0)."""
        return int(self.full_pos[slot].max()) + 1  # -1 (empty) + 1 = 0

    def clear_slot(self, slot: int) -> None:
        """Empty a slot: zero the keys and values it wrote and mark every cell empty (see the module
        docstring for why the data, not only the bookkeeping, is cleared)."""
        used = self.used_positions(slot)
        for layer_idx in range(self.config.num_hidden_layers):
            for buffer in (self.keys[layer_idx], self.values[layer_idx]):
                if self.config.is_global(layer_idx):
                    buffer[slot, :, :used] = 0
                else:
                    buffer[slot] = 0
        for table in (self.full_pos, self.full_tile, self.ring_pos, self.ring_tile):
            table[slot] = -1

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (batch compaction) and clear `src`. Global layers copy only the
        positions either slot has written, not the whole `max_seq_len`: `src`'s cells beyond its own
        are zeros, so whatever `dst` held there is overwritten with zeros too."""
        used = max(self.used_positions(src), self.used_positions(dst))
        for layer_idx in range(self.config.num_hidden_layers):
            for buffer in (self.keys[layer_idx], self.values[layer_idx]):
                if self.config.is_global(layer_idx):
                    buffer[dst, :, :used] = buffer[src, :, :used]
                else:
                    buffer[dst] = buffer[src]
        for table in (self.full_pos, self.full_tile, self.ring_pos, self.ring_tile):
            table[dst] = table[src]
        self.clear_slot(src)


class PrefillAttention:
    """AttentionContext for one chunk of one sequence's prompt, written into slot `slot`.

    Global layers write first and attend over positions [0, end). Local layers attend over the ring's
    previous contents plus the chunk (a chunk can be longer than the ring), then keep the chunk's last
    `ring_len` tokens in the ring."""

    def __init__(self, cache: KVCache, slot: int, positions: torch.Tensor, tile_ids: torch.Tensor):
        # positions, tile_ids: (T,), consecutive positions starting where the slot left off
        self.cache, self.slot = cache, slot
        config, ring_len = cache.config, cache.shape.ring_len
        start, end = int(positions[0]), int(positions[-1]) + 1
        if end > cache.shape.max_seq_len:
            raise ValueError(f"chunk ends at {end}, beyond the slot's {cache.shape.max_seq_len} positions")
        self.positions = positions
        q_pos, q_tile = positions[None], tile_ids[None]  # (1, T)

        cache.full_pos[slot, start:end] = positions
        cache.full_tile[slot, start:end] = tile_ids
        self.start, self.end = start, end
        self.global_mask = attention_mask(
            q_pos, cache.full_pos[slot:slot + 1, :end], sliding_window=None,
            q_tile=q_tile, k_tile=cache.full_tile[slot:slot + 1, :end],
        )
        ring_k_pos = torch.cat([cache.ring_pos[slot], positions])[None]  # (1, ring_len + T)
        ring_k_tile = torch.cat([cache.ring_tile[slot], tile_ids])[None]
        self.local_mask = attention_mask(
            q_pos, ring_k_pos, sliding_window=config.sliding_window, q_tile=q_tile, k_tile=ring_k_tile,
        )
        # The chunk's last ring_len tokens stay in the ring.
        kept = slice(max(0, len(positions) - ring_len), len(positions))
        self.kept = kept
        self.ring_cells = positions[kept] % ring_len
        cache.ring_pos[slot, self.ring_cells] = positions[kept]
        cache.ring_tile[slot, self.ring_cells] = tile_ids[kept]

    def kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        # keys, values: (1, kv_heads, T, head_dim)
        cache, slot = self.cache, self.slot
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        if cache.config.is_global(layer_idx):
            k_buf[slot, :, self.start:self.end] = keys[0]
            v_buf[slot, :, self.start:self.end] = values[0]
            return k_buf[slot:slot + 1, :, :self.end], v_buf[slot:slot + 1, :, :self.end], self.global_mask
        all_keys = torch.cat([k_buf[slot:slot + 1], keys], dim=2)  # (1, kv, ring+T, hd)
        all_values = torch.cat([v_buf[slot:slot + 1], values], dim=2)
        k_buf[slot][:, self.ring_cells] = keys[0, :, self.kept]  # (kv, kept, hd)
        v_buf[slot][:, self.ring_cells] = values[0, :, self.kept]
        return all_keys, all_values, self.local_mask


class DecodeAttention:
    """AttentionContext for one decode step of the sequences in slots [0, B): one new text token each,
    at its own position. Each layer writes the new key/value first, then attends over the slot rows
    in place (a ring cell being overwritten holds position - ring_len, already outside the window)."""

    def __init__(self, cache: KVCache, positions: torch.Tensor):
        # positions: (B,) the new token's position in each slot 0..B-1
        self.cache = cache
        batch = positions.shape[0]
        rows = torch.arange(batch, device=positions.device)
        ring_len = cache.shape.ring_len
        self.rows, self.positions = rows, positions
        self.ring_cells = positions % ring_len
        self.span = int(positions.max()) + 1  # global layers attend over [0, span)

        cache.full_pos[rows, positions] = positions
        cache.full_tile[rows, positions] = -1
        cache.ring_pos[rows, self.ring_cells] = positions
        cache.ring_tile[rows, self.ring_cells] = -1
        q_pos = positions[:, None]  # (B, 1)
        q_tile = torch.full_like(q_pos, -1)
        self.global_mask = attention_mask(
            q_pos, cache.full_pos[:batch, :self.span], sliding_window=None,
            q_tile=q_tile, k_tile=cache.full_tile[:batch, :self.span],
        )
        self.local_mask = attention_mask(
            q_pos, cache.ring_pos[:batch], sliding_window=cache.config.sliding_window,
            q_tile=q_tile, k_tile=cache.ring_tile[:batch],
        )
        self.batch = batch

    def kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        # keys, values: (B, kv_heads, 1, head_dim)
        cache, batch = self.cache, self.batch
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        is_global = cache.config.is_global(layer_idx)
        cells = self.positions if is_global else self.ring_cells
        k_buf[self.rows, :, cells] = keys[:, :, 0]  # (B, kv, hd)
        v_buf[self.rows, :, cells] = values[:, :, 0]
        if is_global:
            return k_buf[:batch, :, :self.span], v_buf[:batch, :, :self.span], self.global_mask
        return k_buf[:batch], v_buf[:batch], self.local_mask

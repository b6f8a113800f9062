"""The engine's paged KV cache: memory in fixed-size blocks, laid out for mixed attention kinds.

A *group* is a set of layers with one attention kind (full, or sliding window of size w) that share
one block table per request; every layer of a group has the same key/value shape. Following vLLM's
hybrid KV cache manager, the layers of each kind are cut into groups of `page_layers` layers (the
smallest kind's layer count), so one block id means the same bytes in every group: block b of group
g stores, for the j-th layer of g, rows [b] of tensor j. One free list serves all groups; a block is
the unit of allocation, reference counting and prefix caching (lm/engine/block_manager.py).

Gemma 3 270M (18 layers, 3 full, 15 sliding) has page_layers 3: one full group and five sliding
groups; a Qwen model with full attention only is one group of all its layers. A group of the last
slice of a kind may be short of `page_layers`: its unused tensor rows are the padding vLLM also pays.

Bytes a request holds: a full group ceil(n / block_size) blocks for n tokens; a sliding group only the
blocks that still hold one of the last w positions (≤ ceil(w / block_size) + 1 once out-of-window
blocks are freed). `kv_bytes_for_context` below is the block-free formula of DESIGN §5; the paged
cache rounds it up to whole blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import typed

from lm.models.base import FULL, SLIDING, DecoderConfig


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
class KVGroup:
    """Layers with one attention kind sharing one block table per request."""

    kind: str  # lm.models.base FULL or SLIDING
    window: int | None  # sliding_window for SLIDING groups, None for FULL
    layers: tuple[int, ...]  # layer indices; the j-th uses storage tensor j


@dataclass(frozen=True)
class KVLayout:
    """How layers map onto groups and storage tensors, and the block size in tokens."""

    groups: tuple[KVGroup, ...]
    page_layers: int  # storage tensors (layers per group at most)
    block_size: int  # tokens per block

    @classmethod
    def from_config(cls, config: DecoderConfig, block_size: int) -> "KVLayout":
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        by_kind: dict[str, list[int]] = {}
        for layer_idx, kind in enumerate(config.layer_types):
            by_kind.setdefault(kind, []).append(layer_idx)
        page_layers = min(len(layers) for layers in by_kind.values())
        groups = []
        for kind in (FULL, SLIDING):
            layers = by_kind.get(kind, [])
            window = config.sliding_window if kind == SLIDING else None
            for first in range(0, len(layers), page_layers):
                groups.append(KVGroup(kind, window, tuple(layers[first:first + page_layers])))
        return cls(groups=tuple(groups), page_layers=page_layers, block_size=block_size)

    @functools.cached_property
    def placement(self) -> dict[int, tuple[int, int]]:
        """Layer index -> (group index, storage tensor index), computed once."""
        return {layer: (g, j) for g, group in enumerate(self.groups) for j, layer in enumerate(group.layers)}

    def block_bytes(self, config: DecoderConfig, dtype: torch.dtype) -> int:
        """Bytes of one block id across the storage tensors (keys and values)."""
        return self.page_layers * 2 * self.block_size * config.num_key_value_heads * config.head_dim * _itemsize(dtype)

    def first_needed_block(self, group: KVGroup, position: int) -> int:
        """Index of the first block a query at `position` (or later) still reads in this group: 0 for
        full attention; for a window w, the block holding position - w + 1."""
        if group.window is None:
            return 0
        return max(0, position - group.window + 1) // self.block_size

    def blocks_for_request(self, num_tokens: int, chunk: int) -> int:
        """Most blocks one request of `num_tokens` positions holds at once in all groups, when it computes
        at most `chunk` tokens per step (a sliding group holds the window before a chunk plus the chunk)."""
        total = 0
        for group in self.groups:
            if group.window is None:
                total += math.ceil(num_tokens / self.block_size)
            else:
                span = min(num_tokens, group.window - 1 + chunk)
                total += min(math.ceil(num_tokens / self.block_size), math.ceil(span / self.block_size) + 1)
        return total


def request_budget_bytes(config: DecoderConfig, max_seq_len: int, dtype: torch.dtype, *, block_size: int,
                         prefill_chunk: int) -> int:
    """The smallest KV budget (bytes) that holds one request of `max_seq_len` tokens computed in chunks
    of at most `prefill_chunk` tokens (or one image tile, if longer), in blocks of `block_size` tokens."""
    layout = KVLayout.from_config(config, block_size)
    return layout.blocks_for_request(max_seq_len, largest_chunk(config, prefill_chunk)) * layout.block_bytes(config, dtype)


def largest_chunk(config: DecoderConfig, prefill_chunk: int) -> int:
    """Most tokens one request computes in a step: `prefill_chunk`, or a whole image tile when a tile is
    longer (a chunk never splits a tile)."""
    return max(prefill_chunk, config.mm_tokens_per_image if config.accepts_images else 0)


class PagedKVStorage:
    """Key and value tensors of `num_blocks` blocks: keys[j], values[j] are
    (num_blocks, block_size, kv_heads, head_dim) in the engine's dtype, for the j-th layer of every group.
    The tensors start uninitialised and blocks are not cleared when freed. Where decode attention gathers
    whole blocks (any cache but float32 on the CPU: lm.engine.model_runner), the engine clears each block
    when it is allocated (`clear`): the positions of a request's last block beyond its length are masked
    out, but a masked NaN or inf still turns the attention output into NaN (0 x NaN), so whatever an
    earlier tenant left there must not stay. A float32 CPU cache is read in place at exactly the
    positions each request wrote, and is not cleared."""

    def __init__(self, config: DecoderConfig, layout: KVLayout, num_blocks: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        self.layout, self.num_blocks = layout, num_blocks
        shape = (num_blocks, layout.block_size, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layout.page_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layout.page_layers)]
        self._arrays: dict[int, tuple] = {}
        self._array_lists: dict[tuple[int, ...], tuple] = {}

    def arrays(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys[j], values[j]) as numpy arrays sharing their memory (CPU storage only), made once per
        tensor: for kernels that take arrays (lm.layers.fused), without a conversion per layer and step."""
        keys, values = self.keys[j], self.values[j]
        cached = self._arrays.get(j)
        if cached is None or cached[0] is not keys or cached[1] is not values:  # made again if replaced
            cached = self._arrays[j] = (keys, values, keys.numpy(), values.numpy())
        return cached[2], cached[3]

    def array_list(self, js: tuple[int, ...]):
        """`arrays(j)` for each j of `js` in order, in a numba typed list (lm.layers.fused.DecodeStack takes
        every layer's cache as one argument), made once per `js` and made again when a tensor is replaced."""
        tensors = [(self.keys[j], self.values[j]) for j in js]
        cached = self._array_lists.get(js)
        if cached is None or any(a is not b or c is not d for (a, c), (b, d) in zip(cached[0], tensors)):
            cached = self._array_lists[js] = (tensors, typed.List([self.arrays(j) for j in js]))
        return cached[1]

    def clear(self, blocks: list[int]) -> None:
        """Zero `blocks` (ids) in every layer."""
        if blocks:
            index = torch.tensor(blocks, device=self.keys[0].device)
            for tensor in self.keys + self.values:
                tensor.index_fill_(0, index, 0)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


"""The model runner: one packed forward pass over every chunk a step scheduled, then the logits of the
requests that sample.

All scheduled tokens (decode rows of one token, prompt chunks of many, from any number of requests) are
packed into one (1, N) batch, so the projections and MLPs run once per step over N rows. Attention is
per request (`PagedAttention`): each chunk's keys and values are written into its blocks, then its
queries attend over that request's positions only, gathered from its block table, so attention costs
each request its own context length, never the batch's longest, and no request reads another's memory.
Decode rows of similar length share one call, each masked to its own keys and padded to at most twice
its own blocks; on the CPU with a float32 cache the rows instead read their own positions where they lie
(lm.layers.fused.decode_attention): no gather, no padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lm.attention import additive_mask, sdpa
from lm.head_screen import GreedyHeadScreen, head_weight
from lm.kv_cache import KVLayout, PagedKVStorage
from lm.layers import fused
from lm.sequence import Sequence

log = logging.getLogger(__name__)

# Most steps the head screen sits out after failing to decide, doubling from 1: on hidden states that
# leave too many candidates (flat logits) a step pays the screen and then the full head, up to 2.3x a
# plain step for the 270M at 8 rows; backing off bounds that to one step in 64.
SCREEN_MAX_BACKOFF = 64


@dataclass
class ScheduledChunk:
    """Positions [start, end) of `sequence` computed this step."""

    sequence: Sequence
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step samples its next one."""
        return self.end == self.sequence.num_tokens


class PagedAttention:
    """AttentionContext of one packed step over the paged cache (lm.attention.AttentionContext).

    Per KV group: `slots` (N,) the storage row (block * block_size + offset) each packed token writes;
    per group and chunk: the block ids holding the keys the chunk reads and where in them its keys start.
    Keys a chunk reads: positions [lo, end), lo = 0 for full attention and start - window + 1 for a
    sliding window. Masks (causal, window, image tiles both ways) are built once per attention kind and
    chunk of several tokens, in SDPA's additive form (it would convert a boolean mask in every layer).

    One-token chunks (decode rows) of similar length attend together: their blocks are gathered into one
    padded (R, blocks * block_size) batch per group with a mask of each row's [lo, end), so a step of R
    decode rows makes one gather and one SDPA call per layer instead of R. A batch holds rows whose
    block counts are within BATCH_SPREAD of its shortest, so padding at most doubles a row's work. A
    float32 CPU cache is read in place, each row over its own positions (lm.layers.fused), so there
    every decode row goes in one batch, and a step of decode rows alone can take the layer's attention
    from its fused projection on (`attend_decode_rows`)."""

    BATCH_SPREAD = 2

    def __init__(self, storage: PagedKVStorage, layout: KVLayout, chunks: list[ScheduledChunk], device: torch.device):
        self.storage, self.layout = storage, layout
        dtype = storage.keys[0].dtype  # masks are additive in it, built once for every layer
        # a cache the in-place kernel reads (float32, CPU) pads nothing: every decode row in one batch there
        self.spread = None if fused.reads_in_place(storage.keys[0], storage.keys[0]) else self.BATCH_SPREAD
        self._decode_arrays: dict[int, tuple] = {}  # attend_decode_rows' arrays, per group
        self._table_arrays: dict[tuple[int, int], tuple] = {}  # and per pair of RoPE tables
        self.num_tokens = sum(chunk.num_tokens for chunk in chunks)
        self.offsets: list[tuple[int, int]] = []  # packed [a, b) of each chunk
        a = 0
        for chunk in chunks:
            self.offsets.append((a, a + chunk.num_tokens))
            a += chunk.num_tokens
        self.decode_rows_step = a == len(chunks)  # every chunk one token: the step decode_stack_arrays serves
        self._chunks, self._device, self._dtype = chunks, device, dtype
        self._planned: tuple | None = None  # (slots, reads, batches), made on first use (`_plan`)

    @property
    def slots(self) -> list[Tensor]:
        """Per group: (N,) the storage row each packed token writes."""
        return self._plan()[0]

    @property
    def reads(self) -> list[list[tuple[int, Tensor, int, int, Tensor | None]]]:
        """Per group: (chunk, blocks, skip, length, mask) of each chunk of several tokens."""
        return self._plan()[1]

    @property
    def batches(self) -> list[list[tuple]]:
        """Per group: (rows, blocks (R, nb), mask, start (R,), length (R,)) of each batch of decode rows."""
        return self._plan()[2]

    def _plan(self) -> tuple:
        """The step's slots, reads and batches per group, made on first use: a step of decode rows that
        lm.layers.fused.DecodeStack runs whole (`decode_stack_arrays`) never needs them."""
        if self._planned is not None:
            return self._planned
        chunks, device, dtype, layout = self._chunks, self._device, self._dtype, self.layout
        size = layout.block_size
        multi = [i for i, chunk in enumerate(chunks) if chunk.num_tokens > 1]
        slots: list[Tensor] = []
        reads: list[list[tuple[int, Tensor, int, int, Tensor | None]]] = []
        batches: list[list[tuple]] = []
        masks: dict[int | None, dict[int, Tensor | None]] = {}
        plans: dict[int | None, list] = {}  # per window: the decode batches (the same for every group of it)
        for g, group in enumerate(layout.groups):
            tables = [chunk.sequence.block_tables[g] for chunk in chunks]
            # plain ints: a tensor op per chunk and group would cost more than the arithmetic
            slots.append(torch.tensor([table[p // size] * size + p % size for chunk, table in zip(chunks, tables)
                                       for p in range(chunk.start, chunk.end)], device=device))
            spans = [self._span(chunk, group.window, size) for chunk in chunks]  # (first block, count, skip, length)
            if group.window not in masks:
                masks[group.window] = {i: self._mask(chunks[i], group.window, device, dtype) for i in multi}
                plans[group.window] = self._decode_plan(chunks, spans, size, device, dtype)
            reads.append([(i, torch.tensor(tables[i][spans[i][0]:spans[i][0] + spans[i][1]], device=device),
                           spans[i][2], spans[i][3], masks[group.window][i]) for i in multi])
            batches.append([
                (rows_index, torch.tensor([_padded(tables[i][spans[i][0]:spans[i][0] + spans[i][1]], width)
                                           for i in members], device=device), mask, start, length)
                for members, width, rows_index, mask, start, length in plans[group.window]])
        self._planned = (slots, reads, batches)
        return self._planned

    @staticmethod
    def _span(chunk: ScheduledChunk, window: int | None, size: int) -> tuple[int, int, int, int]:
        """(first block index, block count, skip, length): the chunk reads keys [lo, end), held in block
        table entries first .. first + count - 1, starting `skip` positions into the first."""
        lo = 0 if window is None else max(0, chunk.start - window + 1)
        first = lo // size
        return first, (chunk.end - 1) // size - first + 1, lo - first * size, chunk.end - lo

    def _decode_plan(self, chunks: list[ScheduledChunk], spans, size: int, device, dtype: torch.dtype):
        """Batches of the one-token chunks: (their chunk indices in packed order, width in blocks, packed
        rows (R,), additive mask (R, 1, 1, width * size) of the keys each row reads, or None when every
        row reads all of them, and the same as (start, length) (R,) each: positions into the row's
        blocks). The block counts and masks depend on the window, not on the group's block ids."""
        plan = []
        singles = sorted((i for i, chunk in enumerate(chunks) if chunk.num_tokens == 1), key=lambda i: spans[i][1])
        while singles:
            batch = [i for i in singles if self.spread is None or spans[i][1] <= self.spread * spans[singles[0]][1]]
            singles = singles[len(batch):]
            width = spans[batch[-1]][1]
            batch.sort()  # in packed order: a batch of every row needs no reordering
            start = torch.tensor([spans[i][2] for i in batch], device=device)  # (R,)
            length = torch.tensor([spans[i][3] for i in batch], device=device)
            skip, end = start[:, None], (start + length)[:, None]  # (R, 1)
            keys = torch.arange(width * size, device=device)[None]  # (1, width * size)
            full = all(spans[i][2] == 0 and spans[i][3] == width * size for i in batch)
            mask = None if full else additive_mask(((keys >= skip) & (keys < end))[:, None, None], dtype)
            rows_index = torch.tensor([self.offsets[i][0] for i in batch], device=device)
            plan.append((batch, width, rows_index, mask, start, length))
        return plan

    @staticmethod
    def _mask(chunk: ScheduledChunk, window: int | None, device, dtype: torch.dtype) -> Tensor:
        """The additive mask (1, 1, T, S) of a chunk's T queries over its keys [lo, end) (`_span`):
        lm.attention.attention_mask's rule, built from each query's range of keys. Query p reads keys
        [max(lo, p - window + 1), p], or up to the end of its image tile when p is a placeholder: causal
        within the window, and a tile's tokens see its later ones (a chunk never ends inside a tile, and one
        that starts inside a tile after a prefix hit holds the rest of it; the window drops only keys
        `window` or more positions back, never a later one). Built in numpy: at a few dozen
        queries the dozen ATen calls of the mask functions cost ~2-3x as much."""
        sequence = chunk.sequence
        lo = 0 if window is None else max(0, chunk.start - window + 1)
        positions = np.arange(chunk.start, chunk.end)
        first = np.full(positions.shape[0], lo) if window is None else np.maximum(lo, positions - window + 1)
        last = positions.copy()
        for tile_start, tile_end in sequence.tile_spans:
            if tile_start < chunk.end and tile_end > chunk.start:
                inside_end = min(tile_end, chunk.end)
                last[max(tile_start, chunk.start) - chunk.start:inside_end - chunk.start] = inside_end - 1
        keys = np.arange(lo, chunk.end)[None]  # (1, S)
        allowed = (keys >= first[:, None]) & (keys <= last[:, None])  # (T, S)
        additive = np.where(allowed, np.float32(0.0), np.float32(-np.inf))
        return torch.from_numpy(additive)[None, None].to(device=device, dtype=dtype)

    def _decode_rows_only(self, g: int) -> tuple | None:
        """Group g's one decode batch when the step is decode rows only, all in that batch (in packed
        order); None otherwise."""
        batches = self.batches[g]
        if self.reads[g] or len(batches) != 1 or len(batches[0][0]) != self.num_tokens:
            return None
        return batches[0]

    def attend_decode_rows(self, layer_idx: int, qkv: Tensor, heads: int, kv_heads: int, q_weight: Tensor | None,
                           k_weight: Tensor | None, eps: float, offset: bool, cos: Tensor, sin: Tensor,
                           scale: float) -> Tensor | None:
        """`attend` for a step of decode rows only, from one step before it: qkv (1, N, H + 2 KV, D), the
        fused projection's output, and the q/k norm (weights (D,) or None, eps, offset) and RoPE tables
        cos, sin (1, N, D) to apply first. On a float32 CPU cache the norm, rotation, cache write and
        attention are one call (lm.layers.fused.decode_rows_attention): returns (1, N, H * D). None for
        any other step or storage: the caller norms, rotates and calls `attend`."""
        if not self.decode_rows_step or not fused.reads_in_place(qkv, self.storage.keys[0]):
            return None
        arrays = self.decode_rows_arrays(layer_idx, cos, sin)
        if arrays is None:
            return None
        return fused.decode_rows_attention(qkv[0], heads, kv_heads, q_weight, k_weight, eps, offset, *arrays,
                                           scale)[None]

    def decode_rows_arrays(self, layer_idx: int, cos: Tensor, sin: Tensor) -> tuple | None:
        """For a step of decode rows only on a float32 CPU cache: (cos, sin, keys, values, slots, blocks,
        start, length) as numpy arrays, what lm.layers.fused.decode_rows_attention reads for layer
        `layer_idx` (cos, sin (1, N, D) its RoPE tables); None for any other step or storage."""
        g, j = self.layout.placement[layer_idx]
        rows_only = self._decode_rows_only(g)
        if rows_only is None or not fused.reads_in_place(self.storage.keys[j], self.storage.keys[j]):
            return None
        # Arrays made once per step and shared by the layers: the group's indices, the RoPE tables of a
        # layer kind (the same tensors for all its layers), the cache (once per engine).
        indices = self._decode_arrays.get(g)
        if indices is None:
            _, blocks, _, start, length = rows_only
            indices = self._decode_arrays[g] = tuple(t.numpy() for t in (self.slots[g], blocks, start, length))
        tables = self._table_arrays.get((id(cos), id(sin)))
        if tables is None:  # the tensors are kept with their arrays, so the ids stay theirs for the step
            tables = self._table_arrays[id(cos), id(sin)] = (cos, sin, cos[0].contiguous().numpy(),
                                                             sin[0].contiguous().numpy())
        return (*tables[2:], *self.storage.arrays(j), *indices)

    def decode_stack_arrays(self, layer_ids: tuple[int, ...], tables: list[tuple[Tensor, Tensor]]) -> tuple | None:
        """For a step of decode rows only on a float32 CPU cache: what lm.layers.fused.DecodeStack reads
        for the layers `layer_ids` in order, whose RoPE tables are `tables` (per layer (cos, sin), each
        (1, N, D)): (caches, kinds, groups, cos, sin, slots, blocks, start, length) as DecodeStack's call
        takes them. None for any other step or storage."""
        if not self.decode_rows_step or self.spread is not None:  # spread None: the cache is read in place
            return None
        placement = [self.layout.placement[i] for i in layer_ids]
        groups = sorted({g for g, _ in placement})
        kinds: dict[tuple[int, int], int] = {}  # per pair of tables (the same tensors for a kind's layers)
        kind_of = [kinds.setdefault((id(cos), id(sin)), len(kinds)) for cos, sin in tables]
        first = {kind: i for i, kind in reversed(list(enumerate(kind_of)))}  # a layer of each kind
        cos = np.stack([tables[first[kind]][0][0].numpy() for kind in range(len(kinds))])  # (kinds, N, D)
        sin = np.stack([tables[first[kind]][1][0].numpy() for kind in range(len(kinds))])
        # Each row over its own blocks (no batching by length: the kernel reads the cache in place), straight
        # from the block tables: the same values as the groups' one decode batch (`_decode_rows_only`).
        size, chunks = self.layout.block_size, self._chunks
        spans = [[self._span(chunk, self.layout.groups[g].window, size) for chunk in chunks] for g in groups]
        width = max(span[1] for group_spans in spans for span in group_spans)
        slots, start, length = (np.zeros((len(groups), len(chunks)), np.int64) for _ in range(3))
        blocks = np.zeros((len(groups), len(chunks), width), np.int64)  # beyond a row's count: never read
        for k, g in enumerate(groups):
            for r, (chunk, (block, count, skip, span_length)) in enumerate(zip(chunks, spans[k])):
                table = chunk.sequence.block_tables[g]
                slots[k, r] = table[chunk.start // size] * size + chunk.start % size
                blocks[k, r, :count] = table[block:block + count]
                start[k, r], length[k, r] = skip, span_length
        index = {g: k for k, g in enumerate(groups)}
        return (self.storage.array_list(tuple(j for _, j in placement)), np.array(kind_of, np.int64),
                np.array([index[g] for g, _ in placement], np.int64), cos, sin, slots, blocks, start, length)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # q (1, H, N, D); k, v (1, KV, N, D)
        g, j = self.layout.placement[layer_idx]
        keys, values = self.storage.keys[j], self.storage.values[j]  # (blocks, block_size, KV, D)
        kv_heads, head_dim = keys.shape[2], keys.shape[3]
        slots = self.slots[g]
        keys.view(-1, kv_heads, head_dim).index_copy_(0, slots, k[0].transpose(0, 1))
        values.view(-1, kv_heads, head_dim).index_copy_(0, slots, v[0].transpose(0, 1))
        batches, reads = self.batches[g], self.reads[g]
        rows_only = self._decode_rows_only(g)
        if rows_only is not None:  # no reassembly
            return self._attend_rows(q, keys, values, *rows_only, scale).transpose(0, 1)[None]
        if not batches and len(reads) == 1:  # one prompt chunk is the whole step: no reassembly
            _, blocks, skip, length, mask = reads[0]
            return sdpa(q, *self._chunk_keys(keys, values, blocks, skip, length), mask, scale)
        out = torch.empty_like(q)  # (1, H, N, D)
        for batch in batches:
            out[0].index_copy_(1, batch[0], self._attend_rows(q, keys, values, *batch, scale).transpose(0, 1))
        for i, blocks, skip, length, mask in reads:
            a, b = self.offsets[i]
            out[:, :, a:b] = sdpa(q[:, :, a:b], *self._chunk_keys(keys, values, blocks, skip, length), mask, scale)
        return out

    @staticmethod
    def _chunk_keys(keys: Tensor, values: Tensor, blocks: Tensor, skip: int, length: int) -> tuple[Tensor, Tensor]:
        """A chunk's keys and values (1, KV, length, D) from its blocks, starting `skip` into the first."""
        chunk_k = keys.index_select(0, blocks).flatten(0, 1)[skip:skip + length].transpose(0, 1)[None]
        chunk_v = values.index_select(0, blocks).flatten(0, 1)[skip:skip + length].transpose(0, 1)[None]
        return chunk_k, chunk_v

    @staticmethod
    def _attend_rows(q: Tensor, keys: Tensor, values: Tensor, rows: Tensor, blocks: Tensor, mask: Tensor | None,
                     start: Tensor, length: Tensor, scale: float) -> Tensor:
        """Attention of the decode rows `rows` (R,) of q (1, H, N, D) over their blocks (R, nb), each
        over positions [start, start + length) of its blocks (the keys `mask` leaves): (R, H, D).
        Float32 CPU storage is read in place by lm.layers.fused; otherwise the blocks are gathered."""
        if fused.reads_in_place(q, keys):
            return fused.decode_attention(q[0].transpose(0, 1).index_select(0, rows), keys, values, blocks,
                                          start, length, scale)
        rows_q = q[0].index_select(1, rows).transpose(0, 1)[:, :, None]  # (R, H, 1, D)
        batch_k = _gather_blocks(keys, blocks).flatten(1, 2).transpose(1, 2)  # (R, KV, nb * size, D)
        batch_v = _gather_blocks(values, blocks).flatten(1, 2).transpose(1, 2)
        return sdpa(rows_q, batch_k, batch_v, mask, scale)[:, :, 0]


def _gather_blocks(storage: Tensor, blocks: Tensor) -> Tensor:
    """storage[blocks] for blocks (R, nb): (R, nb, block_size, KV, D). index_select copies whole blocks;
    advanced indexing computes an offset per element (on the 270M's decode rows at ~430 positions, 15
    against 45 us per gather, measured on the 2-core dev machine)."""
    return storage.index_select(0, blocks.reshape(-1)).view(*blocks.shape, *storage.shape[1:])


def _padded(blocks: list[int], width: int) -> list[int]:
    """`blocks` padded to `width` entries with its last block (masked out: any valid id would do)."""
    return blocks + blocks[-1:] * (width - len(blocks))


def _tiles_at(tile_ids: Tensor, start: int, end: int) -> Tensor:
    """Tile ids of positions [start, end): the prompt's, -1 for generated tokens beyond it."""
    inside = tile_ids[start:end]
    if inside.shape[0] < end - start:
        inside = torch.cat([inside, inside.new_full((end - start - inside.shape[0],), -1)])
    return inside


class ModelRunner:
    """Runs the network over a step's chunks on the paged cache, and its head over the rows that sample:
    in full (`logits`) or, for greedy rows, through the head's int8 screen where there is one
    (`greedy`, lm.head_screen), or by an int8 head's own argmax inside its product."""

    def __init__(self, model, storage: PagedKVStorage, layout: KVLayout, *, device: torch.device,
                 screen: GreedyHeadScreen | None = None):
        self.model, self.storage, self.layout, self.device = model, storage, layout, device
        self.screen = screen
        self._warned_stale = False
        self._screen_skips, self._screen_backoff = 0, 1  # greedy steps left without the screen; next back-off

    @property
    def reads_unwritten_cells(self) -> bool:
        """Whether attention may read cache cells no request has written: padded decode batches gather
        whole blocks, masking the tail of each row's last block (PagedAttention). A float32 CPU cache is
        read in place, each row and chunk over exactly the positions it holds, so newly allocated blocks
        need no zeroing there."""
        return not fused.reads_in_place(self.storage.keys[0], self.storage.keys[0])

    def logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits (R, vocab) of final hidden states (R, hidden)."""
        return self.model.logits(hidden)

    def greedy(self, hidden: Tensor) -> list[int] | None:
        """The argmax token of each row of `hidden` (R, hidden) through the screen, as torch.argmax of
        `logits(hidden)` picks it; None where the screen does not decide (and, backing off, for the next
        1, 2, 4 ... SCREEN_MAX_BACKOFF calls), or when the model's head is no longer the one it was built
        from (replaced, or changed in place). Without a screen, an int8 head's own decision where it
        makes one (`_quantized_greedy`), else None."""
        if self.screen is None:
            return self._quantized_greedy(hidden)
        if self.screen.weight is not head_weight(self.model) or self.screen.stale:
            if not self._warned_stale:
                log.warning("the LM head changed after the engine started: greedy tokens now read the full head")
                self._warned_stale = True
            return None
        if self._screen_skips:  # backing off after the screen failed to decide
            self._screen_skips -= 1
            return None
        try:
            chosen = self.screen.argmax(hidden)
        except Exception:  # noqa: BLE001 - an optimisation must never fail a step: the full head decides
            log.exception("the LM head's screen failed; greedy tokens read the full head from now on")
            self.screen = None
            return None
        if chosen is None:  # the step pays the screen and the full head: try again after 1, 2, 4 ... 64 steps
            self._screen_skips, self._screen_backoff = self._screen_backoff, min(2 * self._screen_backoff,
                                                                                  SCREEN_MAX_BACKOFF)
        else:
            self._screen_backoff = 1
        return chosen

    def _quantized_greedy(self, hidden: Tensor) -> list[int] | None:
        """The argmax of each row of `logits(hidden)` from an int8 head that decides it inside its product
        (lm.quantize.Int8DynamicLinear.greedy, on int8_matvec's rows), when the logits are the head's
        outputs as they are (no final soft-capping); None otherwise."""
        greedy = getattr(getattr(self.model, "lm_head", None), "greedy", None)
        if greedy is None or getattr(getattr(self.model, "config", None), "final_logit_softcapping", None) is not None:
            return None
        return greedy(hidden)

    def run(self, chunks: list[ScheduledChunk]) -> Tensor | None:
        """One forward over `chunks`; returns the final hidden states (R, hidden), model dtype, of the
        chunks that sample, in order, or None if none does. Raises whatever the network raises."""
        ids, positions, image_rows, soft_tokens, last_rows = [], [], [], [], []
        with_images = any(chunk.sequence.soft_tokens is not None for chunk in chunks)  # else no image rows
        row = 0
        for chunk in chunks:
            sequence = chunk.sequence
            ids.extend(sequence.token_ids[chunk.start:chunk.end])
            positions.extend(range(chunk.start, chunk.end))
            if with_images:
                image_rows.append(_tiles_at(sequence.tile_ids, chunk.start, chunk.end) >= 0)
            if sequence.soft_tokens is not None:
                rows = sequence.soft_token_rows(chunk.start, chunk.end)  # (K, hidden): whole tiles, or a tile's rest
                if rows is not None:
                    soft_tokens.append(rows)
            row += chunk.num_tokens
            if chunk.samples:
                last_rows.append(row - 1)
        input_ids = torch.tensor(ids, device=self.device)[None]  # (1, N)
        position_ids = torch.tensor(positions, device=self.device)[None]  # (1, N)
        attention = PagedAttention(self.storage, self.layout, chunks, self.device)
        if soft_tokens:
            image_mask = torch.cat(image_rows).to(self.device)[None]  # (1, N)
            hidden = self.model(input_ids, position_ids, attention,
                                soft_tokens=torch.cat(soft_tokens).to(self.device)[None], image_mask=image_mask)
        else:
            hidden = self.model(input_ids, position_ids, attention)
        if not last_rows:
            return None
        return hidden[0, torch.tensor(last_rows, device=self.device)]  # (R, hidden)

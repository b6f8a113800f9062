"""Block bookkeeping for the paged KV cache: allocation, reference counts, prefix hashes, eviction.

Pure bookkeeping (no tensors): the storage lives in lm.kv_cache.PagedKVStorage, which block ids index.

- Every request holds, per KV group (lm.kv_cache.KVLayout), a block table: block i covers positions
  [i * block_size, (i + 1) * block_size). A sliding-window group drops (None) the blocks no later query
  can read, so it holds at most the window plus the blocks of the chunk in flight.
- Prefix caching: once a block is full, it is registered under a key chained over the previous block's
  key, its token ids and, for image placeholders, the content hash of each image tile in it with the
  offset where that tile's placeholders start in the block. Two requests with the same text but different
  images get different keys from the first block holding a placeholder on. A new request reuses the
  longest chain of registered blocks: every full-attention group needs all blocks of the hit, a
  sliding-window group only those holding one of the last `window` positions before the hit (DESIGN §8).
- A block whose reference count drops to zero goes to the free list; if it is registered it stays
  reusable there until allocation takes it (least recently freed first: unregistered blocks are taken
  before any registered one, and registered ones in LRU order), which evicts its key.

Invariant (`check`): every block is either referenced (its count equals the number of tables holding it)
or on the free list, and the prefix map points only at blocks registered under that key.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lm.kv_cache import KVLayout


@dataclass
class PrefixCacheStats:
    queries: int = 0  # requests that looked up the prefix cache (at each admission)
    hits: int = 0  # lookups that found at least one block
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # tokens whose prefill a hit skipped


class BlockPool:
    """`num_blocks` block ids with reference counts, a free list and the prefix-cache map."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.key_of: list[tuple[int, bytes] | None] = [None] * num_blocks  # (group, block key) if registered
        self.cached: dict[tuple[int, bytes], int] = {}
        # Free blocks in the order allocation takes them: unregistered first, then registered least
        # recently freed first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.allocated: list[int] = []  # handed out since the storage last cleared new blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key_of[block]
        if key is not None:  # evict: the block gets new contents
            del self.cached[key]
            self.key_of[block] = None
        self.ref_count[block] = 1
        self.allocated.append(block)
        return block

    def take(self, block: int) -> None:
        """One more reference to a cached block (a prefix hit); off the free list if it was there."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None
            if self.key_of[block] is None:
                self.free.move_to_end(block, last=False)  # nothing worth keeping: reuse it first

    def register(self, group: int, key: bytes, block: int) -> None:
        """Make a full block findable under (group, key), unless another block already is."""
        if self.key_of[block] is None and (group, key) not in self.cached:
            self.cached[(group, key)] = block
            self.key_of[block] = (group, key)


class BlockManager:
    """Block tables of running requests over one BlockPool. A request is any object with the
    attributes this class reads and writes (lm.sequence.Sequence): `block_tables` (list per group of
    block ids or None), `block_keys` (chained keys of its full blocks, computed on demand), `token_ids`
    (all its tokens), `tiles_overlapping(start, end)` (the image tiles in a range of positions: first
    position in the range, content hash, tile start) and `num_computed_tokens`."""

    def __init__(self, layout: KVLayout, num_blocks: int, *, enable_prefix_caching: bool = True):
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def take_allocated(self) -> list[int]:
        """Block ids allocated since the last call (each once), for the storage to clear before the
        network writes into them (lm.kv_cache.PagedKVStorage.clear)."""
        allocated, self.pool.allocated = self.pool.allocated, []
        return allocated

    # ----- prefix keys ---------------------------------------------------------------------------

    def block_key(self, sequence, index: int) -> bytes:
        """Chained key of full block `index` of `sequence` (computed once, then kept on the sequence)."""
        keys = sequence.block_keys
        if index >= len(keys):
            self._extend_keys(sequence, index + 1)
        return keys[index]

    def _extend_keys(self, sequence, count: int) -> None:
        """Key full blocks len(sequence.block_keys) .. count - 1: BLAKE2b chained over the previous key,
        the block's token ids (int64, little-endian) and each image tile it overlaps (offset, content hash,
        tile start)."""
        keys, size = sequence.block_keys, self.layout.block_size
        first = len(keys)
        tokens = np.asarray(sequence.token_ids[first * size:count * size], dtype="<i8")  # one conversion
        for i in range(first, count):
            digest = hashlib.blake2b(keys[-1] if keys else b"tessera-kv", digest_size=16)
            digest.update(tokens[(i - first) * size:(i - first + 1) * size])
            for position, tile_hash, tile_start in sequence.tiles_overlapping(i * size, (i + 1) * size):
                offset = (position - i * size).to_bytes(4, "little")
                digest.update(offset + tile_hash + tile_start.to_bytes(8, "little"))
            keys.append(digest.digest())

    # ----- admission -----------------------------------------------------------------------------

    def find_prefix(self, sequence, limit: int) -> tuple[int, list[list[int | None]]]:
        """The longest cached prefix of `sequence` of at most `limit` tokens, in whole blocks: (tokens,
        per-group tables of the cached blocks it would take, None where not needed). The prefix may end
        inside an image tile: its blocks' keys hold the tile's content hash, so their keys and values are
        those of the same tile, computed seeing all of it, and the next chunk takes the rest of the tile
        whole (lm.sequence.Sequence.next_chunk). Takes no references."""
        groups, size = self.layout.groups, self.layout.block_size
        if not self.enable_prefix_caching:
            return 0, [[] for _ in groups]
        found: list[list[int | None]] = [[] for _ in groups]
        longest = 0  # blocks 0..longest-1 are cached in every full-attention group
        if len(sequence.block_keys) < limit // size:
            self._extend_keys(sequence, limit // size)  # all at once: a hit or not, they key the blocks once computed
        for index in range(limit // size):
            key = sequence.block_keys[index]
            blocks = [self.pool.cached.get((g, key)) for g in range(len(groups))]
            for g, block in enumerate(blocks):
                found[g].append(block)
            if any(block is None for g, block in enumerate(blocks) if groups[g].window is None):
                break
            longest = index + 1
        for blocks in range(longest, 0, -1):
            tokens = blocks * size
            tables = []
            for g, group in enumerate(groups):
                first = self.layout.first_needed_block(group, tokens)
                table = [None] * first + found[g][first:blocks]
                if any(block is None for block in table[first:]):
                    break
                tables.append(table)
            else:
                return tokens, tables
        return 0, [[] for _ in groups]

    def new_blocks_needed(self, sequence, tables: list[list[int | None]], start: int, end: int) -> int:
        """Blocks to allocate so that `tables` cover what computing positions [start, end) reads and writes."""
        needed = 0
        last = -(-end // self.layout.block_size)  # blocks [0, last) cover [0, end)
        for group, table in zip(self.layout.groups, tables):
            first = self.layout.first_needed_block(group, start)
            needed += sum(1 for i in range(first, last) if i >= len(table) or table[i] is None)
        return needed

    def admit(self, sequence, limit: int, end_of) -> bool:
        """Give a waiting request its cached prefix and the blocks of its first chunk, or nothing and
        False if the free blocks are too few. `end_of(start)` is where the chunk beginning at `start`
        ends (the scheduler's budget and tile rules), or None to admit nothing this step."""
        tokens, tables = self.find_prefix(sequence, limit)
        end = end_of(tokens)
        if end is None:
            return False
        hit_free = sum(1 for table in tables for b in table if b is not None and self.pool.ref_count[b] == 0)
        if self.new_blocks_needed(sequence, tables, tokens, end) > self.pool.num_free - hit_free:
            return False
        if self.enable_prefix_caching:
            self.stats.queries += 1
            self.stats.query_tokens += len(sequence.token_ids)
            self.stats.hits += tokens > 0
            self.stats.hit_tokens += tokens
        for table in tables:
            for block in table:
                if block is not None:
                    self.pool.take(block)
        sequence.block_tables = tables
        sequence.num_computed_tokens = tokens
        self._allocate(sequence, tokens, end)
        return True

    def grow(self, sequence, start: int, end: int) -> bool:
        """Allocate the blocks a running request needs to compute [start, end); False (nothing
        allocated) if too few are free."""
        if self.new_blocks_needed(sequence, sequence.block_tables, start, end) > self.pool.num_free:
            return False
        self._allocate(sequence, start, end)
        return True

    def _allocate(self, sequence, start: int, end: int) -> None:
        last = -(-end // self.layout.block_size)
        for group, table in zip(self.layout.groups, sequence.block_tables):
            first = self.layout.first_needed_block(group, start)
            while len(table) < last:
                table.append(None)
            for i in range(first, last):
                if table[i] is None:
                    table[i] = self.pool.allocate()

    # ----- after a step --------------------------------------------------------------------------

    def computed(self, sequence, start: int = 0) -> None:
        """`sequence.num_computed_tokens` advanced from `start`: register its newly full blocks for prefix
        caching, and release sliding-window blocks no later query reads. Blocks full before `start` were
        registered, and window blocks before it released, by the call for the step that computed up to
        `start` (or came from the prefix cache, keyed): a step's work here follows what it computed, not
        the whole context (0: look at every block). A block refused when it became full (another block
        held its key: two requests computed the same prefix at once) is not offered again, as in vLLM."""
        computed, size = sequence.num_computed_tokens, self.layout.block_size
        for g, (group, table) in enumerate(zip(self.layout.groups, sequence.block_tables)):
            if self.enable_prefix_caching:
                for index in range(start // size, computed // size):
                    block = table[index] if index < len(table) else None
                    if block is not None and self.pool.key_of[block] is None:
                        self.pool.register(g, self.block_key(sequence, index), block)
            first, stop = self.layout.first_needed_block(group, start), self.layout.first_needed_block(group, computed)
            for index in range(first, stop):
                if table[index] is not None:
                    self.pool.release(table[index])
                    table[index] = None

    def free(self, sequence) -> None:
        """Release every block of a finished or preempted request (last blocks first, so that a prefix's
        tail is evicted before its head)."""
        for table in sequence.block_tables:
            for block in reversed(table):
                if block is not None:
                    self.pool.release(block)
        sequence.block_tables = [[] for _ in self.layout.groups]

    # ----- invariant -----------------------------------------------------------------------------

    def check(self, sequences) -> None:
        """Raise AssertionError unless the pool agrees with the tables of `sequences` (all that hold blocks)."""
        counts = [0] * self.pool.num_blocks
        for sequence in sequences:
            for table in sequence.block_tables:
                for block in table:
                    if block is not None:
                        counts[block] += 1
        for block in range(self.pool.num_blocks):
            assert counts[block] == self.pool.ref_count[block], f"block {block}: {counts[block]} holders, " \
                f"ref count {self.pool.ref_count[block]}"
            assert (counts[block] == 0) == (block in self.pool.free), f"block {block}: free list disagrees"
        for key, block in self.pool.cached.items():
            assert self.pool.key_of[block] == key, f"block {block}: registered under another key"

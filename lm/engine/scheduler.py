"""The scheduler: which tokens of which requests one step computes, admission and preemption.

Each step computes one token of every decoding request plus at most `max_num_prefill_tokens` tokens of
requests still prefilling, with at most `max_num_seqs` running requests:
  1. Running requests first, oldest first: a decoding request takes its one token, one still prefilling
     takes the next chunk of what is left (never ending inside an image tile). A request that needs a block when
     none is free preempts the newest running request (its blocks freed, itself queued first again, to
     be recomputed from its prompt and the tokens it already generated), itself last; except that the
     newest, when it is still prefilling, keeps its blocks and waits for the next step (no admission
     then: it would be re-admitted at once, for a chunk as far as its freed blocks reach, and stall at
     the same place again).
  2. Then waiting requests in arrival order while budget, sequence slots and free blocks allow: each
     first takes its longest cached prefix (lm.engine.block_manager), then blocks for its first chunk.
     Admission never preempts.
Decode rows and prompt chunks go into the same forward, so a long prompt delays the running streams by
at most one step of `max_num_prefill_tokens` tokens, and no request starves: admission is first come,
first served, and the oldest running requests are the last preempted.
"""

from __future__ import annotations

from collections import deque

from lm.engine.block_manager import BlockManager
from lm.engine.model_runner import ScheduledChunk
from lm.sequence import Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_prefill_tokens: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.max_num_prefill_tokens = max_num_prefill_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of this step (running requests first, then newly admitted ones)."""
        budget = self.max_num_prefill_tokens  # for prompt chunks; decode rows are always scheduled
        prefill_scheduled = False
        chunks: list[ScheduledChunk] = []
        # decoding requests before prefilling ones, so that prompts never hold back the streams
        order = [s for s in self.running if not s.prefilling] + [s for s in self.running if s.prefilling]
        stalled = False  # the newest request, prefilling, waits for blocks: nothing is admitted past it
        for sequence in order:
            if sequence not in self.running:  # preempted by an earlier request of this loop
                continue
            prefilling = sequence.prefilling
            start, end = sequence.next_chunk(budget if prefilling else 1)
            if end <= start or (end - start > budget and prefill_scheduled):
                continue  # no budget left, or a whole tile that does not fit what is left: next step
            while not self.block_manager.grow(sequence, start, end):
                victim = self.running[-1]
                if victim is sequence and prefilling:
                    # Preempting itself would re-queue it first, to be admitted again at once for the chunk
                    # its freed blocks allow and stall at the same place (a tile after a few text tokens:
                    # admitted and preempted every step). It keeps its blocks and waits; a request that
                    # needs blocks later preempts it as the newest.
                    stalled = True
                    break
                self._preempt(victim)
                chunks = [c for c in chunks if c.sequence is not victim]
                if victim is sequence:
                    break
            else:
                chunks.append(ScheduledChunk(sequence, start, end))
                if prefilling:
                    budget -= end - start
                    prefill_scheduled = True
        budget = self.max_num_prefill_tokens - sum(c.num_tokens for c in chunks if c.start < c.sequence.num_tokens - 1)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not stalled:
            sequence = self.waiting[0]

            def end_of(start: int, sequence=sequence) -> int | None:
                sequence.num_computed_tokens = start
                end = sequence.next_chunk(budget)[1]
                # a whole tile that does not fit what is left of the budget waits for the next step
                return None if end - start > budget and prefill_scheduled else end

            if not self.block_manager.admit(sequence, sequence.num_tokens - 1, end_of):
                sequence.num_computed_tokens = 0
                break
            start, end = sequence.num_computed_tokens, end_of(sequence.num_computed_tokens)
            self.waiting.popleft()
            self.running.append(sequence)
            chunks.append(ScheduledChunk(sequence, start, end))
            budget -= end - start
            prefill_scheduled = True
        return chunks

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.block_manager.free(sequence)
        sequence.num_computed_tokens = 0
        sequence.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def computed(self, chunks: list[ScheduledChunk]) -> None:
        """The step ran: advance each chunk's request and let the block manager cache and trim."""
        for chunk in chunks:
            chunk.sequence.num_computed_tokens = chunk.end
            self.block_manager.computed(chunk.sequence, chunk.start)

    def remove(self, sequence: Sequence) -> None:
        """A finished, cancelled or failed request leaves, its blocks released."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence)

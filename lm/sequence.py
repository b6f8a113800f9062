"""Per-request state inside the engine: tokens, prefill progress, image tiles, streamed text."""

from __future__ import annotations

import time
from bisect import bisect_right

import torch

from lm.requests import Completion, GenerationRequest, RequestHandle, TokenEvent
from lm.sampling import SamplingParams
from lm.thinking import ThinkingTokens


class TextStream:
    """Streamed text with stop strings, over an incremental detokeniser (`push(id) -> str`,
    `flush() -> str`, e.g. lm.tokenizer.IncrementalDecoder, which already holds back partial UTF-8
    characters). Any tail that could still grow into a stop string is held back too.

    A push costs O(stop strings x (len(longest stop) + len(new piece))), whatever the length of the
    text so far: after every push no stop string lies in the text, so a new match must end in the new
    piece and start at most len(longest stop) - 1 characters before it - inside the held-back tail,
    which is exactly that long. Only that tail and the new piece are searched (the number of stop
    strings is bounded at the service edge, `lm.prompt.PromptLimits.max_stop_strings`)."""

    def __init__(self, decoder, stop: tuple[str, ...]):
        self._decoder = decoder
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._released: list[str] = []  # released so far, in pieces (joined once, by `text`)
        self._pending = ""  # decoded but not released: at most `_hold` characters between pushes
        self._stopped = False
        self._strip_newlines = False  # drop the next released text's leading newlines

    def strip_leading_newlines(self) -> None:
        """Drop the leading newlines of what is released next (the blank line after `</think>`)."""
        self._strip_newlines = True

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly released text, whether a stop string was hit)."""
        piece = self._strip(self._decoder.push(token_id))
        if not piece:
            return "", False  # nothing new (a partial character, a dropped newline): nothing new can match
        window = self._pending + piece  # the held-back tail + the new piece: where a new match lies
        hits = [i for i in (window.find(s) for s in self._stop) if i >= 0]
        if hits:
            out = self._release(window[:min(hits)])
            self._pending = ""
            self._stopped = True
            return out, True
        keep = min(self._hold, len(window))
        out = window[:len(window) - keep]
        self._pending = window[len(out):]
        return self._release(out), False

    def flush(self) -> str:
        """Release whatever is held (at the end of generation); nothing after a stop string."""
        if self._stopped:
            return ""
        out, self._pending = self._pending + self._strip(self._decoder.flush()), ""
        return self._release(out)

    def _strip(self, piece: str) -> str:
        """`piece` without the leading newlines to drop (before any stop string is searched in it)."""
        if self._strip_newlines and piece:
            piece = piece.lstrip("\n")
            self._strip_newlines = not piece
        return piece

    def _release(self, out: str) -> str:
        if out:
            self._released.append(out)
        return out


class Sequence:
    """One request in the engine, from admission to completion.

    Its tokens are the prompt followed by what it generated (`token_ids`); `num_computed_tokens` of them
    have keys and values in the KV cache. A step computes [num_computed_tokens, end): a chunk of the prompt,
    or the one token sampled last; when the step reaches the end of `token_ids`, the next token is sampled.
    A preempted request loses its cache (num_computed_tokens 0) and computes its tokens again, generated
    ones included, before sampling the next: nothing is sampled or streamed twice."""

    def __init__(self, request: GenerationRequest, handle: RequestHandle, *, stop_token_ids: tuple[int, ...],
                 soft_tokens: torch.Tensor | None, tile_ids: torch.Tensor, tile_spans: list[tuple[int, int]],
                 tile_hashes: list[bytes], generator: torch.Generator, decoder,
                 thinking: ThinkingTokens | None = None, reasoning_decoder=None, submitted_at: float | None = None):
        self.request = request
        self.handle = handle
        self.params: SamplingParams = request.params
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prompt_len = len(request.prompt_ids)
        self.soft_tokens = soft_tokens  # (tiles, tokens_per_tile, hidden) in the engine's dtype, checked finite
        self.tile_ids = tile_ids  # (T,) tile id per prompt token, -1 for text
        self.tile_spans = tile_spans  # [start, end) of each tile's placeholders, in order
        self.tile_hashes = tile_hashes  # content hash of each tile's soft tokens (prefix-cache keys)
        self._tile_ends = [end for _, end in tile_spans]  # ascending: the spans are in order, disjoint
        self.generator = generator
        self.text = TextStream(decoder, request.params.stop) if decoder is not None else None
        # Thinking (lm.thinking): the engine thread tracks the open block for the budget, the output
        # thread its own copy for the text; the reasoning text has no stop strings.
        self.thinking = thinking
        self.think_open = None if thinking is None else thinking.open_block_start(request.prompt_ids)
        self.reasoning = TextStream(reasoning_decoder, ()) if reasoning_decoder is not None else None
        self.in_reasoning = self.think_open is not None  # output thread
        self.reasoning_tokens = 0  # output thread
        self.token_ids: list[int] = list(request.prompt_ids)  # prompt + generated
        self.generated: list[int] = []
        self.logprobs: list = []  # TokenLogprob or None per generated token, with params.logprobs
        self.grammar = request.grammar  # lm.structured.GrammarMatcher or None (engine thread)
        self.grammar_started = False  # the grammar has taken a token (the answer began)
        self.num_computed_tokens = 0  # tokens whose keys and values are in the KV cache
        self.block_tables: list[list[int | None]] = []  # per KV group (lm.engine.block_manager)
        self.block_keys: list[bytes] = []  # prefix-cache keys of its full blocks, computed on demand
        self.preemptions = 0
        self.streamed = 0  # generated tokens the output thread has streamed
        # time.perf_counter() when the request arrived (Engine.submit, before its checks): latencies count from it
        self.submitted_at = time.perf_counter() if submitted_at is None else submitted_at
        self.first_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefilling(self) -> bool:
        """Still computing tokens it already has (its prompt, or everything again after a preemption)."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def next_position(self) -> int:
        return self.num_tokens - 1  # position of the last sampled token (the next one computed in decode)

    def tiles_overlapping(self, start: int, end: int) -> list[tuple[int, bytes, int]]:
        """The image tiles with placeholders in [start, end), in order: (first position of the tile in
        the range, the tile's content hash, the tile's first position)."""
        found = []
        for tile in range(bisect_right(self._tile_ends, start), len(self.tile_spans)):
            tile_start, _ = self.tile_spans[tile]
            if tile_start >= end:
                break
            found.append((max(tile_start, start), self.tile_hashes[tile], tile_start))
        return found

    def next_chunk(self, budget: int) -> tuple[int, int]:
        """[start, end) of the next tokens to compute: at most `budget` of them, never ending inside an
        image tile (a tile larger than the budget is taken whole; from inside a tile, where a prefix hit
        ended, the rest of it)."""
        start = self.num_computed_tokens
        end = min(start + budget, self.num_tokens)
        for tile_start, tile_end in self.tile_spans:
            if tile_start < end < tile_end:
                end = tile_start if tile_start > start else tile_end
                break
        return start, end

    def soft_token_rows(self, start: int, end: int) -> torch.Tensor | None:
        """The soft tokens (K, hidden) of the placeholders in [start, end), in order (parts of tiles at the
        range's edges included: a prefix hit can end inside a tile), or None when there are none."""
        rows = [self.soft_tokens[tile, max(tile_start, start) - tile_start:min(tile_end, end) - tile_start]
                for tile, (tile_start, tile_end) in enumerate(self.tile_spans) if tile_start < end and tile_end > start]
        return torch.cat(rows) if rows else None

    def append(self, token_id: int, logprob=None) -> tuple[str | None, bool]:
        """Record a sampled token and its TokenLogprob (engine thread): (the finish reason its id alone
        decides, or None; whether it is to be streamed). A stop token ends the request and is not
        streamed; stop strings are the output thread's business (lm.engine.output)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.logprobs.append(logprob)  # before `generated`: the output thread reads it by that index
        self.generated.append(token_id)
        self.token_ids.append(token_id)
        self._track_thinking(token_id)
        if token_id in self.stop_token_ids:
            return "stop", False
        if len(self.generated) >= self.params.max_new_tokens:
            return "length", True
        return None, True

    def force(self, token_ids: list[int], max_seq_len: int) -> list[int]:
        """Append tokens the engine chose (the thinking budget's), as many as max_new_tokens and the context
        leave room for with one token still to sample after them; they are computed like a prompt chunk
        before the next token is sampled. Returns those appended."""
        room = min(self.params.max_new_tokens - len(self.generated), max_seq_len - 1 - len(self.token_ids))
        token_ids = token_ids[:max(0, room)]
        for token_id in token_ids:
            self.logprobs.append(None)
            self.generated.append(token_id)
            self.token_ids.append(token_id)
            self._track_thinking(token_id)
        return token_ids

    def _track_thinking(self, token_id: int) -> None:
        if self.thinking is not None:
            if token_id == self.thinking.start_id and self.think_open is None:  # a <think> inside the block
                self.think_open = len(self.token_ids) - 1                         # does not restart its count
            elif token_id == self.thinking.end_id:
                self.think_open = None

    @property
    def thinking_spent(self) -> int | None:
        """Tokens after the open `<think>` (None when no block is open)."""
        return None if self.think_open is None else len(self.token_ids) - 1 - self.think_open

    def completion(self, reason: str, error: str | None = None, generated: int | None = None) -> Completion:
        """The Completion of the first `generated` tokens (all by default), releasing held-back text."""
        if self.reasoning is not None and reason != "error":
            tail = self.reasoning.flush()
            if tail:
                self.handle._publish(TokenEvent(token_id=None, text=tail, reasoning=True))
        if self.text is not None and reason != "error":
            tail = self.text.flush()
            if tail:
                self.handle._publish(TokenEvent(token_id=None, text=tail))
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        reasoning_text = self.reasoning.text if self.reasoning is not None else ""
        tokens = self.generated[:len(self.generated) if generated is None else generated]
        return Completion(
            request_id=self.request.request_id,
            text=self.text.text if self.text is not None else "",
            token_ids=tokens,
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(tokens),
            time_to_first_token_s=ttft,
            total_time_s=now - self.submitted_at,
            error=error,
            reasoning_text=reasoning_text,
            reasoning_tokens=self.reasoning_tokens,
            reasoning_truncated=reason == "length" and self.in_reasoning,
            logprobs=tuple(self.logprobs[:len(tokens)]) if self.params.logprobs is not None else (),
        )

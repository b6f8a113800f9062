"""The inference engine: continuous batching over a slot KV cache, chunked prefill, streaming.

Scheduling, one step at a time:
  1. Finished and cancelled sequences leave; their slots are freed and the decode rows compacted,
     so decoding sequences always occupy slots [0, B).
  2. Prompts advance by at most `prefill_chunk` tokens in all (never splitting an image tile): the
     prompt being prefilled continues, and while budget is left the oldest waiting requests are
     admitted (FIFO) into the slot after the decode batch, one after another. A prompt that
     completes samples its first token and joins the decode batch.
  3. All decoding sequences advance by one token in one batched forward pass.
Decoding never waits for a long prompt to finish (chunks interleave with decode steps), and
admission is first come, first served, so no request starves.

One request never harms another: soft tokens must be finite (checked at `submit`); a row of
non-finite logits, or a failure while sampling, stop handling or detokenising one sequence, ends that
sequence alone with finish_reason "error"; and a freed cache slot is zeroed (lm/kv_cache.py).

The engine owns the model, the cache and the thread that drives them; callers talk to it through
`submit()` and the RequestHandle it returns.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from lm.attention import tile_ids_from_mask
from lm.models.base import DecoderConfig
from lm.kv_cache import CacheShape, DecodeAttention, KVCache, PrefillAttention, kv_bytes_per_token
from lm.requests import (
    Completion, EngineOverloaded, EngineStopped, GenerationRequest, InvalidRequest, PromptTooLong, RequestHandle,
    non_finite_soft_token,
)
from lm.sampling import make_generator, sample
from lm.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_seq_len: int = 4096  # longest context (prompt + generated tokens) of one request
    kv_budget_bytes: int = 1 << 30  # memory for the KV cache, allocated at start-up
    max_batch: int = 16  # most sequences decoded together (also bounded by the budget)
    prefill_chunk: int = 512  # prompt tokens processed per step
    max_queue: int = 256  # waiting requests beyond which new ones are refused as overloaded
    stop_token_ids: tuple[int, ...] = (1, 106)  # <eos>, <end_of_turn>: default stops
    seed: int = 0  # seeds requests that bring no seed of their own

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "kv_budget_bytes", "max_batch", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    prefilling: int
    slots: int
    kv_bytes_per_token: int
    kv_bytes_total: int
    kv_tokens_used: int


class Engine:
    def __init__(self, model, config: DecoderConfig, engine_config: EngineConfig = EngineConfig(), *,
                 tokenizer=None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """`model` follows the family network contract (lm.models.base); `tokenizer` (optional, lm.tokenizer.Tokenizer)
        supplies incremental decoders for streamed text and stop strings."""
        self.model = model
        self.config = config
        self.engine_config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        shape = CacheShape.from_budget(
            config, budget_bytes=engine_config.kv_budget_bytes, max_seq_len=engine_config.max_seq_len,
            dtype=dtype, max_slots=engine_config.max_batch,
        )
        self.cache = KVCache(config, shape, dtype=dtype, device=self.device)
        self._rng = torch.Generator().manual_seed(engine_config.seed)
        self._waiting: deque[Sequence] = deque()
        self._decoding: list[Sequence] = []  # sequence in slot i is _decoding[i]
        self._prefilling: Sequence | None = None  # always in slot len(_decoding)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----- caller side -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises PromptTooLong / InvalidRequest for a bad request (including soft
        tokens that are not finite in the engine's dtype) and EngineOverloaded when the queue is full."""
        sequence = self._make_sequence(request)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.engine_config.max_queue:
                raise EngineOverloaded(
                    f"overloaded: {len(self._waiting)} requests already waiting (limit "
                    f"{self.engine_config.max_queue}); retry later"
                )
            self._waiting.append(sequence)
            self._lock.notify()
        return sequence.handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Submit and wait; drives the engine itself when no background thread runs."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                self.step()
        return handle.result(timeout)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
            self._thread.start()

    def stop(self, cancel_pending: bool = True) -> None:
        """Stop the background thread; requests still queued or running are cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel_pending:
            for sequence in list(self._waiting) + self._decoding + ([self._prefilling] if self._prefilling else []):
                sequence.handle.cancel()
            self._retire_cancelled()

    def stats(self) -> EngineStats:
        used = sum(s.prompt_len + len(s.generated) for s in self._decoding)
        if self._prefilling is not None:
            used += self._prefilling.prefilled
        return EngineStats(
            waiting=len(self._waiting), running=len(self._decoding), prefilling=int(self._prefilling is not None),
            slots=self.cache.shape.num_slots, kv_bytes_per_token=kv_bytes_per_token(self.config, self.dtype),
            kv_bytes_total=self.cache.total_bytes, kv_tokens_used=used,
        )

    # ----- engine side -------------------------------------------------------------------------

    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty")
        if prompt_len >= self.engine_config.max_seq_len:
            raise PromptTooLong(
                f"prompt is {prompt_len} tokens; the limit is {self.engine_config.max_seq_len - 1} "
                f"(max_seq_len {self.engine_config.max_seq_len} includes at least one generated token)"
            )
        image_mask = torch.zeros(prompt_len, dtype=torch.bool)
        if request.image_mask is not None:
            image_mask = torch.as_tensor(request.image_mask, dtype=torch.bool).reshape(-1)
            if image_mask.shape[0] != prompt_len:
                raise InvalidRequest(f"image_mask has {image_mask.shape[0]} entries for {prompt_len} prompt tokens")
        tiles = 0 if request.soft_tokens is None else request.soft_tokens.shape[0]
        per_tile = self.config.mm_tokens_per_image
        if int(image_mask.sum()) != tiles * per_tile:
            raise InvalidRequest(
                f"prompt has {int(image_mask.sum())} image placeholders but {tiles} tiles of soft tokens "
                f"were given ({tiles} × {per_tile} = {tiles * per_tile} expected)"
            )
        soft_tokens = None
        if request.soft_tokens is not None:
            expected = (tiles, per_tile, self.config.hidden_size)
            if tuple(request.soft_tokens.shape) != expected:
                raise InvalidRequest(f"soft_tokens shape {tuple(request.soft_tokens.shape)}, expected {expected}")
            # Checked in the engine's dtype: a finite float32 value can still overflow a narrower one.
            soft_tokens = request.soft_tokens.to(dtype=self.dtype)
            problem = non_finite_soft_token(soft_tokens)
            if problem is not None:
                raise InvalidRequest(f"soft_tokens has {problem} (as {str(self.dtype).removeprefix('torch.')}); "
                                     f"soft tokens must be finite")
        try:
            tile_ids = tile_ids_from_mask(image_mask[None], per_tile)[0]
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        spans = _tile_spans(tile_ids)
        stops = request.params.stop_token_ids
        return Sequence(
            request, RequestHandle(request.request_id),
            stop_token_ids=self.engine_config.stop_token_ids if stops is None else stops,
            soft_tokens=soft_tokens, tile_ids=tile_ids, tile_spans=spans,
            generator=make_generator(request.params.seed, self._rng),
            decoder=self.tokenizer.incremental_decoder() if self.tokenizer is not None else None,
        )

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a scheduling bug: fail the running requests rather than hang them
                log.exception("engine step failed")
                self._fail_running(_describe(exc))

    def _fail_running(self, error: str) -> None:
        """End every running or prefilling request with an error and empty the cache slots; waiting
        requests stay queued."""
        running = self._decoding + ([self._prefilling] if self._prefilling is not None else [])
        self._decoding, self._prefilling = [], None
        for slot in range(self.cache.shape.num_slots):
            self.cache.clear_slot(slot)
        for sequence in running:
            sequence.slot = -1
            _complete(sequence, "error", error)

    def _has_work(self) -> bool:
        return bool(self._waiting or self._decoding or self._prefilling)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        self._retire_cancelled()
        budget = self.engine_config.prefill_chunk
        while budget > 0 and (self._prefilling is not None or self._admit()):
            sequence = self._prefilling
            start, end = sequence.next_chunk(budget)
            if end - start > budget and budget < self.engine_config.prefill_chunk:
                break  # a whole image tile that does not fit what is left: next step
            self._prefill_step(sequence, start, end)
            budget -= end - start
            if self._prefilling is sequence:
                break  # its prompt continues next step
        if self._decoding:
            self._decode_step()

    def _admit(self) -> bool:
        """Move the oldest waiting request into the slot after the decode batch, if one is free."""
        with self._lock:
            if not self._waiting or len(self._decoding) >= self.cache.shape.num_slots:
                return False
            self._prefilling = self._waiting.popleft()
        self._prefilling.slot = len(self._decoding)
        self.cache.clear_slot(self._prefilling.slot)
        return True

    def _prefill_step(self, sequence: Sequence, start: int, end: int) -> None:
        """Run prompt positions [start, end) of `sequence`; at the prompt's end, sample its first token
        and move it into the decode batch."""
        try:
            request = sequence.request
            ids = torch.tensor(request.prompt_ids[start:end], device=self.device)[None]  # (1, T)
            positions = torch.arange(start, end, device=self.device)
            tile_ids = sequence.tile_ids[start:end].to(self.device)
            attention = PrefillAttention(self.cache, sequence.slot, positions, tile_ids)
            soft_tokens, image_mask = None, None
            if (tile_ids >= 0).any():
                soft_tokens = sequence.soft_tokens[sequence.tiles_in(start, end)].to(self.device)
                image_mask = (tile_ids >= 0)[None]
            hidden = self.model(ids, positions[None], attention, soft_tokens=soft_tokens, image_mask=image_mask)
            sequence.prefilled = end
            if end < sequence.prompt_len:
                return
            logits = self.model.logits(hidden[:, -1])[0]  # (vocab,) only the last position
            self._prefilling = None
            reason = self._accept_token(sequence, sample(logits, sequence.params, sequence.generator))
            self._decoding.append(sequence)
            if reason is not None:
                self._finish(sequence, reason)
        except Exception as exc:  # one bad request must not take the others down
            log.exception("prefill failed for request %s", sequence.request.request_id)
            self._prefilling = None
            self._finish_unslotted(sequence, "error", _describe(exc))

    def _decode_step(self) -> None:
        batch = self._decoding
        try:
            ids = torch.tensor([s.generated[-1] for s in batch], device=self.device)[:, None]  # (B, 1)
            positions = torch.tensor([s.next_position for s in batch], device=self.device)  # (B,)
            attention = DecodeAttention(self.cache, positions)
            hidden = self.model(ids, positions[:, None], attention)
            logits = self.model.logits(hidden[:, -1])  # (B, vocab)
            finite = torch.isfinite(logits).all(dim=-1).tolist()  # (B,)
            greedy = all(s.params.greedy for s in batch)
            choices = torch.argmax(logits, dim=-1).tolist() if greedy else None
        except Exception as exc:
            log.exception("decode step failed for %d sequences", len(batch))
            for sequence in list(batch):
                self._finish(sequence, "error", _describe(exc))
            return
        finished: list[tuple[Sequence, str, str | None]] = []
        for row, sequence in enumerate(batch):
            try:  # whatever goes wrong with one row ends that sequence alone
                if not finite[row]:
                    raise FloatingPointError("the model's logits for this request are not finite (nan or inf)")
                token = choices[row] if choices is not None else sample(logits[row], sequence.params, sequence.generator)
                reason = self._accept_token(sequence, token)
            except Exception as exc:
                log.exception("decoding failed for request %s", sequence.request.request_id)
                finished.append((sequence, "error", _describe(exc)))
                continue
            if reason is not None:
                finished.append((sequence, reason, None))
        for sequence, reason, error in finished:
            self._finish(sequence, reason, error)

    def _accept_token(self, sequence: Sequence, token: int) -> str | None:
        """Record a sampled token (stop handling, streamed text); return the finish reason, if any."""
        reason = sequence.append(token)
        if reason is None and sequence.next_position + 1 >= self.cache.shape.max_seq_len:
            reason = "length"
        return reason

    def _retire_cancelled(self) -> None:
        for sequence in [s for s in self._decoding if s.handle.cancelled]:
            self._finish(sequence, "cancelled")
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            sequence, self._prefilling = self._prefilling, None
            self._finish_unslotted(sequence, "cancelled")
        with self._lock:
            cancelled = [s for s in self._waiting if s.handle.cancelled]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in cancelled:
            _complete(sequence, "cancelled")

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        """Complete a decoding sequence and compact the decode rows into [0, B-1)."""
        slot = self._decoding.index(sequence)
        last = len(self._decoding) - 1
        if slot != last:
            self.cache.move_slot(last, slot)
            self._decoding[slot] = self._decoding[last]
            self._decoding[slot].slot = slot
        self._decoding.pop()
        self.cache.clear_slot(last)
        if self._prefilling is not None:  # keep the prompt being prefilled right after the batch
            self.cache.move_slot(self._prefilling.slot, last)
            self._prefilling.slot = last
        sequence.slot = -1
        _complete(sequence, reason, error)

    def _finish_unslotted(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        if sequence.slot >= 0:
            self.cache.clear_slot(sequence.slot)
            sequence.slot = -1
        _complete(sequence, reason, error)


def _complete(sequence: Sequence, reason: str, error: str | None = None) -> None:
    """Hand the caller its Completion. Should releasing the held-back text fail (the detokeniser's
    flush), the request ends with an error instead, and the engine goes on."""
    try:
        completion = sequence.completion(reason, error)
    except Exception as exc:
        log.exception("finishing request %s failed", sequence.request.request_id)
        completion = sequence.completion("error", _describe(exc))
    sequence.handle._finish(completion)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _tile_spans(tile_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each tile's placeholder run, in prompt order."""
    spans: list[tuple[int, int]] = []
    ids = tile_ids.tolist()
    for pos, tile in enumerate(ids):
        if tile < 0:
            continue
        if spans and ids[spans[-1][0]] == tile:
            spans[-1] = (spans[-1][0], pos + 1)
        else:
            spans.append((pos, pos + 1))
    return spans

"""The inference engine: continuous batching over a paged KV cache with prefix caching and preemption.

Three parts, each in its own module: the scheduler (lm/engine/scheduler.py: admission, the token
budget, preemption), the block manager (lm/engine/block_manager.py: blocks, reference counts, prefix
hashes, eviction) and the model runner (lm/engine/model_runner.py: the packed batch, the network, the
LM head, through its int8 screen for greedy steps on the CPU); detokenization, stop strings, streaming
and completions run on the output thread (`output.py`), off the step's critical path. This module owns
the thread that drives the steps, the requests' lifecycle and sampling.

One step: cancelled requests (and those the output thread completed at a stop string) leave; the
scheduler picks the chunks (every decoding request's token and at most `prefill_chunk` prompt tokens);
the runner computes them in one forward; each request whose chunk reached its last token samples its
next one, hands it to the output thread and may finish (stop token, length). Finished requests release
their blocks; their full blocks stay in the prefix cache until the memory is needed.

One request never harms another: soft tokens must be finite (checked at `submit`); attention reads only
the request's own positions; a row of non-finite logits, or a failure while sampling, stop handling or
detokenising one sequence, ends that sequence alone with finish_reason "error"; and if the packed
forward fails, each chunk is run alone so that only the requests whose own forward fails end in error.

The engine owns the model, the cache and the thread that drives them; callers talk to it through
`submit()` and the RequestHandle it returns.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from lm.attention import tile_spans_from_mask
from lm.engine.block_manager import BlockManager
from lm.engine.model_runner import ModelRunner, ScheduledChunk
from lm.engine.output import OutputProcessor
from lm.engine.scheduler import Scheduler
from lm.head_screen import GreedyHeadScreen, compile_screen_kernel
from lm.kv_cache import KVLayout, PagedKVStorage, kv_bytes_per_token, largest_chunk
from lm.layers.fused import compile_fused_kernels
from lm.models.base import DecoderConfig
from lm.requests import (
    Completion, EngineOverloaded, EngineStopped, GenerationRequest, InvalidRequest, PromptTooLong, RequestHandle,
    non_finite_soft_token,
)
from lm.sampling import (
    apply_penalties, compile_kernels, finite_rows, greedy_and_finite, make_generator, sample, token_logprobs,
)
from lm.sequence import Sequence
from lm.structured import GrammarCompiler, GrammarError, GrammarMatcher, StructuredOutput
from lm.thinking import ThinkingTokens

log = logging.getLogger(__name__)

# Engines whose thread was started and not stopped: joined at interpreter exit (`_stop_at_exit`).
_STARTED: weakref.WeakSet = weakref.WeakSet()
EXIT_JOIN_SECONDS = 30.0  # longest wait at exit for an engine's step in progress to end


@dataclass(frozen=True)
class EngineConfig:
    max_seq_len: int = 4096  # longest context (prompt + generated tokens) of one request
    kv_budget_bytes: int = 1 << 30  # memory for the KV cache blocks, allocated at start-up
    max_batch: int = 16  # most requests running at once (max_num_seqs)
    prefill_chunk: int = 512  # prompt tokens computed per step, besides one token per decoding request
    max_queue: int = 256  # waiting requests beyond which new ones are refused as overloaded
    stop_token_ids: tuple[int, ...] = (1, 106)  # <eos>, <end_of_turn>: default stops
    seed: int = 0  # seeds requests that bring no seed of their own
    block_size: int = 16  # tokens per KV cache block
    enable_prefix_caching: bool = True  # reuse the blocks of an identical prefix (tokens and images)
    # greedy tokens through an int8 screen of a float head, exactly (lm.head_screen; CPU): None = for
    # heads of 8 MiB and more, True = wherever it applies, False = never
    greedy_head_screen: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "kv_budget_bytes", "max_batch", "prefill_chunk", "max_queue", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests queued (preempted ones included)
    running: int  # requests holding KV blocks
    prefilling: int  # running requests still computing tokens they have (prompt, or after preemption)
    kv_bytes_per_token: int  # all layers, DESIGN §5 (a sliding layer stops paying past its window)
    kv_bytes_total: int  # allocated for the blocks
    kv_tokens_used: int  # tokens of running requests whose keys and values are cached
    kv_blocks_total: int
    kv_blocks_free: int  # free, cached-but-unreferenced included
    block_size: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    preemptions: int


class Engine:
    def __init__(self, model, config: DecoderConfig, engine_config: EngineConfig = EngineConfig(), *,
                 tokenizer=None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 thinking: ThinkingTokens | None = None):
        """`model` follows the family network contract (lm.models.base); `tokenizer` (optional,
        lm.tokenizer.Tokenizer) supplies incremental decoders for streamed text and stop strings, and the
        `<think>` markers of a reasoning model (`thinking`, lm.thinking; given explicitly, it wins).
        Raises ValueError if the KV budget cannot hold one request of `max_seq_len` tokens or cannot be
        allocated."""
        self.model = model
        self.config = config
        self.engine_config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.thinking = thinking if thinking is not None or tokenizer is None else ThinkingTokens.from_tokenizer(tokenizer)
        self.layout = KVLayout.from_config(config, engine_config.block_size)
        block_bytes = self.layout.block_bytes(config, dtype)
        num_blocks = engine_config.kv_budget_bytes // block_bytes
        needed = self.layout.blocks_for_request(engine_config.max_seq_len,
                                                largest_chunk(config, engine_config.prefill_chunk))
        if num_blocks < needed:
            raise ValueError(
                f"KV budget of {engine_config.kv_budget_bytes / 2**20:.1f} MiB holds {num_blocks} blocks of "
                f"{block_bytes / 2**10:.1f} KiB; one sequence of {engine_config.max_seq_len} tokens needs {needed} "
                f"({needed * block_bytes / 2**20:.1f} MiB): raise the budget or lower max_seq_len"
            )
        try:
            self.storage = PagedKVStorage(config, self.layout, num_blocks, dtype=dtype, device=self.device)
        except (RuntimeError, MemoryError) as exc:  # the allocator's own words ("can't allocate memory", CUDA OOM)
            budget_mib = engine_config.kv_budget_bytes / 2**20
            raise ValueError(f"the KV budget of {budget_mib:,.0f} MiB could not be allocated "
                             f"on {self.device}: lower it (--kv-budget-mb) ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no details'})") from None
        if self.device.type == "cpu":
            compile_fused_kernels()  # the decoder's small-op kernels (lm.layers.fused), before the first step
        screen = None
        if engine_config.greedy_head_screen is not False and self.device.type == "cpu":
            screen = GreedyHeadScreen.for_model(model, force=bool(engine_config.greedy_head_screen))
            if screen is not None:
                compile_screen_kernel()
        self.runner = ModelRunner(model, self.storage, self.layout, device=self.device, screen=screen)
        self.scheduler = self._new_scheduler()
        self.output = OutputProcessor()
        self._rng = torch.Generator().manual_seed(engine_config.seed)
        self._lock = threading.Condition()
        self._incoming: list[Sequence] = []  # submitted, not yet seen by the scheduler
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._grammars: GrammarCompiler | None = None

    def _new_scheduler(self) -> Scheduler:
        blocks = BlockManager(self.layout, self.storage.num_blocks,
                              enable_prefix_caching=self.engine_config.enable_prefix_caching)
        return Scheduler(blocks, max_num_prefill_tokens=self.engine_config.prefill_chunk,
                         max_num_seqs=self.engine_config.max_batch)

    # ----- caller side -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises PromptTooLong / InvalidRequest for a bad request (including soft
        tokens that are not finite in the engine's dtype) and EngineOverloaded when the queue is full.
        The request's latencies (time to first token, total time) count from this call."""
        sequence = self._make_sequence(request, time.perf_counter())
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            waiting = len(self._incoming) + len(self.scheduler.waiting)
            if waiting >= self.engine_config.max_queue:
                raise EngineOverloaded(
                    f"overloaded: {waiting} requests already waiting (limit {self.engine_config.max_queue}); "
                    "retry later"
                )
            self._incoming.append(sequence)
            self._lock.notify()
        return sequence.handle

    def grammar(self, constraint: StructuredOutput) -> GrammarMatcher:
        """A matcher for a request's GenerationRequest.grammar (lm.structured; the first call reads the
        tokenizer's vocabulary, about a second for 150k tokens). Raises ValueError for a constraint that
        cannot be used, InvalidRequest for a model without a tokenizer."""
        if self.tokenizer is None:
            raise InvalidRequest("structured output needs the model's tokenizer; this engine has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.backend, self.config.vocab_size,
                                             self.engine_config.stop_token_ids)
        return self._grammars.matcher(constraint)

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Submit and wait; drives the engine itself when no background thread runs (then from one
        thread at a time: `step` is not thread-safe, `submit` is)."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                if self._has_work():
                    self.step()
                else:  # finished here; the output thread completes it
                    self.output.drain()
            self._retire_finished()  # one the output thread completed (a stop string) frees its blocks now
        return handle.result(timeout)

    def start(self) -> None:
        """Run steps on a background thread (after compiling the sampling kernels)."""
        if self._thread is None:
            compile_kernels()
            self._thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
            self._thread.start()
            _STARTED.add(self)

    def stop(self, cancel_pending: bool = True) -> None:
        """Stop the background thread; requests still queued or running are cancelled."""
        self._ask_thread_to_stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _STARTED.discard(self)
        if cancel_pending:
            self._take_incoming()
            for sequence in list(self.scheduler.waiting) + self.scheduler.running:
                sequence.handle.cancel()
            self._retire_finished()
        self.output.drain()

    def _ask_thread_to_stop(self) -> None:
        """The background thread ends after its step in progress; new requests are refused from now."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        blocks = scheduler.block_manager
        running = list(scheduler.running)
        with self._lock:
            incoming = len(self._incoming)
        return EngineStats(
            waiting=len(scheduler.waiting) + incoming, running=len(running),
            prefilling=sum(s.prefilling for s in running),
            kv_bytes_per_token=kv_bytes_per_token(self.config, self.dtype), kv_bytes_total=self.storage.total_bytes,
            kv_tokens_used=sum(s.num_computed_tokens for s in running),
            kv_blocks_total=self.storage.num_blocks, kv_blocks_free=blocks.num_free_blocks,
            block_size=self.layout.block_size, prefix_cache_queries=blocks.stats.queries,
            prefix_cache_hits=blocks.stats.hits, prefix_cache_query_tokens=blocks.stats.query_tokens,
            prefix_cache_hit_tokens=blocks.stats.hit_tokens, preemptions=scheduler.num_preemptions,
        )

    def check_blocks(self) -> None:
        """Assert the block accounting invariant (lm.engine.block_manager.BlockManager.check); for tests."""
        self.scheduler.block_manager.check(self.scheduler.running + list(self.scheduler.waiting))

    # ----- engine side -------------------------------------------------------------------------

    def _make_sequence(self, request: GenerationRequest, submitted_at: float | None = None) -> Sequence:
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
        tile_hashes: list[bytes] = []
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
            tile_hashes = [_content_hash(tile) for tile in soft_tokens]  # in the caller's thread
        try:
            spans = tile_spans_from_mask(image_mask.cpu().numpy(), per_tile)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        tile_ids = np.full(prompt_len, -1, np.int64)  # lm.attention.tile_ids_from_mask's numbering
        for tile, (start, end) in enumerate(spans):
            tile_ids[start:end] = tile
        tile_ids = torch.from_numpy(tile_ids)
        budget = request.params.thinking_budget
        if budget is not None and self.thinking is None:
            raise InvalidRequest(f"thinking_budget is set ({budget}), but this model does not think (its vocabulary "
                                 "has no <think> and </think> tokens); leave it unset")
        if self.thinking is not None and request.params.greedy and budget != 0 \
                and not self.thinking.closed_block_last(request.prompt_ids):  # thinking not switched off
            log.warning("request %s decodes greedily on a thinking model: greedy thinking tends to repeat itself "
                        "without end; set a temperature (Qwen 3 recommends 0.6 with top_p 0.95, top_k 20) or a "
                        "thinking budget", request.request_id)
        stops = request.params.stop_token_ids
        for name, ids in (("stop_token_ids", stops or ()), ("logit_bias", [t for t, _ in request.params.logit_bias])):
            outside = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if outside:
                raise InvalidRequest(f"{name} {outside[:4]} lie outside the vocabulary (ids 0 to "
                                     f"{self.config.vocab_size - 1})")
        sequence = Sequence(
            request, RequestHandle(request.request_id),
            stop_token_ids=self.engine_config.stop_token_ids if stops is None else stops,
            soft_tokens=soft_tokens, tile_ids=tile_ids, tile_spans=spans, tile_hashes=tile_hashes,
            generator=make_generator(request.params.seed, self._rng),
            decoder=self.tokenizer.incremental_decoder() if self.tokenizer is not None else None,
            thinking=self.thinking,
            reasoning_decoder=(self.tokenizer.incremental_decoder()
                               if self.tokenizer is not None and self.thinking is not None else None),
            submitted_at=submitted_at,
        )
        forced = []
        if budget == 0 and not self.thinking.closed_block_last(request.prompt_ids):
            # no thinking: the empty block (or the end of the one the prompt opened) before the first token
            forced = self.thinking.no_thinking_ids(block_open=sequence.think_open is not None)
        elif budget is not None and sequence.thinking_spent is not None and sequence.thinking_spent >= budget:
            forced = self.thinking.closing_ids()  # the prompt's own thinking already spent the budget
        if forced:
            room = min(request.params.max_new_tokens, self.engine_config.max_seq_len - 1 - prompt_len)
            if room <= len(forced):
                raise InvalidRequest(f"thinking_budget {budget}: max_new_tokens {request.params.max_new_tokens} and "
                                     f"max_seq_len {self.engine_config.max_seq_len} leave no room for an answer after "
                                     f"the {len(forced)} tokens that end the thinking")
            self._force(sequence, forced)
        return sequence

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
        """End every running request with an error and start the block bookkeeping afresh; waiting
        requests stay queued."""
        running, waiting = self.scheduler.running, self.scheduler.waiting
        self.scheduler = self._new_scheduler()
        for sequence in waiting:
            sequence.block_tables, sequence.num_computed_tokens = [], 0
            self.scheduler.waiting.append(sequence)
        for sequence in running:
            self.output.finish(sequence, "error", error)

    def _has_work(self) -> bool:
        return bool(self._incoming or self.scheduler.waiting or self.scheduler.running)

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        self.scheduler.waiting.extend(incoming)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (see the module docstring). Called by the engine thread, or, without
        `start()`, by one caller thread at a time."""
        self._take_incoming()
        self._retire_finished()
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        allocated = self.scheduler.block_manager.take_allocated()
        if self.runner.reads_unwritten_cells:  # masked, but a NaN left there by an earlier tenant would spread
            self.storage.clear(allocated)
        try:
            results = [(chunks, self.runner.run(chunks))]
        except Exception as exc:
            if len(chunks) == 1:
                log.exception("forward failed for request %s", chunks[0].sequence.request.request_id)
                self._finish(chunks[0].sequence, "error", _describe(exc))
                return
            log.warning("a forward over %d chunks failed (%s); running each alone", len(chunks), _describe(exc))
            results = []
            for chunk in chunks:
                try:
                    results.append(([chunk], self.runner.run([chunk])))
                except Exception as exc:  # one bad request must not take the others down
                    log.exception("forward failed for request %s", chunk.sequence.request.request_id)
                    self._finish(chunk.sequence, "error", _describe(exc))
        for done, hidden in results:
            self.scheduler.computed(done)
            self._sample([c for c in done if c.samples], hidden)

    def _sample(self, chunks: list[ScheduledChunk], hidden: torch.Tensor | None) -> None:
        """Sample, stream and maybe finish each request whose chunk reached its last token; hidden (R, hidden)."""
        if not chunks:
            return
        plain = all(c.sequence.params.greedy and not c.sequence.params.penalized and c.sequence.grammar is None
                    for c in chunks)
        wants_logprobs = any(c.sequence.params.logprobs is not None for c in chunks)
        logits = choices = None
        if plain and not wants_logprobs:
            choices = self.runner.greedy(hidden)  # the head's screen or an int8 head's argmax, where they decide
            finite = [True] * len(chunks)  # the screen decides only rows whose logits are all finite
        if choices is None:
            logits = self.runner.logits(hidden)  # (R, vocab) fp32
            if plain:
                choices, finite = greedy_and_finite(logits)  # (R,) each
            else:
                finite = finite_rows(logits)
        logprobs = None
        if wants_logprobs:
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, vocab), of the raw logits
        for row, chunk in enumerate(chunks):
            sequence = chunk.sequence
            try:  # whatever goes wrong with one row ends that sequence alone
                if not finite[row]:
                    raise FloatingPointError("the model's logits for this request are not finite (nan or inf)"
                                             + _FLOAT16_HINT * (self.dtype == torch.float16))
                constrained = self._grammar_applies(sequence)
                if choices is not None:
                    token = choices[row]
                else:
                    row_logits = logits[row]
                    if sequence.params.penalized:
                        row_logits = apply_penalties(row_logits, sequence.params, sequence.token_ids, sequence.prompt_len)
                    allowed = self._allowed(sequence) if constrained else None
                    token = sample(row_logits, sequence.params, sequence.generator, allowed)
                if constrained and not (token == self._think_start and not sequence.grammar_started):
                    sequence.grammar.accept(token)
                    sequence.grammar_started = True
                record = None
                if logprobs is not None and sequence.params.logprobs is not None:
                    record = token_logprobs(logprobs[row], token, sequence.params.logprobs)
                reason, stream = sequence.append(token, record)
                if stream:
                    self.output.token(sequence, token)
                if reason is None and constrained and sequence.grammar.finished:
                    reason = "stop"  # the grammar allows nothing more: the answer is complete
                if reason is None and self._thinking_over_budget(sequence):
                    closing = self.thinking.closing_ids()
                    if self._force(sequence, closing) < len(closing):  # max_new_tokens or the context ran out
                        reason = "length"
                if reason is None and sequence.num_tokens >= self.engine_config.max_seq_len:
                    reason = "length"
            except (GrammarError, FloatingPointError) as exc:  # the request's constraint, or numbers: no traceback
                log.warning("request %s: %s", sequence.request.request_id, exc)
                self._finish(sequence, "error", _describe(exc))
                continue
            except Exception as exc:
                log.exception("decoding failed for request %s", sequence.request.request_id)
                self._finish(sequence, "error", _describe(exc))
                continue
            if reason is not None:
                self._finish(sequence, reason)

    @property
    def _think_start(self) -> int | None:
        return None if self.thinking is None else self.thinking.start_id

    def _grammar_applies(self, sequence: Sequence) -> bool:
        """A request's grammar constrains its answer: not the inside of a `<think>` block."""
        return sequence.grammar is not None and sequence.think_open is None

    def _allowed(self, sequence: Sequence) -> torch.Tensor:
        """(vocab,) bool: what the grammar allows next; before the answer begins, a thinking model may
        also open its `<think>` block (unless the prompt closed one: thinking is off)."""
        allowed = sequence.grammar.allowed()
        if (self.thinking is not None and sequence.grammar.allow_thinking and not sequence.grammar_started
                and not self.thinking.closed_block_last(sequence.token_ids)):
            allowed[self.thinking.start_id] = True
        return allowed

    def _force(self, sequence: Sequence, token_ids: list[int]) -> int:
        """Append the engine's own tokens to a request (lm.sequence.Sequence.force) and stream them;
        returns how many fit."""
        appended = sequence.force(token_ids, self.engine_config.max_seq_len)
        for token in appended:
            self.output.token(sequence, token)
        return len(appended)

    def _thinking_over_budget(self, sequence: Sequence) -> bool:
        """Whether the open `<think>` block has reached the request's budget and may be closed now: not
        while the text ends inside a multi-byte character (the next token completes it first)."""
        budget, spent = sequence.params.thinking_budget, sequence.thinking_spent
        if budget is None or spent is None or spent < budget:
            return False
        # A UTF-8 character spans at most 4 bytes: past 3 more tokens a trailing U+FFFD is a real one.
        if spent < budget + 3 and self.tokenizer is not None \
                and self.tokenizer.decode(sequence.token_ids[-4:]).endswith("\ufffd"):
            return False
        return True

    def _retire_finished(self) -> None:
        """Cancelled requests end; requests the output thread completed (a stop string, a detokenizer
        failure) release their blocks."""
        for sequence in [s for s in self.scheduler.running + list(self.scheduler.waiting)
                         if s.handle.cancelled or s.handle.done]:
            self._finish(sequence, "cancelled")

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        """Release a request's blocks (its full blocks stay in the prefix cache) and have the output
        thread complete it (a no-op if it completed there already)."""
        self.scheduler.remove(sequence)
        self.output.finish(sequence, reason, error)


# Added to the non-finite logits error of an engine in float16, where that is mostly the model's activations
# overflowing the format (Gemma 3's reach it: its checkpoints are published in bfloat16).
_FLOAT16_HINT = ("; the engine runs in float16, whose largest value is 65,504, which a model's activations can exceed: "
                 "run it in bfloat16 (float32's range) or float32")


def _content_hash(tensor: torch.Tensor) -> bytes:
    """16-byte digest of a tensor's values, dtype and shape (an image tile's soft tokens): SHA-256, cut to
    16 bytes (with the CPU's SHA extensions ~1.8 GB/s on the 2-core dev machine, BLAKE2b ~0.9)."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the tensor's memory, not a copy of it
    return digest.digest()[:16]


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


@atexit.register
def _stop_at_exit() -> None:
    """Let every started engine's thread finish its step and end before the interpreter finalizes. A
    daemon thread still inside a PyTorch call then would be ended by the interpreter while in C++ code
    (pthread_exit unwinding a noexcept frame), which aborts the process ("terminate called without an
    active exception") after the program itself ended normally. Requests still queued are left as they
    are: the process is exiting."""
    engines = list(_STARTED)
    for engine in engines:
        engine._ask_thread_to_stop()
    for engine in engines:
        thread = engine._thread
        if thread is not None:
            thread.join(EXIT_JOIN_SECONDS)
            if thread.is_alive():
                log.warning("an engine step was still running %.0f s after exit began", EXIT_JOIN_SECONDS)

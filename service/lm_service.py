"""`tessera.lm.v1.LanguageModelService`: prompts (+ image soft tokens) in, text out, on the engine.

The engine runs on its own thread; this servicer only lays out the prompt, submits it and relays the
handle's events into the event loop (the handle notifies the loop, nothing blocks it). Nothing that
grows with the request runs on the event loop: the cheap limits (`lm.prompt.check_request_size`: chat
messages, stop strings, text bytes, images, tiles, image tokens and chat turns against the context; the
request id; images on a text-only model) are checked first, from the message's counts, sizes and
shapes alone, each count before its items are read; then building the chat messages (and counting
their text), tokenizing, layout and the soft-token copies run on a small pool of worker threads (the
tokenizer releases the GIL), so health checks and running streams never pause. When the RPC
ends early - the client cancelled, its deadline passed, the server stops - the request is cancelled
in the engine, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

from lm.engine import Engine
from lm.prompt import (Prompt, PromptLimits, check_content_parts, check_request_size, check_text_bytes, layout_request,
                       template_kwargs_from_json, tools_from_json)
from lm.requests import GenerationRequest, check_request_id, non_finite_soft_token
from lm.structured import GrammarError
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service.interceptors import NotReady
from service.wire import (logprob_to_proto, messages_from_proto, request_text_bytes, sampling_from_proto,
                          structured_output_from_proto, tensor_from_proto)

log = logging.getLogger(__name__)

SERVICE_NAME = "tessera.lm.v1.LanguageModelService"


@dataclass
class LoadedLanguageModel:
    lm: object  # lm.runtime.LanguageModel
    engine: Engine  # started


class LanguageModelServicer(lm_pb2_grpc.LanguageModelServiceServicer):
    def __init__(self, load: Callable[[], LoadedLanguageModel], *, model_name: str, max_message_bytes: int,
                 metrics=None, limits: PromptLimits = PromptLimits(), prompt_workers: int = 2):
        """`limits`: what one request may carry (ServeConfig.prompt_limits()); `prompt_workers`: threads
        that tokenize and lay out prompts, off the event loop."""
        self._load = load  # blocking; runs on a worker thread
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.limits = limits
        self.loaded: LoadedLanguageModel | None = None
        self._prompt_pool = ThreadPoolExecutor(max_workers=prompt_workers, thread_name_prefix="lm-prompt")

    async def load(self) -> LoadedLanguageModel:
        self.loaded = await asyncio.to_thread(self._load)
        if self.metrics is not None:
            self._register_gauges(self.loaded.engine)
        return self.loaded

    def stop(self) -> None:
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)
        if self.loaded is not None:
            self.loaded.engine.stop()

    def _ready(self) -> LoadedLanguageModel:
        if self.loaded is None:
            raise NotReady(f"the language model {self.model_name} is still loading; retry shortly")
        return self.loaded

    # ----- RPCs ---------------------------------------------------------------------------------

    async def Generate(self, request, context):
        done = None
        async for message in self.stream(request):
            if message.HasField("done"):
                done = message.done
        return done

    async def GenerateStream(self, request, context):
        async for message in self.stream(request):
            yield message

    async def Tokenize(self, request, context):
        loaded = self._ready()
        self._check_size(loaded, request, request.image_tiles)
        prompt = await self._off_loop(self._prompt, loaded, request, list(request.image_tiles))
        return lm_pb2.TokenizeResponse(token_ids=prompt.token_ids)

    async def CountTokens(self, request, context):
        return await self.count_tokens(request)

    async def GetInfo(self, request, context):
        loaded = self._ready()
        config, engine_config = loaded.lm.config, loaded.engine.engine_config
        stats = loaded.engine.stats()
        return lm_pb2.LanguageModelInfo(
            model=self.model_name, vocab_size=config.vocab_size, d_model=config.hidden_size,
            tokens_per_tile=config.mm_tokens_per_image if _accepts_images(loaded) else 0, image_token_id=loaded.lm.tokenizer.special.image_token_id,
            max_seq_len=engine_config.max_seq_len, max_batch=engine_config.max_batch,
            max_queue=engine_config.max_queue, dtype=str(loaded.lm.dtype).removeprefix("torch."),
            accepts_images=_accepts_images(loaded),
            max_message_bytes=self.max_message_bytes,
            kv_block_size=stats.block_size, kv_blocks_total=stats.kv_blocks_total, kv_blocks_free=stats.kv_blocks_free,
            prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
            prefix_cache_query_tokens=stats.prefix_cache_query_tokens,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens, preemptions=stats.preemptions,
        )

    # ----- the work, shared with the in-process gateway -------------------------------------------

    async def count_tokens(self, request: lm_pb2.TokenizeRequest) -> lm_pb2.CountTokensResponse:
        """The prompt's length and the longest the engine takes. Raises ValueError (bad or too large
        request: the cheap limits are checked before anything is tokenized), NotReady."""
        loaded = self._ready()
        self._check_size(loaded, request, request.image_tiles)
        prompt = await self._off_loop(self._prompt, loaded, request, list(request.image_tiles))
        return lm_pb2.CountTokensResponse(count=len(prompt.token_ids), max_prompt_tokens=_max_prompt_tokens(loaded))

    async def stream(self, request: lm_pb2.GenerateRequest) -> AsyncIterator[lm_pb2.GenerateStreamResponse]:
        """Token events of one request as protobuf messages, the Completion last. Raises ValueError
        (bad request), EngineOverloaded, NotReady."""
        loaded = self._ready()
        started = time.perf_counter()
        check_request_id(request.request_id)
        self._check_size(loaded, request, _DeclaredTiles(request.images), stop=request.sampling.stop)
        generation = await self._off_loop(self._generation_request, loaded, request)
        engine = loaded.engine
        token_text = _token_texts(loaded.lm.tokenizer)
        handle = engine.submit(generation)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        handle.set_notifier(lambda: _wake_threadsafe(loop, wake))
        first_token_at, observed = None, False
        try:
            while True:
                wake.clear()
                events = _drain(handle)
                for event in events:
                    if event is None:  # finished
                        completion, observed = handle.result(), True  # counted below, unless it failed
                        if completion.finish_reason == "error":
                            if completion.error.startswith(f"{GrammarError.__name__}: "):  # the request's own
                                raise ValueError(completion.error.split(": ", 1)[1])
                            if completion.error.startswith(f"{FloatingPointError.__name__}: "):  # the numbers':
                                raise FloatingPointError(completion.error.split(": ", 1)[1])  # named, no traceback
                            raise RuntimeError(f"generation failed for request {completion.request_id}: "
                                               f"{completion.error}")
                        self._observe(completion, first_token_at, started)
                        yield lm_pb2.GenerateStreamResponse(done=_completion_proto(completion, token_text))
                        return
                    if first_token_at is None and event.token_id is not None:
                        first_token_at = time.perf_counter()
                    message = lm_pb2.GenerateStreamResponse(text=event.text, reasoning=event.reasoning)
                    if event.token_id is not None:
                        message.token_id = event.token_id
                    if event.logprob is not None:
                        message.logprob.CopyFrom(logprob_to_proto(event.logprob, token_text))
                    yield message
                if not events:
                    await wake.wait()
        finally:
            handle.set_notifier(None)
            if not handle.done:
                handle.cancel()  # client gone, deadline passed or server stopping: freed at the next step
            if not observed:  # ended before its Completion was read (now, or once the engine finishes it)
                self._observe_when_finished(handle)

    def _generation_request(self, loaded: LoadedLanguageModel, request) -> GenerationRequest:
        config = loaded.lm.config
        messages = self._messages(request, stop=request.sampling.stop)  # the cheaper checks first
        params = sampling_from_proto(request.sampling, loaded.lm.sampling_defaults)
        soft_tokens = []
        for index, image in enumerate(request.images):
            tensor = tensor_from_proto(image, f"image {index} soft tokens")
            expected = (config.mm_tokens_per_image, config.hidden_size)
            if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] < 1:
                raise ValueError(f"image {index} soft tokens have shape {tuple(tensor.shape)}; expected "
                                 f"[tiles, {expected[0]}, {expected[1]}] for this model")
            # A NaN or Inf would spread through the model: refused here, naming it, in the model's dtype
            # (a finite float32 value can still overflow a narrower one).
            tensor = tensor.to(loaded.lm.dtype)
            problem = non_finite_soft_token(tensor)
            if problem is not None:
                dtype = str(loaded.lm.dtype).removeprefix("torch.")
                raise ValueError(f"image {index}: soft token tensor has {problem}; soft tokens must be finite "
                                 f"(checked as {dtype}, the model's dtype)")
            soft_tokens.append(tensor)
        tiles = [t.shape[0] for t in soft_tokens]
        prompt = self._layout(loaded, request, tiles, messages)
        context, prompt_tokens = loaded.engine.engine_config.max_seq_len, len(prompt.token_ids)
        # (a prompt that leaves no room for one generated token is the engine's PromptTooLong, which says so)
        if request.sampling.max_new_tokens_within_context and prompt_tokens < context \
                and prompt_tokens + params.max_new_tokens > context:
            raise ValueError(f"this model's context is {context:,} tokens; the request asks for "
                             f"{prompt_tokens + params.max_new_tokens:,} ({prompt_tokens:,} in the prompt, "
                             f"{params.max_new_tokens:,} to generate): lower max_tokens or max_completion_tokens "
                             f"(at most {max(context - prompt_tokens, 0):,} here) or shorten the prompt")
        stacked = torch.cat(soft_tokens).to(loaded.lm.device) if soft_tokens else None
        kwargs = {"request_id": request.request_id} if request.request_id else {}
        constraint = structured_output_from_proto(request.sampling)
        template = loaded.lm.tokenizer.chat_template
        if request.tools_json and constraint is None and template is not None and not template.takes_tools:
            # the tools would be dropped in silence: "auto" could never call one (a forced call, constrained
            # to the tools' schemas by a grammar, still can)
            raise ValueError(f"the model {self.model_name}'s chat template does not take tools, so they would never "
                             "reach the prompt: send no tools, or force a call (tool_choice \"required\" or a named "
                             "function), or serve a model whose template takes tools (Qwen 2.5, Qwen 3)")
        grammar = loaded.engine.grammar(constraint) if constraint is not None else None
        if grammar is not None:
            grammar.allow_thinking = not request.raw  # a raw completion's text is all answer
        return GenerationRequest(prompt.token_ids, params, soft_tokens=stacked,
                                 image_mask=torch.tensor(prompt.image_mask, dtype=torch.bool), grammar=grammar,
                                 **kwargs)

    def _check_size(self, loaded: LoadedLanguageModel, request, tiles: Sequence[int], *,
                    stop: Sequence[str] = ()) -> None:
        """The cheap limits, on the event loop, from counts and sizes alone: every count is compared
        before its items are read, so this costs O(1) for a request over a count limit and at most
        O(max_messages + max_images + max_stop_strings) otherwise; nothing is built, tokenized or copied.
        `tiles`: per image, as declared (`len` is read first); `stop`: the stop strings."""
        if len(tiles) and not _accepts_images(loaded):
            raise ValueError(f"the model {self.model_name} is text-only (GetInfo: accepts_images=false); the "
                             f"request has {len(tiles):,} image(s): send text only, or serve a vision-language "
                             "checkpoint")
        check_request_size(text_bytes=request_text_bytes(request), tiles_per_image=tiles, limits=self.limits,
                           max_prompt_tokens=_max_prompt_tokens(loaded),
                           tokens_per_tile=loaded.lm.config.mm_tokens_per_image, messages=len(request.messages),
                           stop=stop)
        check_content_parts([len(message.content) for message in request.messages], self.limits)

    def _messages(self, request, *, stop: Sequence[str] = ()) -> list[dict[str, Any]] | None:
        """The request's chat messages (None: it has none), built on a worker thread after
        `_check_size`; their text counts towards the text-byte limit with the prompt and `stop`."""
        if not request.messages:
            return None
        messages = messages_from_proto(request.messages)  # O(parts): bounded by the checks on the loop
        check_text_bytes(request_text_bytes(request, messages), self.limits, stop=stop)
        return messages

    def _prompt(self, loaded: LoadedLanguageModel, request, tiles: list[int]) -> Prompt:
        """The prompt of a Tokenize/CountTokens request (on a worker thread, after `_check_size`)."""
        return self._layout(loaded, request, tiles, self._messages(request))

    def _layout(self, loaded: LoadedLanguageModel, request, tiles: list[int],
                messages: list[dict[str, Any]] | None) -> Prompt:
        """The prompt of a request by the rules every entry point shares (`lm.prompt.layout_request`):
        chat `messages` (from `_messages`), raw text, or one user turn."""
        return layout_request(
            loaded.lm.tokenizer, prompt=request.prompt, raw=request.raw, messages=messages, image_tiles=tiles,
            tokens_per_tile=loaded.lm.config.mm_tokens_per_image, allow_special_tokens=self.limits.allow_special_tokens,
            template_kwargs=template_kwargs_from_json(request.chat_template_kwargs),
            tools=tools_from_json(request.tools_json))

    async def _off_loop(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, work, *args)

    def _observe(self, completion, first_token_at, started) -> None:
        if self.metrics is None:
            return
        self.metrics.tokens_generated.inc(completion.completion_tokens)
        if completion.finish_reason != "cancelled" or completion.completion_tokens:  # its prompt was computed
            self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        if first_token_at is not None:
            self.metrics.time_to_first_token.observe(first_token_at - started)

    def _observe_when_finished(self, handle) -> None:
        """Count the tokens (`_observe`) of a request whose stream ended before its Completion was read (the
        client left, or it was cancelled), once the engine has finished it: from the output thread's
        notifier, or here if it finished already; once either way. A request cancelled before any token
        counts no prompt tokens (it may never have been computed)."""
        if self.metrics is None:
            return
        once = threading.Lock()

        def observe() -> None:
            if handle.done and once.acquire(blocking=False):  # never released: the second caller skips
                self._observe(handle.result(), None, 0.0)

        handle.set_notifier(observe)
        observe()

    def _register_gauges(self, engine: Engine) -> None:
        m = self.metrics
        m.gauge("tessera_engine_queue_depth", "requests waiting for admission", lambda: engine.stats().waiting)
        m.gauge("tessera_engine_batch_size", "requests running (holding KV blocks)", lambda: engine.stats().running)
        m.gauge("tessera_kv_cache_blocks", "KV cache blocks in all", lambda: engine.stats().kv_blocks_total)
        m.gauge("tessera_kv_cache_blocks_free", "KV cache blocks free (cached but unreferenced included)",
                lambda: engine.stats().kv_blocks_free)
        m.gauge("tessera_prefix_cache_queries", "prefix-cache lookups", lambda: engine.stats().prefix_cache_queries)
        m.gauge("tessera_prefix_cache_hits", "prefix-cache lookups that found blocks",
                lambda: engine.stats().prefix_cache_hits)
        m.gauge("tessera_prefix_cache_hit_tokens", "prompt tokens whose prefill the prefix cache skipped",
                lambda: engine.stats().prefix_cache_hit_tokens)
        m.gauge("tessera_engine_preemptions", "requests preempted for KV blocks", lambda: engine.stats().preemptions)
        m.gauge("tessera_kv_cache_tokens_used", "tokens held in the KV cache", lambda: engine.stats().kv_tokens_used)
        m.gauge("tessera_kv_cache_bytes", "bytes allocated for the KV cache", lambda: engine.stats().kv_bytes_total)


class _DeclaredTiles(Sequence):
    """Tiles per image as the soft-token shapes declare them ([tiles, tokens, d_model]; anything else
    counts 1 and is refused with the tensor's own checks), read lazily: its length costs O(1), so a
    request with too many images is refused before any of them is looked at."""

    def __init__(self, images):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        shape = self._images[index].shape
        return int(shape[0]) if len(shape) == 3 else 1


def _token_texts(tokenizer):
    """token id -> its text alone (special tokens written out), for log probabilities (one cache shared
    by every request on that tokenizer)."""
    return functools.partial(_token_text, tokenizer)


@functools.lru_cache(maxsize=1 << 16)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _accepts_images(loaded: LoadedLanguageModel) -> bool:
    """Whether the checkpoint is a vision-language one (it names an image placeholder token)."""
    return loaded.lm.config.accepts_images


def _max_prompt_tokens(loaded: LoadedLanguageModel) -> int:
    return loaded.engine.engine_config.max_seq_len - 1  # max_seq_len holds at least one generated token


def _drain(handle) -> list:
    """Every event available now without waiting; None marks the end."""
    import queue

    events = []
    while True:
        try:
            event = handle.next_event(timeout=0)
        except queue.Empty:
            return events
        events.append(event)
        if event is None:
            return events


def _wake_threadsafe(loop: asyncio.AbstractEventLoop, flag: asyncio.Event) -> None:
    try:
        loop.call_soon_threadsafe(flag.set)
    except RuntimeError:  # the loop has closed (server gone); the engine thread must not fail
        pass


def _completion_proto(completion, token_text) -> lm_pb2.GenerateResponse:
    return lm_pb2.GenerateResponse(
        logprobs=[logprob_to_proto(record, token_text) for record in completion.logprobs if record is not None],
        request_id=completion.request_id, text=completion.text, token_ids=completion.token_ids,
        finish_reason=completion.finish_reason, prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        time_to_first_token_s=completion.time_to_first_token_s or 0.0, total_time_s=completion.total_time_s,
        reasoning_text=completion.reasoning_text, reasoning_tokens=completion.reasoning_tokens,
        reasoning_truncated=completion.reasoning_truncated,
    )

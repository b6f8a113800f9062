"""What a caller hands the engine and what it gets back: requests, streamed events, results."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from lm.sampling import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Base of the errors the engine reports to callers; `code` is a stable short reason."""

    code = "engine_error"


class PromptTooLong(EngineError, ValueError):
    code = "prompt_too_long"


class InvalidRequest(EngineError, ValueError):
    code = "invalid_request"


class EngineOverloaded(EngineError):
    code = "overloaded"


class EngineStopped(EngineError):
    code = "stopped"


# A request id travels back to the client and into logs: short, visible ASCII only (no spaces, line
# breaks or NULs that would forge or break a log line), so any id a client may choose is refused
# unless it is one a log and a header can carry as it is.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))  # "!" to "~"


def check_request_id(request_id: str) -> None:
    """Refuse a client's request id unless it is empty (one is generated) or 1 to MAX_REQUEST_ID_CHARS
    visible ASCII characters ("!" to "~": letters, digits, punctuation). Costs O(1) for an over-long id.
    Raises InvalidRequest naming the first bad character's position and code point."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id is {len(request_id):,} characters; at most {MAX_REQUEST_ID_CHARS} "
                             "visible ASCII characters are allowed")
    for position, char in enumerate(request_id):
        if char not in _REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id has {char!r} (U+{ord(char):04X}) at position {position}; a request "
                                 f"id is up to {MAX_REQUEST_ID_CHARS} visible ASCII characters ('!' to '~': no "
                                 "spaces, control characters or non-ASCII)")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]  # token ids, image placeholders included
    params: SamplingParams = field(default_factory=SamplingParams)
    soft_tokens: torch.Tensor | None = None  # (tiles, tokens_per_tile, hidden), in placeholder order
    image_mask: torch.Tensor | None = None  # (T,) bool, True at placeholder positions
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    grammar: Any = None  # lm.structured.GrammarMatcher: the answer is constrained to its grammar (None: free)


def non_finite_soft_token(soft_tokens: torch.Tensor) -> str | None:
    """Where the first non-finite value (nan, inf, -inf) of soft tokens (tiles, tokens, channels) lies,
    in row-major order, as "a non-finite value (nan) at tile 0, token 17, channel 3"; None when every
    value is finite."""
    flat = soft_tokens.detach().reshape(-1)  # (tiles * tokens * channels,)
    if bool(torch.isfinite(flat.sum())):  # one pass: a NaN or inf makes the sum NaN or inf (finite values
        return None  # summing past the dtype's range too: those are then checked one by one)
    bad = ~torch.isfinite(flat)
    if not bool(bad.any()):
        return None
    first = int(torch.argmax(bad.to(torch.uint8)))  # argmax returns the first maximum
    value = float(flat[first])
    tile, rest = divmod(first, soft_tokens.shape[1] * soft_tokens.shape[2])
    token, channel = divmod(rest, soft_tokens.shape[2])
    return f"a non-finite value ({value}) at tile {tile}, token {token}, channel {channel}"


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None for text held back until the end (a pending stop-string prefix)
    text: str  # newly complete text (may be empty while a character or stop string is pending)
    reasoning: bool = False  # the token and text belong to the reasoning (<think> block), not the answer
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs, for sampled (not inserted) tokens


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    total_time_s: float
    error: str | None = None  # set when finish_reason == "error"
    reasoning_text: str = ""  # the <think> block's text (markers left out); `text` is the answer alone
    reasoning_tokens: int = 0  # of completion_tokens, those of the <think> block (its markers included)
    reasoning_truncated: bool = False  # generation stopped while still thinking (no answer was given)
    # With SamplingParams.logprobs: one per token of token_ids, None for tokens the engine inserted
    # (the thinking budget's); empty otherwise.
    logprobs: tuple[TokenLogprob | None, ...] = ()


_DONE = object()


class RequestHandle:
    """The caller's side of one request: iterate for TokenEvents, or wait for the Completion.

    Thread-safe: the engine's output thread publishes, any one consumer thread reads. `cancel()` asks the
    engine to stop the request and free its KV blocks at its next step."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._completion: Completion | None = None
        self._notify = None  # called (output thread) after each event and at the finish

    # engine side
    def _publish(self, event: TokenEvent) -> None:
        self._events.put(event)
        notify = self._notify  # read once: the consumer may clear it meanwhile (set_notifier(None))
        if notify is not None:
            notify()

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._finished.set()
        self._events.put(_DONE)
        notify = self._notify
        if notify is not None:
            try:
                notify()
            except Exception:  # the caller's bug; the request is over, and the engine must go on
                log.exception("request %s: the notifier failed at the finish", self.request_id)

    # caller side
    def set_notifier(self, notify) -> None:
        """`notify()` (no arguments) is called from the engine's output thread after every event and when the
        request finishes, so an event loop can wait for events without blocking a thread (e.g.
        `lambda: loop.call_soon_threadsafe(flag.set)`); drain with `next_event(timeout=0)`."""
        self._notify = notify

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __iter__(self):
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            yield event

    def next_event(self, timeout: float | None = None) -> TokenEvent | None:
        """The next token event; None once the request has finished. Raises queue.Empty on timeout."""
        event = self._events.get(timeout=timeout)
        return None if event is _DONE else event

    def result(self, timeout: float | None = None) -> Completion:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._completion is not None
        return self._completion

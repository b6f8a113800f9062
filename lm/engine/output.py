"""Output processing off the engine step's critical path: detokenization, stop strings, streaming and
completions, on a thread of its own.

The engine thread only appends each sampled token to its request and hands it over (`token`); it decides
the finishes it can see from ids alone (a stop token, max_new_tokens, the context limit, cancel, errors)
and hands those over too (`finish`), in order. This thread turns tokens into text (lm.sequence.TextStream:
incremental detokenizer, stop strings), keeps a reasoning model's `<think>` block apart from the answer
(stop strings apply to the answer), publishes the events and the Completion. A stop string, or a
failure while detokenizing one request, completes that request here; the engine sees the handle done at
its next step and frees the request's blocks, so a request may compute a token or two past its stop
string, which are never shown (vLLM's output processor aborts requests the same way).

While the engine is idle the thread exits after `IDLE_SECONDS`; the next token starts it again.
"""

from __future__ import annotations

import logging
import queue
import threading

from lm.requests import TokenEvent
from lm.sequence import Sequence

log = logging.getLogger(__name__)

IDLE_SECONDS = 5.0


class OutputProcessor:
    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ----- engine side ---------------------------------------------------------------------------

    def token(self, sequence: Sequence, token_id: int) -> None:
        """Stream `token_id`, the sequence's latest generated token (already in `sequence.generated`)."""
        self._put((sequence, token_id, None, None))

    def finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        """Complete the request with every token it generated so far (unless it already completed here)."""
        self._put((sequence, None, reason, (error, len(sequence.generated))))

    def drain(self) -> None:
        """Wait until everything handed over so far is processed."""
        self._queue.join()

    def _put(self, item) -> None:
        self._queue.put(item)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tessera-output", daemon=True)
                self._thread.start()

    # ----- this thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                self._process(*item)
            except Exception:  # never lose the thread: log it and go on with the other requests
                log.exception("output processing failed")
            finally:
                self._queue.task_done()

    def _process(self, sequence: Sequence, token_id: int | None, reason: str | None, finish) -> None:
        if sequence.handle.done:
            return  # completed here already (stop string or a detokenizer failure)
        if token_id is None:
            error, generated = finish
            _complete(sequence, reason, error, generated)
            return
        try:
            thinking = sequence.thinking
            hit_stop = False
            logprob = sequence.logprobs[sequence.streamed]  # this token's (None unless asked for)
            if thinking is not None and token_id in (thinking.start_id, thinking.end_id):
                # the markers count as reasoning tokens; their text is left out of both texts
                sequence.reasoning_tokens += 1
                sequence.in_reasoning = token_id == thinking.start_id
                tail = ""
                if not sequence.in_reasoning:
                    tail = sequence.reasoning.flush() if sequence.reasoning is not None else ""
                    if sequence.text is not None:
                        sequence.text.strip_leading_newlines()  # the blank line after </think>
                sequence.streamed += 1
                sequence.handle._publish(TokenEvent(token_id=token_id, text=tail, reasoning=True, logprob=logprob))
            elif sequence.in_reasoning:
                delta = sequence.reasoning.push(token_id)[0] if sequence.reasoning is not None else ""
                sequence.reasoning_tokens += 1
                sequence.streamed += 1
                sequence.handle._publish(TokenEvent(token_id=token_id, text=delta, reasoning=True, logprob=logprob))
            else:
                delta, hit_stop = ("", False) if sequence.text is None else sequence.text.push(token_id)
                sequence.streamed += 1  # after the push: a token whose text failed is not in the Completion
                sequence.handle._publish(TokenEvent(token_id=token_id, text=delta, logprob=logprob))
        except Exception as exc:
            log.exception("detokenizing failed for request %s", sequence.request.request_id)
            _complete(sequence, "error", f"{type(exc).__name__}: {exc}", sequence.streamed)
            return
        if hit_stop:
            _complete(sequence, "stop", None, sequence.streamed)


def _complete(sequence: Sequence, reason: str, error: str | None, generated: int) -> None:
    """Hand the caller its Completion of the first `generated` tokens. Should releasing the held-back
    text fail (the detokenizer's flush), the request ends with an error instead."""
    try:
        completion = sequence.completion(reason, error, generated)
    except Exception as exc:
        log.exception("finishing request %s failed", sequence.request.request_id)
        completion = sequence.completion("error", f"{type(exc).__name__}: {exc}", generated)
    sequence.handle._finish(completion)

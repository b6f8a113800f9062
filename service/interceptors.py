"""Server interceptors: exceptions -> status codes (with metrics per method and code), and an
optional bearer-token check.

Status codes mean what they say (see `status_for`): a bad image, bad parameters or a prompt that is
too long is INVALID_ARGUMENT with the reason; so is a request body that is not the method's protobuf
message. A full queue is RESOURCE_EXHAUSTED; a model still loading, a server shutting down or a
backend the gateway cannot reach is UNAVAILABLE; a client that went away is CANCELLED and one whose
deadline passed is DEADLINE_EXCEEDED (counted, never logged as an error); anything else is a bug:
INTERNAL, logged once with the request id the client sees. A reply larger than the server's max
message size is RESOURCE_EXHAUSTED naming its size (services refuse such requests before the work;
this is the backstop, so the call never ends in a transport error counted as OK).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
import uuid

import grpc

from lm.prompt import RequestTooLarge
from lm.requests import EngineOverloaded, EngineStopped
from service.decode import RequestDecoder, TooManyFields, Undecodable, compile_walker
from vision.image import ImageError

log = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes carry no token

# A client whose deadline passes cancels the call itself, a little before the server's own copy of
# that deadline expires (the deadline travelled as a relative timeout and arrived a transit time
# later). A cancellation this close to the deadline is counted as the deadline's.
DEADLINE_SLACK_S = 0.25


class NotReady(Exception):
    """The service is loading its model or shutting down."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed before the work finished."""


class BackendError(Exception):
    """A backend service (vision or LM, called by the gateway) failed the call; `code` is the status
    to return and the message names the backend, its address and what it said."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ReplyTooLarge(Exception):
    """A reply message larger than the server may send; the message names both sizes."""


# exception class -> status code; the first match in order wins (subclasses before bases)
_STATUS_BY_EXCEPTION: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ReplyTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # PromptTooLong, InvalidRequest, bad params, images
    (FloatingPointError, grpc.StatusCode.INTERNAL),  # the model's logits not finite: said as it is, no traceback
)


# Trailing metadata naming the kind of a refusal where the status code alone does not, for an HTTP front
# (service.openai_api) to answer as it would in process: a request over the size limits is
# INVALID_ARGUMENT like any bad request, but HTTP 413; a full queue is RESOURCE_EXHAUSTED (HTTP 429), as
# are a reply over the server's max message size (HTTP 400: ask for less) and a message over gRPC's own
# size limit, which gRPC refuses before any handler (HTTP 413).
ERROR_REASON_KEY = "tessera-error-reason"
REQUEST_TOO_LARGE = "request-too-large"
OVERLOADED = "overloaded"
REPLY_TOO_LARGE = "reply-too-large"


def error_reason(error: BaseException) -> str | None:
    """REQUEST_TOO_LARGE, OVERLOADED or REPLY_TOO_LARGE for those refusals, or for a downstream call that
    failed with one; None otherwise."""
    if isinstance(error, RequestTooLarge):
        return REQUEST_TOO_LARGE
    if isinstance(error, EngineOverloaded):
        return OVERLOADED
    if isinstance(error, ReplyTooLarge):
        return REPLY_TOO_LARGE
    if isinstance(error, grpc.aio.AioRpcError):
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_REASON_KEY:
                return value
    return None


def status_for(error: BaseException) -> grpc.StatusCode | None:
    if isinstance(error, BackendError):
        return error.code
    for kind, code in _STATUS_BY_EXCEPTION:
        if isinstance(error, kind):
            return code
    return None


def _method_name(full_method: str) -> str:
    return full_method.rsplit("/", 1)[-1] if full_method else "unknown"


def record(metrics, method: str, code: grpc.StatusCode, started: float) -> None:
    """Count one finished RPC by method and status code and observe its latency (`metrics` may be None)."""
    if metrics is None:
        return
    name = _method_name(method)
    metrics.requests.labels(name, code.name).inc()
    metrics.latency.labels(name).observe(time.perf_counter() - started)


def cancellation_code(context) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has (all but) passed, else CANCELLED."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class _WriteAfterCloseFilter(logging.Filter):
    """Demotes grpc.aio's "ExecuteBatchError raised in core by servicer method" to DEBUG.

    A server-side batch (a response or the status) fails in core only once the call is over on the
    transport: the client cancelled, its deadline passed or the connection dropped. grpc.aio skips the
    ERROR when it has already seen the client's close, but that notice arrives on a separate operation
    and can lose the race to the failed write (grpc/_cython/_cygrpc/aio/server.pyx.pxi,
    `_handle_exceptions` vs `_handle_cancellation_from_core`). The call itself is counted by
    ErrorsAndMetricsInterceptor as CANCELLED / DEADLINE_EXCEEDED."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("ExecuteBatchError raised in core by servicer"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"the client went away while a response was being sent ({record.getMessage()})", None, None, None)
            return log.isEnabledFor(logging.DEBUG)
        return True


_GRPC_CORE_LOG = logging.getLogger("grpc._cython.cygrpc")
_WRITE_AFTER_CLOSE = _WriteAfterCloseFilter()


class ErrorsAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: maps exceptions to status codes and records requests by method and code
    and their latency in `metrics` (a ServerMetrics, or None). A reply over `max_response_bytes` (the
    server's max send message size; None: unchecked) fails the call with RESOURCE_EXHAUSTED. Request
    bodies are parsed here (service.decode): one of more than `max_request_fields` protobuf fields is
    refused unparsed."""

    def __init__(self, metrics=None, *, max_response_bytes: int | None = None, max_request_fields: int = 1 << 18):
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes
        self.max_request_fields = max_request_fields
        compile_walker()
        _GRPC_CORE_LOG.addFilter(_WRITE_AFTER_CLOSE)  # a no-op when already added

    def _check_size(self, response, method: str) -> None:
        if self.max_response_bytes is None or not hasattr(response, "ByteSize"):
            return
        size = response.ByteSize()  # sums field sizes; nothing is serialized
        if size > self.max_response_bytes:
            log.warning("%s: a reply of %d bytes exceeds the max message size; refused", method, size)
            raise ReplyTooLarge(f"the reply is {size:,} bytes, over the server's max message size of "
                                f"{self.max_response_bytes:,} bytes (--max-message-mb); ask for less per request")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler  # streaming requests: none in Tessera's APIs (reflection handles its own errors)
        parse = handler.request_deserializer
        decoder = None if parse is None else RequestDecoder(parse, self.max_request_fields)
        kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)  # bytes in
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._wrap_call(handler.unary_unary, method, decoder),
                                                       **kwargs)
        if inspect.iscoroutinefunction(handler.unary_stream):  # writes with context.write (health Watch)
            return grpc.unary_stream_rpc_method_handler(self._wrap_call(handler.unary_stream, method, decoder),
                                                        **kwargs)
        return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, method, decoder),
                                                    **kwargs)

    async def _decode(self, decoder, request, context, method: str, started: float):
        if decoder is None:
            return request
        request = decoder.decode(request)
        if isinstance(request, Undecodable):
            await self._refuse_undecodable(request, context, method, started)
        return request

    def _wrap_call(self, behaviour, method, decoder):
        async def wrapped(request, context):
            started = time.perf_counter()
            request = await self._decode(decoder, request, context, method, started)
            try:
                response = await behaviour(request, context)
                self._check_size(response, method)
            except BaseException as error:  # noqa: BLE001 - classified, recorded, then aborted or re-raised
                await self._fail(error, context, method, started)
            record(self.metrics, method, grpc.StatusCode.OK, started)
            return response
        return wrapped

    def _wrap_stream(self, behaviour, method, decoder):
        async def wrapped(request, context):
            started = time.perf_counter()
            request = await self._decode(decoder, request, context, method, started)
            # aclosing: when this generator is dropped, the handler's own cleanup (freeing the
            # engine slot, cancelling a downstream call) runs now, not whenever it is collected.
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                try:
                    async for response in responses:
                        self._check_size(response, method)
                        yield response
                except GeneratorExit:
                    # gRPC drops the generator when the call ends while a response is being sent:
                    # the client cancelled or its deadline passed. The call is over; nothing to send.
                    record(self.metrics, method, cancellation_code(context), started)
                    raise
                except BaseException as error:  # noqa: BLE001
                    await self._fail(error, context, method, started)
            record(self.metrics, method, grpc.StatusCode.OK, started)
        return wrapped

    async def _refuse_undecodable(self, request: Undecodable, context, method: str, started: float) -> None:
        log.warning("%s: refused a request that is not a valid %s from %s: %s", method, request.message_type,
                    context.peer(), request.error)
        record(self.metrics, method, grpc.StatusCode.INVALID_ARGUMENT, started)
        if isinstance(request.error, TooManyFields):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed request body: {request.error} (expected a serialized {request.message_type}; "
                            "string fields must be valid UTF-8)")

    async def _fail(self, error: BaseException, context, method: str, started: float) -> None:
        """Record the call's status, then abort it with that status (or re-raise what is not ours)."""
        if isinstance(error, asyncio.CancelledError):  # the client went away or its deadline passed
            record(self.metrics, method, cancellation_code(context), started)
            raise error
        if isinstance(error, grpc.aio.AbortError):  # the handler already chose and sent the status
            record(self.metrics, method, context.code() or grpc.StatusCode.UNKNOWN, started)
            raise error
        if isinstance(error, grpc.aio.AioRpcError):  # a downstream service's status: pass it on
            code, details = error.code(), error.details() or ""
        else:
            code, details = status_for(error), str(error)
        if code is None:
            request_id = uuid.uuid4().hex[:12]
            log.error("internal error in %s (request id %s)", method, request_id, exc_info=error)
            code, details = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"
        record(self.metrics, method, code, started)
        reason = error_reason(error)
        await context.abort(code, details, trailing_metadata=((ERROR_REASON_KEY, reason),) if reason else ())


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every RPC except health and reflection.
    Refusals are UNAUTHENTICATED and counted in `metrics` (a ServerMetrics, or None)."""

    def __init__(self, token: str, metrics=None):
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return self._refusal(handler, method)

    def _refusal(self, handler, method: str):
        message = "missing or wrong bearer token in 'authorization'"

        async def refuse_unary(request, context):
            record(self.metrics, method, grpc.StatusCode.UNAUTHENTICATED, time.perf_counter())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(request, context):
            record(self.metrics, method, grpc.StatusCode.UNAUTHENTICATED, time.perf_counter())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        # The body of a refused call is never parsed (request_deserializer None: raw bytes).
        kwargs = {"response_serializer": handler.response_serializer} if handler is not None else {}
        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **kwargs)

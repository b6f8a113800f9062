"""Server interceptors: exceptions -> status codes (with metrics per method and code), and an
optional bearer-token check.

Status codes mean what they say (see `status_for`): a bad image, bad parameters or a prompt that is
too long is INVALID_ARGUMENT with the reason; a full queue is RESOURCE_EXHAUSTED; a model still
loading or a server shutting down is UNAVAILABLE; anything else is a bug: INTERNAL, logged with the
request id the client sees.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid

import grpc

from lm.requests import EngineOverloaded, EngineStopped
from vision.image import ImageError

log = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes carry no token


class NotReady(Exception):
    """The service is loading its model or shutting down."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed before the work finished."""


# exception class -> status code; the first match in order wins (subclasses before bases)
_STATUS_BY_EXCEPTION: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # PromptTooLong, InvalidRequest, bad params, images
)


def status_for(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in _STATUS_BY_EXCEPTION:
        if isinstance(error, kind):
            return code
    return None


def _method_name(full_method: str) -> str:
    return full_method.rsplit("/", 1)[-1] if full_method else "unknown"


class ErrorsAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: maps exceptions to status codes and records requests by method and code
    and their latency in `metrics` (a ServerMetrics, or None)."""

    def __init__(self, metrics=None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler  # streaming requests: none in Tessera's APIs (reflection handles its own errors)

    def _wrap_unary(self, behaviour, method):
        async def wrapped(request, context):
            started = time.perf_counter()
            try:
                response = await behaviour(request, context)
            except BaseException as error:  # noqa: BLE001 - classified, recorded, then aborted or re-raised
                await self._fail(error, context, method, started)
            self._record(method, grpc.StatusCode.OK, started)
            return response
        return wrapped

    def _wrap_stream(self, behaviour, method):
        async def wrapped(request, context):
            started = time.perf_counter()
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as error:  # noqa: BLE001
                await self._fail(error, context, method, started)
            self._record(method, grpc.StatusCode.OK, started)
        return wrapped

    async def _fail(self, error: BaseException, context, method: str, started: float) -> None:
        """Record the call's status, then abort it with that status (or re-raise what is not ours)."""
        if isinstance(error, asyncio.CancelledError):  # the client went away or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self._record(method, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED, started)
            raise error
        if isinstance(error, grpc.aio.AbortError):  # the handler already chose and sent the status
            self._record(method, context.code() or grpc.StatusCode.UNKNOWN, started)
            raise error
        if isinstance(error, grpc.aio.AioRpcError):  # a downstream service's status: pass it on
            code, details = error.code(), error.details() or ""
        else:
            code, details = status_for(error), str(error)
        if code is None:
            request_id = uuid.uuid4().hex[:12]
            log.error("internal error in %s (request id %s)", method, request_id, exc_info=error)
            code, details = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"
        self._record(method, code, started)
        await context.abort(code, details)

    def _record(self, method, code, started) -> None:
        if self.metrics is None:
            return
        name = _method_name(method)
        self.metrics.requests.labels(name, code.name).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every RPC except health and reflection."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusal(handler)


def _refusal(handler):
    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")
        yield  # pragma: no cover - makes this an async generator

    kwargs = {}
    if handler is not None:
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, **kwargs)

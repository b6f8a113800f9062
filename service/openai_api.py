"""The OpenAI-compatible HTTP front (`tessera serve openai`, and part of `serve all`): FastAPI on uvicorn,
in front of the gateway. Image parts are base64 `data:` URLs; `http(s)` URLs are fetched only from the
hosts of --allowed-media-domains (service.media_fetch).

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health` (200
once the model is loaded and the gateway serving, else 503) and `GET /metrics` (Prometheus). Each
completion request becomes n gateway queries (`service.openai_protocol`), run concurrently; the
gateway is the one in this process (`LocalGateway`, `serve all`) or reached over gRPC
(`RemoteGateway`, `serve openai`), with the same limits and typed errors either way, answered as
OpenAI's error JSON: 400 bad request, 401 missing or wrong bearer token, 404 unknown model, 413 a body,
image or prompt over the limits, 429 the engine's queue is full, 503 loading or a backend down, 504 a
backend's deadline. A client that disconnects cancels its queries, and the engine frees their KV blocks.

Reasoning models: the `<think>` block comes back as `reasoning_content` on the message and on stream
deltas, the answer as `content`. Tools: with `tools` and `tool_choice` "auto" (the default) the
definitions go to the chat template and `<tool_call>` blocks in the answer come back as `tool_calls`
(service.tool_calls); "required" and a named function constrain decoding to the calls' JSON, as vLLM
does; "none" leaves the tools out. Structured output: `response_format` json_object / json_schema
constrain decoding (lm.structured).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, ValidationError

from lm.prompt import RequestTooLarge
from lm.requests import EngineOverloaded, EngineStopped
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service.interceptors import (
    OVERLOADED, REPLY_TOO_LARGE, REQUEST_TOO_LARGE, BackendError, DeadlineExceeded, NotReady, error_reason,
)
from service import openai_protocol
from service.media_fetch import fetch_image
from service.openai_protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, messages_to_proto, pan_and_scan_to_proto, sampling_to_proto,
    structured_output_to_proto, template_kwargs_to_proto, with_seed,
)
from service.tool_calls import ToolCall, ToolCallStream, arguments_text, call_from_json, new_call_id, parse_tool_calls
from vision.image import ImageError

log = logging.getLogger(__name__)

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20
# /v1/completions' max_tokens when unset: OpenAI's documented default for that endpoint, as vLLM's (chat
# completions run to the end of the context instead)
COMPLETIONS_MAX_TOKENS = 16
CLIENT_CLOSED = 499  # the requests counter's status for a stream its client closed (nginx's "client closed request")


@dataclass(frozen=True)
class HttpSettings:
    model_name: str  # the one model served: /v1/models lists it, requests must name it
    auth_token: str | None = None  # bearer token of /v1/* (health and metrics are open, as gRPC's are)
    max_body_bytes: int = 64 << 20  # largest request body (base64 images included)
    max_image_bytes: int = 20 << 20  # largest decoded image
    default_max_tokens: int = 4096  # chat's max_tokens when unset: the context's length (generation ends there)
    request_timeout_s: float | None = None  # deadline of each gateway query (None: none)
    allowed_media_domains: tuple[str, ...] = ()  # hosts image URLs may be fetched from (service.media_fetch)
    media_timeout_s: float = 10.0  # seconds to fetch one image URL
    max_images: int | None = None  # image parts per request, counted before any is decoded or fetched


# ----- the gateway, in this process or over gRPC -------------------------------------------------

class LocalGateway:
    """The gateway servicer of this process (`serve all`)."""

    def __init__(self, servicer, ready):
        self.servicer = servicer
        self.ready = ready  # () -> bool: the models are loaded

    def not_ready_reason(self) -> str:
        return "the model is still loading; retry shortly"

    def stream(self, request: gateway_pb2.QueryRequest, timeout: float | None) -> AsyncIterator:
        return self.servicer.stream(request, timeout)


class GatewayCallError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


class RemoteGateway:
    """A gateway reached over gRPC (`serve openai`); `metadata` carries the bearer token."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple = (), ready=lambda: True, name: str = "the gateway"):
        self.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.metadata = metadata
        self.ready = ready
        self.name = name  # in errors, e.g. "gateway at host:port"

    def not_ready_reason(self) -> str:
        return (f"{self.name} is not ready (unreachable, still loading, or refusing this server's token; the "
                "server log says which); retry shortly")

    async def stream(self, request: gateway_pb2.QueryRequest, timeout: float | None) -> AsyncIterator:
        call = self.stub.QueryStream(request, timeout=timeout, metadata=self.metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            details, reason = error.details() or error.code().name, error_reason(error)
            if reason == OVERLOADED:
                raise EngineOverloaded(details) from None
            if reason == REQUEST_TOO_LARGE:
                raise RequestTooLarge(details) from None
            if reason == REPLY_TOO_LARGE:
                raise ApiError(400, details) from None  # the answer asked for is over the gateway's limit
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a message over gRPC's size limit
                raise RequestTooLarge(f"{self.name} refused a message as too large: {details} (bytes; "
                                      "its --max-message-mb sets the limit)") from None
            raise GatewayCallError(error.code(), details) from None
        finally:
            call.cancel()


_HTTP_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAUTHENTICATED: 503, grpc.StatusCode.PERMISSION_DENIED: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


# A \u escape of a high surrogate not followed by a low one, or of a low one not after a high one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                               rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


# The request fields whose ranges the LM service checks (lm.sampling.SamplingParams, each problem beginning
# with the field's name: "top_p must be in (0, 1], got 1.5"), by that name.
_SAMPLING_FIELDS = {name: name for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                            "frequency_penalty", "repetition_penalty", "seed", "logit_bias", "stop")}
_SAMPLING_FIELDS["max_new_tokens"] = "max_tokens"


def _sampling_param(message: str) -> str | None:
    """The request field a 400 from the LM service's sampling checks names first, or None."""
    return _SAMPLING_FIELDS.get(message.split(" ", 1)[0])


def api_error(error: BaseException) -> ApiError:
    """The HTTP error for an exception from a gateway query (the statuses of service.interceptors)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestTooLarge):
        return ApiError(413, str(error))
    if isinstance(error, (ImageError, ValueError)):
        return ApiError(400, str(error), param=_sampling_param(str(error)))
    if isinstance(error, EngineOverloaded):
        return ApiError(429, str(error))
    if isinstance(error, (NotReady, EngineStopped)):
        return ApiError(503, str(error))
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, str(error))
    if isinstance(error, FloatingPointError):  # the model's logits were not finite: the server's numbers
        return ApiError(500, str(error))
    if isinstance(error, (BackendError, GatewayCallError)):
        # The gateway's token refused by a backend is the deployment's fault: 503, not the client's 401.
        status = _HTTP_BY_GRPC.get(error.code, 500)
        return ApiError(status, str(error), param=_sampling_param(str(error)) if status == 400 else None)
    log.error("internal error in an HTTP request", exc_info=error)
    return ApiError(500, f"internal error ({type(error).__name__}); see the server log")


# ----- one completion request: n queries, tools, responses ------------------------------------------

@dataclass
class ToolMode:
    kind: str = "none"  # none | auto | required | named
    function: str = ""  # named: the function
    single: bool = False  # parallel_tool_calls false: one call at most


# pydantic names, in an error's loc, the member of a union it tried: a scalar type, a generic or
# constrained type (`list[ContentPart]`, `literal['auto','none']`, `function-after[...]`) or a model class
_SCALAR_LABELS = frozenset({"str", "int", "float", "bool", "bytes", "none"})
_TYPE_LABEL = re.compile(r"(?:list|dict|set|frozenset|tuple|literal|nullable|union|tagged-union|json-or-python|"
                         r"lax-or-strict|chain|is-instance|function-(?:after|before|wrap|plain))\[.*\]", re.S)
_MODEL_LABELS = frozenset(name for name, value in vars(openai_protocol).items()
                          if isinstance(value, type) and issubclass(value, BaseModel))


def _union_label(part) -> bool:
    """Whether an element of a validation error's loc is pydantic's name for a union member rather than a
    field, index or key the client sent (a client's key that happens to equal one is dropped too)."""
    return isinstance(part, str) and (part in _SCALAR_LABELS or part in _MODEL_LABELS
                                      or _TYPE_LABEL.fullmatch(part) is not None)


def _chat_query(body: ChatCompletionRequest, settings: HttpSettings) -> tuple[gateway_pb2.QueryRequest, ToolMode]:
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    if not body.messages:
        raise ApiError(400, "messages is empty; send at least one message", param="messages")
    fetch = None
    if settings.allowed_media_domains:
        def fetch(url: str, where: str) -> bytes:
            return fetch_image(url, allowed_domains=settings.allowed_media_domains, max_bytes=settings.max_image_bytes,
                               timeout_s=settings.media_timeout_s, where=where)
    messages, images = messages_to_proto(body.messages, max_image_bytes=settings.max_image_bytes, fetch=fetch,
                                         max_images=settings.max_images)
    completion_field = body.max_completion_tokens is not None
    max_tokens = body.max_completion_tokens if completion_field else body.max_tokens
    sampling = sampling_to_proto(body, max_tokens=max_tokens, default_max_tokens=settings.default_max_tokens,
                                 logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                 max_tokens_field="max_completion_tokens" if completion_field else "max_tokens")
    if body.thinking_budget is not None:
        sampling.thinking_budget = body.thinking_budget
    mode = _tool_mode(body)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    if mode.kind in ("required", "named") and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(400, f"response_format {body.response_format.type} and tool_choice {mode.kind!r} cannot be "
                            "combined: a forced tool call is already constrained JSON", param="response_format")
    if mode.kind == "named":
        function = next(tool.function for tool in body.tools if tool.function.name == mode.function)
        sampling.structured_output.json_schema = json.dumps(function.parameters or {"type": "object"})
    elif mode.kind == "required":
        sampling.structured_output.json_schema = json.dumps(
            _required_calls_schema(body.tools, single=body.parallel_tool_calls is False))
    else:
        structured_output_to_proto(body.response_format, sampling)
    query = gateway_pb2.QueryRequest(
        messages=messages, images=images, sampling=sampling, pan_and_scan=pan_and_scan_to_proto(body.pan_and_scan),
        chat_template_kwargs=template_kwargs_to_proto(body.chat_template_kwargs),
        tools_json=json.dumps(tools) if tools and mode.kind != "none" else "")
    return query, mode


def _tool_mode(body: ChatCompletionRequest) -> ToolMode:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return ToolMode()
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) < len(names):
        raise ApiError(400, "tools have duplicate function names", param="tools")
    for tool in body.tools:
        if tool.function.parameters is not None and tool.function.parameters.get("type", "object") != "object":
            raise ApiError(400, f"tool {tool.function.name!r}: parameters must be a JSON Schema of an object",
                           param="tools")
    single = body.parallel_tool_calls is False
    if choice is None or choice == "auto":
        return ToolMode("auto", single=single)
    if choice == "none":
        return ToolMode()
    if choice == "required":
        return ToolMode("required", single=single)
    name = choice.function.get("name", "")
    if name not in {tool.function.name for tool in body.tools}:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                       param="tool_choice")
    return ToolMode("named", name)


def _required_calls_schema(tools, *, single: bool) -> dict:
    """A JSON array of at least one call (exactly one when `single`: parallel_tool_calls false), each
    {"name": one of the tools, "arguments": its parameters}."""
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "arguments": tool.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    return {"type": "array", "minItems": 1, **({"maxItems": 1} if single else {}), "items": {"anyOf": calls}}


def _calls_and_content(text: str, mode: ToolMode) -> tuple[str | None, list[ToolCall]]:
    """The message's content and tool calls from the answer's text."""
    if mode.kind == "auto":
        content, calls = parse_tool_calls(text)
        return (content or None) if calls else text, calls[:1] if mode.single else calls
    if mode.kind == "named":  # the text is the arguments object itself
        parsed = _json_or_none(text)
        arguments = None if parsed is None else arguments_text(parsed)
        return (None, [ToolCall(mode.function, arguments, new_call_id())]) if arguments is not None else (text, [])
    if mode.kind == "required":
        data = _json_or_none(text)
        calls = [call_from_json(json.dumps(item)) for item in data] if isinstance(data, list) else []
        if calls and all(call is not None for call in calls):
            return None, calls
        return text, []
    return text, []


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _finish_reason(done, calls: list[ToolCall], mode: ToolMode) -> str:
    if calls and mode.kind in ("auto", "required"):
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _logprob_entry(record: lm_pb2.TokenLogprob) -> dict:
    return {"token": record.token, "logprob": record.logprob, "bytes": list(record.token.encode()),
            "top_logprobs": [{"token": top.token, "logprob": top.logprob, "bytes": list(top.token.encode())}
                             for top in record.top]}


def _usage(dones) -> dict:
    completion = sum(done.completion_tokens for done in dones)
    prompt = dones[0].prompt_tokens if dones else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(done.reasoning_tokens for done in dones)}}


def _text_usage(dones: dict, n: int) -> dict:
    """Usage of a completions request (choice index -> its final message): every prompt counted once
    (choice p * n + i answers prompt p)."""
    usage = _usage(list(dones.values()))
    usage["prompt_tokens"] = sum(done.prompt_tokens for index, done in dones.items() if index % n == 0)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


class OpenAIFront:
    """The FastAPI app around one gateway (`app`)."""

    def __init__(self, gateway, settings: HttpSettings, *, registry=None):
        self.gateway = gateway
        self.settings = settings
        self.registry = registry
        self.stopping = False  # set by HttpServer.stop: streams cut from now on are the server's doing
        self._created = int(time.time())  # /v1/models' `created`: when this front started serving the model
        self.closing = asyncio.Event()  # set just before the drain's grace period ends: streams say so and end
        self.requests = Counter("tessera_http_requests", "HTTP requests finished, by route and status",
                                ["route", "status"], registry=registry) if registry is not None else None
        app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_exception_handler(StarletteHTTPException, self._http_exception)  # unknown routes, methods
        self.app = app

    # ----- routes ---------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self._created, "owned_by": "tessera"}

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as error:
            return self._error(error, "models")
        return self._json({"object": "list", "data": [self._model_card()]}, "models")

    async def model(self, request: Request, model_id: str) -> Response:
        try:
            self._authorize(request)
            if model_id != self.settings.model_name:
                raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                                    f"{self.settings.model_name!r}", code="model_not_found")
        except ApiError as error:
            return self._error(error, "models")
        return self._json(self._model_card(), "models")

    async def health(self) -> Response:
        if self.gateway.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": self.gateway.not_ready_reason()}, status_code=503)

    async def _http_exception(self, request: Request, error: StarletteHTTPException) -> Response:
        reply = self._error(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"),
                            "other")
        reply.headers.update(error.headers or {})  # a 405's Allow
        return reply

    async def metrics(self) -> Response:
        if self.registry is None:
            return Response(status_code=404)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat", ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completions", CompletionRequest)

    # ----- the work ---------------------------------------------------------------------------------

    async def _complete(self, request: Request, route: str, model) -> Response:
        try:
            self._authorize(request)
            body = await self._body(request, model)
            if body.model != self.settings.model_name:
                raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                    f"{self.settings.model_name!r} (GET /v1/models)", param="model",
                               code="model_not_found")
            if not 1 <= body.n <= MAX_N:
                raise ApiError(400, f"n must be in [1, {MAX_N}], got {body.n}", param="n")
            if not self.gateway.ready():
                raise ApiError(503, self.gateway.not_ready_reason())
            if route == "chat":
                # base64 decoding and image fetches: off the event loop
                query, mode = await asyncio.to_thread(_chat_query, body, self.settings)
                queries = [(i, with_seed(query, i), mode) for i in range(body.n)]
            else:
                queries = self._completion_queries(body)
            runs = [_Run(index, self.gateway.stream(q, self.settings.request_timeout_s), mode)
                    for index, q, mode in queries]
            try:  # errors before the first token become the status; a client gone meanwhile frees its place
                await _until_disconnected(request, asyncio.gather(*(run.prime() for run in runs)))
            except BaseException:
                await asyncio.gather(*(run.close() for run in runs))
                raise
        except Exception as error:  # noqa: BLE001 - every error is answered as OpenAI's JSON
            return self._error(api_error(error), route)
        response_id = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._stream_chat(runs, response_id, created, include_usage, body) if route == "chat" else \
                self._stream_text(runs, response_id, created, include_usage, body)
            return StreamingResponse(self._sse_stream(route, runs, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            dones = await _until_disconnected(request, asyncio.gather(*(run.finish() for run in runs)))
        except Exception as error:  # noqa: BLE001
            return self._error(api_error(error), route)
        finally:
            await asyncio.gather(*(run.close() for run in runs))
        if route == "chat":
            return self._json(self._chat_body(runs, dones, response_id, created, body), route)
        return self._json(self._text_body(runs, dones, response_id, created, body), route)

    def _completion_queries(self, body: CompletionRequest) -> list:
        if body.echo or body.suffix is not None:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (the most likely tokens per step)",
                           param="logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise ApiError(400, "prompt as token ids is not supported here: send the prompt as text (a string or a "
                                "list of strings)", param="prompt")
        if not prompts or len(prompts) * body.n > MAX_N:
            raise ApiError(400, f"give 1 to {MAX_N} prompts x n", param="prompt")
        sampling = sampling_to_proto(body, max_tokens=body.max_tokens, default_max_tokens=COMPLETIONS_MAX_TOKENS,
                                     logprobs=body.logprobs)
        structured_output_to_proto(body.response_format, sampling)
        queries = []
        for p, prompt in enumerate(prompts):
            query = gateway_pb2.QueryRequest(prompt=prompt, raw=True, sampling=sampling)
            queries += [(p * body.n + i, with_seed(query, i), ToolMode()) for i in range(body.n)]
        return queries

    def _chat_body(self, runs, dones, response_id, created, body) -> dict:
        choices = []
        for run, done in zip(runs, dones):
            content, calls = _calls_and_content(done.text, run.mode)
            message = {"role": "assistant", "content": content}
            if done.reasoning_text or done.reasoning_tokens:
                message["reasoning_content"] = done.reasoning_text
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
            choices.append({"index": run.index, "message": message, "finish_reason": _finish_reason(done, calls, run.mode),
                            "logprobs": {"content": [_logprob_entry(r) for r in done.logprobs]} if body.logprobs else None})
        return {"id": response_id, "object": "chat.completion", "created": created, "model": self.settings.model_name,
                "choices": choices, "usage": _usage(dones)}

    def _text_body(self, runs, dones, response_id, created, body) -> dict:
        choices = [{"index": run.index, "text": done.text, "finish_reason": _finish_reason(done, [], run.mode),
                    "logprobs": _legacy_logprobs(done.logprobs) if body.logprobs is not None else None}
                   for run, done in zip(runs, dones)]
        usage = _text_usage({run.index: done for run, done in zip(runs, dones)}, body.n)
        return {"id": response_id, "object": "text_completion", "created": created, "model": self.settings.model_name,
                "choices": choices, "usage": usage}

    async def _stream_chat(self, runs, response_id, created, include_usage, body):
        def chunk(index, delta, finish_reason=None, logprobs=None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                         "model": self.settings.model_name, "choices": [choice]})

        tool_streams = {run.index: ToolCallStream() for run in runs}
        sent_calls = {run.index: 0 for run in runs}
        held = {run.index: "" for run in runs}  # forced tool calls: the whole answer, parsed at the end
        dones = []
        for run in runs:
            yield chunk(run.index, {"role": "assistant", "content": ""})
        async for run, message in _merge(runs):
            i = run.index
            if message.HasField("done"):
                done = message.done
                dones.append(done)
                if run.mode.kind == "auto":
                    tail = tool_streams[i].flush()
                    if tail:
                        yield chunk(i, {"content": tail})
                    calls = [None] * sent_calls[i]
                else:
                    content, calls = _calls_and_content(held[i], run.mode) if run.mode.kind != "none" else ("", [])
                    if content:
                        yield chunk(i, {"content": content})
                    if calls:
                        yield chunk(i, {"tool_calls": [c.to_openai(n) for n, c in enumerate(calls)]})
                yield chunk(i, {}, _finish_reason(done, calls, run.mode))
                continue
            logprobs = {"content": [_logprob_entry(message.logprob)]} if message.HasField("logprob") else None
            if message.reasoning:
                yield chunk(i, {"reasoning_content": message.text}, logprobs=logprobs)
            elif run.mode.kind == "auto":
                content, calls = tool_streams[i].push(message.text)
                if content or logprobs:
                    yield chunk(i, {"content": content}, logprobs=logprobs)
                for call in calls:
                    if run.mode.single and sent_calls[i]:
                        break  # parallel_tool_calls false: the first call only
                    yield chunk(i, {"tool_calls": [call.to_openai(sent_calls[i])]})
                    sent_calls[i] += 1
            elif run.mode.kind in ("named", "required"):
                held[i] += message.text
                if logprobs:
                    yield chunk(i, {}, logprobs=logprobs)
            else:
                yield chunk(i, {"content": message.text}, logprobs=logprobs)
        if include_usage:
            yield _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.settings.model_name, "choices": [], "usage": _usage(dones)})

    async def _stream_text(self, runs, response_id, created, include_usage, body):
        def chunk(index, text, finish_reason=None, logprobs=None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            return _sse({"id": response_id, "object": "text_completion", "created": created,
                         "model": self.settings.model_name, "choices": [choice]})

        dones = {}
        offsets = {run.index: 0 for run in runs}  # text_offset of each choice's next token
        async for run, message in _merge(runs):
            if message.HasField("done"):
                dones[run.index] = message.done
                yield chunk(run.index, "", _finish_reason(message.done, [], run.mode))
                continue
            logprobs = None
            if message.HasField("logprob"):
                logprobs = _legacy_logprobs([message.logprob], offsets[run.index])
                offsets[run.index] += len(message.logprob.token)
            yield chunk(run.index, message.text, logprobs=logprobs)
        if include_usage:
            yield _sse({"id": response_id, "object": "text_completion", "created": created,
                        "model": self.settings.model_name, "choices": [], "usage": _text_usage(dones, body.n)})

    async def _sse_stream(self, route: str, runs, events):
        """`events` (a route's SSE chunks) as sent: an error after the status line goes in the stream as
        OpenAI's error JSON, the request is counted by how it ended (CLIENT_CLOSED when the client left
        mid-stream, 503 when the server's drain cut it), the queries are closed whatever happens, and
        `[DONE]` ends a stream that was not cut."""
        closing = asyncio.ensure_future(self.closing.wait())
        pending: asyncio.Future | None = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(events))
                await asyncio.wait((pending, closing), return_when=asyncio.FIRST_COMPLETED)
                if not pending.done():  # the drain's grace period is ending: end the stream rather than be cut
                    failure = ApiError(503, "the server is shutting down and its grace period for requests in "
                                            "flight has ended; the answer is incomplete")
                    self._count(route, failure.status)
                    yield _sse(failure.body())
                    break
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    self._count(route, 200)
                    break
                yield event
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or the server's drain ended
            self._count(route, 503 if self.stopping else CLIENT_CLOSED)
            raise
        except Exception as error:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            failure = api_error(error)
            self._count(route, failure.status)
            yield _sse(failure.body())
        finally:
            closing.cancel()
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await events.aclose()
            await asyncio.gather(*(run.close() for run in runs))
        yield "data: [DONE]\n\n"

    # ----- plumbing -----------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        token = self.settings.auth_token
        if not token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    async def _body(self, request: Request, model):
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared):,} bytes; at most {limit:,}")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"the request body exceeds {limit:,} bytes")
            chunks.append(part)
        body = b"".join(chunks)
        try:
            return model.model_validate_json(body)
        except ValidationError as error:
            # A field of several types (a message's content: a string or a list of parts) fails once per
            # type; the deepest error is the one inside what the client sent (its image part's url, not
            # "content is not a string").
            deepest = max(error.errors(), key=lambda e: len(e.get("loc", ())))
            where = ".".join(str(p) for p in deepest.get("loc", ()) if not _union_label(p))
            message = deepest.get("msg")
            if deepest.get("type") == "json_invalid" and "escape" in message and _SURROGATE_ESCAPE.search(body):
                # the parser's words ("unexpected end of hex escape") do not say what is wrong with it
                message += (" (the body escapes a UTF-16 surrogate, \\ud800-\\udfff, that is not half of a pair: "
                            "no character; send the character itself or both halves of its pair)")
            raise ApiError(400, f"invalid request body: {where or 'body'}: {message} "
                                f"({error.error_count()} error(s))", param=where or None) from None

    def _count(self, route: str, status: int) -> None:
        if self.requests is not None:
            self.requests.labels(route, str(status)).inc()

    def _json(self, body: dict, route: str) -> Response:
        self._count(route, 200)
        return JSONResponse(body)

    def _error(self, error: ApiError, route: str) -> Response:
        self._count(route, error.status)
        headers = {}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        elif error.status in (429, 503):
            headers["Retry-After"] = "1"
        return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _Run:
    """One gateway query of a request: its stream, primed to its first message so that errors raised
    before any token (bad request, full queue) become the response's status."""

    def __init__(self, index: int, stream, mode: ToolMode):
        self.index = index
        self.mode = mode
        self._stream = stream
        self._first = None

    async def prime(self) -> None:
        try:
            self._first = await self._stream.__anext__()
        except StopAsyncIteration:
            raise RuntimeError("the gateway's stream ended without a message") from None

    async def messages(self):
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.HasField("done"):
                return
        async for message in self._stream:
            yield message
            if message.HasField("done"):
                return

    async def finish(self):
        async for message in self.messages():
            if message.HasField("done"):
                return message.done
        raise RuntimeError("the gateway's stream ended without a final message")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.aclose()


async def _merge(runs: list[_Run]):
    """(run, message) from every run as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: _Run) -> None:
        try:
            async for message in run.messages():
                await queue.put((run, message, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((run, None, error))
            return
        await queue.put((run, None, None))

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        remaining = len(runs)
        while remaining:
            run, message, error = await queue.get()
            if error is not None:
                raise error
            if message is None:
                remaining -= 1
                continue
            yield run, message
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request, work):
    """Await `work`; cancel it (499) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ApiError(499, "the client disconnected")
    return task.result()


def _legacy_logprobs(records, start: int = 0) -> dict:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}) and
    text_offset (each token's start in the completion's text, counted from `start`)."""
    offsets, position = [], start
    for record in records:
        offsets.append(position)
        position += len(record.token)
    # As OpenAI's: each step's top_logprobs holds the sampled token too (up to logprobs + 1 entries).
    return {"tokens": [r.token for r in records], "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{**{top.token: top.logprob for top in r.top}, r.token: r.logprob} for r in records],
            "text_offset": offsets}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ----- serving -------------------------------------------------------------------------------------

class HttpServer:
    """uvicorn serving an OpenAIFront on the running event loop (beside the gRPC server)."""

    def __init__(self, front: OpenAIFront, host: str, port: int, *, grace_period: float = 30.0):
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the process's own handlers stop everything, this included
                yield

        config = uvicorn.Config(front.app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=int(grace_period) or None, access_log=False)
        self._server = _Server(config)
        self._front, self._grace_period = front, grace_period
        self._host, self._port = host, port
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve; returns the port. Raises OSError when the port cannot be bound (bound here, so
        that the error reaches the caller rather than uvicorn exiting the process)."""
        import socket

        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                with contextlib.suppress(SystemExit):
                    self._task.result()
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        return sock.getsockname()[1]

    def force_exit(self) -> None:
        """During `stop`: end the streams still running (an error event, then [DONE]) and close the
        connections instead of waiting for them."""
        self._front.closing.set()
        self._server.force_exit = True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._front.stopping = True
        # A second before uvicorn would cancel the requests still running (and cut their streams
        # mid-transfer), the streams end themselves with an error event and [DONE].
        closing = asyncio.get_running_loop().call_later(max(self._grace_period - 1.0, 0.0), self._front.closing.set)
        self._server.should_exit = True
        with contextlib.suppress(BaseException):
            await self._task
        closing.cancel()

"""The OpenAI API's request bodies (chat completions, completions) as pydantic models, and their
translation into gateway queries (`tessera.gateway.v1.QueryRequest`).

Field names and meanings are OpenAI's (https://platform.openai.com/docs/api-reference/chat). Tessera's
extensions, under the names vLLM uses where it has one: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`chat_template_kwargs` (e.g. {"enable_thinking": false}), `thinking_budget` (most tokens of a reasoning
model's <think> block) and `pan_and_scan` (Pan & Scan crops per request). Unknown fields are ignored, as
OpenAI's own server ignores fields a client library adds.

Where Tessera differs: an unset `temperature` / `top_p` / `top_k` takes the checkpoint's recommendation
(its generation_config.json with do_sample true), else greedy decoding; an unset `max_tokens` allows
chat completions to run up to the context's end (completions take 16, OpenAI's default there).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2
from proto.tessera.lm.v1 import lm_pb2


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status` (HTTP)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 499: "client_closed_request",
             503: "service_unavailable", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """An explicit null means "not given", as OpenAI reads it (clients such as LiteLLM send them)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class ImageUrl(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier turn's thinking: the templates leave it out of the prompt


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class PanAndScan(_Body):
    enabled: bool = True
    min_crop_size: int | None = None
    max_num_crops: int | None = None
    min_ratio_to_activate: float | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Tessera extensions (vLLM's names)
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's: the model's end-of-turn / eos tokens do not end generation (benchmarks)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # Known OpenAI / vLLM fields Tessera does not implement: refused when set (never silently ignored).
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    audio: dict | None = None
    prediction: dict | None = None
    functions: list | None = None
    function_call: Any = None
    modalities: list[str] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = None
    pan_and_scan: PanAndScan | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # token ids are refused with their own message
    logprobs: int | None = None  # the legacy API's: the N most likely tokens at each step (0-5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ----- translation into gateway queries -----------------------------------------------------------

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<base64>;base64)?,",
                       re.ASCII | re.IGNORECASE)  # RFC 2397: scheme and parameter names are case-insensitive


def image_from_url(url: str, *, max_bytes: int, where: str, fetch=None) -> tensor_pb2.Image:
    """An image part's bytes: decoded from a base64 `data:` URL, or `fetch(url, where)` for any other
    (service.media_fetch; None: refused). ApiError 400 for a URL that is neither or data that is not
    base64, 413 for data over `max_bytes` (checked before decoding)."""
    match = _DATA_URL.match(url)
    if match is None:
        if fetch is None:
            raise ApiError(400, f"{where}: image_url must be a base64 data: URL (data:image/png;base64,...); this "
                                "server does not fetch images from the network", param=where)
        return tensor_pb2.Image(data=fetch(url, where))
    if match["base64"] is None:
        raise ApiError(400, f"{where}: the data: URL is not base64-encoded", param=where)
    payload = url[match.end():]
    if len(payload) // 4 * 3 > max_bytes + 3:  # checked before decoding
        raise ApiError(413, f"{where}: the image is about {len(payload) // 4 * 3:,} bytes; at most {max_bytes:,}",
                       param=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL holds invalid base64", param=where) from None
    return tensor_pb2.Image(data=data, mime_type=match["mime"] or "")


def messages_to_proto(messages: list[Message], *, max_image_bytes: int, fetch=None, max_images: int | None = None
                      ) -> tuple[list[lm_pb2.ChatMessage], list[tensor_pb2.Image]]:
    """OpenAI chat messages as the gateway's (images in order; `fetch` as image_from_url's). "developer"
    is a system message. More than `max_images` image parts is a 413 before any image is decoded or
    fetched."""
    count = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if max_images is not None and count > max_images:
        raise ApiError(413, f"the messages have {count} images; at most {max_images} per request (--max-images)",
                       param="messages")
    result, images = [], []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = []
        content = message.content
        if content is None and not (role == "assistant" and message.tool_calls):  # as OpenAI's API answers
            raise ApiError(400, f"messages[{index}].content is missing or null; only an assistant message with "
                                "tool_calls may leave it out", param=f"messages[{index}].content")
        if isinstance(content, str):
            parts.append(lm_pb2.ContentPart(text=content))
        elif content is not None:
            for number, part in enumerate(content):
                where = f"messages[{index}].content[{number}]"
                if part.type == "text" and part.text is not None:
                    parts.append(lm_pb2.ContentPart(text=part.text))
                elif part.type == "image_url" and role != "user":
                    raise ApiError(400, f"{where}: image_url parts are accepted in user messages only (as in OpenAI's "
                                        f"API); this message's role is {message.role!r}", param=where)
                elif part.type == "image_url" and part.image_url is not None:
                    images.append(image_from_url(part.image_url.url, max_bytes=max_image_bytes, where=where,
                                                 fetch=fetch))
                    parts.append(lm_pb2.ContentPart(image=True))
                elif part.type in ("text", "image_url"):
                    field = "text" if part.type == "text" else "image_url.url"
                    raise ApiError(400, f"{where}: a {part.type} part needs `{field}`", param=where)
                else:
                    raise ApiError(400, f"{where}: content part of type {part.type!r} is not supported (text and "
                                        "image_url are)", param=where)
        entry = lm_pb2.ChatMessage(role=role, content=parts, name=message.name or "",
                                   tool_call_id=message.tool_call_id or "")
        if message.tool_calls:
            entry.tool_calls_json = json.dumps([call.model_dump(exclude_none=True) for call in message.tool_calls])
        result.append(entry)
    return result, images


_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = 3.4028234663852886e38


def _check_ranges(body: _Sampling, max_tokens: int | None, max_tokens_field: str) -> None:
    """400 naming the field for numbers the wire's int32 / float32 fields cannot hold as given (a float
    beyond float32's range would arrive as inf; an int beyond int32's would not arrive at all), for
    max_tokens under 1, and for top_k under -1 (-1 and 0: off). The finer rules (temperature >= 0,
    top_p in (0, 1], ...) are the LM service's (lm.sampling.SamplingParams)."""
    if max_tokens is not None and not 1 <= max_tokens <= _INT32_MAX:
        raise ApiError(400, f"{max_tokens_field} must be a positive integer (at most {_INT32_MAX}), got {max_tokens}",
                       param=max_tokens_field)
    if body.top_k is not None and not -1 <= body.top_k <= _INT32_MAX:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or a positive integer (at most {_INT32_MAX}), got "
                            f"{body.top_k}", param="top_k")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None and not abs(value) <= _FLOAT32_MAX:  # NaN fails this too
            raise ApiError(400, f"{name} must be a finite number within float32's range, got {value}", param=name)


def sampling_to_proto(body: _Sampling, *, max_tokens: int | None, default_max_tokens: int,
                      logprobs: int | None, max_tokens_field: str = "max_tokens") -> lm_pb2.SamplingParams:
    _check_ranges(body, max_tokens, max_tokens_field)
    message = lm_pb2.SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        max_new_tokens_within_context=max_tokens is not None,  # OpenAI's 400; unset: up to the context
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if getattr(body, name) is not None:
            setattr(message, name, getattr(body, name))
    if body.top_k == -1:
        message.top_k = 0  # vLLM's and many clients' "top-k off"
    if body.seed is not None:
        if not 0 <= body.seed < 2**63:
            raise ApiError(400, f"seed must be in [0, 2**63), got {body.seed}", param="seed")
        message.seed = body.seed
    if logprobs is not None:
        message.logprobs = logprobs
    if body.ignore_eos:
        message.stop_token_ids.SetInParent()  # set and empty: only max_tokens and stop strings end it
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.lstrip("-").isdigit()):
            raise ApiError(400, f"logit_bias keys are token ids, got {key[:20]!r}", param="logit_bias")
        message.logit_bias[int(key)] = bias
    _refuse_unsupported(body)
    return message


_UNSUPPORTED = {"min_tokens": 0, "prompt_logprobs": None, "audio": None, "prediction": None, "functions": None,
                "function_call": None}


def _refuse_unsupported(body: _Sampling) -> None:
    for name, unset in _UNSUPPORTED.items():
        if getattr(body, name) not in (unset, [], {}):  # empty lists, as some clients send, are unset too
            hint = "; use tools and tool_choice" if name.startswith("function") else ""
            raise ApiError(400, f"{name} is not supported by this server{hint}", param=name)
    if body.modalities is not None and set(body.modalities) - {"text"}:
        raise ApiError(400, "this server answers in text only (modalities: [\"text\"])", param="modalities")


def structured_output_to_proto(response_format: ResponseFormat | None, sampling: lm_pb2.SamplingParams) -> None:
    """`response_format` as the constraint of `sampling` (text: none)."""
    if response_format is None or response_format.type == "text":
        return
    if response_format.type == "json_object":
        sampling.structured_output.json_object = True
        return
    schema = response_format.json_schema
    if schema is None or schema.schema_ is None:
        raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    sampling.structured_output.json_schema = json.dumps(schema.schema_)


def pan_and_scan_to_proto(options: PanAndScan | None) -> tensor_pb2.PanAndScanOptions:
    message = tensor_pb2.PanAndScanOptions()
    if options is None:
        return message
    message.enabled = options.enabled
    for name in ("min_crop_size", "max_num_crops", "min_ratio_to_activate"):
        if getattr(options, name) is not None:
            setattr(message, name, getattr(options, name))
    return message


def template_kwargs_to_proto(kwargs: dict[str, Any] | None) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in (kwargs or {}).items()}


def with_seed(query: gateway_pb2.QueryRequest, index: int) -> gateway_pb2.QueryRequest:
    """The query of the `index`-th of n choices: its own seed (seed + index) when a seed is given, so
    that choices differ and each is reproducible."""
    if index == 0 or not query.sampling.HasField("seed"):
        return query
    copy = gateway_pb2.QueryRequest()
    copy.CopyFrom(query)
    copy.sampling.seed = (query.sampling.seed + index) % 2**63
    return copy

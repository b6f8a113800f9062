"""Protobuf <-> Python at the service edge: tensors, sampling parameters, Pan & Scan options, chat
messages. Nothing past this module sees a protobuf type."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from lm.prompt import text_bytes
from lm.sampling import SamplingParams, sampling_choices
from lm.structured import StructuredOutput
from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.lm.v1 import lm_pb2
from vision.pan_and_scan import PanAndScanConfig

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"tensor dtype {name} cannot travel; allowed: {', '.join(WIRE_DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,) row-major
    return tensor_pb2.Tensor(data=flat.view(torch.uint8).numpy().tobytes(), dtype=name, shape=list(tensor.shape))


def array_to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    if array.dtype != np.float32:
        raise ValueError(f"array dtype {array.dtype} cannot travel; use float32")
    return tensor_pb2.Tensor(data=np.ascontiguousarray(array).tobytes(), dtype="float32", shape=list(array.shape))


def tensor_from_proto(message: tensor_pb2.Tensor, what: str = "tensor") -> torch.Tensor:
    """A (copied, writable) torch tensor; ValueError naming `what` when dtype, shape and size disagree."""
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"{what}: dtype {message.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise ValueError(f"{what}: {len(message.data)} bytes of data for shape {shape} {message.dtype} "
                         f"({expected} bytes expected)")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)


def sampling_from_proto(message: lm_pb2.SamplingParams, defaults: dict | None = None) -> SamplingParams:
    """`defaults` (lm.sampling.checkpoint_sampling_defaults) fill temperature, top_k and top_p where the
    message leaves them unset; otherwise greedy / off. Raises ValueError (with every reason) for bad
    parameters."""
    given = {name: getattr(message, name) for name in ("temperature", "top_k", "top_p") if message.HasField(name)}
    return SamplingParams(
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else 128,
        **sampling_choices(defaults or {}, **given),
        seed=int(message.seed) if message.HasField("seed") else None,
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids.ids) if message.HasField("stop_token_ids") else None,
        thinking_budget=int(message.thinking_budget) if message.HasField("thinking_budget") else None,
        min_p=float(message.min_p), presence_penalty=float(message.presence_penalty),
        frequency_penalty=float(message.frequency_penalty),
        repetition_penalty=float(message.repetition_penalty) if message.HasField("repetition_penalty") else 1.0,
        logprobs=int(message.logprobs) if message.HasField("logprobs") else None,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in message.logit_bias.items())),
    )


def structured_output_from_proto(message: lm_pb2.SamplingParams) -> StructuredOutput | None:
    """The request's constraint (lm.structured), None when it has none. `json_object: false` is
    refused like an image part set to false: it sets the oneof, and reading it as "none" would guess."""
    if not message.HasField("structured_output"):
        return None
    output = message.structured_output
    kind = output.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output is set but names no constraint (json_schema, json_object, regex "
                         "or lark_grammar)")
    if kind == "json_object":
        if not output.json_object:
            raise ValueError("structured_output.json_object is false; leave structured_output unset for free text")
        return StructuredOutput("json_object")
    return StructuredOutput("lark" if kind == "lark_grammar" else kind, getattr(output, kind))


def logprob_to_proto(record, token_text) -> lm_pb2.TokenLogprob:
    """A TokenLogprob (lm.requests) as its message; `token_text(id)` gives a token's text."""
    return lm_pb2.TokenLogprob(
        token_id=record.token_id, token=token_text(record.token_id), logprob=record.logprob,
        top=[lm_pb2.TopLogprob(token_id=i, token=token_text(i), logprob=p) for i, p in record.top])


def sampling_to_proto(params: SamplingParams) -> lm_pb2.SamplingParams:
    message = lm_pb2.SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_k=params.top_k, top_p=params.top_p, stop=list(params.stop),
                                    min_p=params.min_p, presence_penalty=params.presence_penalty,
                                    frequency_penalty=params.frequency_penalty,
                                    repetition_penalty=params.repetition_penalty)
    if params.seed is not None:
        message.seed = params.seed
    if params.stop_token_ids is not None:
        message.stop_token_ids.ids.extend(params.stop_token_ids)
    if params.thinking_budget is not None:
        message.thinking_budget = params.thinking_budget
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    message.logit_bias.update(dict(params.logit_bias))
    return message


def pan_and_scan_from_proto(message: tensor_pb2.PanAndScanOptions) -> PanAndScanConfig:
    defaults = PanAndScanConfig()
    return PanAndScanConfig(
        enabled=bool(message.enabled),
        min_crop_size=message.min_crop_size if message.HasField("min_crop_size") else defaults.min_crop_size,
        max_num_crops=message.max_num_crops if message.HasField("max_num_crops") else defaults.max_num_crops,
        min_ratio_to_activate=(message.min_ratio_to_activate if message.HasField("min_ratio_to_activate")
                               else defaults.min_ratio_to_activate),
    )


def messages_from_proto(messages) -> list[dict[str, Any]]:
    """Chat messages in lm/prompt.py's form: [{role, content: [{type: text|image, ...}]}].

    A ContentPart is a text part when its `text` is set and an image part when its `image` is set to
    true (the next entry of the request's images goes there). `image: false` is refused, not read as
    "no image": it sets the oneof, so it is neither a text part nor an absent one, and guessing which
    the client meant would shift every later image by one. ValueError names the message and part."""
    result = []
    for index, message in enumerate(messages):
        parts = []
        for number, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
            elif kind == "image" and part.image:
                parts.append({"type": "image"})
            elif kind == "image":
                raise ValueError(f"message {index}, content part {number}: image is false; an image part sets "
                                 "image: true (the next of the request's images goes there), a text part sets text")
            else:
                raise ValueError(f"message {index}, content part {number}: neither text nor image is set")
        entry: dict[str, Any] = {"role": message.role, "content": parts}
        if message.tool_calls_json:
            entry["tool_calls"] = _tool_calls(message.tool_calls_json, index)
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.name:
            entry["name"] = message.name
        result.append(entry)
    return result


def request_text_bytes(request, messages=None) -> int:
    """The text a gateway or LM request carries (lm.prompt.text_bytes): its prompt, its tools and, once
    its chat `messages` are built (messages_from_proto), their texts and earlier tool calls."""
    calls = sum(len(message.tool_calls_json) for message in request.messages) if messages else 0
    return text_bytes(request.prompt, messages or ()) + text_bytes(request.tools_json) + calls


def _tool_calls(text: str, index: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls (OpenAI's JSON array), as the chat template reads them."""
    try:
        calls = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"message {index}: tool_calls_json is not valid JSON: {text[:60]!r}") from None
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise ValueError(f"message {index}: tool_calls_json must be a JSON array of tool call objects")
    return calls

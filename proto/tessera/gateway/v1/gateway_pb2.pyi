from proto.tessera.common.v1 import tensor_pb2 as _tensor_pb2
from proto.tessera.lm.v1 import lm_pb2 as _lm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryRequest(_message.Message):
    __slots__ = ("prompt", "images", "pan_and_scan", "sampling", "request_id", "raw", "chat_template_kwargs", "messages", "tools_json")
    class ChatTemplateKwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAN_AND_SCAN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    pan_and_scan: _tensor_pb2.PanAndScanOptions
    sampling: _lm_pb2.SamplingParams
    request_id: str
    raw: bool
    chat_template_kwargs: _containers.ScalarMap[str, str]
    messages: _containers.RepeatedCompositeFieldContainer[_lm_pb2.ChatMessage]
    tools_json: str
    def __init__(self, prompt: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., pan_and_scan: _Optional[_Union[_tensor_pb2.PanAndScanOptions, _Mapping]] = ..., sampling: _Optional[_Union[_lm_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., raw: _Optional[bool] = ..., chat_template_kwargs: _Optional[_Mapping[str, str]] = ..., messages: _Optional[_Iterable[_Union[_lm_pb2.ChatMessage, _Mapping]]] = ..., tools_json: _Optional[str] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "tiles_per_image", "encode_time_s", "time_to_first_token_s", "total_time_s", "token_ids", "reasoning_text", "reasoning_tokens", "reasoning_truncated", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TILES_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tiles_per_image: _containers.RepeatedScalarFieldContainer[int]
    encode_time_s: float
    time_to_first_token_s: float
    total_time_s: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    reasoning_text: str
    reasoning_tokens: int
    reasoning_truncated: bool
    logprobs: _containers.RepeatedCompositeFieldContainer[_lm_pb2.TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., tiles_per_image: _Optional[_Iterable[int]] = ..., encode_time_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., total_time_s: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., reasoning_text: _Optional[str] = ..., reasoning_tokens: _Optional[int] = ..., reasoning_truncated: _Optional[bool] = ..., logprobs: _Optional[_Iterable[_Union[_lm_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class QueryStreamResponse(_message.Message):
    __slots__ = ("text", "done", "reasoning", "logprob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    done: QueryResponse
    reasoning: bool
    logprob: _lm_pb2.TokenLogprob
    def __init__(self, text: _Optional[str] = ..., done: _Optional[_Union[QueryResponse, _Mapping]] = ..., reasoning: _Optional[bool] = ..., logprob: _Optional[_Union[_lm_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

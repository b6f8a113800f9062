"""`tessera.gateway.v1.GatewayService`: the user's entry point, image bytes + text in, text out.

It calls the vision service when images are present, then the language model. Both are reached
through small client objects: `Remote*` over gRPC (the services deployed apart; the caller's
deadline and token travel with each call) or `Local*` (the servicers in this process, `serve all`;
the call runs in the caller's task, so its deadline and cancellation apply directly).

A query is refused before any image is decoded or encoded when it is certainly too large: first from
its sizes (stop strings, text bytes, images; `lm.prompt.check_request_size`) and its request id, then
from its images' headers (tiles per image from `vision.pan_and_scan.num_tiles`, tiles per request),
then by the language model's CountTokens on the prompt with those tiles against its context.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from lm.prompt import (PromptLimits, RequestTooLarge, check_content_parts, check_request_size, count_images,
                       require_prompt)
from lm.requests import check_request_id
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from service.interceptors import BackendError
from service.vision_service import tiles_from_headers
from service.wire import messages_from_proto, pan_and_scan_from_proto, request_text_bytes
from vision.image import ImageLimits

SERVICE_NAME = "tessera.gateway.v1.GatewayService"


class LocalVision:
    def __init__(self, servicer):
        self.servicer = servicer

    async def encode(self, request, timeout):
        return await self.servicer.encode(request)


class LocalLanguageModel:
    def __init__(self, servicer):
        self.servicer = servicer

    async def generate_stream(self, request, timeout) -> AsyncIterator[lm_pb2.GenerateStreamResponse]:
        async for message in self.servicer.stream(request):
            yield message

    async def count_tokens(self, request, timeout) -> lm_pb2.CountTokensResponse:
        return await self.servicer.count_tokens(request)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


# A backend's status that is the request's own outcome (a bad image, a full queue, its deadline) goes
# back to the caller as it is; any other says the deployment is broken and names the backend.
_REQUEST_OUTCOMES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
})
_BACKEND_FAILURES = {  # status from the backend -> (status for the caller, what it means)
    grpc.StatusCode.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, "is unavailable"),
    grpc.StatusCode.UNAUTHENTICATED: (grpc.StatusCode.UNAVAILABLE, "refused the gateway's token"),
    grpc.StatusCode.PERMISSION_DENIED: (grpc.StatusCode.UNAVAILABLE, "refused the gateway's token"),
    grpc.StatusCode.UNIMPLEMENTED: (grpc.StatusCode.UNAVAILABLE, "does not serve this method (wrong target?)"),
}


def backend_error(error: grpc.aio.AioRpcError, backend: str, default_timeout: float | None = None) -> Exception:
    """The exception to raise for a failed call to `backend` ("LM service at host:port").
    `default_timeout`: the gateway's own deadline (s) on that call, when the caller set none; its expiry
    says the backend did not answer, so it names the backend."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and default_timeout is not None:
        return BackendError(code, f"{backend} did not finish within {default_timeout:g} s (the gateway's "
                                  "--backend-timeout, applied because the request set no deadline of its own)")
    if code in _REQUEST_OUTCOMES:
        return error
    status, meaning = _BACKEND_FAILURES.get(code, (grpc.StatusCode.INTERNAL, f"failed ({code.name})"))
    return BackendError(status, f"{backend} {meaning}: {error.details() or code.name}")


class _Remote:
    """What the two backend clients share: the token, the name in errors and the default deadline."""

    def __init__(self, metadata: tuple, name: str, default_timeout: float | None):
        self.metadata = metadata
        self.name = name
        self.default_timeout = default_timeout

    def _timeout(self, timeout: float | None) -> tuple[float | None, float | None]:
        """(deadline for the call, the default it came from or None when it is the caller's)."""
        if timeout is None and self.default_timeout is not None:
            return self.default_timeout, self.default_timeout
        return timeout, None


class RemoteVision(_Remote):
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple = (), name: str = "vision service",
                 default_timeout: float | None = None):
        """`name` names the backend in errors, e.g. "vision service at host:port"; `default_timeout`
        (s): the deadline of a call whose caller set none (None: no deadline)."""
        super().__init__(metadata, name, default_timeout)
        self.stub = vision_pb2_grpc.VisionServiceStub(channel)

    async def encode(self, request, timeout):
        timeout, default = self._timeout(timeout)
        try:
            return await self.stub.Encode(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, self.name, default) from None


class RemoteLanguageModel(_Remote):
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple = (), name: str = "LM service",
                 default_timeout: float | None = None):
        """`name` names the backend in errors, e.g. "LM service at host:port"; `default_timeout`
        (s): the deadline of a call whose caller set none (None: no deadline)."""
        super().__init__(metadata, name, default_timeout)
        self.stub = lm_pb2_grpc.LanguageModelServiceStub(channel)

    async def generate_stream(self, request, timeout) -> AsyncIterator[lm_pb2.GenerateStreamResponse]:
        timeout, default = self._timeout(timeout)
        call = self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)
        try:
            async for message in call:
                if message.HasField("done"):
                    # Let the LM end the call with its own status before the caller stops reading: a
                    # call cancelled here, after `done`, would count a success as CANCELLED on the LM.
                    await _finish(call)
                yield message
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, self.name, default) from None
        finally:
            call.cancel()  # no-op once finished; otherwise the LM frees the request's slot

    async def count_tokens(self, request, timeout) -> lm_pb2.CountTokensResponse:
        timeout, default = self._timeout(timeout)
        try:
            return await self.stub.CountTokens(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, self.name, default) from None


async def _finish(call, timeout: float = 5.0) -> None:
    """Read a stream whose final message has arrived to its end (its status follows at once), for at
    most `timeout` seconds; what comes after the final message changes nothing of the answer, so a
    failure or a stall there is ignored (the caller then cancels the call)."""
    async def drain() -> None:
        async for _ in call:
            pass
    try:
        await asyncio.wait_for(drain(), timeout)
    except (grpc.aio.AioRpcError, asyncio.TimeoutError):
        pass


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, vision, language_model, *, limits: PromptLimits = PromptLimits(),
                 image_limits: ImageLimits = ImageLimits()):
        """`vision` None: this deployment has no vision service; image queries are refused. `limits`: what
        one query may carry (ServeConfig.prompt_limits()); `image_limits`: the checks made on each image's
        header (those of the vision service)."""
        self.vision = vision
        self.language_model = language_model
        self.limits = limits
        self.image_limits = image_limits

    async def Query(self, request, context):
        done = None
        async for message in self.stream(request, context.time_remaining()):
            if message.HasField("done"):
                done = message.done
        return done

    async def QueryStream(self, request, context):
        async for message in self.stream(request, context.time_remaining()):
            yield message

    async def stream(self, request: gateway_pb2.QueryRequest, timeout: float | None
                     ) -> AsyncIterator[gateway_pb2.QueryStreamResponse]:
        started = time.perf_counter()
        deadline = None if timeout is None else started + timeout

        def remaining() -> float | None:  # what is left of the caller's deadline, passed downstream
            return None if deadline is None else max(deadline - time.perf_counter(), 0.001)

        check_request_id(request.request_id)
        messages = self._check_prompt(request)
        images, tiles = [], []
        if request.images:
            if self.vision is None:
                raise ValueError("this deployment has no vision service (the model is text-only); "
                                 "send text only or serve a vision-language checkpoint")
            tiles = await asyncio.to_thread(tiles_from_headers, [image.data for image in request.images],
                                            pan_and_scan_from_proto(request.pan_and_scan), self.image_limits)
            await self._check_prompt_fits(request, messages, tiles, remaining())
            encoded = await self.vision.encode(
                vision_pb2.EncodeRequest(images=request.images, pan_and_scan=request.pan_and_scan), remaining())
            images = [item.soft_tokens for item in encoded.images]
            tiles = [item.num_crops + 1 for item in encoded.images]
        encode_s = time.perf_counter() - started
        lm_request = lm_pb2.GenerateRequest(prompt=request.prompt, raw=request.raw, messages=request.messages,
                                            images=images, sampling=request.sampling, request_id=request.request_id,
                                            chat_template_kwargs=request.chat_template_kwargs,
                                            tools_json=request.tools_json)
        first_token_s = None
        async for message in self.language_model.generate_stream(lm_request, remaining()):
            if message.HasField("done"):
                done = message.done
                yield gateway_pb2.QueryStreamResponse(done=gateway_pb2.QueryResponse(
                    request_id=done.request_id, text=done.text, finish_reason=done.finish_reason,
                    prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                    tiles_per_image=tiles, encode_time_s=encode_s,
                    time_to_first_token_s=first_token_s or 0.0, total_time_s=time.perf_counter() - started,
                    token_ids=done.token_ids, reasoning_text=done.reasoning_text,
                    reasoning_tokens=done.reasoning_tokens, reasoning_truncated=done.reasoning_truncated,
                    logprobs=done.logprobs))
                return
            if first_token_s is None and message.HasField("token_id"):
                first_token_s = time.perf_counter() - started
            if message.text or message.HasField("logprob"):
                reply = gateway_pb2.QueryStreamResponse(text=message.text, reasoning=message.reasoning)
                if message.HasField("logprob"):
                    reply.logprob.CopyFrom(message.logprob)
                yield reply
        raise RuntimeError("the language model's stream ended without a final message")

    def _check_prompt(self, request: gateway_pb2.QueryRequest) -> list | None:
        """The cheap checks, before any image is read: a prompt or chat messages (their image parts match
        the images), then the text (prompt, messages, tools), the stop strings and the number of images
        against the limits. Returns the chat messages (lm/prompt.py's form), None for a prompt."""
        messages = None
        if request.messages:
            if request.prompt:
                raise ValueError("give either prompt or messages, not both")
            check_request_size(text_bytes=0, tiles_per_image=[1] * len(request.images), limits=self.limits,
                               messages=len(request.messages), stop=request.sampling.stop)
            check_content_parts([len(message.content) for message in request.messages], self.limits)
            messages = messages_from_proto(request.messages)
            parts = count_images(messages)
            if parts != len(request.images):
                raise ValueError(f"the messages have {parts} image part(s) for {len(request.images)} image(s); each "
                                 "image part takes the next of the request's images")
        else:
            require_prompt(request.prompt, raw=request.raw, num_images=len(request.images))
        check_request_size(text_bytes=request_text_bytes(request, messages), tiles_per_image=[1] * len(request.images),
                           limits=self.limits, stop=request.sampling.stop)
        return messages

    async def _check_prompt_fits(self, request: gateway_pb2.QueryRequest, messages: list | None, tiles: list[int],
                                 timeout) -> None:
        """RequestTooLarge unless the images' tiles are within the limits and the whole prompt, laid out
        by the language model with these tiles, fits its context."""
        check_request_size(text_bytes=request_text_bytes(request, messages), tiles_per_image=tiles, limits=self.limits,
                           stop=request.sampling.stop)
        counted = await self.language_model.count_tokens(
            lm_pb2.TokenizeRequest(prompt=request.prompt, raw=request.raw, messages=request.messages,
                                   image_tiles=tiles, chat_template_kwargs=request.chat_template_kwargs,
                                   tools_json=request.tools_json), timeout)
        if counted.count > counted.max_prompt_tokens:
            raise RequestTooLarge(f"prompt is {counted.count} tokens with its images' {sum(tiles)} tiles "
                                  f"({', '.join(map(str, tiles))}); the limit is {counted.max_prompt_tokens} tokens")

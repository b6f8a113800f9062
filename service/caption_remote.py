"""Batch captioning through a running gateway (`tessera caption --target HOST:PORT`): the services
decode, encode and batch; this side keeps `concurrency` calls in flight and turns answers into the
same records as the in-process captioner (service/caption.py)."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Sequence

from service.caption import (
    CaptionInputError, CaptionItem, CaptionOptions, default_params, error_record, escape_undecodable,
)


class ServiceUnavailable(Exception):
    """The gateway (or a service behind it) stayed UNAVAILABLE through every retry. Not the image's
    failure: it gets no record, so that a later run captions it. (RESOURCE_EXHAUSTED is retried too, but
    it also answers a message over the size limit, which is the image's: that one still gets a record.)"""


class RemoteCaptioner:
    """Captions through `tessera serve gateway` (or `all`) at `target`: `concurrency` calls in flight;
    the services decode, encode and batch. Overload and unavailability are retried with backoff; if
    unavailability outlasts the retries, the job stops (`run` raises ServiceUnavailable) rather than
    writing an error record for each image left. Any other failure becomes the image's error record:
    its code the image's own (ImageError's, named at the end of the vision service's message) or else
    the gRPC status."""

    _RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __init__(self, target: str, options: CaptionOptions, *, auth_token: str | None = None,
                 timeout_s: float = 600.0, retries: int = 5, max_message_mb: int = 64):
        self.target, self.options = target, options
        self.params = options.params or default_params()
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self.timeout_s, self.retries, self.max_message_mb = timeout_s, retries, max_message_mb

    def check_model_sees_images(self, timeout_s: float = 30.0) -> None:
        """Before any image: ask GetInfo (`tessera serve all` serves it beside the gateway), retrying for
        up to `timeout_s` while no server answers or it is still loading (UNAVAILABLE). Raises
        CaptionInputError when none is ready in that time, when it refuses the token, or when it serves a
        text-only model: every image would fail, and its error record would be skipped by the next run. A
        gateway without the LM service beside it (UNIMPLEMENTED) is left to the job's own calls."""
        import grpc

        from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
            while True:
                try:
                    info = stub.GetInfo(lm_pb2.GetInfoRequest(), metadata=self.metadata, wait_for_ready=True,
                                        timeout=max(deadline - time.monotonic(), 0.1))
                    break
                except grpc.RpcError as error:
                    code = error.code()
                    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        raise CaptionInputError(f"the server at {self.target} refused this job's token ({code.name}: "
                                                f"{error.details()}); set TESSERA_AUTH_TOKEN or --auth-token-file"
                                                ) from None
                    if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                        return
                    if time.monotonic() >= deadline:
                        raise CaptionInputError(f"no server was ready at {self.target} within {timeout_s:g} s (last "
                                                f"answer {code.name}: {error.details()}): is --target right and the "
                                                "server up?") from None
                    time.sleep(1.0)  # a server still loading its model answers UNAVAILABLE
        if not info.accepts_images:
            raise CaptionInputError(f"the model served at {self.target} ({info.model or 'unnamed'}) is text-only "
                                    "(GetInfo: accepts_images=false): it cannot caption images; point --target at "
                                    "a gateway serving a vision-language checkpoint")

    def run(self, items: Sequence[CaptionItem], emit: Callable[[dict], None]) -> None:
        """Caption `items`, calling `emit` with each record as it comes. Raises ServiceUnavailable once the
        calls in flight have ended, when the gateway stayed unavailable through a call's retries: no new
        call is made after that, and the images not captioned get no record."""
        import grpc

        from proto.tessera.gateway.v1 import gateway_pb2_grpc

        limit = self.max_message_mb << 20
        channel = grpc.insecure_channel(self.target, [("grpc.max_send_message_length", limit),
                                                      ("grpc.max_receive_message_length", limit)])
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        pending = iter(items)
        outage: ServiceUnavailable | None = None
        try:
            with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="caption-call") as pool:
                running = set()
                while True:
                    while outage is None and len(running) < self.options.concurrency:
                        item = next(pending, None)
                        if item is None:
                            break
                        running.add(pool.submit(self._caption, stub, item))
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            emit(future.result())
                        except ServiceUnavailable as error:
                            outage = outage or error
        finally:
            channel.close()
        if outage is not None:
            raise ServiceUnavailable(f"the gateway at {self.target} could not take the work through {self.retries} "
                                     f"retries ({outage}): the job stopped; the images without a record are "
                                     "captioned when it runs again with the same --out")

    def _request(self, data: bytes):
        from proto.tessera.common.v1 import tensor_pb2
        from proto.tessera.gateway.v1 import gateway_pb2
        from proto.tessera.lm.v1 import lm_pb2

        p = self.params
        sampling = lm_pb2.SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k,
                                         top_p=p.top_p, stop=list(p.stop))
        if p.seed is not None:
            sampling.seed = p.seed
        if p.stop_token_ids is not None:
            sampling.stop_token_ids.ids.extend(p.stop_token_ids)
        return gateway_pb2.QueryRequest(prompt=self.options.prompt, images=[tensor_pb2.Image(data=data)],
                                        sampling=sampling,
                                        pan_and_scan=tensor_pb2.PanAndScanOptions(enabled=self.options.pan_and_scan))

    def _caption(self, stub, item: CaptionItem) -> dict:
        import grpc

        from vision.image import ImageError, read_image_file

        started = time.perf_counter()
        try:  # a regular file that fits in one message (the gateway checks the image itself)
            data = read_image_file(item.path, self.max_message_mb << 20)
        except ImageError as error:
            return error_record(item, error.code, escape_undecodable(str(error)))
        request = self._request(data)
        for attempt in range(self.retries + 1):
            try:
                response = stub.Query(request, timeout=self.timeout_s, metadata=self.metadata)
                break
            except grpc.RpcError as error:
                status = error.code()
                if status.name in self._RETRYABLE and attempt < self.retries:
                    time.sleep(min(30.0, 0.5 * 2 ** attempt))
                    continue
                if status == grpc.StatusCode.UNAVAILABLE:
                    raise ServiceUnavailable(f"UNAVAILABLE: {error.details() or 'no details'}") from None
                details, code = error.details() or status.name, status.name.lower()
                # the vision service ends a refused image's message with its ImageError code ("... (truncated)"):
                # the record takes that code, as the in-process captioner's record does
                named = details.rsplit("(", 1)[-1][:-1] if details.endswith(")") else ""
                if status == grpc.StatusCode.INVALID_ARGUMENT and named in ImageError.CODES:
                    code = named
                return error_record(item, code, details, {"total_s": round(time.perf_counter() - started, 4)})
        tiles = list(response.tiles_per_image)
        return {"id": item.id, "path": item.path, "caption": response.text.strip(),
                "num_crops": tiles[0] - 1 if tiles else 0, "finish_reason": response.finish_reason,
                "tokens": {"prompt": response.prompt_tokens, "generated": response.completion_tokens},
                "timings": {"encode_s": round(response.encode_time_s, 4),
                            "first_token_s": round(response.time_to_first_token_s, 4),
                            "generate_s": round(response.total_time_s, 4),
                            "total_s": round(time.perf_counter() - started, 4)}}

"""`tessera.vision.v1.VisionService`: images -> tiles -> soft tokens, with a soft-token cache.

Decoding, tiling and the encoder run on worker threads (never on the event loop). A bad image fails
the whole call with INVALID_ARGUMENT naming the image, the reason and its code.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from service.interceptors import NotReady
from service.wire import array_to_proto, pan_and_scan_from_proto, tensor_to_proto
from vision.cache import SoftTokenCache, cache_key
from vision.image import ImageError, ImageLimits
from vision.preprocess import TILE_SIZE, preprocess_batch

SERVICE_NAME = "tessera.vision.v1.VisionService"


class BadImage(ValueError):
    """An image the service refuses; the message names it, the reason and the reason's code."""


@dataclass
class LoadedVision:
    encoder: object  # vision.encoder.VisionEncoder


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, load: Callable[[], LoadedVision | None], *, model_name: str, max_message_bytes: int,
                 limits: ImageLimits = ImageLimits(), cache_bytes: int = 256 << 20, metrics=None,
                 workers: int = 2):
        """`load` (blocking, run on a worker thread) returns None when the model has no vision tower
        (`serve all` on a text-only model): Encode is then refused with that reason."""
        self._load = load
        self.text_only = False
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.limits = limits
        self.cache = SoftTokenCache(cache_bytes)
        self.metrics = metrics
        self.loaded: LoadedVision | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vision-preprocess")
        self._encode_lock = threading.Lock()  # one forward pass at a time; it uses every core anyway
        if metrics is not None:
            metrics.gauge("tessera_encoder_cache_hits", "soft-token cache hits", lambda: self.cache.stats().hits)
            metrics.gauge("tessera_encoder_cache_misses", "soft-token cache misses", lambda: self.cache.stats().misses)
            metrics.gauge("tessera_encoder_cache_bytes", "bytes held by the soft-token cache",
                          lambda: self.cache.stats().bytes_used)

    async def load(self) -> LoadedVision | None:
        self.loaded = await asyncio.to_thread(self._load)
        self.text_only = self.loaded is None
        return self.loaded

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ready(self) -> LoadedVision:
        if self.text_only:
            raise ValueError(f"model {self.model_name} is text-only (no vision tower): images need a Gemma 3 "
                             "vision-language checkpoint")
        if self.loaded is None:
            raise NotReady(f"the vision model {self.model_name} is still loading; retry shortly")
        return self.loaded

    # ----- RPCs ---------------------------------------------------------------------------------

    async def Preprocess(self, request, context):
        results = await self._preprocess([image.data for image in request.images],
                                         pan_and_scan_from_proto(request.pan_and_scan))
        response = vision_pb2.PreprocessResponse()
        for result in results:
            item = response.images.add(tiles=array_to_proto(result.tiles), num_crops=result.num_crops,
                                       width=result.width, height=result.height)
            for x0, y0, x1, y1 in result.boxes:
                item.crop_boxes.add(x0=x0, y0=y0, x1=x1, y1=y1)
        return response

    async def Encode(self, request, context):
        return await self.encode(request)

    async def GetInfo(self, request, context):
        loaded = self._ready()
        config = loaded.encoder.config
        return vision_pb2.VisionInfo(
            model=loaded.encoder.identity, d_model=config.d_model, tokens_per_tile=config.mm_tokens_per_image,
            image_size=config.image_size, dtype=str(loaded.encoder.options.dtype).removeprefix("torch."),
            max_image_bytes=self.limits.max_bytes, max_image_pixels=self.limits.max_pixels,
            formats=sorted(self.limits.formats), max_message_bytes=self.max_message_bytes,
        )

    # ----- the work, shared with the in-process gateway -------------------------------------------

    async def encode(self, request: vision_pb2.EncodeRequest) -> vision_pb2.EncodeResponse:
        loaded = self._ready()
        encoder = loaded.encoder
        pan_and_scan = pan_and_scan_from_proto(request.pan_and_scan)
        params = {**asdict(pan_and_scan), "size": encoder.config.image_size}
        keys = [cache_key(image.data, params, encoder.identity) for image in request.images]
        soft_tokens: list[torch.Tensor | None] = [self.cache.get(key) for key in keys]
        hits = [t is not None for t in soft_tokens]
        missing = [i for i, t in enumerate(soft_tokens) if t is None]
        if missing:
            results = await self._preprocess([request.images[i].data for i in missing], pan_and_scan, missing)
            tiles = [torch.from_numpy(r.tiles) for r in results]
            encoded = await asyncio.to_thread(self._encode_locked, encoder, tiles)
            for index, value in zip(missing, encoded):
                soft_tokens[index] = value
                self.cache.put(keys[index], value)
            if self.metrics is not None:
                self.metrics.images_encoded.inc(len(missing))
        response = vision_pb2.EncodeResponse()
        for key, value, hit in zip(keys, soft_tokens, hits):
            response.images.add(soft_tokens=tensor_to_proto(value), num_crops=value.shape[0] - 1,
                                cache_key=key, cache_hit=hit)
        return response

    async def _preprocess(self, sources: list[bytes], pan_and_scan, indices: list[int] | None = None):
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            None, lambda: preprocess_batch(sources, pan_and_scan, limits=self.limits, size=TILE_SIZE,
                                           num_workers=2, executor=self._pool))
        indices = list(range(len(sources))) if indices is None else indices
        for index, result in zip(indices, results):
            if isinstance(result, ImageError):
                raise BadImage(f"image {index}: {result} ({result.code})")
        return results

    def _encode_locked(self, encoder, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._encode_lock:
            return encoder.encode_many(tiles)

"""`tessera.vision.v1.VisionService`: images -> tiles -> soft tokens, with a soft-token cache.

Every request is sized before any work, from its images' headers: at most `max_images` images and
`max_tiles` tiles (originals plus Pan & Scan crops; the gateway's own limits, `--max-images`,
`--max-tiles`), and a reply that fits the server's max message size (a Preprocess tile is 9.6 MB of
float32 pixels). An over-large request is INVALID_ARGUMENT naming the limit, before any image is
decoded. Header reading, hashing, decoding, tiling, the encoder and building the reply run on worker
threads (never on the event loop). A bad image fails the whole call with INVALID_ARGUMENT naming the
image, the reason and its code.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from lm.prompt import PromptLimits, RequestTooLarge, check_request_size
from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from service.interceptors import NotReady
from service.wire import array_to_proto, pan_and_scan_from_proto, tensor_to_proto
from vision.cache import SoftTokenCache, cache_key
from vision.image import ImageError, ImageLimits, image_size
from vision.pan_and_scan import PanAndScanConfig, num_tiles
from vision.preprocess import TILE_SIZE, preprocess_batch

SERVICE_NAME = "tessera.vision.v1.VisionService"

# Protobuf framing around each image's tensor in a reply (field tags, lengths, shape, dtype name, crop
# boxes, cache key), bounded from above so that a reply estimated to fit always does.
_REPLY_BYTES_PER_IMAGE = 256
_REPLY_BYTES_PER_TILE = 32


class BadImage(ValueError):
    """An image the service refuses; the message names it, the reason and the reason's code."""


@dataclass
class LoadedVision:
    encoder: object  # vision.encoder.VisionEncoder


def tiles_from_headers(sources: list[bytes], pan_and_scan: PanAndScanConfig, limits: ImageLimits) -> list[int]:
    """Tiles (1 + Pan & Scan crops) of each image from its header alone, nothing decoded (the count
    preprocessing gives: EXIF orientation swaps the sides at most). Raises BadImage naming the image
    for one refused on its header (size, format, pixel count)."""
    tiles = []
    for index, data in enumerate(sources):
        try:
            width, height = image_size(data, limits)
        except ImageError as error:
            raise BadImage(f"image {index}: {error} ({error.code})") from None
        tiles.append(num_tiles(width, height, pan_and_scan))
    return tiles


def check_reply_size(tiles_per_image: list[int], tile_bytes: int, max_message_bytes: int, method: str) -> None:
    """RequestTooLarge naming the sizes unless a reply carrying `tiles_per_image` tiles of `tile_bytes`
    payload bytes each fits in `max_message_bytes` (the server's max message size)."""
    tiles = sum(tiles_per_image)
    size = tiles * (tile_bytes + _REPLY_BYTES_PER_TILE) + len(tiles_per_image) * _REPLY_BYTES_PER_IMAGE
    if size > max_message_bytes:
        fit = max((max_message_bytes - _REPLY_BYTES_PER_IMAGE) // (tile_bytes + _REPLY_BYTES_PER_TILE), 0)
        raise RequestTooLarge(
            f"the {method} reply would be {size:,} bytes ({tiles} tiles of {tile_bytes:,} bytes), over the server's "
            f"max message size of {max_message_bytes:,} bytes (--max-message-mb); at most {fit} tiles fit in one "
            f"{method} reply: send fewer images or fewer Pan & Scan crops per request")


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, load: Callable[[], LoadedVision | None], *, model_name: str, max_message_bytes: int,
                 limits: ImageLimits = ImageLimits(), request_limits: PromptLimits = PromptLimits(),
                 cache_bytes: int = 256 << 20, metrics=None, workers: int = 2):
        """`load` (blocking, run on a worker thread) returns None when the model has no vision tower
        (`serve all` on a text-only model): Encode is then refused with that reason. `limits`: the checks
        made on each image; `request_limits`: images and tiles per request (ServeConfig.prompt_limits(),
        the gateway's); `max_message_bytes`: the largest reply Preprocess and Encode may send."""
        self._load = load
        self.text_only = False
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.limits = limits
        self.request_limits = request_limits
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
        sources = [image.data for image in request.images]
        pan_and_scan = pan_and_scan_from_proto(request.pan_and_scan)
        tiles = await self._plan(sources, pan_and_scan)
        check_reply_size(tiles, 3 * TILE_SIZE * TILE_SIZE * 4, self.max_message_bytes, "Preprocess")  # float32
        results = await self._preprocess(sources, pan_and_scan)
        return await asyncio.to_thread(_preprocess_reply, results)  # copies up to the max message size

    async def Encode(self, request, context):
        return await self.encode(request, max_reply_bytes=self.max_message_bytes)

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

    async def encode(self, request: vision_pb2.EncodeRequest, *,
                     max_reply_bytes: int | None = None) -> vision_pb2.EncodeResponse:
        """Soft tokens for the request's images. `max_reply_bytes`: refuse (RequestTooLarge) a request
        whose reply would be larger, before any work; None for the in-process gateway, whose reply never
        travels."""
        loaded = self._ready()
        encoder = loaded.encoder
        pan_and_scan = pan_and_scan_from_proto(request.pan_and_scan)
        sources = [image.data for image in request.images]
        tiles = await self._plan(sources, pan_and_scan)
        if max_reply_bytes is not None:
            config = encoder.config
            itemsize = torch.empty((), dtype=encoder.options.dtype).element_size()
            check_reply_size(tiles, config.mm_tokens_per_image * config.d_model * itemsize, max_reply_bytes, "Encode")
        params = {**asdict(pan_and_scan), "size": encoder.config.image_size}
        keys = await asyncio.to_thread(lambda: [cache_key(data, params, encoder.identity) for data in sources])
        soft_tokens: list[torch.Tensor | None] = [self.cache.get(key) for key in keys]
        hits = [t is not None for t in soft_tokens]
        missing = [i for i, t in enumerate(soft_tokens) if t is None]
        if missing:
            # The same image twice in one request (a chat that shows it again) is encoded once.
            firsts, seen = [], set()
            for index in missing:
                if keys[index] not in seen:
                    seen.add(keys[index])
                    firsts.append(index)
            results = await self._preprocess([sources[i] for i in firsts], pan_and_scan, firsts)
            encoded = await asyncio.to_thread(self._encode_locked, encoder,
                                              [torch.from_numpy(r.tiles) for r in results])
            by_key = {keys[index]: value for index, value in zip(firsts, encoded)}
            for key, value in by_key.items():
                self.cache.put(key, value)
            for index in missing:
                soft_tokens[index] = by_key[keys[index]]
            if self.metrics is not None:
                self.metrics.images_encoded.inc(len(firsts))
        return await asyncio.to_thread(_encode_reply, keys, soft_tokens, hits)

    async def _plan(self, sources: list[bytes], pan_and_scan: PanAndScanConfig) -> list[int]:
        """Tiles per image from the headers, after refusing a request over the per-request limits:
        the number of images first (nothing read), then the tiles (headers only)."""
        if not sources:
            raise ValueError("the request has no images; give at least one in `images`")
        check_request_size(text_bytes=0, tiles_per_image=[1] * len(sources), limits=self.request_limits)
        tiles = await asyncio.to_thread(tiles_from_headers, sources, pan_and_scan, self.limits)
        check_request_size(text_bytes=0, tiles_per_image=tiles, limits=self.request_limits)
        return tiles

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


def _preprocess_reply(results) -> vision_pb2.PreprocessResponse:
    response = vision_pb2.PreprocessResponse()
    for result in results:
        item = response.images.add(tiles=array_to_proto(result.tiles), num_crops=result.num_crops,
                                   width=result.width, height=result.height)
        for x0, y0, x1, y1 in result.boxes:
            item.crop_boxes.add(x0=x0, y0=y0, x1=x1, y1=y1)
    return response


def _encode_reply(keys: list[str], soft_tokens: list[torch.Tensor], hits: list[bool]) -> vision_pb2.EncodeResponse:
    response = vision_pb2.EncodeResponse()
    for key, value, hit in zip(keys, soft_tokens, hits):
        response.images.add(soft_tokens=tensor_to_proto(value), num_crops=value.shape[0] - 1,
                            cache_key=key, cache_hit=hit)
    return response

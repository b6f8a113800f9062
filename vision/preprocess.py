"""Pan & Scan tiling: an RGB image in, `PreprocessedImage` (float32 tiles in [-1, 1]) out.

Matches the reference `Gemma3ImageProcessorPil` (size 896, BILINEAR, rescale 1/255, mean = std = 0.5):
every tile is cropped and resized from the uint8 image with Pillow's BILINEAR arithmetic, reproduced bit
for bit by `vision.resample` (compiled, GIL-free, several times faster than Pillow's own loop), so the
uint8 tiles are identical to the reference's. The reference then rescales in float64 and normalises in
float32; here both steps are one fused float32 op, x * (2/255) - 1, which differs from the reference by
at most a couple of float32 ulps (< 1e-6).

`preprocess_batch` spreads decoding and per-tile work over a thread pool; the pixels of an image are
read once and every tile is cut from them without copies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vision.image import ImageError, ImageLimits, load_image
from vision.pan_and_scan import Box, PanAndScanConfig, plan_crops
from vision.resample import ResizeSource, prepare_source, resize_bilinear

TILE_SIZE = 896  # SigLIP So400m/14 input side
_SCALE = np.float32(2.0 / 255.0)  # rescale (1/255) and normalise ((x - 0.5) / 0.5) fused


@dataclass(frozen=True, eq=False)
class PreprocessedImage:
    tiles: np.ndarray  # float32 (1 + num_crops, 3, size, size) in [-1, 1]: the original, then crops row-major
    num_crops: int  # Pan & Scan crops (0 when none apply)
    boxes: tuple[Box, ...]  # crop boxes (x0, y0, x1, y1) in source pixels, one per crop
    width: int  # source width after EXIF orientation
    height: int  # source height after EXIF orientation

    def __post_init__(self) -> None:
        tiles = self.tiles
        if tiles.dtype != np.float32 or tiles.ndim != 4 or tiles.shape[1] != 3 or tiles.shape[2] != tiles.shape[3]:
            raise ValueError(f"tiles must be float32 (1 + k, 3, S, S), got {tiles.dtype} {tiles.shape}")
        if tiles.shape[0] != 1 + self.num_crops or len(self.boxes) != self.num_crops:
            raise ValueError(
                f"{tiles.shape[0]} tiles and {len(self.boxes)} boxes do not match num_crops={self.num_crops}"
            )


def preprocess(image: Image.Image, pan_and_scan: PanAndScanConfig, *, size: int = TILE_SIZE) -> PreprocessedImage:
    """Tile one decoded RGB image (see `load_image`): the whole image, then its Pan & Scan crops."""
    boxes, source = _prepare(image, pan_and_scan, size)
    tiles = np.empty((1 + len(boxes), 3, size, size), dtype=np.float32)  # (1 + k, C, H, W)
    for index, box in enumerate(_tile_boxes(image, boxes)):
        _render_tile(source, box, size, tiles[index])
    return PreprocessedImage(tiles, len(boxes), tuple(boxes), image.width, image.height)


def preprocess_batch(
    sources: Sequence[bytes | str | os.PathLike | Image.Image],
    pan_and_scan: PanAndScanConfig,
    *,
    limits: ImageLimits = ImageLimits(),
    size: int = TILE_SIZE,
    num_workers: int = 2,
    executor: Executor | None = None,
) -> list[PreprocessedImage | ImageError]:
    """Decode (bytes, paths) and tile many images on a thread pool; results in input order.

    A source that fails to load gives its `ImageError` in place of a result. Decoded `PIL.Image`s are
    taken as they are and must be RGB. Pass `executor` (with `num_workers` threads) to reuse a pool
    across calls."""
    if executor is None:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="preprocess") as pool:
            return preprocess_batch(sources, pan_and_scan, limits=limits, size=size, executor=pool)

    def decode(source):
        image = source if isinstance(source, Image.Image) else load_image(source, limits)
        return (image, *_prepare(image, pan_and_scan, size))

    # At most `lookahead` decodes are in flight, so decoded images never pile up in memory. Each image's
    # tile jobs are queued as soon as its own decode finishes, whatever the order, so a large photo's
    # decode does not hold back the tiling of the images after it.
    sources = list(sources)
    lookahead = 2 * num_workers
    results: list[PreprocessedImage | ImageError | None] = [None] * len(sources)
    decoding: dict[Future, int] = {}
    tile_jobs: list[Future] = []
    next_index = 0
    while next_index < len(sources) or decoding:
        while next_index < len(sources) and len(decoding) < lookahead:
            decoding[executor.submit(decode, sources[next_index])] = next_index
            next_index += 1
        finished, _ = wait(decoding, return_when=FIRST_COMPLETED)
        for future in finished:
            index = decoding.pop(future)
            try:
                image, boxes, resize_source = future.result()
            except ImageError as error:
                results[index] = error
                continue
            tiles = np.empty((1 + len(boxes), 3, size, size), dtype=np.float32)  # (1 + k, C, H, W)
            for tile, box in enumerate(_tile_boxes(image, boxes)):
                tile_jobs.append(executor.submit(_render_tile, resize_source, box, size, tiles[tile]))
            results[index] = PreprocessedImage(tiles, len(boxes), tuple(boxes), image.width, image.height)
    for job in tile_jobs:
        job.result()  # re-raises a tiling failure (a bug, not a bad image)
    return results


def _prepare(image: Image.Image, pan_and_scan: PanAndScanConfig, size: int) -> tuple[list[Box], ResizeSource]:
    if image.mode != "RGB":
        raise ValueError(f"preprocess needs an RGB image, got mode {image.mode!r}; load it with vision.image.load_image")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tile size must be a positive integer, got {size!r}")
    boxes = plan_crops(image.width, image.height, pan_and_scan)
    pixels = np.asarray(image)  # (H, W, C) uint8: the one copy out of Pillow; tiles are windows into it
    return boxes, prepare_source(pixels, _tile_boxes(image, boxes), size)


def _tile_boxes(image: Image.Image, crops: list[Box]) -> list[Box]:
    return [(0, 0, image.width, image.height), *crops]


def _render_tile(source: ResizeSource, box: Box, size: int, out: np.ndarray) -> None:
    """Crop, resize and normalise one tile into `out` (3, size, size)."""
    pixels = resize_bilinear(source, box, size)  # (H, W, C) uint8, identical to Pillow's
    np.multiply(pixels.transpose(2, 0, 1), _SCALE, out=out, dtype=np.float32)  # (C, H, W)
    np.subtract(out, np.float32(1.0), out=out)

"""Pan & Scan tiling: an RGB image in, `PreprocessedImage` (float32 tiles in [-1, 1]) out.

Matches the reference `Gemma3ImageProcessorPil` (size 896, BILINEAR, rescale 1/255, mean = std = 0.5):
every tile is cropped and resized from the uint8 image with Pillow's BILINEAR filter (antialiased when
shrinking), exactly as the reference resizes, so the uint8 tiles are bit-identical. The reference then
rescales in float64 and normalises in float32; here both steps are one fused float32 op,
x * (2/255) - 1, which differs from the reference by at most a couple of float32 ulps (< 1e-6).

Cost is dominated by Pillow's resize (about 80% of the CPU time), which releases the GIL:
`preprocess_batch` spreads decode and per-tile work over a thread pool. An opt-in fast path
(`exact=False`) swaps Pillow's resize for torch's vectorised one at a measured cost in exactness.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
from PIL import Image

from vision.image import ImageError, ImageLimits, load_image
from vision.pan_and_scan import Box, PanAndScanConfig, plan_crops

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


def preprocess(
    image: Image.Image, pan_and_scan: PanAndScanConfig, *, size: int = TILE_SIZE, exact: bool = True
) -> PreprocessedImage:
    """Tile one decoded RGB image (see `load_image`): the whole image, then its Pan & Scan crops.

    `exact=False` resizes with torch's vectorised antialiased bilinear kernel instead of Pillow's:
    several times faster, but its 16-bit fixed-point weights put some pixels 1/255 off the reference
    (tiles within 2/255 ≈ 0.0079 instead of 1e-5; see BENCHMARKS.md)."""
    boxes, tiles = _plan(image, pan_and_scan, size)
    source = _tile_source(image, exact)
    for index, box in enumerate((None, *boxes)):
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
    exact: bool = True,
) -> list[PreprocessedImage | ImageError]:
    """Decode (bytes, paths) and tile many images on a thread pool; results in input order.

    A source that fails to load gives its `ImageError` in place of a result. Decoded `PIL.Image`s are
    taken as they are and must be RGB. Pass `executor` (with `num_workers` threads) to reuse a pool
    across calls. `exact` as in `preprocess`."""
    if executor is None:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="preprocess") as pool:
            return preprocess_batch(sources, pan_and_scan, limits=limits, size=size, executor=pool, exact=exact)

    # Decodes run at most `lookahead` images ahead of tiling, so decoded images never pile up in memory;
    # tile jobs are queued as each decode finishes and overlap the next decodes.
    lookahead = 2 * num_workers
    pending = iter(sources)
    decoding: deque[Future] = deque(
        executor.submit(_decoded, source, limits, exact) for source in islice(pending, lookahead)
    )
    results: list[PreprocessedImage | ImageError] = []
    tile_jobs: list[Future] = []
    while decoding:
        future = decoding.popleft()
        for source in islice(pending, 1):
            decoding.append(executor.submit(_decoded, source, limits, exact))
        try:
            image, tile_source = future.result()
        except ImageError as error:
            results.append(error)
            continue
        boxes, tiles = _plan(image, pan_and_scan, size)
        for index, box in enumerate((None, *boxes)):
            tile_jobs.append(executor.submit(_render_tile, tile_source, box, size, tiles[index]))
        results.append(PreprocessedImage(tiles, len(boxes), tuple(boxes), image.width, image.height))
    for job in tile_jobs:
        job.result()  # re-raises a tiling failure (a bug, not a bad image)
    return results


def _decoded(source, limits: ImageLimits, exact: bool) -> tuple[Image.Image, Image.Image | np.ndarray]:
    if isinstance(source, Image.Image):
        image = source
        image.load()  # here, once: tile jobs share the image and must not race on a lazy load
    else:
        image = load_image(source, limits)
    return image, _tile_source(image, exact)


def _tile_source(image: Image.Image, exact: bool) -> Image.Image | np.ndarray:
    """What tiles are cut from: the Pillow image (exact), or its pixels, copied once, for torch (fast)."""
    if exact or image.mode != "RGB":
        return image
    return np.array(image)  # (H, W, C) uint8, writable for torch.from_numpy; crops become views


def _plan(image: Image.Image, pan_and_scan: PanAndScanConfig, size: int) -> tuple[list[Box], np.ndarray]:
    if image.mode != "RGB":
        raise ValueError(f"preprocess needs an RGB image, got mode {image.mode!r}; load it with vision.image.load_image")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tile size must be a positive integer, got {size!r}")
    boxes = plan_crops(image.width, image.height, pan_and_scan)
    return boxes, np.empty((1 + len(boxes), 3, size, size), dtype=np.float32)  # (1 + k, C, H, W)


def _render_tile(source: Image.Image | np.ndarray, box: Box | None, size: int, out: np.ndarray) -> None:
    """Crop, resize and normalise one tile into `out` (3, size, size)."""
    if isinstance(source, np.ndarray):
        pixels = _resize_fast(source, box, size)
    else:
        # Crop, then resize: `resize(box=...)` would let the filter read pixels beyond the crop's edges,
        # which the reference (crop, then resize) does not.
        tile = source if box is None else source.crop(box)
        pixels = np.asarray(tile.resize((size, size), Image.Resampling.BILINEAR))  # (H, W, C) uint8
    np.multiply(pixels.transpose(2, 0, 1), _SCALE, out=out, dtype=np.float32)  # (C, H, W)
    np.subtract(out, np.float32(1.0), out=out)


def _resize_fast(pixels: np.ndarray, box: Box | None, size: int) -> np.ndarray:
    import torch
    from torch.nn import functional as F

    if box is not None:
        x0, y0, x1, y1 = box
        pixels = pixels[y0:y1, x0:x1]  # a view: no copy
    batch = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last strides
    resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()  # (H, W, C) uint8

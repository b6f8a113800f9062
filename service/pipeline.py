"""Images to soft tokens for a prompt: decode and validate, Pan & Scan, SigLIP encode.

Shared by `tessera generate`, the batch captioner and the in-process gateway, so every entry point
treats images the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vision.image import ImageError, ImageLimits, image_size
from vision.pan_and_scan import PanAndScanConfig, num_tiles


class ImageInputError(ValueError):
    """Images were given that this model or these inputs cannot take; the message says why."""


@dataclass(frozen=True)
class EncodedImages:
    soft_tokens: torch.Tensor | None  # (total tiles, tokens_per_tile, hidden), images in order; None if none
    tiles_per_image: tuple[int, ...]  # tiles (1 + crops) of each image
    seconds: float  # decode + preprocess + encode time


def has_vision_tower(checkpoint_dir: Path) -> bool:
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    return isinstance(config.get("vision_config"), dict)


def plan_tiles(sources: Sequence[str | Path | bytes], *, pan_and_scan: bool = False,
               limits: ImageLimits = ImageLimits()) -> tuple[int, ...]:
    """Tiles (1 + Pan & Scan crops) of each image from its header alone, nothing decoded: the prompt
    can be laid out, and refused when too long, before any image is decoded or encoded. Equals the
    `tiles_per_image` that `encode_images` gives for the same sources. Raises ImageInputError naming
    the image."""
    config = PanAndScanConfig(enabled=pan_and_scan)
    tiles = []
    for source in sources:
        try:
            width, height = image_size(source, limits)
        except ImageError as error:
            raise ImageInputError(f"{_name(source)}: {error}") from None
        tiles.append(num_tiles(width, height, config))
    return tuple(tiles)


def encode_images(lm, sources: Sequence[str | Path | bytes], *, pan_and_scan: bool = False,
                  limits: ImageLimits = ImageLimits(), encoder=None) -> EncodedImages:
    """Soft tokens for `sources` with the vision tower of `lm`'s checkpoint (loaded on demand unless an
    `encoder` is given), in the LM's dtype and device."""
    if not sources:
        return EncodedImages(None, (), 0.0)
    if encoder is None and not has_vision_tower(lm.path):
        raise ImageInputError(f"model at {lm.path} is text-only (no vision_config in config.json); "
                              "images need a Gemma 3 vision-language checkpoint (4B, 12B, 27B)")
    from vision.encoder import EncoderOptions, VisionEncoder
    from vision.preprocess import preprocess_batch

    started = time.perf_counter()
    results = preprocess_batch(list(sources), PanAndScanConfig(enabled=pan_and_scan), limits=limits)
    for source, result in zip(sources, results):
        if isinstance(result, ImageError):
            raise ImageInputError(f"{_name(source)}: {result}")
    if encoder is None:
        encoder = VisionEncoder.from_checkpoint(lm.path, EncoderOptions(device=str(lm.device), dtype=lm.dtype))
    tiles = [torch.from_numpy(r.tiles) for r in results]
    soft_tokens = torch.cat(encoder.encode_many(tiles)).to(lm.device, lm.dtype)
    return EncodedImages(soft_tokens, tuple(t.shape[0] for t in tiles), time.perf_counter() - started)


def _name(source: str | Path | bytes) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"image of {len(source)} bytes"

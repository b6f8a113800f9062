"""Pan & Scan crop geometry: one pure function decides the crops, for cropping and for token counting.

The rules follow the Gemma 3 reference image processor (see DESIGN.md section 2): an image whose long
side is at least `min_ratio_to_activate` times its short side is cut into 2..max_num_crops
non-overlapping crops along the long side, each at least `min_crop_size` pixels on its short side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Server-side ceiling on crops per image, whatever a request asks for: each crop costs a full SigLIP
# pass (≈ 5.5 TFLOP) and 256 prompt tokens.
MAX_CROPS_CAP = 16


@dataclass(frozen=True)
class PanAndScanConfig:
    enabled: bool = False  # Pan & Scan is off unless asked for
    min_crop_size: int = 256  # smallest allowed crop side in source pixels
    max_num_crops: int = 4  # most crops per image (the original tile is not counted)
    min_ratio_to_activate: float = 1.2  # long side / short side at which cropping starts

    def __post_init__(self) -> None:
        if not isinstance(self.min_crop_size, int) or self.min_crop_size < 1:
            raise ValueError(f"min_crop_size must be a positive integer, got {self.min_crop_size!r}")
        if not isinstance(self.max_num_crops, int) or not 2 <= self.max_num_crops <= MAX_CROPS_CAP:
            raise ValueError(
                f"max_num_crops must be an integer in [2, {MAX_CROPS_CAP}], got {self.max_num_crops!r}"
            )
        ratio = self.min_ratio_to_activate
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1.0:
            raise ValueError(f"min_ratio_to_activate must be a finite number >= 1.0, got {ratio!r}")


Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in source pixels, x1/y1 exclusive


def plan_crops(width: int, height: int, config: PanAndScanConfig) -> list[Box]:
    """Crop boxes for an image of `width` x `height`, row-major; empty when no crops apply."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not config.enabled:
        return []
    if width >= height:
        if width / height < config.min_ratio_to_activate:
            return []
        across = _crops_along(width, height, config)
        down = 1
    else:
        if height / width < config.min_ratio_to_activate:
            return []
        across = 1
        down = _crops_along(height, width, config)
    crop_w = math.ceil(width / across)
    crop_h = math.ceil(height / down)
    if min(crop_w, crop_h) < config.min_crop_size:
        return []
    return [
        (col * crop_w, row * crop_h, min((col + 1) * crop_w, width), min((row + 1) * crop_h, height))
        for row in range(down)
        for col in range(across)
    ]


def _crops_along(long_side: int, short_side: int, config: PanAndScanConfig) -> int:
    count = math.floor(long_side / short_side + 0.5)  # round half up
    count = min(long_side // config.min_crop_size, count)
    return min(config.max_num_crops, max(2, count))


def num_tiles(width: int, height: int, config: PanAndScanConfig) -> int:
    """Tiles the vision stage produces for one image: the original plus its crops."""
    return 1 + len(plan_crops(width, height, config))

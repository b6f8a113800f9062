"""A synthetic landscape "photo" for demos and benchmarks, generated (never downloaded).

`python -m vision.sample OUT_PATH [--width W --height H]` writes a JPEG at OUT_PATH if it is absent and
prints the path. The picture is deterministic: sky gradient, sun, two mountain ridges, a lake and
grain, wide enough (16:9 by default) that Pan & Scan cuts it into crops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photo(width: int = 1600, height: int = 900, *, seed: int = 0) -> Image.Image:
    """An RGB landscape of `width` x `height` with photo-like texture (so JPEG sizes are realistic)."""
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height  # 0..1 across and down
    sky_top, sky_bottom = np.array([40, 90, 170], np.float32), np.array([200, 220, 240], np.float32)
    picture = sky_top + (sky_bottom - sky_top) * v[..., None]  # (H, W, 3)

    sun = (u - 0.72) ** 2 * (width / height) ** 2 + (v - 0.22) ** 2 < 0.006
    picture[sun] = [255, 236, 180]

    far_ridge = 0.45 + 0.06 * np.sin(u * 9.0 + 1.0) + 0.03 * np.sin(u * 23.0)
    near_ridge = 0.58 + 0.05 * np.sin(u * 5.0 + 2.5) + 0.02 * np.sin(u * 41.0)
    picture[v > far_ridge] = [95, 105, 130]
    picture[v > near_ridge] = [50, 90, 55]
    lake = v > 0.78
    picture[lake] = (np.array([30, 70, 120], np.float32) + 40 * (v[lake, None] - 0.78))
    picture[lake] += 12 * np.sin(x[lake, None] / 3.0 + 4 * np.sin(y[lake, None] / 5.0))  # ripples

    grain = np.random.default_rng(seed).normal(0.0, 6.0, picture.shape).astype(np.float32)
    return Image.fromarray(np.clip(picture + grain, 0, 255).astype(np.uint8), "RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vision.sample", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT_PATH", help="where to write the JPEG")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        synthetic_photo(args.width, args.height).save(args.out, "JPEG", quality=90)
        print(f"sample: wrote a synthetic {args.width}x{args.height} landscape photo to {args.out}", file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

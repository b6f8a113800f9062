"""`tessera preprocess IMAGE [IMAGE...]`: decode, validate and tile images; one JSON line per image.

A good image prints {"image", "width", "height", "num_crops", "boxes"}; a bad one prints
{"image", "error": {"code", "message"}} and the command exits 1 after processing the rest.
`--out FILE.npy` saves the float32 tiles (1 + num_crops, 3, 896, 896) of a single image.
"""

from __future__ import annotations

import argparse
import json
import sys

from vision.commands import output_problem

# PanAndScanConfig field -> the flag that sets it, so its validation errors name what the user typed.
_FLAG_OF_FIELD = {
    "min_crop_size": "--min-crop-size",
    "max_num_crops": "--max-crops",
    "min_ratio_to_activate": "--min-ratio",
}
_CHUNK = 8  # images decoded and tiled at once: bounds memory to a few hundred MB of tiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vision.pan_and_scan import MAX_CROPS_CAP, PanAndScanConfig

    defaults = PanAndScanConfig()
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    parser.add_argument("--pan-and-scan", action="store_true", help="cut wide or tall images into crops")
    parser.add_argument("--min-crop-size", type=int, default=defaults.min_crop_size, metavar="N",
                        help=f"smallest crop side in pixels (default {defaults.min_crop_size})")
    parser.add_argument("--max-crops", type=int, default=defaults.max_num_crops, metavar="N",
                        help=f"most crops per image, 2..{MAX_CROPS_CAP} (default {defaults.max_num_crops})")
    parser.add_argument("--min-ratio", type=float, default=defaults.min_ratio_to_activate, metavar="R",
                        help=f"aspect ratio at which cropping starts (default {defaults.min_ratio_to_activate})")
    parser.add_argument("--out", metavar="FILE.npy", help="save the tiles of a single image with numpy.save")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="decode/resize threads (default 2)")


def run(args: argparse.Namespace) -> int:
    from vision.image import ImageError
    from vision.pan_and_scan import PanAndScanConfig
    from vision.preprocess import preprocess_batch

    try:
        config = PanAndScanConfig(
            enabled=args.pan_and_scan,
            min_crop_size=args.min_crop_size,
            max_num_crops=args.max_crops,
            min_ratio_to_activate=args.min_ratio,
        )
    except ValueError as error:
        return _usage_error(_with_flag_names(str(error)))
    if args.out is not None and len(args.images) != 1:
        return _usage_error(f"--out saves the tiles of one image; got {len(args.images)} images")
    if args.out is not None and (problem := output_problem(args.out)) is not None:
        return _usage_error(problem)
    if args.workers < 1:
        return _usage_error(f"--workers must be at least 1, got {args.workers}")

    failures = crops = 0
    for start in range(0, len(args.images), _CHUNK):
        names = args.images[start : start + _CHUNK]
        for name, result in zip(names, preprocess_batch(names, config, num_workers=args.workers)):
            if isinstance(result, ImageError):
                failures += 1
                line = {"image": name, "error": {"code": result.code, "message": result.message}}
            else:
                crops += result.num_crops
                line = {"image": name, "width": result.width, "height": result.height,
                        "num_crops": result.num_crops, "boxes": [list(box) for box in result.boxes]}
                if args.out is not None:
                    _save(args.out, result.tiles)
            print(json.dumps(line), flush=True)

    done = len(args.images) - failures
    summary = (f"preprocess: {done} of {len(args.images)} images -> {done + crops} tiles of 896x896 "
               f"({done} whole + {crops} Pan & Scan crops)")
    if failures:
        summary += f"; {failures} failed (see the error lines)"
    if args.out is not None and not failures:
        summary += f"; tiles saved to {args.out}"
    print(summary, file=sys.stderr)
    return 1 if failures else 0


def _save(path: str, tiles) -> None:
    import numpy as np

    with open(path, "wb") as handle:  # exactly this path: numpy.save(str) would append ".npy"
        np.save(handle, tiles)


def _with_flag_names(message: str) -> str:
    for field, flag in _FLAG_OF_FIELD.items():
        message = message.replace(field, flag)
    return message


def _usage_error(message: str) -> int:
    print(f"tessera preprocess: error: {message}", file=sys.stderr)
    return 2

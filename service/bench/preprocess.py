"""`tessera bench preprocess`: Tessera's image preprocessing against `Gemma3ImageProcessorPil`, side by side.

Both sides get the same generated photos (4032x3024, 1920x1080 and 1080x1920 JPEG, 3000x800 and
800x600 PNG), Pan & Scan on at the defaults, and are timed twice: from decoded RGB images, and from
encoded bytes with decoding included. Tessera uses a pool of `--threads` workers; the reference is
called the way transformers runs it, once on the list of images. Runs alternate between the sides, and
the median of `--repeats` runs is reported (the best run too: the machine may be shared), with the CPU
time per tile (all threads), which other load on the machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from service.bench import positive_int

# (width, height, format) of the benchmark photos
PHOTOS: tuple[tuple[int, int, str], ...] = (
    (4032, 3024, "JPEG"),
    (1920, 1080, "JPEG"),
    (3000, 800, "PNG"),
    (1080, 1920, "JPEG"),
    (800, 600, "PNG"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed runs per side and input kind (default 7)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="Tessera worker threads and torch threads (default 2)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    from transformers import Gemma3ImageProcessorPil

    from vision.image import load_image
    from vision.pan_and_scan import PanAndScanConfig
    from vision.preprocess import preprocess_batch
    from vision.sample import synthetic_photo

    torch.set_num_threads(args.threads)
    config = PanAndScanConfig(enabled=True)
    encoded = [_encode(synthetic_photo(w, h, seed=i), fmt) for i, (w, h, fmt) in enumerate(PHOTOS)]
    decoded = [load_image(data) for data in encoded]
    reference = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, resample=Image.Resampling.BILINEAR, rescale_factor=1 / 255,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=True,
        pan_and_scan_min_crop_size=config.min_crop_size, pan_and_scan_max_num_crops=config.max_num_crops,
        pan_and_scan_min_ratio_to_activate=config.min_ratio_to_activate,
    )

    print(f"photos: {', '.join(f'{w}x{h} {fmt} ({len(d) / 1e6:.2f} MB)' for (w, h, fmt), d in zip(PHOTOS, encoded))}")
    print(f"Pan & Scan on (min_crop_size {config.min_crop_size}, max_num_crops {config.max_num_crops}, "
          f"min_ratio {config.min_ratio_to_activate}); Tessera threads {args.threads}; "
          f"torch threads {torch.get_num_threads()}; repeats {args.repeats}")

    with ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="bench") as pool:
        ours = preprocess_batch(decoded, config, executor=pool)
        ref_out = reference(images=decoded, return_tensors="np")
        ours_tiles = np.concatenate([result.tiles for result in ours])
        ref_bytes = reference(images=[Image.open(io.BytesIO(d)) for d in encoded], return_tensors="np")
        ours_bytes = np.concatenate([r.tiles for r in preprocess_batch(encoded, config, executor=pool)])
        num_tiles = ours_tiles.shape[0]
        crops_equal = [r.num_crops for r in ours] == [int(n) for n in ref_out["num_crops"]]
        diff = float(np.abs(ours_tiles - ref_out["pixel_values"]).max())
        diff_bytes = float(np.abs(ours_bytes - ref_bytes["pixel_values"]).max())
        print(f"parity: num_crops equal {crops_equal} ({[r.num_crops for r in ours]}), {num_tiles} tiles, "
              f"max |diff| from decoded {diff:.2e}, from bytes {diff_bytes:.2e}")

        sides = {
            "decoded": {
                "tessera": lambda: preprocess_batch(decoded, config, executor=pool),
                "reference (return_tensors='np')": lambda: reference(images=decoded, return_tensors="np"),
                "reference (list output)": lambda: reference(images=decoded),
            },
            "bytes": {
                "tessera": lambda: preprocess_batch(encoded, config, executor=pool),
                "reference (return_tensors='np')": lambda: reference(
                    images=[Image.open(io.BytesIO(d)) for d in encoded], return_tensors="np"),
                "reference (list output)": lambda: reference(images=[Image.open(io.BytesIO(d)) for d in encoded]),
            },
        }
        goals = {"decoded": 5.0, "bytes": 2.5}
        for kind, runners in sides.items():
            times = {name: [] for name in runners}
            cpu = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, runner in runners.items():  # alternate, so load from elsewhere hits both sides
                    cpu_started, started = time.process_time(), time.perf_counter()
                    runner()
                    times[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
            print(f"\nfrom {kind}:")
            for name, samples in times.items():
                print(f"  {name:34s} {num_tiles / statistics.median(samples):7.1f} tiles/s median "
                      f"({num_tiles / min(samples):7.1f} best); "
                      f"{1000 * statistics.median(cpu[name]) / num_tiles:5.1f} CPU ms per tile")
            for name in runners:
                if name != "tessera":
                    ratio = statistics.median(times[name]) / statistics.median(times["tessera"])
                    print(f"  tessera / {name}: {ratio:5.2f}x (goal >= {goals[kind]}x)")
    return 0 if crops_equal and diff <= 1e-5 and diff_bytes <= 1e-5 else 1


def _encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()

"""`tessera encode --model DIR IMAGE...`: images -> soft tokens with the checkpoint's vision stage.

Prints one JSON line per image: {"image", "num_crops", "soft_tokens": [1 + k, 256, d_model],
"preprocess_ms", "encode_ms"}; a bad image prints {"image", "error": {"code", "message"}} and the
command exits 1 after the rest. `--out FILE.npy` saves the soft tokens (float32) of a single image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vision.commands import output_problem

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face Gemma 3 checkpoint directory")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    parser.add_argument("--pan-and-scan", action="store_true", help="also encode Pan & Scan crops of wide/tall images")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="vision backend (default torch)")
    parser.add_argument("--int8", action="store_true", help="onnx backend: dynamic int8 quantisation")
    parser.add_argument("--device", default="cpu", help="torch backend device, e.g. cuda (default cpu)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="torch backend dtype (default float32)")
    parser.add_argument("--max-batch", type=int, default=4, metavar="N", help="tiles per forward pass (default 4)")
    parser.add_argument("--threads", type=int, default=2, metavar="N", help="CPU threads (default 2)")
    parser.add_argument("--onnx-cache", metavar="DIR", help="exported ONNX files (default ~/.cache/tessera/onnx)")
    parser.add_argument("--out", metavar="FILE.npy", help="save the soft tokens of a single image with numpy.save")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from vision.encoder import EncoderOptions, VisionEncoder
    from vision.image import ImageError
    from vision.pan_and_scan import PanAndScanConfig
    from vision.preprocess import preprocess_batch
    from vision.weights import CheckpointError

    if args.out is not None and len(args.images) != 1:
        return _usage_error(f"--out saves the soft tokens of one image; got {len(args.images)} images")
    # numpy.save adds ".npy" to a name without it: the file written is that one
    if args.out is not None and (problem := output_problem(args.out if args.out.endswith(".npy")
                                                          else args.out + ".npy")) is not None:
        return _usage_error(problem)
    if args.threads < 1:
        return _usage_error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        options = EncoderOptions(
            backend=args.backend,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            max_batch=args.max_batch,
            int8=args.int8,
            onnx_cache_dir=Path(args.onnx_cache) if args.onnx_cache else None,
            intra_op_threads=args.threads,
        )
        start = time.perf_counter()
        from lm.checkpoints import resolve_model  # a named model or a .gguf file too, as the other commands take

        encoder = VisionEncoder.from_checkpoint(resolve_model(args.model), options)
        load_seconds = time.perf_counter() - start
    except (ValueError, OSError, CheckpointError, RuntimeError) as error:
        return _usage_error(str(error))

    config = PanAndScanConfig(enabled=args.pan_and_scan)
    failures = tiles_done = 0
    encode_seconds = 0.0
    for name in args.images:
        start = time.perf_counter()
        (result,) = preprocess_batch([name], config, num_workers=args.threads)
        preprocess_seconds = time.perf_counter() - start
        if isinstance(result, ImageError):
            failures += 1
            print(json.dumps({"image": name, "error": {"code": result.code, "message": result.message}}), flush=True)
            continue
        start = time.perf_counter()
        soft_tokens = encoder.encode(torch.from_numpy(result.tiles))  # (1 + k, 256, d_model)
        seconds = time.perf_counter() - start
        encode_seconds += seconds
        tiles_done += soft_tokens.shape[0]
        print(json.dumps({
            "image": name,
            "num_crops": result.num_crops,
            "soft_tokens": list(soft_tokens.shape),
            "dtype": str(soft_tokens.dtype).removeprefix("torch."),
            "preprocess_ms": round(preprocess_seconds * 1e3, 1),
            "encode_ms": round(seconds * 1e3, 1),
        }), flush=True)
        if args.out is not None:
            import numpy as np

            np.save(args.out, soft_tokens.float().cpu().numpy())

    done = len(args.images) - failures
    summary = (f"encode: {done} of {len(args.images)} images, {tiles_done} tiles in {encode_seconds:.2f} s "
               f"({args.backend}{' int8' if args.int8 else ''}; model load {load_seconds:.2f} s)")
    if failures:
        summary += f"; {failures} failed (see the error lines)"
    if args.out is not None and not failures:
        summary += f"; soft tokens saved to {args.out}"
    print(summary, file=sys.stderr)
    return 1 if failures else 0


def _usage_error(message: str) -> int:
    print(f"tessera encode: {message}", file=sys.stderr)
    return 2

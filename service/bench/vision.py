"""`tessera bench vision`: soft tokens per second for the project's torch and ONNX Runtime (fp32, int8)
backends against the reference, transformers' `Gemma3ForConditionalGeneration.get_image_features`
(SigLIP + multimodal projector; public API only), side by side on the same random So400m/14 weights
and the same tiles. The reference's language model is a one-layer stub with an 8-entry vocabulary:
only its width (`--d-model`) matters here, as the projector's output width.

The weights are written once as a published-layout checkpoint (`vision_tower.vision_model.*`) in a
temporary directory and loaded through `vision.weights`, so the benchmark also exercises the loader.
A true-size tile costs ≈ 5.5 TFLOP (≈ 47 s on the 2-core dev machine): one tile per backend by
default, no warm-up run (one-time costs are small next to that).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from service.bench import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", type=positive_int, default=1, help="tiles per backend, one batch (default 1)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch and ONNX Runtime threads (default 2)")
    parser.add_argument("--layers", type=positive_int, default=27,
                        help="SigLIP layers (default 27 = So400m; fewer for a quick smoke run)")
    parser.add_argument("--d-model", type=positive_int, default=2560,
                        help="soft-token width (default 2560, Gemma 3 4B)")
    parser.add_argument("--skip-int8", action="store_true", help="leave out the int8 ONNX backend")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-vision-") as work:
        return _run(args, Path(work))


def _run(args: argparse.Namespace, work: Path) -> int:
    import torch

    from vision.encoder import EncoderOptions, VisionEncoder

    reference, config_dict = _reference(args)
    checkpoint = _write_checkpoint(reference, config_dict, work / "checkpoint")
    tiles = torch.rand(args.tiles, 3, 896, 896, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vision = config_dict["vision_config"]
    print(f"SigLIP {vision['num_hidden_layers']} layers, width {vision['hidden_size']}, "
          f"d_model {args.d_model}; {args.tiles} tile(s) per backend in one batch; {args.threads} threads",
          flush=True)

    results: dict[str, tuple[float, torch.Tensor]] = {}
    with torch.inference_mode():
        start = time.perf_counter()
        expected = _image_features(reference, tiles)
        results["reference (transformers)"] = (time.perf_counter() - start, expected)
    print(f"  (reference: {results['reference (transformers)'][0]:.1f} s)", flush=True)
    del reference

    variants = {
        "tessera torch": EncoderOptions(max_batch=args.tiles),
        "tessera onnx fp32": EncoderOptions(backend="onnx", max_batch=args.tiles, onnx_cache_dir=work / "onnx",
                                            intra_op_threads=args.threads),
    }
    if not args.skip_int8:
        variants["tessera onnx int8"] = EncoderOptions(backend="onnx", int8=True, max_batch=args.tiles,
                                                       onnx_cache_dir=work / "onnx", intra_op_threads=args.threads)
    torch_seconds_per_tile = None
    for name, options in variants.items():
        start = time.perf_counter()
        encoder = VisionEncoder.from_checkpoint(checkpoint, options)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        soft_tokens = encoder.encode(tiles)
        results[name] = (time.perf_counter() - start, soft_tokens)
        steps = {"torch": "load", "onnx": "load + export" + (" + quantise" if options.int8 else "")}
        print(f"  ({name}: {results[name][0]:.1f} s; setup: {steps[options.backend]}, {setup:.1f} s)", flush=True)
        if name == "tessera torch":
            torch_seconds_per_tile = results[name][0] / args.tiles
            identity = encoder.identity
        del encoder

    ref_seconds = results["reference (transformers)"][0]
    print("\nthroughput (higher is better):")
    for name, (seconds, _) in results.items():
        print(f"  {name:26s} {args.tiles / seconds:8.4f} tiles/s  {seconds / args.tiles:7.1f} s/tile  "
              f"{ref_seconds / seconds:5.2f}x reference")

    print("\nagreement:")
    torch_tokens = results["tessera torch"][1]
    for name, (_, soft_tokens) in results.items():
        if name == "reference (transformers)":
            continue
        cosine = torch.nn.functional.cosine_similarity(soft_tokens.float(), expected.float(), dim=-1)
        print(f"  {name:26s} max |diff| vs reference {(soft_tokens - expected).abs().max().item():.2e}, "
              f"per-token cosine mean {cosine.mean().item():.6f} min {cosine.min().item():.6f}")
    if "tessera onnx int8" in results:
        int8, fp32 = results["tessera onnx int8"][1], results["tessera onnx fp32"][1]
        cosine = torch.nn.functional.cosine_similarity(int8, fp32, dim=-1)
        print(f"  int8 vs onnx fp32: per-token cosine mean {cosine.mean().item():.6f} "
              f"min {cosine.min().item():.6f} (goal mean >= 0.99)")
    del torch_tokens

    _cache_hit_cost(identity, results["tessera torch"][1], torch_seconds_per_tile)
    return 0


def _reference(args):
    """A random-weight reference `Gemma3ForConditionalGeneration` with the So400m vision tower, and the
    config.json the vision stage of such a checkpoint implies."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.layers,
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
                                attn_implementation="sdpa")
    # The language model is never run: one narrow layer, 8 ids, at the width the projector maps to.
    text = Gemma3TextConfig(hidden_size=args.d_model, vocab_size=8, num_hidden_layers=1, intermediate_size=8,
                            num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    config = Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=256,
                          attn_implementation="sdpa")
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the reference initialises these to zeros, which would hide projector errors
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, 1152**-0.5)
            elif name.endswith("mm_soft_emb_norm.weight"):
                param.normal_(0.0, 0.5)
    config_dict = {
        "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": args.d_model},
        "vision_config": vision.to_dict(),
    }
    return model, config_dict


def _image_features(model, tiles):
    """Soft tokens (tiles, 256, d_model) through the public `get_image_features`."""
    import torch

    features = model.get_image_features(pixel_values=tiles)
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _write_checkpoint(model, config_dict: dict, directory: Path) -> Path:
    """The reference's vision tower and projector in the published layout (`vision_tower.vision_model.*`,
    `multi_modal_projector.*`); the stub language model is left out."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.model.state_dict().items():
        if key.startswith("vision_tower."):
            tower_key = key.removeprefix("vision_tower.")
            tensors["vision_tower.vision_model." + tower_key.removeprefix("vision_model.")] = value
        elif key.startswith("multi_modal_projector."):
            tensors[key] = value
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config_dict))
    return directory


def _cache_hit_cost(identity: str, soft_tokens, encode_seconds_per_tile: float) -> None:
    """A hit = hashing the encoded image (a ~1 MB JPEG here) + parameters + model, then the lookup."""
    import io

    from vision.cache import SoftTokenCache, cache_key
    from vision.sample import synthetic_photo

    buffer = io.BytesIO()
    synthetic_photo(1600, 900).save(buffer, format="JPEG", quality=95)
    image_bytes = buffer.getvalue()
    params = {"pan_and_scan": False, "min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2}
    cache = SoftTokenCache(max_bytes=1 << 30)
    cache.put(cache_key(image_bytes, params, identity), soft_tokens[:1])
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        assert cache.get(cache_key(image_bytes, params, identity)) is not None
    hit = (time.perf_counter() - start) / repeats
    print(f"\ncache hit ({len(image_bytes) / 1e6:.2f} MB JPEG, key + lookup): {hit * 1e3:.3f} ms = "
          f"{100 * hit / encode_seconds_per_tile:.4f}% of a one-tile torch encode (goal < 1%)")

"""`tessera bench caption`: batch captioning images/s against a naive loop over the reference.

Both sides caption the same synthetic photos with the same tiny random Gemma 3 vision-language
checkpoint (real geometry: SigLIP at 896 px / patch 14, 256 soft tokens per tile, the 262,144-entry
Gemma 3 vocabulary and the embedded 270M's tokenizer; narrow widths so it runs on a laptop CPU):
- tessera: `service.caption` (decode/preprocess pool, batched vision encode, the engine batching
  all captions), writing the JSONL output as `tessera caption` does;
- reference: for each image, `Gemma3Processor` (Gemma3ImageProcessorPil) then
  `Gemma3ForConditionalGeneration.generate`, one image at a time.
Every caption is exactly `--new-tokens` tokens on both sides (stop tokens ignored), greedy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per caption")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pan-and-scan", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")


def tiny_captioning_config(*, layers: int = 4, vision_width: int = 32):
    """A Gemma 3 vision-language config with the text vocabulary of the 270M tokenizer."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=128, max_position_embeddings=8192, initializer_range=0.25,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )
    vision = SiglipVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
                                num_attention_heads=2, image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256,
                        image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000,
                        eos_token_id=[1, 106])


def write_tiny_captioning_checkpoint(path: Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Save a random `Gemma3ForConditionalGeneration` with the embedded 270M's tokenizer files to `path`.
    Norm and projector weights are drawn at random (the reference initialises them to zeros, which would
    hide bugs in how they are applied), and the patch embedding large enough that different images give
    different captions."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from lm.checkpoints import DEFAULT_MODEL, resolve_model

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_captioning_config(layers=layers)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
            elif "mm_input_projection_weight" in name:
                param.normal_(0.0, 0.5)
            elif "patch_embedding.weight" in name:  # so that pixels, not position embeddings, dominate
                param.normal_(0.0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    source = resolve_model(DEFAULT_MODEL, progress=False)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path


def reference_processor(checkpoint: Path):
    """`Gemma3Processor` over the checkpoint's (270M) tokenizer, which names no image tokens itself."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, extra_special_tokens={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    from PIL import Image

    from vision.pan_and_scan import PanAndScanConfig

    defaults = PanAndScanConfig()  # the released checkpoints' preprocessor settings (DESIGN.md section 2)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, resample=Image.Resampling.BILINEAR, rescale_factor=1 / 255,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, pan_and_scan_min_crop_size=defaults.min_crop_size,
        pan_and_scan_max_num_crops=defaults.max_num_crops,
        pan_and_scan_min_ratio_to_activate=defaults.min_ratio_to_activate)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template, image_seq_length=256)


def reference_caption(model, processor, image_path: str, prompt: str, *, new_tokens: int,
                      pan_and_scan: bool = False, force_length: bool = False) -> list[int]:
    """Greedy caption token ids of one image by the reference (processor + generate)."""
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(text=text, images=[image], return_tensors="pt", do_pan_and_scan=pan_and_scan)
    extra = {"min_new_tokens": new_tokens} if force_length else {}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run(args: argparse.Namespace) -> int:
    import torch

    from lm.sampling import SamplingParams
    from service.caption import CaptionOptions, JobSummary, RecordWriter, collect_inputs, load_local_captioner, run_job
    from vision.sample import synthetic_photo

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-caption-"))
    try:
        checkpoint = write_tiny_captioning_checkpoint(work / "tiny-vlm")
        images = work / "images"
        images.mkdir()
        for i in range(args.images):
            width, height = (1280, 720) if i % 2 else (800, 800)
            synthetic_photo(width, height, seed=i).save(images / f"{i:04d}.jpg", quality=90)
        items, _ = collect_inputs([images])
        prompt = "Describe this image."
        params = SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=())  # exactly new_tokens each
        options = CaptionOptions(prompt=prompt, pan_and_scan=args.pan_and_scan, params=params,
                                 concurrency=args.concurrency, workers=2, vision_batch=4)
        captioner = load_local_captioner(str(checkpoint), options)
        run_job(captioner, items[:2], RecordWriter(work / "warmup.jsonl"), JobSummary())  # warm-up
        summary = JobSummary(inputs=len(items))
        with RecordWriter(work / "results.jsonl") as writer:
            run_job(captioner, items, writer, summary)
        ours = summary.processed / summary.seconds
        crops = sum(json.loads(line).get("num_crops", 0) for line in open(work / "results.jsonl"))
        print(f"caption bench: {args.images} synthetic photos ({crops} Pan & Scan crops), {args.new_tokens} new "
              f"tokens each, greedy; torch threads {args.threads}")
        print(f"  tessera caption  (concurrency {args.concurrency}): {ours:7.3f} images/s "
              f"({summary.seconds:.2f} s, {summary.failed} failed)")
        if args.skip_reference:
            return 0
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        processor = reference_processor(checkpoint)
        reference_caption(model, processor, items[0].path, prompt, new_tokens=2)  # warm-up
        started = time.perf_counter()
        for item in items:
            reference_caption(model, processor, item.path, prompt, new_tokens=args.new_tokens,
                              pan_and_scan=args.pan_and_scan, force_length=True)
        seconds = time.perf_counter() - started
        reference = len(items) / seconds
        print(f"  transformers loop (one image at a time):   {reference:7.3f} images/s ({seconds:.2f} s)")
        print(f"  ratio: {ours / reference:.2f}x")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)

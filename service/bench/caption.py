"""`tessera bench caption`: batch captioning images/s against a naive loop over the reference.

Both sides caption the same synthetic photos with the same tiny random Gemma 3 vision-language
checkpoint from `service.tiny_checkpoints` (real geometry: SigLIP at 896 px / patch 14, 256 soft
tokens per tile, the 262,144-entry Gemma 3 vocabulary and the embedded 270M's tokenizer; narrow
widths so it runs on a laptop CPU):
- tessera: `service.caption` (decode/preprocess pool, batched vision encode, the engine batching
  all captions), writing the JSONL output as `tessera caption` does;
- reference (`service.caption_reference`): for each image, `Gemma3Processor`
  (Gemma3ImageProcessorPil) then `Gemma3ForConditionalGeneration.generate`, one image at a time.
Every caption is exactly `--new-tokens` tokens on both sides (stop tokens ignored), greedy. The two
sides run `--repeats` times each, alternating; the ratio is of the median times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from service.bench import positive_int
from service.caption import CaptionOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=positive_int, default=16)
    parser.add_argument("--new-tokens", type=positive_int, default=16, help="tokens generated per caption")
    parser.add_argument("--concurrency", type=positive_int, default=CaptionOptions.concurrency)
    parser.add_argument("--workers", type=positive_int, default=CaptionOptions.workers)
    parser.add_argument("--vision-batch", type=positive_int, default=CaptionOptions.vision_batch)
    parser.add_argument("--prefill-chunk", type=positive_int, default=CaptionOptions.prefill_chunk)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--pan-and-scan", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="alternating runs of each side (medians compared)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lm.sampling import SamplingParams
    from service.caption import CaptionOptions, JobSummary, RecordWriter, collect_inputs, load_local_captioner, run_job
    from service.tiny_checkpoints import write_tiny_captioning_checkpoint
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
                                 concurrency=args.concurrency, workers=args.workers, vision_batch=args.vision_batch,
                                 prefill_chunk=args.prefill_chunk)
        captioner = load_local_captioner(str(checkpoint), options)
        with RecordWriter(work / "warmup.jsonl") as writer:
            run_job(captioner, items[:2], writer, JobSummary())  # warm-up

        def ours(run: int) -> float:
            summary = JobSummary(inputs=len(items))
            with RecordWriter(work / f"results{run}.jsonl") as writer:
                run_job(captioner, items, writer, summary)
            if summary.failed:
                raise RuntimeError(f"{summary.failed} of {len(items)} captions failed")
            return summary.seconds

        reference = None
        if not args.skip_reference:
            from transformers import Gemma3ForConditionalGeneration

            from service.caption_reference import reference_caption, reference_processor

            model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
            processor = reference_processor(checkpoint)
            reference_caption(model, processor, items[0].path, prompt, new_tokens=2)  # warm-up

            def reference(run: int) -> float:
                started = time.perf_counter()
                for item in items:
                    reference_caption(model, processor, item.path, prompt, new_tokens=args.new_tokens,
                                      pan_and_scan=args.pan_and_scan, force_length=True)
                return time.perf_counter() - started

        # the two sides alternate (each run the other one first), so that a slower moment of the machine
        # hits both; medians compared
        seconds: dict[str, list[float]] = {"tessera": [], "reference": []}
        for run in range(args.repeats):
            sides = [("tessera", ours)] + ([("reference", reference)] if reference is not None else [])
            for side, measure in sides[::-1] if run % 2 else sides:
                seconds[side].append(measure(run))
        crops = sum(json.loads(line).get("num_crops", 0) for line in open(work / "results0.jsonl"))
        print(f"caption bench: {args.images} synthetic photos ({crops} Pan & Scan crops), {args.new_tokens} new "
              f"tokens each, greedy; torch threads {args.threads}; {args.repeats} alternating runs")
        ours_s = statistics.median(seconds["tessera"])
        print(f"  tessera caption  (concurrency {args.concurrency}): {len(items) / ours_s:7.3f} images/s "
              f"(median {ours_s:.2f} s; runs {', '.join(f'{s:.2f}' for s in seconds['tessera'])})")
        if reference is None:
            return 0
        reference_s = statistics.median(seconds["reference"])
        print(f"  transformers loop (one image at a time):   {len(items) / reference_s:7.3f} images/s "
              f"(median {reference_s:.2f} s; runs {', '.join(f'{s:.2f}' for s in seconds['reference'])})")
        print(f"  ratio: {reference_s / ours_s:.2f}x")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)

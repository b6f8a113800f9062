"""`tessera caption`: caption many images into a JSONL file; resumable, shardable, with a summary.

Exit status: 0 when the job ran (bad images are error records, not failures of the job); 1 when
images were to be processed and none was captioned, or with --fail-on-error when any image failed;
2 for unusable inputs or options (including a text-only --model such as gemma3-270m, which cannot
see images: captioning needs a vision-language checkpoint or --target).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lm.commands import QUANTIZATION_SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lm.commands.generate import add_sampling_arguments
    from service.caption import CaptionOptions  # its defaults apply to the in-process flags left unset

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, directories (searched recursively) or .jsonl manifests of "
                             '{"id": ..., "path": ...} lines (relative paths are relative to the manifest)')
    parser.add_argument("--out", type=Path, required=True,
                        help="JSONL results file; appended to, and ids already in it are skipped")
    parser.add_argument("--prompt", default=None, help="instruction sent with each image")
    parser.add_argument("--pan-and-scan", action="store_true", help="add Pan & Scan crops of wide or tall images")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--model", default="gemma3-270m",
                         help="in-process engine (the default): a Gemma 3 vision-language checkpoint directory; "
                              "the embedded gemma3-270m is text-only and is refused with an explanation")
    backend.add_argument("--target", metavar="HOST:PORT", help="caption through a running `tessera serve gateway`")
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=64)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="captions in flight at once (engine batch, or parallel gateway calls)")
    parser.add_argument("--workers", type=int, default=2, help="image decode/preprocess threads")
    parser.add_argument("--vision-batch", type=int, default=None,
                        help="in-process only: tiles per vision-tower forward pass "
                             f"(default {CaptionOptions.vision_batch})")
    parser.add_argument("--kv-budget-mb", type=int, default=None,
                        help=f"in-process only: the engine's KV cache budget (default {CaptionOptions.kv_budget_mb})")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="in-process only: prompt tokens computed per step "
                             f"(default {CaptionOptions.prefill_chunk}; a job wants few, full steps)")
    parser.add_argument("--shard", metavar="INDEX/COUNT",
                        help="process only this shard (images are assigned by a hash of their id); default from "
                             "JOB_COMPLETION_INDEX and TESSERA_SHARD_COUNT when the latter is set")
    parser.add_argument("--retry-errors", action="store_true",
                        help="re-run ids whose recorded result is an error; their error records are removed from "
                             "--out first (the file is rewritten atomically), so each id keeps one record")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 if any image failed")
    parser.add_argument("--device", default=None, help="in-process only (default cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="in-process only (default float32)")
    parser.add_argument("--quantize", choices=QUANTIZATION_SCHEMES,
                        help="in-process only: LM weight quantisation (CPU; lm/quantize.py)")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--auth-token", default=None,
                       help="--target only: bearer token; visible to every local user in `ps`, so prefer "
                            "TESSERA_AUTH_TOKEN or --auth-token-file")
    token.add_argument("--auth-token-file", type=Path, default=None,
                       help="--target only: read the bearer token from the first line of this file")
    parser.add_argument("--progress-interval", type=float, default=30.0,
                        help="seconds between progress lines when stderr is not a terminal")


# flags that configure the in-process engine: refused with --target, which captions with the gateway's settings
IN_PROCESS_FLAGS = ("--vision-batch", "--kv-budget-mb", "--prefill-chunk", "--device", "--dtype", "--quantize")


def run(args: argparse.Namespace) -> int:
    from lm.commands.generate import sampling_params
    from service.caption import (
        DEFAULT_PROMPT, CaptionInputError, CaptionOptions, JobSummary, RecordWriter, Shard, collect_inputs,
        drop_records, plan_job, read_records,
    )

    def fail(message: str) -> int:
        print(f"tessera caption: {message}", file=sys.stderr)
        return 2

    local_only = [flag for flag in IN_PROCESS_FLAGS
                  if getattr(args, flag.removeprefix("--").replace("-", "_")) is not None]
    if args.target and local_only:  # the gateway's servers run with their own settings
        verb, pronoun = ("set", "them") if len(local_only) > 1 else ("sets", "it")
        return fail(f"{', '.join(local_only)} {verb} the in-process engine; with --target the gateway at {args.target} "
                    f"captions with its servers' own settings: drop {pronoun}, or set {pronoun} on `tessera serve`")
    engine = {name: getattr(args, name) for name in ("vision_batch", "kv_budget_mb", "prefill_chunk")
              if getattr(args, name) is not None}  # the rest: CaptionOptions' defaults
    try:
        params = sampling_params(args)
        options = CaptionOptions(prompt=args.prompt or DEFAULT_PROMPT, pan_and_scan=args.pan_and_scan, params=params,
                                 concurrency=args.concurrency, workers=args.workers, **engine)
        shard = Shard.parse(args.shard) if args.shard else Shard.from_environment(os.environ)
        items, duplicates = collect_inputs(args.inputs)
        if args.out.exists() and any(Path(given).exists() and os.path.samefile(given, args.out)
                                     for given in args.inputs):
            raise CaptionInputError(f"--out {args.out} is one of the inputs: the records would be appended to it; "
                                    "write them to another file")
        done = read_records(args.out)
    except (CaptionInputError, ValueError, OSError) as error:
        return fail(str(error))
    if not items:
        return fail(f"no images found in {' '.join(args.inputs)} (image suffixes: .jpg .jpeg .png .webp .gif .bmp "
                    ".tif .tiff; or a .jsonl manifest)")
    if shard is None and os.environ.get("JOB_COMPLETION_INDEX"):
        print("tessera caption: warning: JOB_COMPLETION_INDEX is set but TESSERA_SHARD_COUNT is not, so this pod "
              "captions every image; set TESSERA_SHARD_COUNT to the Job's completions", file=sys.stderr)
    todo, mine, skipped = plan_job(items, done, shard, retry_errors=args.retry_errors)
    failed_before = 0 if args.retry_errors else sum(1 for item in items if (shard is None or shard.owns(item.id))
                                                    and "error" in done.get(item.id, {}))
    if failed_before:
        print(f"tessera caption: {failed_before} of the images skipped failed in an earlier run (their error records "
              f"are in {args.out}); --retry-errors runs them again", file=sys.stderr)
    summary = JobSummary(inputs=mine, skipped=skipped, duplicates=duplicates)
    outage = None  # the gateway stayed unavailable (--target): the job stopped part way
    where = f" (shard {shard})" if shard else ""
    print(f"tessera caption: {len(items)} images{where}: {mine} in this shard, {skipped} already in {args.out}, "
          f"{len(todo)} to caption", file=sys.stderr)
    if todo:
        try:
            captioner = _captioner(args, options)
        except (CaptionInputError, ValueError, OSError) as error:
            return fail(str(error))
        from service.caption import run_job

        retried = {item.id for item in todo if item.id in done}  # only with --retry-errors
        try:
            drop_records(args.out, retried)
        except OSError as error:
            return fail(f"cannot rewrite {args.out} without the error records to retry: {error}")
        from service.caption_remote import ServiceUnavailable

        with RecordWriter(args.out) as writer, _Progress(len(todo), args.progress_interval) as progress:
            try:
                run_job(captioner, todo, writer, summary, on_record=progress.update)
            except ServiceUnavailable as error:
                outage = error
            except CaptionInputError as error:  # the in-process engine cannot start (its KV budget)
                return fail(str(error))
    result = summary.as_dict()
    print(json.dumps({"summary": result, "shard": str(shard) if shard else None, "out": str(args.out)}))
    failures = ", ".join(f"{code} {n}" for code, n in result["failures"].items()) or "none"
    print(f"tessera caption: {summary.captioned} captioned, {summary.failed} failed ({failures}) in "
          f"{summary.seconds:.1f} s ({result['images_per_s'] or 0} images/s)", file=sys.stderr)
    if outage is not None:
        print(f"tessera caption: {outage}", file=sys.stderr)
        return 1
    if todo and summary.captioned == 0:
        return 1
    return 1 if args.fail_on_error and summary.failed else 0


def _captioner(args: argparse.Namespace, options):
    if args.target:
        from service.caption_remote import RemoteCaptioner

        captioner = RemoteCaptioner(args.target, options, auth_token=_auth_token(args))
        captioner.check_model_sees_images()
        return captioner
    from lm.runtime import DTYPES
    from service.caption import load_local_captioner

    return load_local_captioner(args.model, options, device=args.device or "cpu", dtype=DTYPES.get(args.dtype),
                                quantize=args.quantize)  # dtype None: its default (float32)


def _auth_token(args: argparse.Namespace) -> str | None:
    """--auth-token, else the first line of --auth-token-file, else TESSERA_AUTH_TOKEN. Raises OSError
    or ValueError (an empty file)."""
    if args.auth_token:
        return args.auth_token
    if args.auth_token_file is not None:
        lines = args.auth_token_file.read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"--auth-token-file {args.auth_token_file}: the file is empty; its first line must be "
                             "the bearer token")
        return lines[0].strip()
    return os.environ.get("TESSERA_AUTH_TOKEN") or None


class _Progress:
    """tqdm's bar (rate, ETA) on a terminal; otherwise one plain line every `interval` seconds."""

    def __init__(self, total: int, interval: float, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.interval = total, interval
        self.done = self.failed = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        self.done += 1
        self.failed += "error" in record
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"caption: {self.done}/{self.total} images ({self.failed} failed), {rate:.2f} images/s, "
                  f"ETA {_duration(eta)}", file=self.stream, flush=True)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"

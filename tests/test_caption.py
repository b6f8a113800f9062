"""`tessera caption` end to end on a tiny random vision-language checkpoint with the 270M tokenizer:
captions against the reference (Gemma3Processor + Gemma3ForConditionalGeneration.generate), error
records for bad images, resuming after SIGKILL, sharding, exit codes, the text-only model refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.caption_reference import reference_caption, reference_processor
from service.cli import main
from service.tiny_checkpoints import write_tiny_captioning_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Describe this image."
GOOD = ("red.png", "noise.jpg", "nested/wide.jpg")
BAD = {"not_an_image.jpg": "unsupported_format", "empty.png": "empty", "nested/truncated.jpg": "truncated"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_captioning_checkpoint(tmp_path_factory.mktemp("tiny-captioning-vlm"))


def _write_images(root: Path) -> Path:
    (root / "nested").mkdir(parents=True)
    Image.new("RGB", (300, 300), (220, 20, 20)).save(root / "red.png")
    noise = np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.jpg", quality=90)
    wide = np.random.default_rng(1).integers(0, 255, (300, 900, 3), dtype=np.uint8)  # 3:1, Pan & Scan crops
    Image.fromarray(wide).save(root / "nested" / "wide.jpg", quality=90)
    (root / "not_an_image.jpg").write_bytes(b"plain text, not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "nested" / "truncated.jpg").write_bytes((root / "noise.jpg").read_bytes()[:300])
    (root / "notes.txt").write_text("not an image suffix: ignored")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("images"))


def _records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output ends with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def _caption(capsys, *args) -> tuple[int, str, str]:
    code = main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference(checkpoint):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, reference_processor(checkpoint)


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_records_match_the_reference_and_bad_images_get_error_records(
        checkpoint, images, reference, tmp_path, capsys, pan_and_scan):
    out = tmp_path / "results.jsonl"
    flags = ["--pan-and-scan"] if pan_and_scan else []
    code, stdout, stderr = _caption(capsys, images, "--model", checkpoint, "--out", out, "--prompt", PROMPT,
                                    "--max-new-tokens", 6, "--concurrency", 4, *flags)
    assert code == 0, stderr
    records = {Path(r["path"]).relative_to(images).as_posix(): r for r in _records(out)}
    assert sorted(records) == sorted([*GOOD, *BAD])
    model, processor = reference
    for name in GOOD:
        record = records[name]
        assert record["id"] == str(images / name)
        if pan_and_scan and name != "nested/wide.jpg":
            continue  # only the 3:1 image is cropped: the others were compared without Pan & Scan
        ids = reference_caption(model, processor, record["path"], PROMPT, new_tokens=6, pan_and_scan=pan_and_scan)
        assert record["caption"] == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert record["tokens"]["generated"] == len(ids)
        assert set(record["timings"]) >= {"preprocess_s", "encode_s", "first_token_s", "generate_s"}
    for name in GOOD:  # crops as the reference processor makes them
        pixel_values = processor.image_processor(Image.open(images / name).convert("RGB"),
                                                 do_pan_and_scan=pan_and_scan)
        expected = int(np.ravel(pixel_values["num_crops"])[0]) if pan_and_scan else 0
        assert records[name]["num_crops"] == expected
    assert (records["nested/wide.jpg"]["num_crops"] > 0) == pan_and_scan  # 3:1 is cropped when asked
    assert len({records[n]["caption"] for n in GOOD}) > 1, "different images get different captions"
    for name, code_name in BAD.items():
        assert records[name]["error"]["code"] == code_name
        assert records[name]["error"]["message"]
    summary = json.loads(stdout)["summary"]
    assert (summary["captioned"], summary["failed"], summary["skipped"]) == (3, 3, 0)
    assert summary["failures"] == {c: 1 for c in BAD.values()}
    assert "caption: 6/6 images (3 failed)" in stderr  # plain progress line: not a terminal


def test_rerun_skips_done_ids_and_can_retry_errors(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    common = [images, "--model", checkpoint, "--out", out, "--max-new-tokens", 2]
    assert _caption(capsys, *common)[0] == 0
    first = out.read_bytes()
    code, stdout, stderr = _caption(capsys, *common)
    assert code == 0 and out.read_bytes() == first
    summary = json.loads(stdout)["summary"]
    assert (summary["skipped"], summary["processed"]) == (6, 0)
    assert "3 of the images skipped failed in an earlier run" in stderr and "--retry-errors" in stderr
    code, stdout, _ = _caption(capsys, *common, "--retry-errors", "--fail-on-error")
    assert code == 1  # the bad images fail again
    assert json.loads(stdout)["summary"]["processed"] == 3
    ids = [record["id"] for record in _records(out)]
    assert len(ids) == len(set(ids)) == 6  # the retried ids' old error records were replaced, not duplicated


def test_killed_job_leaves_whole_lines_and_resumes(checkpoint, tmp_path):
    """Kill the job (SIGKILL) as soon as it has written KILL_AFTER records: what it wrote is whole lines
    in input order; the resumed run appends the rest after them: every image once, in whole lines. (A FIFO
    among the inputs once held the job still at an exact record; a path that is not a regular file is now
    refused without being opened, as the last lines check.)"""
    total, kill_after = 16, 3
    images = tmp_path / "many"
    images.mkdir()
    paths = [images / f"{i:02d}.png" for i in range(total)]
    for i, path in enumerate(paths):
        Image.new("RGB", (64 + i, 48), (i * 10, 100, 200)).save(path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(path)}) + "\n" for path in paths))
    ids = [str(path) for path in paths]
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "service.cli", "caption", str(manifest), "--model", str(checkpoint),
               "--out", str(out), "--max-new-tokens", "4", "--concurrency", "1"]
    with open(tmp_path / "killed.stderr", "wb") as stderr:
        job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while not out.exists() or out.read_bytes().count(b"\n") < kill_after:
                assert job.poll() is None, f"the job exited ({job.returncode}) before the kill: " + \
                    (tmp_path / "killed.stderr").read_text()
                assert time.monotonic() < deadline, f"fewer than {kill_after} records after 120 s"
                time.sleep(0.01)
            job.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode == -signal.SIGKILL
    partial = _records(out)  # whole lines only
    done = len(partial)
    assert kill_after <= done < total, "the job had finished before the kill"
    assert [r["id"] for r in partial] == ids[:done]  # concurrency 1: in input order
    assert all("caption" in r for r in partial)

    resume = [*command[:-4], "--max-new-tokens", "2", "--concurrency", "8"]  # same output, faster settings
    finished = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    records = _records(out)
    assert records[:done] == partial  # appended after the killed run's lines, which are untouched
    assert sorted(r["id"] for r in records) == sorted(ids)  # each image exactly once: no duplicates
    assert all("caption" in r for r in records), [r for r in records if "caption" not in r]
    summary = json.loads(finished.stdout)["summary"]
    assert (summary["skipped"], summary["processed"], summary["captioned"]) == (done, total - done, total - done)

    fifo = tmp_path / "pipe.png"  # nobody writes to it: opening it would block the job for good
    os.mkfifo(fifo)
    manifest.write_text(json.dumps({"path": str(fifo)}) + "\n")  # a manifest keeps it (a directory walk skips it)
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr  # nothing captioned
    assert _records(out)[-1]["error"]["code"] == "unreadable" and "not a regular file" in refused.stderr + \
        _records(out)[-1]["error"]["message"]


def test_shards_from_the_indexed_job_environment_are_disjoint_and_complete(checkpoint, images, tmp_path, capsys,
                                                                         monkeypatch):
    from service.caption import shard_of

    outputs = []
    for index in range(3):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        monkeypatch.setenv("TESSERA_SHARD_COUNT", "3")
        outputs.append(tmp_path / f"shard-{index}.jsonl")
        code, stdout, stderr = _caption(capsys, images, "--model", checkpoint, "--out", outputs[-1],
                                        "--max-new-tokens", 1)
        mine = [n for n in [*GOOD, *BAD] if shard_of(str(images / n), 3) == index]
        # exit 1 only when the shard had images and none could be captioned
        assert code == (1 if mine and not set(mine) & set(GOOD) else 0), stderr
        assert json.loads(stdout)["shard"] == f"{index}/3"
        records = _records(outputs[-1]) if outputs[-1].exists() else []
        assert sorted(r["id"] for r in records) == sorted(str(images / n) for n in mine)  # its own images only
    ids = [r["id"] for path in outputs if path.exists() for r in _records(path)]
    assert sorted(ids) == sorted(str(images / n) for n in [*GOOD, *BAD])  # every image exactly once
    assert sum(bool(_records(path)) for path in outputs if path.exists()) > 1  # the images really were split


def test_text_only_model_is_refused_with_an_explanation(images, tmp_path, capsys):
    code, _, stderr = _caption(capsys, images, "--model", "gemma3-270m", "--out", tmp_path / "r.jsonl")
    assert code == 2
    assert "text-only" in stderr and "vision-language checkpoint" in stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_a_kv_budget_too_small_for_the_prefill_chunk_is_refused_naming_both_flags(checkpoint, images, tmp_path, capsys):
    """A step computes up to --prefill-chunk tokens of one caption, which its sliding-window layers hold
    at once: a budget too small for that is refused before any image is read, naming what to change; the
    same budget serves a smaller chunk."""
    args = [images / "red.png", "--model", checkpoint, "--pan-and-scan", "--kv-budget-mb", 1, "--max-new-tokens", 2]
    code, _, stderr = _caption(capsys, *args, "--out", tmp_path / "a.jsonl", "--prefill-chunk", 4096)
    assert code == 2 and "--kv-budget-mb 1 is too small" in stderr and "lower --prefill-chunk" in stderr
    assert not (tmp_path / "a.jsonl").exists()
    code, _, _ = _caption(capsys, *args, "--out", tmp_path / "b.jsonl", "--prefill-chunk", 512)
    assert code == 0 and "caption" in _records(tmp_path / "b.jsonl")[0]


def test_manifest_ids_and_relative_paths(checkpoint, images, tmp_path, capsys):
    manifest = tmp_path / "list.jsonl"
    relative = os.path.relpath(images / "red.png", tmp_path)
    manifest.write_text(json.dumps({"id": "a", "path": relative}) + "\n\n"
                        + json.dumps({"id": 7, "path": str(images / "empty.png")}) + "\n"
                        + json.dumps({"id": "a", "path": str(images / "red.png")}) + "\n")  # the same file again
    out = tmp_path / "r.jsonl"
    code, stdout, _ = _caption(capsys, manifest, "--model", checkpoint, "--out", out, "--max-new-tokens", 1)
    assert code == 0
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {"a", "7"} and records["7"]["error"]["code"] == "empty"
    assert Path(records["a"]["path"]).resolve() == (images / "red.png").resolve()
    assert json.loads(stdout)["summary"]["duplicates"] == 1


def test_exit_status(checkpoint, images, tmp_path, capsys):
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_text("".join(json.dumps({"path": str(images / n)}) + "\n" for n in BAD))
    assert _caption(capsys, bad_only, "--model", checkpoint, "--out", tmp_path / "a.jsonl")[0] == 1
    empty_dir = tmp_path / "none"
    empty_dir.mkdir()
    code, _, stderr = _caption(capsys, empty_dir, "--model", checkpoint, "--out", tmp_path / "b.jsonl")
    assert code == 2 and "no images found" in stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"path": "x.png"}\n{oops\n')
    code, _, stderr = _caption(capsys, broken, "--model", checkpoint, "--out", tmp_path / "c.jsonl")
    assert code == 2 and "broken.jsonl:2" in stderr
    code, _, stderr = _caption(capsys, images, "--shard", "3/3", "--model", checkpoint, "--out", tmp_path / "d.jsonl")
    assert code == 2 and "INDEX < COUNT" in stderr


def test_target_captions_through_a_running_gateway(checkpoint, images, reference, tmp_path, capsys):
    from service_fixtures import start_server

    server = start_server("all", model=str(checkpoint))
    try:
        out = tmp_path / "remote.jsonl"
        code, stdout, stderr = _caption(capsys, images, "--target", server.target, "--out", out, "--prompt", PROMPT,
                                        "--max-new-tokens", 6, "--concurrency", 3)
    finally:
        server.stop()
    assert code == 0, stderr
    records = {Path(r["path"]).relative_to(images).as_posix(): r for r in _records(out)}
    assert sorted(records) == sorted([*GOOD, *BAD])
    model, processor = reference
    for name in GOOD:
        ids = reference_caption(model, processor, records[name]["path"], PROMPT, new_tokens=6)
        assert records[name]["caption"] == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    from vision.image import ImageError, load_image

    for name in BAD:  # the image's own code, as the in-process captioner records it (not the gRPC status)
        with pytest.raises(ImageError) as refused:
            load_image(records[name]["path"])
        assert records[name]["error"]["code"] == refused.value.code and records[name]["error"]["message"]
    assert json.loads(stdout)["summary"]["failed"] == len(BAD)


def test_target_serving_a_text_only_model_is_refused_before_any_record(gemma270m_dir, images, tmp_path, capsys):
    """The server answers GetInfo with accepts_images=false: exit 2 naming it, no output file (every image
    would otherwise be recorded as failed, and skipped by the rerun against the right server)."""
    from service_fixtures import start_server

    server = start_server("lm", model=str(gemma270m_dir))
    try:
        out = tmp_path / "never.jsonl"
        code, _, stderr = _caption(capsys, images, "--target", server.target, "--out", out)
    finally:
        server.stop()
    assert code == 2 and "text-only" in stderr and "accepts_images=false" in stderr, stderr
    assert not out.exists()


def test_target_where_no_server_answers_is_refused_before_any_record(images, tmp_path):
    """A --target nobody serves (or one still loading past the wait) is an input error, not one error
    record per image that the next run would skip."""
    from service_fixtures import free_port

    from service.caption import CaptionInputError, CaptionOptions
    from service.caption_remote import RemoteCaptioner

    started = time.perf_counter()
    with pytest.raises(CaptionInputError, match="no server was ready at 127.0.0.1:.* within 1.5 s"):
        RemoteCaptioner(f"127.0.0.1:{free_port()}", CaptionOptions()).check_model_sees_images(timeout_s=1.5)
    assert time.perf_counter() - started < 10


def test_a_gateway_that_stays_unavailable_stops_the_job_without_records(images, tmp_path):
    """UNAVAILABLE through every retry is the service's state, not the images': the job stops after the
    calls in flight and writes no error record, so the next run (a Job's restart) captions them all."""
    from service_fixtures import free_port

    from service.caption import CaptionOptions, collect_inputs
    from service.caption_remote import RemoteCaptioner, ServiceUnavailable

    items, _ = collect_inputs([images])
    emitted = []
    captioner = RemoteCaptioner(f"127.0.0.1:{free_port()}", CaptionOptions(concurrency=2), retries=1)
    with pytest.raises(ServiceUnavailable, match="could not take the work through 1 retries .*UNAVAILABLE"):
        captioner.run(items, emitted.append)
    assert emitted == []


def test_a_kv_budget_the_machine_cannot_allocate_is_an_input_error(checkpoint, images, tmp_path, capsys):
    """1,000 TiB (past any address space, so no overcommit setting lets it through): exit 2 naming the
    budget, not a traceback, and no record."""
    out = tmp_path / "r.jsonl"
    code, _, stderr = _caption(capsys, images, "--model", checkpoint, "--out", out, "--kv-budget-mb", 1000 << 20)
    assert code == 2 and "could not be allocated on cpu: lower it (--kv-budget-mb)" in stderr, stderr
    assert "Traceback" not in stderr and not out.read_bytes()


def test_in_process_flags_with_target_are_refused_by_name(images, tmp_path, capsys):
    """--kv-budget-mb, --prefill-chunk and the other in-process engine flags would be ignored by a gateway:
    with --target they are refused, named, before any connection or output."""
    out = tmp_path / "r.jsonl"
    code, _, stderr = _caption(capsys, images, "--target", "127.0.0.1:9", "--out", out, "--prefill-chunk", 512,
                               "--kv-budget-mb", 64)
    assert code == 2 and "--kv-budget-mb, --prefill-chunk set the in-process engine" in stderr
    assert "drop them," in stderr
    assert "127.0.0.1:9" in stderr and not out.exists()
    code, _, stderr = _caption(capsys, images, "--target", "127.0.0.1:9", "--out", out, "--quantize", "int4")
    assert code == 2 and "--quantize sets the in-process engine" in stderr and "drop it," in stderr


def test_a_second_job_reuses_the_head_screen_and_gives_the_same_records(checkpoint, images, tmp_path, monkeypatch):
    from lm.head_screen import GreedyHeadScreen
    from lm.sampling import SamplingParams
    from service.caption import CaptionOptions, JobSummary, RecordWriter, collect_inputs, load_local_captioner, run_job

    builds = []
    build = GreedyHeadScreen.__init__

    def counted(self, weight):
        builds.append(weight)
        build(self, weight)

    monkeypatch.setattr(GreedyHeadScreen, "__init__", counted)
    options = CaptionOptions(prompt=PROMPT, params=SamplingParams(max_new_tokens=4, stop_token_ids=()), concurrency=4)
    captioner = load_local_captioner(str(checkpoint), options)
    items, _ = collect_inputs([images])
    records = []
    for run in range(2):
        with RecordWriter(tmp_path / f"run{run}.jsonl") as writer:
            run_job(captioner, items, writer, JobSummary(inputs=len(items)))
        records.append(sorted(json.dumps({k: v for k, v in record.items() if k not in ("seconds", "timings")},
                                         sort_keys=True) for record in _records(tmp_path / f"run{run}.jsonl")))
    assert len(builds) == 1, "the second job's engine built the screen again"
    assert records[0] == records[1]


def test_prompts_encoded_before_a_slow_image_are_captioned_while_it_decodes(checkpoint, tmp_path, monkeypatch):
    """Concurrency 2, one tile per tower call: a and b fill the engine, c waits for a place, and d's decode
    blocks until released. The places a and b give back go to c meanwhile, so three records exist before
    d is decoded at all."""
    import threading

    import service.caption as caption
    from lm.sampling import SamplingParams
    from service.caption import CaptionOptions, JobSummary, RecordWriter, collect_inputs, load_local_captioner, run_job

    for i, name in enumerate("abcd"):
        Image.new("RGB", (64, 48 + i), (40 * i, 90, 160)).save(tmp_path / f"{name}.png")
    release = threading.Event()
    prepare = caption._prepare

    def slow_d(item, *args):
        if item.path.endswith("d.png"):
            assert release.wait(120), "never released"
        return prepare(item, *args)

    monkeypatch.setattr(caption, "_prepare", slow_d)
    # a and b still decode (128 tokens each) when the producer reaches d, so no place is free then
    options = CaptionOptions(prompt=PROMPT, params=SamplingParams(max_new_tokens=128, stop_token_ids=()),
                             concurrency=2, vision_batch=1, workers=2)
    captioner = load_local_captioner(str(checkpoint), options)
    items, _ = collect_inputs([tmp_path / f"{name}.png" for name in "abcd"])
    out = tmp_path / "records.jsonl"
    with RecordWriter(out) as writer:
        job = threading.Thread(target=run_job, args=(captioner, items, writer, JobSummary(inputs=4)))
        job.start()
        try:
            deadline = time.monotonic() + 60
            while not out.exists() or out.read_bytes().count(b"\n") < 3:
                assert time.monotonic() < deadline, "the prompts encoded before the slow image waited for it"
                time.sleep(0.02)
            assert not release.is_set()
        finally:
            release.set()
            job.join(120)
    records = _records(out)
    assert sorted(Path(r["path"]).name for r in records[:3]) == ["a.png", "b.png", "c.png"]
    assert [Path(r["path"]).name for r in records[3:]] == ["d.png"] and all("caption" in r for r in records)

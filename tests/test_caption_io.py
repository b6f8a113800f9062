"""Batch captioning without a model: inputs, shard assignment, the append-only output, progress."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.caption import (
    CaptionInputError, CaptionItem, RecordWriter, Shard, collect_inputs, plan_job, read_records, shard_of,
)
from service.commands.caption import _Progress


REPO = Path(__file__).resolve().parents[1]
IDS = [f"bucket/images/{i:05d}.jpg" for i in range(2000)]


def test_every_id_lands_in_exactly_one_shard_in_range_and_shards_are_balanced():
    for count in (1, 2, 3, 7, 16):
        assert all(0 <= shard_of(item_id, count) < count for item_id in IDS)
        shards = [Shard(index, count) for index in range(count)]
        owners = [[s.index for s in shards if s.owns(item_id)] for item_id in IDS]
        assert all(owner == [shard_of(item_id, count)] for owner, item_id in zip(owners, IDS))
        sizes = [sum(o == [i] for o in owners) for i in range(count)]
        assert sum(sizes) == len(IDS)
        # roughly balanced: within 30% of an even split (the binomial spread is a few percent here)
        assert 0.7 * len(IDS) / count < min(sizes) <= max(sizes) < 1.3 * len(IDS) / count, sizes


def test_shard_is_the_sha256_of_the_utf8_id_not_pythons_salted_hash():
    """The definition a resumed or re-sharded job relies on across versions and machines: the first 8 bytes
    of sha256(id as UTF-8), big-endian, mod COUNT (never `hash()`, which changes per process)."""
    for item_id in IDS[:200] + ["", "id-3", "ünïcödé/画像.png", "7"]:
        digest = hashlib.sha256(item_id.encode("utf-8")).digest()
        for count in (1, 2, 4, 5, 16, 1000):
            assert shard_of(item_id, count) == int.from_bytes(digest[:8], "big") % count, (item_id, count)


def test_shard_assignment_is_the_same_in_another_process():
    ids = IDS[:300]
    script = ("import json, sys; from service.caption import shard_of; "
              "print(json.dumps([shard_of(i, c) for i in json.load(sys.stdin) for c in (2, 3, 7, 16)]))")
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run([sys.executable, "-c", script], input=json.dumps(ids), capture_output=True,
                               text=True, cwd=REPO, env=env, timeout=60, check=True)
        assert json.loads(child.stdout) == [shard_of(i, c) for i in ids for c in (2, 3, 7, 16)]


def test_shard_assignment_ignores_order_and_neighbours():
    items = [CaptionItem(f"id-{i}", f"/x/{i}.png") for i in range(50)]
    shard = Shard(1, 4)
    forward, _, _ = plan_job(items, {}, shard)
    backward, _, _ = plan_job(items[::-1][:30], {}, shard)
    assert {i.id for i in backward} == {i.id for i in forward} & {i.id for i in items[::-1][:30]}
    assert {i.id for i in forward} == {i.id for i in items if shard_of(i.id, 4) == 1}
    assert 0 < len(forward) < len(items)  # the shard really filtered (else the comparison proves nothing)


@pytest.mark.parametrize("text", ["1", "a/2", "2/2", "-1/3", "0/0"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(CaptionInputError):
        Shard.parse(text)


def test_shard_defaults_from_the_indexed_job_environment():
    assert Shard.from_environment({}) is None
    assert Shard.from_environment({"JOB_COMPLETION_INDEX": "2"}) is None  # no count: not sharded
    assert Shard.from_environment({"JOB_COMPLETION_INDEX": "2", "TESSERA_SHARD_COUNT": "5"}) == Shard(2, 5)


def test_torn_last_line_is_cut_off_before_appending(tmp_path):
    out = tmp_path / "r.jsonl"
    with RecordWriter(out) as writer:
        writer.append({"id": "a", "caption": "x"})
        writer.append({"id": "b", "error": {"code": "empty", "message": "m"}})
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "capt')  # what a torn write would leave
    records = read_records(out)
    assert set(records) == {"a", "b"}
    with RecordWriter(out) as writer:
        writer.append({"id": "c", "caption": "y"})
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


def test_an_out_file_that_is_not_a_results_file_is_refused_untouched(tmp_path):
    """--out pointing at the wrong file: refused before anything is cut (the torn-line rule once removed the
    last line of any file), and a line without a caption or an error is not taken for a finished image."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"important line 1\nimportant line 2 no newline")
    manifest = tmp_path / "images.jsonl"
    manifest.write_bytes(b'{"id": "r", "path": "red.png"}\n{"id": "g", "path": "gray.png"}')
    for path in (notes, manifest):
        before = path.read_bytes()
        with pytest.raises(CaptionInputError, match="is not a caption record"):
            read_records(path)
        assert path.read_bytes() == before
    one_line = tmp_path / "one.jsonl"  # a manifest's single line, no newline: whole JSON, so not a torn record
    for content in (b'{"id": "r", "path": "red.png"}', b'{"id": "a", "caption": "x"}\n{"id": "q", "path": "x"}',
                    b'\xff\xfe binary\n'):
        one_line.write_bytes(content)
        with pytest.raises(CaptionInputError, match="is not a caption record"):
            read_records(one_line)
        assert one_line.read_bytes() == content
    only_torn = tmp_path / "torn.jsonl"
    only_torn.write_bytes(b"just words")
    with pytest.raises(CaptionInputError, match="torn.jsonl:1 is not a caption record"):
        read_records(only_torn)
    record = json.dumps({"id": "c", "caption": "一只猫坐在窗台上 café"}, ensure_ascii=False).encode()  # as written
    for cut in range(1, len(record) + 1):  # a record cut anywhere, inside a character or before its newline
        only_torn.write_bytes(b'{"id": "a", "caption": "x"}\n' + record[:cut])
        assert set(read_records(only_torn)) == {"a"}, record[:cut]
        assert only_torn.read_bytes() == b'{"id": "a", "caption": "x"}\n'
    with pytest.raises(CaptionInputError, match="not a regular file"):
        read_records(tmp_path)


def test_out_as_one_of_the_inputs_is_refused(tmp_path, capsys):
    from service.cli import main

    manifest = tmp_path / "images.jsonl"
    manifest.write_bytes(b'{"id": "r", "path": "red.png"}\n')
    assert main(["caption", str(manifest), "--out", str(tmp_path / "." / "images.jsonl"), "--model", "unused"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert manifest.read_bytes() == b'{"id": "r", "path": "red.png"}\n'


def test_image_files_that_are_not_regular_files_are_refused_before_reading(tmp_path):
    """A manifest line naming /dev/zero once read it until memory ran out."""
    from vision.image import ImageError, load_image, read_image_file

    for path in ("/dev/zero", tmp_path):
        with pytest.raises(ImageError, match="not a regular file") as caught:
            load_image(path)
        assert caught.value.code == "unreadable"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):  # opening it would block for a writer
        read_image_file(fifo, 1 << 20)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(ImageError) as caught:
        read_image_file(big, 1024)
    assert caught.value.code == "too_large"
    assert read_image_file(big, 2048) == b"\0" * 2048


def test_resume_plan_skips_done_and_optionally_retries_errors():
    items = [CaptionItem(x, x) for x in "abc"]
    done = {"a": {"id": "a", "caption": "x"}, "b": {"id": "b", "error": {"code": "empty", "message": ""}}}
    assert [i.id for i in plan_job(items, done, None)[0]] == ["c"]
    assert [i.id for i in plan_job(items, done, None, retry_errors=True)[0]] == ["b", "c"]


def test_inputs_directories_files_and_duplicates(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPG", "d/sub/a.png", "d/readme.txt", "single.bin"):
        (tmp_path / name).write_bytes(b"x")
    items, duplicates = collect_inputs([tmp_path / "d", tmp_path / "single.bin", tmp_path / "d" / "b.JPG"])
    assert [i.path for i in items] == [str(tmp_path / p) for p in ("d/b.JPG", "d/sub/a.png", "single.bin")]
    assert duplicates == 1
    with pytest.raises(CaptionInputError, match="does not exist"):
        collect_inputs([tmp_path / "missing"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    terminal = _Terminal()
    with _Progress(3, 30.0, stream=terminal) as progress:
        for _ in range(3):
            progress.update({"id": "x"})
    assert progress.bar is not None and "3/3" in terminal.getvalue() and "img/s" in terminal.getvalue()
    plain = io.StringIO()
    with _Progress(3, 0.0, stream=plain) as progress:
        progress.update({"id": "x"})
        progress.update({"id": "y", "error": {}})
    lines = plain.getvalue().splitlines()
    assert lines[-1].startswith("caption: 2/3 images (1 failed)") and "ETA" in lines[-1]


class _Engine:
    """Records what is submitted; refuses requests named in `refuse` as the engine refuses a prompt."""

    def __init__(self, refuse=()):
        self.submitted, self.refuse = [], set(refuse)

    def submit(self, request):
        from lm.requests import PromptTooLong

        if request in self.refuse:
            raise PromptTooLong(f"{request} is too long")
        self.submitted.append(request)
        return f"handle of {request}"


def _ready(*names):
    from collections import deque

    from service.caption import _Pending

    return deque((name, _Pending(CaptionItem(name, name), None, 0, {"encode_s": 0.1})) for name in names)


def _submit(ready, engine, slots, *, last=False, idle=False, concurrency=4):
    import queue
    import threading

    from service.caption import _submit_ready

    submitted = queue.Queue()
    _submit_ready(ready, engine, submitted, slots, threading.Event(), concurrency=concurrency, last=last, idle=idle)
    return [submitted.get_nowait() for _ in range(submitted.qsize())]


def test_prompts_reach_the_engine_only_when_they_fill_the_free_places():
    from service.caption import _Slots

    engine, slots = _Engine(), _Slots(4)
    ready = _ready("a", "b", "c")
    assert _submit(ready, engine, slots, last=False) == [] and len(ready) == 3  # 3 of 4 free: wait for more
    ready.extend(_ready("d", "e"))
    out = _submit(ready, engine, slots, last=False)
    assert engine.submitted == ["a", "b", "c", "d"] and [p.handle for p in out] == [f"handle of {n}" for n in "abcd"]
    assert slots.free == 0 and list(r[0] for r in ready) == ["e"]
    assert _submit(ready, engine, slots, last=False) == []  # no free place, fewer than `concurrency` waiting
    slots.give_back()
    slots.give_back()  # two places free, one prompt: it waits for a second one ...
    assert _submit(ready, engine, slots, last=False) == [] and engine.submitted == ["a", "b", "c", "d"]
    assert len(_submit(ready, engine, slots, last=True)) == 1  # ... unless no image is left to encode
    assert engine.submitted[-1] == "e" and slots.free == 1 and not ready


def test_a_full_queue_of_prompts_waits_for_a_place_and_a_refused_prompt_is_an_error_record():
    import threading

    from service.caption import _Slots

    engine, slots = _Engine(refuse={"b"}), _Slots(3)
    for _ in range(3):
        slots.take()
    ready = _ready("a", "b", "c")
    threading.Timer(0.2, slots.give_back).start()  # a caption completes
    out = _submit(ready, engine, slots, concurrency=3)  # 3 prompts = concurrency: waits for a place
    assert engine.submitted == ["a"] and [p.handle for p in out] == ["handle of a"]
    assert list(r[0] for r in ready) == ["b", "c"] and slots.free == 0
    slots.give_back()
    slots.give_back()
    out = _submit(ready, engine, slots, last=True, concurrency=3)
    assert engine.submitted == ["a", "c"] and slots.free == 1  # the refused prompt's place was given back
    assert out[0] == {"id": "b", "path": "b", "error": {"code": "prompt_too_long", "message": "b is too long"},
                      "timings": {"encode_s": 0.1}} and out[1].handle == "handle of c"


def test_while_the_tower_waits_for_an_image_the_ready_prompts_take_the_free_places_without_waiting():
    from service.caption import _Slots

    engine, slots = _Engine(), _Slots(4)
    slots.take()
    slots.take()
    ready = _ready("a", "b", "c")
    assert len(_submit(ready, engine, slots, idle=True)) == 2  # two free places: two prompts, no wait
    assert engine.submitted == ["a", "b"] and slots.free == 0 and len(ready) == 1
    assert _submit(ready, engine, slots, idle=True) == []  # none free: it returns at once

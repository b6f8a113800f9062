"""Batch captioning without a model: inputs, shard assignment, the append-only output, progress."""

from __future__ import annotations

import io
import json

import pytest

from service.caption import (
    CaptionInputError, CaptionItem, RecordWriter, Shard, collect_inputs, plan_job, read_records, shard_of,
)
from service.commands.caption import _Progress


def test_every_id_lands_in_exactly_one_shard():
    ids = [f"bucket/images/{i:05d}.jpg" for i in range(2000)]
    for count in (1, 2, 3, 7, 16):
        shards = [Shard(index, count) for index in range(count)]
        owners = [[s.index for s in shards if s.owns(item_id)] for item_id in ids]
        assert all(len(o) == 1 for o in owners)
        sizes = [sum(o == [i] for o in owners) for i in range(count)]
        assert min(sizes) > 0.7 * len(ids) / count  # roughly balanced


def test_shard_assignment_ignores_order_and_neighbours():
    items = [CaptionItem(f"id-{i}", f"/x/{i}.png") for i in range(50)]
    shard = Shard(1, 4)
    forward, _, _ = plan_job(items, {}, shard)
    backward, _, _ = plan_job(items[::-1][:30], {}, shard)
    assert {i.id for i in backward} == {i.id for i in forward} & {i.id for i in items[::-1][:30]}
    assert shard_of("id-3", 4) == shard_of("id-3", 4)


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

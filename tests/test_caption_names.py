"""`tessera caption` on awkward directories: a file name that is not UTF-8 gets a record under a stable
escaped id (resume and shards work on it), a dangling symbolic link gets an error record naming it,
and --retry-errors leaves exactly one record per id."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from service.caption import drop_records, escape_undecodable, shard_of
from service.cli import main
from service.tiny_checkpoints import write_tiny_captioning_checkpoint

BAD_NAME = b"bad_name_\xff\xfe.png"  # bytes ff fe are not UTF-8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_captioning_checkpoint(tmp_path_factory.mktemp("tiny-captioning-names"), layers=2)


def _png(path, colour) -> None:
    Image.new("RGB", (64, 48), colour).save(path, format="PNG")


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    _png(root / "ok.png", (200, 30, 30))
    try:
        with open(os.path.join(os.fsencode(root), BAD_NAME), "wb") as out:
            _png(out, (30, 200, 30))
    except OSError as error:  # a file system that only takes UTF-8 names cannot hold the case
        pytest.skip(f"this file system refuses non-UTF-8 names: {error}")
    return root


def _bad_id(root: Path) -> str:
    return f"{root}/bad_name_\\xff\\xfe.png"  # the bytes as backslash escapes, literally


def _caption(capsys, *args) -> tuple[int, dict, str]:
    code = main(["caption", *map(str, args), "--max-new-tokens", "2", "--concurrency", "2"])
    out, err = capsys.readouterr()
    return code, (json.loads(out)["summary"] if out.strip() else {}), err


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8


def test_non_utf8_name_gets_an_escaped_stable_id_and_resume_skips_it(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out)
    assert code == 0, err
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {str(images / "ok.png"), _bad_id(images)}
    assert "caption" in records[_bad_id(images)] and records[_bad_id(images)]["path"] == _bad_id(images)
    assert summary["captioned"] == 2
    first = out.read_bytes()
    code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out)  # a rerun: nothing left
    assert code == 0, err
    assert (summary["skipped"], summary["processed"]) == (2, 0) and out.read_bytes() == first


def test_shards_take_the_escaped_id(checkpoint, images, tmp_path, capsys):
    seen = []
    for index in range(2):
        out = tmp_path / f"shard-{index}.jsonl"
        code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out, "--shard", f"{index}/2")
        assert code == 0, err
        ids = [r["id"] for r in _records(out)] if out.exists() else []
        assert all(shard_of(i, 2) == index for i in ids)
        assert summary["inputs"] == len(ids)
        seen += ids
    assert sorted(seen) == sorted([str(images / "ok.png"), _bad_id(images)])


def test_dangling_symlink_gets_an_error_record_and_retry_keeps_one_record_per_id(checkpoint, images, tmp_path,
                                                                                 capsys):
    (images / "gone.png").symlink_to(images / "missing-target.png")
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out)
    assert code == 0, err
    records = {r["id"]: r for r in _records(out)}
    gone = records[str(images / "gone.png")]["error"]
    assert gone["code"] == "dangling_symlink"
    assert str(images / "gone.png") in gone["message"] and "missing-target.png" in gone["message"]
    assert records[str(images / "empty.png")]["error"]["code"] == "empty"
    assert (summary["captioned"], summary["failed"]) == (2, 2)
    captioned = [line for line in out.read_bytes().splitlines() if b'"caption"' in line]

    (images / "gone.png").unlink()  # both fixed, then retried
    (images / "gone.png").symlink_to(images / "ok.png")
    _png(images / "empty.png", (10, 10, 200))
    code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out, "--retry-errors")
    assert code == 0, err
    assert (summary["skipped"], summary["processed"], summary["captioned"]) == (2, 2, 2)
    ids = [r["id"] for r in _records(out)]
    assert len(ids) == len(set(ids)) == 4, "one record per id"
    assert all("caption" in r for r in _records(out))
    assert out.read_bytes().splitlines()[:2] == captioned, "the records kept are unchanged"


def test_drop_records_rewrites_only_the_given_ids(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "caption" if i != "b" else "error": "x"}, ensure_ascii=False) for i in ("a", "b", "é")]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert drop_records(out, {"b"}) == 1
    assert out.read_text(encoding="utf-8") == f"{lines[0]}\n{lines[2]}\n"
    assert drop_records(out, {"nobody"}) == 0 and drop_records(out, set()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"], "no temporary file left behind"


def test_escape_undecodable_is_the_bytes_as_backslash_escapes():
    name = os.fsdecode(b"dir/bad_name_\xff\xfe.png")
    assert escape_undecodable(name) == os.fsencode(name).decode("utf-8", "backslashreplace")
    assert escape_undecodable(name).encode("utf-8")  # writable
    assert escape_undecodable("plain/é.png") == "plain/é.png"

"""`tessera caption` on awkward directories: a file name that is not UTF-8 gets a record under a stable
escaped id (resume and shards work on it), a name that reads like such an escaped id gets an id of its
own (no two files share one), a dangling or looping symbolic link gets an error record naming it, and
--retry-errors leaves exactly one record per id."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from service.caption import (
    CaptionInputError, collect_inputs, drop_records, escape_undecodable, name_from_id, name_id, shard_of,
)
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


# The file the tester added beside BAD_NAME: its name is the characters "\xff\xfe", written out.
LOOKALIKE_NAME = "bad_name_\\xff\\xfe.png"


@pytest.fixture
def lookalike(images) -> Path:
    """`images` plus a UTF-8 file named like BAD_NAME's escaped form: the two used to share an id."""
    _png(images / LOOKALIKE_NAME, (30, 30, 200))
    return images


def _files_of(ids) -> set[bytes]:
    """The file system names the ids lead back to."""
    return {os.fsencode(name_from_id(item_id)) for item_id in ids}


def test_a_name_that_reads_like_an_escaped_id_gets_its_own_id(checkpoint, lookalike, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, summary, err = _caption(capsys, lookalike, "--model", checkpoint, "--out", out)
    assert code == 0, err
    records = {r["id"]: r for r in _records(out)}
    assert len(records) == 3 and all("caption" in r for r in records.values())
    assert _bad_id(lookalike) in records, "the non-UTF-8 name keeps its id (old output files still resume)"
    assert str(lookalike / "ok.png") in records
    assert all(r["path"] == item_id for item_id, r in records.items())
    assert _files_of(records) == {os.fsencode(p) for p in lookalike.iterdir()}, "each id leads back to its own file"
    assert (summary["captioned"], summary["duplicates"]) == (3, 0)
    first = out.read_bytes()
    code, summary, err = _caption(capsys, lookalike, "--model", checkpoint, "--out", out)  # a rerun: nothing left
    assert code == 0, err
    assert (summary["skipped"], summary["processed"]) == (3, 0) and out.read_bytes() == first


def test_shards_cover_both_lookalike_names_exactly_once(checkpoint, lookalike, tmp_path, capsys):
    seen = []
    for index in range(2):
        out = tmp_path / f"shard-{index}.jsonl"
        code, summary, err = _caption(capsys, lookalike, "--model", checkpoint, "--out", out, "--shard",
                                      f"{index}/2")
        assert code == 0, err
        ids = [r["id"] for r in _records(out)] if out.exists() else []
        assert all(shard_of(i, 2) == index for i in ids) and summary["inputs"] == len(ids)
        seen += ids
    assert len(seen) == len(set(seen)) == 3
    assert _files_of(seen) == {os.fsencode(p) for p in lookalike.iterdir()}


def test_name_id_is_one_to_one_and_leaves_plain_names_alone():
    # Every string up to 4 characters over the characters that matter: backslash, the letters and hex
    # digits of the escapes, an undecodable byte (U+DCFF), a lone high surrogate, a UTF-8 letter.
    alphabet = ["\\", "x", "u", "d", "8", "f", "\udcff", "\ud800", "é"]
    names = ["".join(chars) for n in range(5) for chars in itertools.product(alphabet, repeat=n)]
    ids = [name_id(name) for name in names]
    assert len(set(ids)) == len(names), "two names share an id"
    for name, item_id in zip(names, ids):
        item_id.encode("utf-8")  # writable
        assert name_from_id(item_id) == name
        if "\\" not in name and not any(0xD800 <= ord(char) <= 0xDFFF for char in name):
            assert item_id == name
    for plain in ("plain/é.png", "C:\\images\\a.png", "a\\b.png"):  # backslashes that start no escape
        assert name_id(plain) == plain


def test_one_id_for_two_different_files_is_an_input_error_and_the_same_file_twice_a_duplicate(tmp_path):
    for name in ("a.png", "b.png"):
        _png(tmp_path / name, (1, 2, 3))
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"id": "x", "path": "a.png"}\n{"id": "x", "path": "b.png"}\n', encoding="utf-8")
    with pytest.raises(CaptionInputError, match=r"'x' is given to two different files.*a\.png.*b\.png"):
        collect_inputs([clash])
    again = tmp_path / "again.jsonl"
    again.write_text(f'{{"id": "x", "path": "a.png"}}\n{{"id": "x", "path": "{tmp_path / "a.png"}"}}\n',
                     encoding="utf-8")
    items, duplicates = collect_inputs([again, tmp_path])
    assert [i.id for i in items] == ["x", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert duplicates == 1


def test_symlink_loop_gets_an_error_record_that_says_so(checkpoint, images, tmp_path, capsys):
    (images / "loop.png").symlink_to(images / "loop.png")
    (images / "ping.png").symlink_to(images / "pong.png")
    (images / "pong.png").symlink_to(images / "ping.png")
    out = tmp_path / "out.jsonl"
    code, summary, err = _caption(capsys, images, "--model", checkpoint, "--out", out)
    assert code == 0, err
    records = {r["id"]: r for r in _records(out)}
    for name in ("loop.png", "ping.png", "pong.png"):
        error = records[str(images / name)]["error"]
        assert error["code"] == "symlink_loop"
        assert str(images / name) in error["message"] and "loop" in error["message"]
        assert "does not exist" not in error["message"]
    assert (summary["captioned"], summary["failures"]) == (2, {"symlink_loop": 3})
    with pytest.raises(CaptionInputError, match="symbolic link loop"):
        collect_inputs([images / "loop.png"])

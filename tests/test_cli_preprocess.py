"""`tessera preprocess` through the real CLI entry point: JSON lines, --out, exit codes, flag errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cli import main
from vision.image import load_image
from vision.pan_and_scan import PanAndScanConfig
from vision.preprocess import preprocess
from vision.sample import synthetic_photo


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-images")
    wide = folder / "wide.jpg"
    synthetic_photo(1000, 400).save(wide, "JPEG", quality=90)
    square = folder / "square.png"
    synthetic_photo(300, 300, seed=1).save(square, "PNG")
    broken = folder / "broken.jpg"
    broken.write_bytes(wide.read_bytes()[:2000])
    text = folder / "notes.png"
    text.write_text("not an image")
    return {"wide": wide, "square": square, "broken": broken, "text": text}


def run_cli(capsys, *argv: str):
    code = main(["preprocess", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_one_json_line_per_image(capsys, images):
    code, lines, err = run_cli(capsys, "--pan-and-scan", str(images["wide"]), str(images["square"]))
    assert code == 0
    config = PanAndScanConfig(enabled=True)
    expected = [preprocess(load_image(images[name]), config) for name in ("wide", "square")]
    assert lines == [
        {"image": str(images[name]), "width": result.width, "height": result.height,
         "num_crops": result.num_crops, "boxes": [list(box) for box in result.boxes]}
        for name, result in zip(("wide", "square"), expected)
    ]
    assert lines[0]["num_crops"] == 3 and lines[1]["num_crops"] == 0  # 1000/400 = 2.5 rounds up to 3
    assert "2 of 2 images" in err


def test_crop_flags_change_the_plan(capsys, images):
    for flags, crops in [(["--max-crops", "2"], 2), (["--min-ratio", "3"], 0), (["--min-crop-size", "400"], 2),
                         (["--min-crop-size", "100", "--max-crops", "16", "--min-ratio", "2.5"], 3)]:
        code, lines, _ = run_cli(capsys, "--pan-and-scan", *flags, str(images["wide"]))
        assert code == 0 and lines[0]["num_crops"] == crops, flags
    code, lines, _ = run_cli(capsys, str(images["wide"]))  # Pan & Scan off by default
    assert code == 0 and lines[0]["num_crops"] == 0 and lines[0]["boxes"] == []


def test_bad_images_reported_and_rest_processed(capsys, images, tmp_path):
    missing = tmp_path / "missing.jpg"
    code, lines, err = run_cli(capsys, str(images["broken"]), str(images["text"]), str(missing),
                               str(images["square"]))
    assert code == 1
    assert [line["image"] for line in lines] == [str(images[n]) for n in ("broken", "text")] + [
        str(missing), str(images["square"])]
    assert [line["error"]["code"] for line in lines[:3]] == ["truncated", "unsupported_format", "unreadable"]
    assert all(line["error"]["message"] for line in lines[:3])
    assert lines[3]["width"] == 300 and "3 failed" in err


def test_out_saves_the_tiles(capsys, images, tmp_path):
    out = tmp_path / "tiles.npy"
    code, lines, _ = run_cli(capsys, "--pan-and-scan", "--out", str(out), str(images["wide"]))
    assert code == 0
    tiles = np.load(out)
    expected = preprocess(load_image(images["wide"]), PanAndScanConfig(enabled=True)).tiles
    assert tiles.dtype == np.float32 and tiles.shape == (1 + lines[0]["num_crops"], 3, 896, 896)
    np.testing.assert_array_equal(tiles, expected)


def test_out_with_a_bad_image_writes_nothing(capsys, images, tmp_path):
    out = tmp_path / "tiles.npy"
    code, lines, _ = run_cli(capsys, "--out", str(out), str(images["text"]))
    assert code == 1 and "error" in lines[0] and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--max-crops", "1"], "--max-crops must be an integer in [2, 16]"),
    (["--max-crops", "100"], "--max-crops must be an integer in [2, 16]"),
    (["--min-crop-size", "-5"], "--min-crop-size must be a positive integer"),
    (["--min-ratio", "0.5"], "--min-ratio must be a finite number >= 1.0"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_flag_values(capsys, images, argv, message):
    code, lines, err = run_cli(capsys, *argv, str(images["wide"]))
    assert code == 2 and lines == [] and message in err


def test_out_needs_exactly_one_image(capsys, images, tmp_path):
    code, lines, err = run_cli(capsys, "--out", str(tmp_path / "t.npy"), str(images["wide"]), str(images["square"]))
    assert code == 2 and lines == [] and "--out saves the tiles of one image; got 2 images" in err


def test_unparseable_flag_is_an_argparse_error(capsys, images):
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "--min-crop-size", "big", str(images["wide"])])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("where, reason", [("missing/tiles.npy", "does not exist"), (".", "is a directory"),
                                           ("notes.txt/tiles.npy", "is not a directory")])
def test_an_unwritable_out_is_refused_before_the_work(capsys, images, tmp_path, where, reason):
    """--out that cannot be written is a usage error (2) before any image is read (no line printed)."""
    (tmp_path / "notes.txt").write_text("x")
    code, lines, err = run_cli(capsys, str(images["wide"]), "--out", str(tmp_path / where))
    assert code == 2 and lines == [] and reason in err, err

"""`tessera encode`: JSON lines per image, soft tokens saved with --out equal the reference's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.cli import main
from vision.pan_and_scan import PanAndScanConfig
from vision.preprocess import preprocess_batch
from vision.sample import synthetic_photo
from vision_checkpoints import with_random_projector


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir, tmp_path_factory):
    return with_random_projector(tiny_vlm_dir, tmp_path_factory.mktemp("tiny-vlm-proj"))


@pytest.fixture(scope="module")
def wide_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "wide.jpg"
    synthetic_photo(1200, 500).save(path, format="JPEG")  # 2.4:1, Pan & Scan cuts it into crops
    return path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_encode_pan_and_scan_matches_reference(vlm_dir, wide_photo, tmp_path, capsys):
    from transformers import Gemma3ForConditionalGeneration

    out = tmp_path / "soft_tokens.npy"
    assert main(["encode", "--model", str(vlm_dir), str(wide_photo), "--pan-and-scan", "--out", str(out)]) == 0
    (line,) = json_lines(capsys.readouterr().out)
    (tiles,) = preprocess_batch([wide_photo], PanAndScanConfig(enabled=True))
    assert line["num_crops"] == tiles.num_crops >= 2
    assert line["soft_tokens"] == [1 + tiles.num_crops, 256, 64]
    assert line["encode_ms"] > 0 and line["preprocess_ms"] > 0

    reference = Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference.get_image_features(pixel_values=torch.from_numpy(tiles.tiles)).pooler_output
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-4, rtol=0)


def test_bad_image_is_reported_and_the_rest_encoded(vlm_dir, wide_photo, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main(["encode", "--model", str(vlm_dir), str(bad), str(wide_photo)]) == 1
    error, good = json_lines(capsys.readouterr().out)
    assert error["image"] == str(bad) and error["error"]["code"] == "unsupported_format"  # text, not an image
    assert error["error"]["message"]
    assert good["num_crops"] == 0 and good["soft_tokens"] == [1, 256, 64]


def test_onnx_backend_from_the_command_line(vlm_dir, wide_photo, tmp_path, capsys):
    args = ["encode", "--model", str(vlm_dir), str(wide_photo), "--backend", "onnx",
            "--onnx-cache", str(tmp_path / "onnx"), "--out", str(tmp_path / "onnx.npy")]
    assert main(args) == 0
    assert main(["encode", "--model", str(vlm_dir), str(wide_photo), "--out", str(tmp_path / "torch.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy"), atol=1e-3, rtol=0)


def test_not_a_checkpoint_is_a_usage_error(tmp_path, wide_photo, capsys):
    assert main(["encode", "--model", str(tmp_path), str(wide_photo)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_out_without_npy_is_checked_as_the_file_numpy_writes(vlm_dir, wide_photo, tmp_path, capsys):
    """numpy.save appends .npy: `--out tokens` writes tokens.npy, even beside a folder named tokens."""
    (tmp_path / "tokens").mkdir()
    assert main(["encode", "--model", str(vlm_dir), str(wide_photo), "--out", str(tmp_path / "tokens")]) == 0
    assert np.load(tmp_path / "tokens.npy").ndim == 3


def test_an_unwritable_out_is_refused_before_loading(tmp_path, wide_photo, capsys):
    assert main(["encode", "--model", str(tmp_path / "never-read"), str(wide_photo),
                 "--out", str(tmp_path / "missing" / "tokens.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_named_text_only_model_is_resolved_and_refused(wide_photo, capsys):
    """`--model gemma3-270m` names the embedded model (not a path), which has no vision tower."""
    assert main(["encode", "--model", "gemma3-270m", str(wide_photo)]) == 2
    assert "not a vision-language checkpoint" in capsys.readouterr().err

"""preprocess / preprocess_batch against the reference Gemma3ImageProcessorPil on the same images.

Parity means: the same number of crops and every tile within 1e-5 of the reference's pixel_values.
Images are generated here at modest sizes (the reference is slow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vision.image import load_image
from vision.pan_and_scan import PanAndScanConfig, plan_crops
from vision.preprocess import PreprocessedImage, preprocess, preprocess_batch

TOLERANCE = 1e-5
PAS = PanAndScanConfig(enabled=True)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured RGB picture (gradients, waves, noise) so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width, 1) * 255, y / max(height, 1) * 255,
                    128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)], -1)
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def reference(images: list[Image.Image], config: PanAndScanConfig):
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        resample=Image.Resampling.BILINEAR,
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=config.enabled,
        pan_and_scan_min_crop_size=config.min_crop_size,
        pan_and_scan_max_num_crops=config.max_num_crops,
        pan_and_scan_min_ratio_to_activate=config.min_ratio_to_activate,
    )
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"], [int(n) for n in out["num_crops"]]


def assert_matches_reference(ours: list[PreprocessedImage], ref_images, config) -> None:
    pixel_values, num_crops = reference(ref_images, config)
    assert [result.num_crops for result in ours] == num_crops
    tiles = np.concatenate([result.tiles for result in ours])
    assert tiles.shape == pixel_values.shape
    assert np.abs(tiles - pixel_values).max() <= TOLERANCE


@pytest.mark.parametrize("width, height, config, expected_crops", [
    (1000, 600, PAS, 2),  # landscape
    (500, 1100, PAS, 2),  # portrait
    (700, 700, PAS, 0),  # square
    (600, 500, PAS, 2),  # ratio exactly 1.2: activates
    (599, 500, PAS, 0),  # ratio just under 1.2
    (512, 300, PAS, 2),  # crops exactly min_crop_size wide
    (510, 300, PAS, 0),  # crops of 255 < min_crop_size: none
    (900, 200, PAS, 0),  # short side below min_crop_size
    (2000, 300, PAS, 4),  # capped by max_num_crops
    (300, 1900, PanAndScanConfig(enabled=True, max_num_crops=3), 3),
    (1201, 400, PanAndScanConfig(enabled=True, min_crop_size=100, min_ratio_to_activate=1.5), 3),
    (1000, 600, PanAndScanConfig(enabled=False), 0),  # Pan & Scan off
    (10, 10, PAS, 0),
    (1, 300, PAS, 0),
    (300, 1, PAS, 0),
    (1, 1, PAS, 0),
])
def test_parity_with_reference(width, height, config, expected_crops):
    image = photo(width, height)
    ours = preprocess(image, config)
    assert ours.num_crops == expected_crops == len(ours.boxes)
    assert (ours.width, ours.height) == (width, height)
    assert ours.tiles.shape == (1 + expected_crops, 3, 896, 896) and ours.tiles.dtype == np.float32
    assert ours.tiles.min() >= -1.0 and ours.tiles.max() <= 1.0
    assert_matches_reference([ours], [image], config)


def test_boxes_are_the_plan_and_each_crop_tile_comes_from_its_box():
    image = photo(1030, 400)  # three crops, the last one clipped at the right edge
    result = preprocess(image, PAS)
    assert list(result.boxes) == plan_crops(1030, 400, PAS)
    assert result.boxes[-1][2] == 1030
    for index, box in enumerate(result.boxes, start=1):
        np.testing.assert_array_equal(result.tiles[index], preprocess(image.crop(box), PAS).tiles[0])


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("RGB", "JPEG"),
])
def test_every_mode_end_to_end(mode, fmt):
    """Bytes through load_image then preprocess, against the reference fed the same decoded file."""
    image = photo(700, 400)
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 700, dtype=np.uint8), (400, 1)), "L"))
    data = encode(image.convert(mode), fmt)
    ours = preprocess(load_image(data), PAS)
    assert_matches_reference([ours], [Image.open(io.BytesIO(data))], PAS)


def test_16bit_greyscale_end_to_end():
    """The reference saturates 16-bit grey; fed our 8-bit RGB it agrees, and the tile is not white."""
    values = (np.add.outer(np.arange(300), np.arange(500)) * 80).astype(np.uint16)
    rgb = load_image(encode(Image.fromarray(values), "PNG"))
    ours = preprocess(rgb, PAS)
    assert_matches_reference([ours], [rgb], PAS)
    assert ours.tiles.mean() < 0.5


def test_batch_matches_single_and_reports_errors_in_place(tmp_path):
    images = [photo(1000, 600, seed=1), photo(400, 900, seed=2), photo(64, 64, seed=3)]
    path = tmp_path / "second.png"
    path.write_bytes(encode(images[1], "PNG"))
    sources = [images[0], b"not an image", path, encode(images[2], "PNG"), b""]
    results = preprocess_batch(sources, PAS, num_workers=2)
    assert [type(r).__name__ for r in results] == [
        "PreprocessedImage", "ImageError", "PreprocessedImage", "PreprocessedImage", "ImageError"]
    assert results[1].code == "unsupported_format" and results[4].code == "empty"
    for result, image in zip([results[0], results[2], results[3]], images):
        single = preprocess(image, PAS)
        assert result.boxes == single.boxes
        np.testing.assert_array_equal(result.tiles, single.tiles)
    assert_matches_reference([results[0], results[2], results[3]], images, PAS)


def test_preprocess_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        preprocess(photo(20, 20).convert("L"), PAS)
    assert isinstance(preprocess_batch([photo(20, 20)], PAS, num_workers=1)[0], PreprocessedImage)
    with pytest.raises(ValueError, match="RGB"):
        preprocess_batch([photo(20, 20).convert("RGBA")], PAS, num_workers=1)

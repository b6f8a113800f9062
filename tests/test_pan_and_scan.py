"""Crop geometry against the reference processor's Pan & Scan, through its public call.

The reference (`Gemma3ImageProcessorPil`) only shows its crops after resizing them, so both sides tile
the same noise image at a small tile size: the tiles are bit-exact Pillow BILINEAR resizes of each
crop box (see vision.preprocess), so a box off by one pixel changes them, and the crop count equals the
processor's `num_crops`."""

import numpy as np
import pytest
from PIL import Image

from vision.pan_and_scan import MAX_CROPS_CAP, PanAndScanConfig, num_tiles, plan_crops
from vision.preprocess import preprocess

SIZES = [
    (896, 896), (1000, 1199), (1200, 1000), (1199, 1000), (1000, 1200), (3000, 800), (800, 3000),
    (4032, 3024), (1920, 1080), (1080, 1920), (10, 10), (1, 500), (500, 1), (511, 256), (512, 256),
    (767, 256), (768, 256), (2000, 300), (5000, 600), (257, 1000), (6000, 1000),
]
CONFIGS = [
    PanAndScanConfig(enabled=True),
    PanAndScanConfig(enabled=True, min_crop_size=128, max_num_crops=6, min_ratio_to_activate=1.5),
    PanAndScanConfig(enabled=True, max_num_crops=2),
]
TILE = 48  # small tiles keep the reference fast; each output pixel still averages a few source pixels


def noise(width: int, height: int) -> Image.Image:
    """Independent random pixels: a crop box shifted by one pixel resizes to different values."""
    rng = np.random.default_rng(width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def images():
    return {size: noise(*size) for size in SIZES}


def reference_tiles(image: Image.Image, config: PanAndScanConfig) -> tuple[np.ndarray, int]:
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=config.min_crop_size,
        pan_and_scan_max_num_crops=config.max_num_crops,
        pan_and_scan_min_ratio_to_activate=config.min_ratio_to_activate,
    )
    # A 1-pixel-high RGB image is ambiguous to the processor's channel inference: state the layout.
    out = processor(images=[image], return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"], int(out["num_crops"][0])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"min{c.min_crop_size}-max{c.max_num_crops}")
@pytest.mark.parametrize("width,height", SIZES)
def test_crops_match_reference(images, width, height, config):
    image = images[(width, height)]
    expected_tiles, expected_crops = reference_tiles(image, config)
    boxes = plan_crops(width, height, config)
    assert len(boxes) == expected_crops
    assert num_tiles(width, height, config) == 1 + expected_crops
    ours = preprocess(image, config, size=TILE)
    assert ours.boxes == tuple(boxes)
    assert ours.tiles.shape == expected_tiles.shape
    assert np.abs(ours.tiles - expected_tiles).max() <= 1e-5


def test_a_box_off_by_one_pixel_changes_the_tile(images):
    """Guard for the parity test above: at this tile size one pixel of shift is visible."""
    image = images[(3000, 800)]
    (x0, y0, x1, y1), *_ = plan_crops(3000, 800, CONFIGS[0])
    exact = preprocess(image.crop((x0, y0, x1, y1)), PanAndScanConfig(), size=TILE).tiles
    shifted = preprocess(image.crop((x0 + 1, y0, x1 + 1, y1)), PanAndScanConfig(), size=TILE).tiles
    assert np.abs(exact - shifted).max() > 1e-3


def test_disabled_means_no_crops():
    assert plan_crops(3000, 800, PanAndScanConfig()) == []
    assert num_tiles(3000, 800, PanAndScanConfig()) == 1


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"max_num_crops": 1}, "max_num_crops"),
        ({"max_num_crops": MAX_CROPS_CAP + 1}, "max_num_crops"),
        ({"min_crop_size": -5}, "min_crop_size"),
        ({"min_crop_size": 0}, "min_crop_size"),
        ({"min_ratio_to_activate": 0.5}, "min_ratio_to_activate"),
        ({"min_ratio_to_activate": float("nan")}, "min_ratio_to_activate"),
    ],
)
def test_nonsense_config_is_refused_with_the_field_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PanAndScanConfig(enabled=True, **kwargs)


def test_zero_side_is_refused():
    with pytest.raises(ValueError, match="positive"):
        plan_crops(0, 100, PanAndScanConfig(enabled=True))

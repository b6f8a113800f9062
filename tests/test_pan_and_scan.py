"""Crop geometry against the reference processor's own Pan & Scan on the same image sizes."""

import numpy as np
import pytest

from vision.pan_and_scan import MAX_CROPS_CAP, PanAndScanConfig, num_tiles, plan_crops

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


@pytest.fixture(scope="module")
def reference():
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"min{c.min_crop_size}-max{c.max_num_crops}")
@pytest.mark.parametrize("width,height", SIZES)
def test_boxes_match_reference_crops(reference, width, height, config):
    image = np.arange(height * width, dtype=np.int64).reshape(1, height, width)
    expected = reference.pan_and_scan(
        image,
        pan_and_scan_min_crop_size=config.min_crop_size,
        pan_and_scan_max_num_crops=config.max_num_crops,
        pan_and_scan_min_ratio_to_activate=config.min_ratio_to_activate,
    )
    boxes = plan_crops(width, height, config)
    assert len(boxes) == len(expected)
    for (x0, y0, x1, y1), crop in zip(boxes, expected):
        np.testing.assert_array_equal(image[:, y0:y1, x0:x1], crop)
    assert num_tiles(width, height, config) == 1 + len(expected)


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

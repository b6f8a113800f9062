"""vision.resample against Pillow itself: `Image.crop(box).resize((s, s), BILINEAR)`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vision.resample import prepare_source, resize_bilinear


def pillow(rgb: np.ndarray, box, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).crop(box).resize((size, size), Image.Resampling.BILINEAR))


def test_random_sizes_boxes_and_targets_match_pillow():
    rng = np.random.default_rng(0)
    for trial in range(60):
        width, height = (int(v) for v in rng.integers(1, 500, 2))
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1)))
        if trial % 3 == 0:
            box = (0, 0, width, height)
        size = 896 if trial % 2 == 0 else int(rng.integers(1, 400))
        source = prepare_source(rgb, [box], size)
        np.testing.assert_array_equal(resize_bilinear(source, box, size), pillow(rgb, box, size), err_msg=str(
            (width, height, box, size)))


@pytest.mark.parametrize("width, height, box", [
    (1500, 1000, (0, 0, 1500, 1000)),  # both passes shrink, horizontal first
    (1000, 1500, (0, 0, 1000, 1500)),  # height shrinks far more: Pillow 13 runs the vertical pass first
    (1000, 1500, (0, 750, 1000, 1500)),  # a bottom crop
    (2000, 900, (1000, 0, 2000, 900)),  # a right crop
    (896, 2000, (0, 0, 896, 2000)),  # vertical only
    (2000, 896, (0, 0, 2000, 896)),  # horizontal only
    (896, 896, (0, 0, 896, 896)),  # nothing to do
    (300, 200, (0, 0, 300, 200)),  # enlarging
])
def test_pass_order_cases_match_pillow(width, height, box):
    rgb = np.random.default_rng(width + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    source = prepare_source(rgb, [box], 896)
    np.testing.assert_array_equal(resize_bilinear(source, box, 896), pillow(rgb, box, 896))


def test_unprepared_box_is_refused():
    rgb = np.zeros((100, 200, 3), np.uint8)
    source = prepare_source(rgb, [(0, 0, 200, 100)], 896)  # enlarging: horizontal first but no transpose
    with pytest.raises(ValueError, match="prepare_source"):
        resize_bilinear(prepare_source(rgb, [], 50), (0, 0, 200, 100), 50)
    assert resize_bilinear(source, (0, 0, 200, 100), 896).shape == (896, 896, 3)

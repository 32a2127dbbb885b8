"""Tests for the outline overlays of unet_nuclei/plots.py (draw_outlines).

The expected values are worked out by hand in the comments, so a wrong implementation fails here rather
than agreeing with itself.
"""

import numpy as np
import pytest

from conftest import squares
from unet_nuclei.plots import draw_outlines

# ----------------------------------------------------------------------------------------------------
# draw_outlines
# ----------------------------------------------------------------------------------------------------

# Two touching 6x6 squares: A at rows 2-7, columns 2-7 and B at rows 2-7, columns 8-13.
TOUCHING = squares((12, 16), (2, 8, 2, 8, 1), (2, 8, 8, 14, 2))


def _ring(shape, r0, r1, c0, c1, width=1):
    ring = np.zeros(shape, bool)
    ring[r0:r1, c0:c1] = True
    ring[r0 + width : r1 - width, c0 + width : c1 - width] = False
    return ring


def test_outlines_of_touching_instances_are_separate():
    image = np.full((12, 16, 3), 40, np.uint8)
    before = image.copy()
    result = draw_outlines(image, TOUCHING, color=(255, 0, 0))
    assert result.shape == image.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(image, before)
    # Each 6x6 square gets its own 1-pixel ring of 20 pixels, including the shared columns 7 and 8.
    expected = _ring(TOUCHING.shape, 2, 8, 2, 8) | _ring(TOUCHING.shape, 2, 8, 8, 14)
    coloured = np.all(result == (255, 0, 0), axis=2)
    np.testing.assert_array_equal(coloured, expected)
    assert coloured[4, 7] and coloured[4, 8]
    assert not coloured[4, 4]  # Interior of A.
    np.testing.assert_array_equal(result[~expected], image[~expected])


def test_outlines_of_binary_mask_follow_connected_components():
    # As one binary mask the two squares are one 6x12 component: the shared columns are interior.
    result = draw_outlines(np.zeros((12, 16, 3), np.uint8), TOUCHING > 0)
    coloured = np.all(result == (255, 255, 0), axis=2)
    np.testing.assert_array_equal(coloured, _ring(TOUCHING.shape, 2, 8, 2, 14))
    assert not coloured[4, 7] and not coloured[4, 8]


def test_outline_thickness_and_image_edge():
    labels = squares((10, 10), (0, 6, 0, 6, 4))
    result = draw_outlines(np.zeros((10, 10, 3), np.uint8), labels, thickness=2)
    coloured = np.all(result == (255, 255, 0), axis=2)
    # The instance touches the image edge, which closes its outline there; a 2-pixel band of a 6x6
    # square leaves a 2x2 interior: 36 - 4 = 32 pixels.
    np.testing.assert_array_equal(coloured, _ring(labels.shape, 0, 6, 0, 6, width=2))
    assert coloured.sum() == 32


def test_outlines_accept_float_mask_and_grayscale_image():
    mask = (TOUCHING > 0).astype(np.float32)
    result = draw_outlines(np.zeros((12, 16), np.uint8), mask, color=(1, 2, 3))
    assert result.shape == (12, 16, 3)
    np.testing.assert_array_equal(np.all(result == (1, 2, 3), axis=2), _ring(TOUCHING.shape, 2, 8, 2, 14))


def test_outline_argument_checks():
    with pytest.raises(ValueError, match="shape"):
        draw_outlines(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 6), np.int32))
    with pytest.raises(ValueError):
        draw_outlines(np.zeros((5, 5, 3), np.float32), np.zeros((5, 5), np.int32))
    with pytest.raises(ValueError, match="labels_or_mask"):
        draw_outlines(np.zeros((5, 5, 3), np.uint8), np.full((5, 5), 0.5))

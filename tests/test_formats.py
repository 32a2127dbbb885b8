"""Tests for unet_nuclei/formats.py: the DSB-2018 run-length rows (against the reference codec in rle.py).

The expected values are worked out by hand in the comments, so a wrong implementation fails here rather
than agreeing with itself.
"""

import numpy as np
import pytest

from conftest import squares
from rle import rle_decode, rle_encode
from unet_nuclei.formats import rle_rows

# ----------------------------------------------------------------------------------------------------
# Run-length encoding
# ----------------------------------------------------------------------------------------------------


def test_rle_hand_example_is_column_major_and_one_based():
    # Column-major numbering of a 3x3 image:   1 4 7
    #                                           2 5 8
    #                                           3 6 9
    # The foreground pixels are 3 (row 2, column 0), 4 and 5 (column 1, rows 0-1) and 7 (row 0,
    # column 2).  Pixels 3, 4, 5 form one run across the column break: "3 3"; pixel 7 alone: "7 1".
    # (Row-major numbering would give "2 2 5 1 7 1".)
    mask = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0]], np.uint8)
    assert rle_encode(mask) == "3 3 7 1"
    np.testing.assert_array_equal(rle_decode("3 3 7 1", (3, 3)), mask)


def test_rle_full_empty_and_last_pixel():
    assert rle_encode(np.ones((2, 2), bool)) == "1 4"
    assert rle_encode(np.zeros((2, 3))) == ""
    assert rle_decode("", (2, 3)).tolist() == [[0, 0, 0], [0, 0, 0]]
    # Pixel 6 of a 2x3 image is the bottom-right one.
    assert rle_decode("6 1", (2, 3)).tolist() == [[0, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (15, 4), (31, 9)])
def test_rle_round_trip_on_random_masks(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for density in (0.1, 0.5, 0.9):
        mask = (rng.random(shape) < density).astype(np.uint8)
        decoded = rle_decode(rle_encode(mask), shape)
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize(
    "text",
    [
        "1 2 3",  # An odd number of values.
        "0 2",  # Pixels are numbered from 1.
        "8 3",  # Pixels 8, 9, 10: past the 9 pixels of a 3x3 image.
        "9 2",  # Pixels 9 and 10: one past the end.
        "1 x",  # Not a number.
        "1.5 2",  # Not an integer.
        "-1 2",  # Negative.
        "3 0",  # An empty run.
        "5 2 1 1",  # Unsorted runs.
        "1 3 2 2",  # Overlapping runs.
    ],
)
def test_rle_decode_rejects_malformed_strings(text):
    with pytest.raises(ValueError):
        rle_decode(text, (3, 3))


def test_rle_decode_rejects_bad_shape_and_non_string():
    with pytest.raises(ValueError):
        rle_decode("1 1", (0, 3))
    with pytest.raises(ValueError):
        rle_decode("1 1", (3, 3, 1))
    with pytest.raises(ValueError):
        rle_decode("1 1", (2.5, 3))
    with pytest.raises(TypeError):
        rle_decode(None, (3, 3))


def test_rle_rows_one_row_per_instance_in_label_order():
    labels = squares((8, 9), (0, 2, 0, 2, 7), (3, 6, 3, 5, 2), (6, 8, 6, 9, 3))
    rows = rle_rows("img", labels)
    assert [image_id for image_id, _ in rows] == ["img"] * 3
    # Label order 2, 3, 7; every row decodes to exactly its instance.
    for (_, encoded), value in zip(rows, (2, 3, 7)):
        np.testing.assert_array_equal(rle_decode(encoded, labels.shape), (labels == value).astype(np.uint8))
        assert encoded == rle_encode(labels == value)


def test_rle_rows_empty_image_gives_one_empty_row():
    assert rle_rows("blank", np.zeros((4, 4), np.int32)) == [("blank", "")]

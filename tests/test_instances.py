"""Tests of the instance, scoring, run-length and outline helpers.

The expected values are worked out by hand in the comments, so a wrong implementation fails here rather
than agreeing with itself.
"""

import cv2
import numpy as np
import pytest

from rle import rle_decode, rle_encode
from unet_nuclei.formats import rle_rows
from unet_nuclei.metrics import (
    DSB_IOU_THRESHOLDS,
    binary_dice_iou,
    count_instances,
    dsb_score,
    instance_iou_matrix,
    matching_precisions,
    score_image,
)
from unet_nuclei.plots import draw_outlines
from unet_nuclei.postprocess import (
    PostProcessing,
    choose_post_processing,
    drop_unsure,
    instances_from_classes,
    label_instances,
)
from unet_nuclei.segmenter import Prediction


def _squares(shape, *boxes):
    """Label image with one rectangle per box (row0, row1, col0, col1, label), ends exclusive."""
    labels = np.zeros(shape, np.int32)
    for r0, r1, c0, c1, value in boxes:
        labels[r0:r1, c0:c1] = value
    return labels


# ----------------------------------------------------------------------------------------------------
# binary_dice_iou
# ----------------------------------------------------------------------------------------------------


def test_dice_iou_identical_masks():
    mask = _squares((5, 5), (1, 3, 1, 4, 1))
    assert binary_dice_iou(mask, mask) == (1.0, 1.0)


def test_dice_iou_disjoint_masks():
    a = _squares((5, 5), (0, 2, 0, 2, 1))
    b = _squares((5, 5), (3, 5, 3, 5, 1))
    assert binary_dice_iou(a, b) == (0.0, 0.0)


def test_dice_iou_half_overlap():
    # Truth has 4 pixels, the prediction 2 of them: intersection 2, union 4.
    # Dice = 2 * 2 / (4 + 2) = 2/3, IoU = 2 / 4 = 1/2.
    truth = _squares((4, 4), (0, 2, 0, 2, 1))
    pred = _squares((4, 4), (0, 1, 0, 2, 1))
    dice, iou = binary_dice_iou(truth, pred)
    assert dice == pytest.approx(2 / 3)
    assert iou == pytest.approx(0.5)


def test_dice_iou_nonzero_values_count_as_foreground():
    truth = np.array([[0, 255], [7, 0]], np.uint8)
    pred = np.array([[0, True], [True, False]])
    assert binary_dice_iou(truth, pred) == (1.0, 1.0)


def test_dice_iou_empty_masks():
    empty = np.zeros((3, 3), np.uint8)
    full = np.ones((3, 3), np.uint8)
    assert binary_dice_iou(empty, empty) == (1.0, 1.0)
    assert binary_dice_iou(empty, full) == (0.0, 0.0)
    assert binary_dice_iou(full, empty) == (0.0, 0.0)


def test_dice_iou_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        binary_dice_iou(np.zeros((3, 4)), np.zeros((4, 3)))


# ----------------------------------------------------------------------------------------------------
# instance_iou_matrix
# ----------------------------------------------------------------------------------------------------


def _slow_iou_matrix(true_labels, pred_labels):
    true_ids = [v for v in np.unique(true_labels) if v != 0]
    pred_ids = [v for v in np.unique(pred_labels) if v != 0]
    result = np.zeros((len(true_ids), len(pred_ids)))
    for i, t in enumerate(true_ids):
        for j, p in enumerate(pred_ids):
            a, b = true_labels == t, pred_labels == p
            result[i, j] = np.count_nonzero(a & b) / np.count_nonzero(a | b)
    return result


@pytest.mark.parametrize("seed", range(5))
def test_iou_matrix_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    # Non-consecutive label values (multiples of 7, and up to 1000) check the remapping.
    true_labels = rng.integers(0, 6, size=(23, 31)) * 7
    pred_labels = np.where(rng.random((23, 31)) < 0.3, 0, rng.integers(1, 1000, size=(23, 31)) % 9)
    fast = instance_iou_matrix(true_labels, pred_labels)
    slow = _slow_iou_matrix(true_labels, pred_labels)
    assert fast.shape == slow.shape == (5, 8)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_iou_matrix_hand_example_and_empty_side():
    # True label 5 covers 4 pixels, predicted label 2 covers 2 of them plus 2 others: IoU = 2 / 6.
    truth = _squares((4, 4), (0, 2, 0, 2, 5))
    pred = _squares((4, 4), (1, 2, 0, 4, 2))
    assert instance_iou_matrix(truth, pred) == pytest.approx(np.array([[2 / 6]]))
    assert instance_iou_matrix(truth, np.zeros((4, 4), int)).shape == (1, 0)


def test_iou_matrix_rejects_float_labels_and_shape_mismatch():
    with pytest.raises(ValueError, match="integer"):
        instance_iou_matrix(np.zeros((2, 2), float), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        instance_iou_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))


# ----------------------------------------------------------------------------------------------------
# dsb_score
# ----------------------------------------------------------------------------------------------------

TWO_SQUARES = _squares((10, 10), (0, 3, 0, 3, 1), (5, 9, 5, 9, 2))


def test_thresholds_are_the_ten_dsb_values():
    assert DSB_IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_dsb_perfect_prediction_with_other_label_values():
    pred = np.where(TWO_SQUARES == 1, 40, np.where(TWO_SQUARES == 2, 3, 0))
    assert dsb_score(TWO_SQUARES, pred) == 1.0


def test_dsb_both_empty_and_one_empty():
    empty = np.zeros((10, 10), np.int32)
    assert dsb_score(empty, empty) == 1.0
    assert dsb_score(TWO_SQUARES, empty) == 0.0
    assert dsb_score(empty, TWO_SQUARES) == 0.0


def test_dsb_one_of_two_missed():
    # TP = 1, FP = 0, FN = 1 at every threshold: 1 / 2.
    pred = np.where(TWO_SQUARES == 1, 1, 0)
    assert dsb_score(TWO_SQUARES, pred) == pytest.approx(0.5)


def test_dsb_one_extra_false_nucleus():
    # Both true nuclei found exactly plus one invented: TP = 2, FP = 1, FN = 0 -> 2 / 3 everywhere.
    pred = TWO_SQUARES.copy()
    pred[0:2, 7:9] = 3
    assert dsb_score(TWO_SQUARES, pred) == pytest.approx(2 / 3)


def test_dsb_merge_of_two_nuclei():
    # True A = 4x4 = 16 px, true B = 4x2 = 8 px right next to it; one predicted region covers both
    # (24 px).  IoU(A) = 16 / 24 = 0.667, IoU(B) = 8 / 24 = 0.333.  A matches at 0.5, 0.55, 0.6, 0.65:
    # TP = 1, FP = 0, FN = 1 -> 1/2; above that TP = 0, FP = 1, FN = 2 -> 0.  Mean = 4 * 0.5 / 10 = 0.2.
    truth = _squares((6, 8), (0, 4, 0, 4, 1), (0, 4, 4, 6, 2))
    pred = _squares((6, 8), (0, 4, 0, 6, 1))
    assert dsb_score(truth, pred) == pytest.approx(0.2)


def test_dsb_split_of_one_nucleus():
    # A 4x4 truth predicted as two 4x2 halves: each IoU = 8 / 16 = 0.5, not > 0.5, so TP = 0,
    # FP = 2, FN = 1 at every threshold -> 0.
    truth = _squares((4, 4), (0, 4, 0, 4, 1))
    pred = _squares((4, 4), (0, 4, 0, 2, 1), (0, 4, 2, 4, 2))
    assert dsb_score(truth, pred) == 0.0


def test_dsb_partial_overlap_of_exactly_0_7():
    # Truth is a 1x10 strip, the prediction its first 7 pixels: IoU = 7 / 10 = 0.7 exactly.  It matches
    # at 0.5, 0.55, 0.6 and 0.65 but not at 0.7 (strictly greater is required): 4 of 10 thresholds.
    truth = _squares((3, 12), (1, 2, 1, 11, 1))
    pred = _squares((3, 12), (1, 2, 1, 8, 1))
    assert instance_iou_matrix(truth, pred)[0, 0] == 0.7
    assert dsb_score(truth, pred) == pytest.approx(0.4)
    # The score is symmetric in this case (same counts with the roles swapped).
    assert dsb_score(pred, truth) == pytest.approx(0.4)


def test_dsb_custom_thresholds_and_validation():
    truth = _squares((3, 12), (1, 2, 1, 11, 1))
    pred = _squares((3, 12), (1, 2, 1, 8, 1))
    assert dsb_score(truth, pred, thresholds=[0.5, 0.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        dsb_score(truth, pred, thresholds=[0.3])
    with pytest.raises(ValueError, match="shape"):
        dsb_score(truth, pred[:, :5])


# ----------------------------------------------------------------------------------------------------
# count_instances
# ----------------------------------------------------------------------------------------------------


def test_count_instances():
    assert count_instances(np.array([[0, 3], [9, 9]])) == 2
    assert count_instances(np.zeros((4, 4), np.int32)) == 0
    assert count_instances(np.array([[0, 3], [70000, 3]], np.uint32)) == 2  # counted by sizes, unsigned
    assert count_instances(np.array([[0, -3], [9, -3]])) == 2  # negative labels: still distinct nonzero ids
    assert count_instances(np.zeros((0, 5), np.uint16)) == 0


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
    labels = _squares((8, 9), (0, 2, 0, 2, 7), (3, 6, 3, 5, 2), (6, 8, 6, 9, 3))
    rows = rle_rows("img", labels)
    assert [image_id for image_id, _ in rows] == ["img"] * 3
    # Label order 2, 3, 7; every row decodes to exactly its instance.
    for (_, encoded), value in zip(rows, (2, 3, 7)):
        np.testing.assert_array_equal(rle_decode(encoded, labels.shape), (labels == value).astype(np.uint8))
        assert encoded == rle_encode(labels == value)


def test_rle_rows_empty_image_gives_one_empty_row():
    assert rle_rows("blank", np.zeros((4, 4), np.int32)) == [("blank", "")]


# ----------------------------------------------------------------------------------------------------
# label_instances
# ----------------------------------------------------------------------------------------------------


def _discs(shape, *circles):
    probability = np.zeros(shape, np.float32)
    for x, y, radius in circles:
        cv2.circle(probability, (x, y), radius, 1.0, -1)
    return probability


def _ellipse(shape, centre, axes, angle):
    probability = np.zeros(shape, np.float32)
    cv2.ellipse(probability, centre, axes, angle, 0, 360, 1.0, -1)
    return probability


@pytest.mark.parametrize("radius, ratio", [(10, 1.25), (15, 1.25), (15, 1.5), (25, 1.3)])
def test_two_touching_discs_are_split(radius, ratio):
    distance = int(round(ratio * radius))
    probability = _discs((120, 140), (40, 60, radius), (40 + distance, 60, radius))
    labels = label_instances(probability, min_size=1)
    assert count_instances(labels) == 2
    # Each disc centre lies in its own instance and the two halves are about equally large.
    assert labels[60, 40] != labels[60, 40 + distance]
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() > 0.8 * areas.max()
    # The instances cover the whole thresholded mask (watershed lines are given back).
    np.testing.assert_array_equal(labels > 0, probability > 0.5)
    # Without splitting the touching discs stay one object.
    assert count_instances(label_instances(probability, split_touching=False)) == 1


def test_split_follows_the_neck_between_unequal_discs():
    # Discs of radius 25 and 12 with centres 30 apart: the circles cross at
    # x = (30^2 + 25^2 - 12^2) / (2 * 30) = 23.0 from the big centre.  A split halfway between the
    # centres (x = 15) would cut a large piece off the big disc.
    probability = _discs((100, 120), (40, 50, 25), (70, 50, 12))
    labels = label_instances(probability, min_size=1)
    assert count_instances(labels) == 2
    row = labels[50, 40:71]
    change = int(np.flatnonzero(row[1:] != row[:-1])[0]) + 1
    assert abs(change - 23.0) <= 1.5


@pytest.mark.parametrize(
    "axes, angle",
    [
        ((25, 25), 0),
        ((40, 18), 0),
        ((20, 8), 63),
        ((35, 20), 120),
        # Thin ellipses at 45 degrees have the largest pixelation ripples along their ridge (about 0.4 px).
        ((30, 9), 45),
        ((42, 12), 45),
        # These have two equally high distance peaks a little apart, which must still give one marker.
        ((27, 12), 30),
        ((15, 5), 30),
        ((36, 16), 30),
    ],
)
def test_single_convex_ellipse_is_not_split(axes, angle):
    labels = label_instances(_ellipse((128, 128), (64, 63), axes, angle), min_size=1)
    assert count_instances(labels) == 1


def test_small_specks_are_removed_and_labels_are_consecutive_int32():
    probability = _discs((100, 100), (25, 25, 8), (70, 70, 10))
    probability[2:5, 90:93] = 0.9  # 9 pixels: below min_size = 10.
    probability[90:94, 2:6] = 0.9  # 16 pixels: kept.
    labels = label_instances(probability, min_size=10)
    assert labels.dtype == np.int32
    assert labels.shape == probability.shape
    assert np.unique(labels).tolist() == [0, 1, 2, 3]
    assert labels[3, 91] == 0
    assert labels[92, 4] > 0


def test_threshold_is_applied_strictly():
    probability = np.full((20, 20), 0.4, np.float32)
    probability[5:15, 5:15] = 0.6
    labels = label_instances(probability, threshold=0.5, min_size=1)
    assert count_instances(labels) == 1
    assert np.count_nonzero(labels) == 100
    assert count_instances(label_instances(probability, threshold=0.6)) == 0


def test_empty_map_and_bad_input():
    labels = label_instances(np.zeros((16, 16), np.float32))
    assert labels.dtype == np.int32 and not labels.any()
    with pytest.raises(ValueError, match="2-D"):
        label_instances(np.zeros((4, 4, 1), np.float32))


# ----------------------------------------------------------------------------------------------------
# choose_post_processing, Prediction and the instance-aware (3-class) path
# ----------------------------------------------------------------------------------------------------


def _one_hot_output(probability):
    """A binary model's H x W x 1 output from a probability map."""
    return probability.astype(np.float32)[..., None]


def test_choose_post_processing_picks_the_best_dsb_score():
    # A disc predicted at 0.9 inside a halo at 0.4: above 0.4 the prediction is exactly the truth (DSB 1);
    # at 0.3 the halo joins it and the one predicted nucleus is more than twice the true one (DSB 0).
    truth = (_discs((60, 60), (30, 30, 10)) > 0).astype(np.int32)
    probability = np.where(truth > 0, 0.9, 0.0).astype(np.float32)
    probability[(_discs((60, 60), (30, 30, 17)) > 0) & (truth == 0)] = 0.4
    output = _one_hot_output(probability)
    post, mean, per_image = choose_post_processing(
        [truth, truth], [output, output], min_sizes=[5], thresholds=[0.3, 0.5, 0.7]
    )
    assert post.threshold == 0.5  # 0.5 and 0.7 tie on both scores: the first one wins
    assert mean == {"dice": 1.0, "iou": 1.0, "dsb_score": 1.0, "ap50": 1.0}
    assert [s.nuclei_pred for s in per_image] == [1, 1]
    _, worse, _ = choose_post_processing([truth], [output], min_sizes=[5], thresholds=[0.3])
    assert worse["dsb_score"] == 0.0 and worse["iou"] == pytest.approx(np.pi * 100 / (np.pi * 289), abs=0.05)


def test_prediction_labels_once_and_scores_against_the_truth():
    probability = _discs((50, 60), (15, 20, 8), (45, 30, 6))
    truth = label_instances(probability, min_size=1)
    image = np.zeros((50, 60, 3), np.uint8)
    post = PostProcessing(0.5, 0.5, 10)
    p = Prediction.from_output("a", image, _one_hot_output(probability), post, truth)
    assert (p.name, p.height, p.width, p.count) == ("a", 50, 60, 2)
    assert p.scores.dsb_score == 1.0 and p.scores.nuclei_true == p.scores.nuclei_pred == 2
    np.testing.assert_array_equal(p.probability, probability)
    summary = p.summary()
    assert summary.image is summary.labels is summary.probability is summary.truth_labels is None
    assert (summary.count, summary.scores) == (2, p.scores)
    assert Prediction.from_output("b", image, _one_hot_output(probability), post).scores is None


def _class_output(labels, interior_width=2):
    """A confident 3-class output for a label image: boundary on each nucleus's outer ``interior_width``
    pixels and where nuclei meet, interior inside, background elsewhere."""
    from unet_model_core import instance_targets

    classes = instance_targets(labels, contact=interior_width)
    return np.eye(3, dtype=np.float32)[classes] * 0.9 + 0.1 / 3


def test_touching_discs_are_split_by_the_model_markers():
    # Two discs of radius 10 whose centres are 16 px apart overlap by a lens 4 px wide: one blob for a
    # threshold, two nuclei with the boundary class between them.
    yy, xx = np.mgrid[:40, :60]
    left = (yy - 20) ** 2 + (xx - 22) ** 2 <= 100
    right = ((yy - 20) ** 2 + (xx - 38) ** 2 <= 100) & ~left
    truth = left.astype(np.int32) + 2 * right
    output = _class_output(truth)
    labels = instances_from_classes(output, threshold=0.5, marker_threshold=0.5, min_size=5)
    assert count_instances(labels) == 2
    # Each predicted nucleus is its true disc up to the contested pixels: DSB at 0.5-0.85 at least.
    assert matching_precisions(truth, labels)[:8].min() == 1.0
    # The same area as a binary mask is one connected component: the old path needs the distance
    # transform to split it, the instance-aware one reads the split off the model.
    assert count_instances(label_instances((truth > 0).astype(np.float32), split_touching=False)) == 1


def test_instances_from_classes_keeps_nuclei_without_markers_and_drops_specks():
    output = np.zeros((30, 30, 3), np.float32)
    output[..., 0] = 1.0
    output[2:10, 2:10] = (0.2, 0.0, 0.8)  # all boundary, no interior: a nucleus without a marker
    output[20:22, 20:22] = (0.0, 1.0, 0.0)  # a 4-pixel speck
    labels = instances_from_classes(output, min_size=10)
    assert count_instances(labels) == 1 and (labels[2:10, 2:10] == 1).all()
    assert count_instances(instances_from_classes(output, min_size=3)) == 2
    with pytest.raises(ValueError, match="H x W x 3"):
        instances_from_classes(output[..., :2])


def test_post_processing_dispatches_on_the_output_classes():
    truth = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    truth[(yy - 20) ** 2 + (xx - 22) ** 2 <= 100] = 1
    truth[((yy - 20) ** 2 + (xx - 38) ** 2 <= 100) & (truth == 0)] = 2
    post = PostProcessing(0.5, 0.5, 5)
    assert count_instances(post.nuclei(_class_output(truth))) == 2
    assert post.nuclei(_one_hot_output((truth > 0).astype(np.float32))).max() >= 1


def test_choose_post_processing_tries_marker_thresholds_for_instance_outputs():
    # Two 20x20 squares side by side make one 20x40 rectangle: no neck, so no distance transform can
    # split it.  Interior at 0.55 everywhere in the nuclei but 0.65 in the two cores: only a marker
    # threshold between the two separates the nuclei.
    from unet_model_core import instance_targets

    truth = np.zeros((40, 60), np.int32)
    truth[10:30, 10:30], truth[10:30, 30:50] = 1, 2
    cores = instance_targets(truth, contact=4) == 1
    output = np.zeros((40, 60, 3), np.float32)
    output[..., 1] = np.where(truth > 0, 0.55, 0.0)
    output[cores, 1] = 0.65
    output[..., 2] = np.where(truth > 0, 0.4, 0.0) - np.where(cores, 0.1, 0.0)
    output[..., 0] = 1.0 - output[..., 1] - output[..., 2]
    post, mean, _ = choose_post_processing(
        [truth], [output], min_sizes=[5], thresholds=[0.5], marker_thresholds=[0.5, 0.6]
    )
    assert post.marker_threshold == 0.6 and mean["dsb_score"] > 0.5
    assert score_image(truth, PostProcessing(0.5, 0.5, 5).nuclei(output)).nuclei_pred == 1


# ----------------------------------------------------------------------------------------------------
# draw_outlines
# ----------------------------------------------------------------------------------------------------

# Two touching 6x6 squares: A at rows 2-7, columns 2-7 and B at rows 2-7, columns 8-13.
TOUCHING = _squares((12, 16), (2, 8, 2, 8, 1), (2, 8, 8, 14, 2))


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
    labels = _squares((10, 10), (0, 6, 0, 6, 4))
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


def test_drop_unsure_drops_faint_nuclei_and_renumbers_the_rest():
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 2:8], labels[10:18, 10:18], labels[2:6, 20:26] = 1, 2, 3
    output = np.zeros((20, 30, 3), np.float32)
    output[..., 0] = 1.0
    output[labels == 1] = (0.4, 0.5, 0.1)  # nucleus probability 0.6: unsure
    output[labels == 2] = (0.05, 0.9, 0.05)  # 0.95: sure
    output[labels == 3] = (0.1, 0.8, 0.1)  # 0.9 on 20 pixels...
    output[2:3, 20:24] = np.nan  # ...and 4 NaN pixels (no prediction: background), so 0.9 * 20 / 24 = 0.75
    kept = drop_unsure(labels.copy(), output, 0.8)
    assert count_instances(kept) == 1 and (kept[10:18, 10:18] == 1).all() and (kept[labels != 2] == 0).all()
    assert count_instances(drop_unsure(labels.copy(), output, 0.7)) == 2  # 0.75 >= 0.7: nucleus 3 stays
    np.testing.assert_array_equal(drop_unsure(labels.copy(), output, 0.0), labels)  # 0 keeps every one
    # A binary model's output is its nucleus probability; 1 - background for a 3-class one.
    binary = np.nan_to_num(1.0 - output[..., :1], nan=0.0)
    np.testing.assert_array_equal(drop_unsure(labels.copy(), binary, 0.8), kept)
    # Found from the map, nucleus 3 leaves its NaN row out (mean 0.9) and stays; nucleus 1 goes.
    found = PostProcessing(0.5, 0.5, 5, min_confidence=0.8).nuclei(binary)
    assert count_instances(found) == 2 and (found[labels == 1] == 0).all()
    assert count_instances(PostProcessing(0.5, 0.5, 5).nuclei(binary)) == 3


def test_choose_post_processing_drops_unsure_blobs_only_when_that_scores_better():
    # One disc predicted surely (nucleus probability 0.97) and a faint blob of debris (0.78, no marker):
    # kept, the blob is a false positive (DSB 0.5); from a smallest confidence of 0.8 on, it goes (DSB 1).
    truth = (_discs((40, 70), (20, 20, 9)) > 0).astype(np.int32)
    output = _class_output(truth)
    sure = output.copy()
    output[_discs((40, 70), (52, 20, 8)) > 0] = (0.22, 0.5, 0.28)  # (x, y, radius)
    post, mean, _ = choose_post_processing([truth], [output], thresholds=[0.5], marker_thresholds=[0.5], min_sizes=[5])
    assert post.min_confidence == 0.8 and mean["dsb_score"] == 1.0  # 0.8 to 0.95 tie: the first wins
    assert score_image(truth, PostProcessing(0.5, 0.5, 5).nuclei(output)).dsb_score == 0.5
    post, mean, _ = choose_post_processing([truth], [sure], thresholds=[0.5], marker_thresholds=[0.5], min_sizes=[5])
    assert post.min_confidence == 0.0 and mean["dsb_score"] == 1.0  # nothing to drop: every nucleus kept
    post, _, _ = choose_post_processing(
        [truth], [output], thresholds=[0.5], marker_thresholds=[0.5], min_sizes=[5], confidences=[0.0]
    )
    assert post.min_confidence == 0.0

"""Tests for unet_nuclei/metrics.py: Dice and IoU, the instance IoU matrix, the DSB-2018 score.

The expected values are worked out by hand in the comments, so a wrong implementation fails here rather
than agreeing with itself.
"""

import numpy as np
import pytest

from conftest import squares
from unet_nuclei.metrics import (
    DSB_IOU_THRESHOLDS,
    TruthScorer,
    binary_dice_iou,
    count_instances,
    dsb_score,
    instance_iou_matrix,
    score_image,
)

# ----------------------------------------------------------------------------------------------------
# binary_dice_iou
# ----------------------------------------------------------------------------------------------------


def test_dice_iou_identical_masks():
    mask = squares((5, 5), (1, 3, 1, 4, 1))
    assert binary_dice_iou(mask, mask) == (1.0, 1.0)


def test_dice_iou_disjoint_masks():
    a = squares((5, 5), (0, 2, 0, 2, 1))
    b = squares((5, 5), (3, 5, 3, 5, 1))
    assert binary_dice_iou(a, b) == (0.0, 0.0)


def test_dice_iou_half_overlap():
    # Truth has 4 pixels, the prediction 2 of them: intersection 2, union 4.
    # Dice = 2 * 2 / (4 + 2) = 2/3, IoU = 2 / 4 = 1/2.
    truth = squares((4, 4), (0, 2, 0, 2, 1))
    pred = squares((4, 4), (0, 1, 0, 2, 1))
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


def test_iou_matrix_with_label_values_far_above_the_pixel_count():
    # Labels up to 5e9 on 713 pixels take the sorted path instead of the lookup table: the same matrix.
    rng = np.random.default_rng(3)
    true_labels = rng.integers(0, 6, size=(23, 31))
    pred_labels = np.where(rng.random((23, 31)) < 0.3, 0, rng.integers(1, 9, size=(23, 31)))
    small = instance_iou_matrix(true_labels, pred_labels)
    np.testing.assert_array_equal(instance_iou_matrix(true_labels * 10**9, pred_labels * 555_555_557), small)
    np.testing.assert_allclose(small, _slow_iou_matrix(true_labels, pred_labels), rtol=0, atol=1e-12)


def test_truth_scorer_scores_many_predictions_as_score_image_does():
    # One TruthScorer, reused for several predictions (the post-processing search), scores each exactly as
    # a fresh score_image does; the truth's instances are counted once.
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 7, size=(30, 40)) * 3
    scorer = TruthScorer(truth)
    for _ in range(4):
        pred = np.where(rng.random((30, 40)) < 0.4, 0, rng.integers(1, 12, size=(30, 40)))
        assert scorer(pred) == score_image(truth, pred)
        assert scorer(pred).nuclei_true == 6 and scorer(pred).nuclei_pred == count_instances(pred)
    assert scorer(np.zeros_like(truth)).dsb_score == 0.0
    with pytest.raises(ValueError, match=r"\(30, 40\).*\(30, 41\)"):
        scorer(np.zeros((30, 41), int))


def test_iou_matrix_hand_example_and_empty_side():
    # True label 5 covers 4 pixels, predicted label 2 covers 2 of them plus 2 others: IoU = 2 / 6.
    truth = squares((4, 4), (0, 2, 0, 2, 5))
    pred = squares((4, 4), (1, 2, 0, 4, 2))
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

TWO_SQUARES = squares((10, 10), (0, 3, 0, 3, 1), (5, 9, 5, 9, 2))


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
    truth = squares((6, 8), (0, 4, 0, 4, 1), (0, 4, 4, 6, 2))
    pred = squares((6, 8), (0, 4, 0, 6, 1))
    assert dsb_score(truth, pred) == pytest.approx(0.2)


def test_dsb_split_of_one_nucleus():
    # A 4x4 truth predicted as two 4x2 halves: each IoU = 8 / 16 = 0.5, not > 0.5, so TP = 0,
    # FP = 2, FN = 1 at every threshold -> 0.
    truth = squares((4, 4), (0, 4, 0, 4, 1))
    pred = squares((4, 4), (0, 4, 0, 2, 1), (0, 4, 2, 4, 2))
    assert dsb_score(truth, pred) == 0.0


def test_dsb_partial_overlap_of_exactly_0_7():
    # Truth is a 1x10 strip, the prediction its first 7 pixels: IoU = 7 / 10 = 0.7 exactly.  It matches
    # at 0.5, 0.55, 0.6 and 0.65 but not at 0.7 (strictly greater is required): 4 of 10 thresholds.
    truth = squares((3, 12), (1, 2, 1, 11, 1))
    pred = squares((3, 12), (1, 2, 1, 8, 1))
    assert instance_iou_matrix(truth, pred)[0, 0] == 0.7
    assert dsb_score(truth, pred) == pytest.approx(0.4)
    # The score is symmetric in this case (same counts with the roles swapped).
    assert dsb_score(pred, truth) == pytest.approx(0.4)


def test_dsb_custom_thresholds_and_validation():
    truth = squares((3, 12), (1, 2, 1, 11, 1))
    pred = squares((3, 12), (1, 2, 1, 8, 1))
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

"""How good predicted nuclei are: matching against ground truth and the DSB-2018 score.

``instance_iou_matrix`` matches every true nucleus with every predicted one in one pass;
``matching_precisions`` and ``dsb_score`` give the competition's metric (the mean over IoU thresholds
0.5-0.95 of TP / (TP + FP + FN)); ``binary_dice_iou`` compares the nucleus areas; ``score_image`` gathers
them for one image (``Scores``) and ``mean_scores`` averages them over images.  Instance label images
(0 = background, 1..N = nuclei) are the currency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unet_nuclei.label_images import label_sizes

# The IoU thresholds of the DSB-2018 metric: 0.5, 0.55, ..., 0.95.  ``np.arange`` with a float step
# accumulates rounding error (0.5 + 4 * 0.05 is not exactly 0.7), and an IoU that is exactly 0.7 must
# compare equal to the 0.7 threshold, so the values are rounded to two decimals.
DSB_IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def _as_label_image(labels, name):
    """Return ``labels`` as an int64 array, accepting integer and boolean images only."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _check_same_shape(true_shape, pred_shape, true_name, pred_name):
    if true_shape != pred_shape:
        raise ValueError(f"{true_name} has shape {true_shape} but {pred_name} has shape {pred_shape}; they must match")


def binary_dice_iou(true_mask, pred_mask) -> tuple[float, float]:
    """Dice and IoU of two binary masks (any nonzero = foreground).

    Both empty -> (1.0, 1.0), because predicting nothing where there is nothing is perfect; one empty and
    the other not -> (0.0, 0.0).  Never NaN.
    """
    true_mask = np.asarray(true_mask) != 0
    pred_mask = np.asarray(pred_mask) != 0
    _check_same_shape(true_mask.shape, pred_mask.shape, "true_mask", "pred_mask")
    intersection = int(np.count_nonzero(true_mask & pred_mask))
    total = int(np.count_nonzero(true_mask)) + int(np.count_nonzero(pred_mask))
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return 2.0 * intersection / total, intersection / union


def _dense_index(labels):
    """Map the labels of an image to 0 (background) and 1..n (instances in increasing label order)."""
    top = int(labels.max(initial=0))
    if top <= 4 * labels.size + 65536 and int(labels.min(initial=0)) >= 0:
        # A lookup table indexed by label, from one count of each label: a fifth of the time of the
        # sorted or hashed ``np.unique`` below, which the post-processing search calls thousands of times.
        present = label_sizes(labels) > 0
        present[0] = False
        lookup = np.where(present, np.cumsum(present), 0)
        return lookup[labels], int(np.count_nonzero(present))
    ids = np.unique(labels)
    ids = ids[ids != 0]
    # searchsorted gives each nonzero label its rank among the instance ids; background is forced to 0.
    index = np.searchsorted(ids, labels) + 1
    index[labels == 0] = 0
    return index, ids.size


class TruthScorer:
    """One ground truth, ready to be compared with many predictions: its instances are indexed once, which
    the post-processing search (hundreds of candidate label images per validation image) needs.
    ``instance_iou_matrix``, ``matching_precisions`` and ``score_image`` are this for a single prediction."""

    def __init__(self, true_labels):
        true_labels = _as_label_image(true_labels, "true_labels")
        self.shape = true_labels.shape
        self.index, self.count = _dense_index(true_labels.ravel())
        self.foreground = true_labels.ravel() > 0
        self.area = int(np.count_nonzero(self.foreground))

    def iou_matrix(self, pred_labels) -> np.ndarray:
        """IoU between every true instance (rows) and every predicted instance (columns), rows and columns
        in increasing label order (labels need not be consecutive).  The intersections of all pairs come
        from one ``np.bincount`` over the pair index ``true_idx * (n_pred + 1) + pred_idx``, so the cost
        does not grow with the number of instances.  Returns a float64 array of shape (n_true, n_pred)."""
        pred_labels = _as_label_image(pred_labels, "pred_labels")
        _check_same_shape(self.shape, pred_labels.shape, "true_labels", "pred_labels")
        pred_idx, n_pred = _dense_index(pred_labels.ravel())
        n_true = self.count
        # Row 0 and column 0 of the joint histogram count background, which gives the instance areas as
        # marginal sums without a second pass over the image.
        joint = np.bincount(self.index * (n_pred + 1) + pred_idx, minlength=(n_true + 1) * (n_pred + 1))
        joint = joint.reshape(n_true + 1, n_pred + 1)
        true_area = joint[1:, :].sum(axis=1)
        pred_area = joint[:, 1:].sum(axis=0)
        intersection = joint[1:, 1:].astype(np.float64)
        union = true_area[:, None] + pred_area[None, :] - intersection
        # Every instance has at least one pixel, so the union is never zero.
        return intersection / union

    def precisions(self, pred_labels, thresholds=DSB_IOU_THRESHOLDS) -> np.ndarray:
        """TP / (TP + FP + FN) at each IoU threshold (see ``matching_precisions``)."""
        thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
        if thresholds.size == 0:
            raise ValueError("thresholds must not be empty")
        if np.any(thresholds < 0.5) or np.any(thresholds >= 1.0) or np.any(np.isnan(thresholds)):
            raise ValueError(f"thresholds must lie in [0.5, 1), got {thresholds.tolist()}")
        return _precisions(self.iou_matrix(pred_labels), thresholds)

    def __call__(self, pred_labels) -> Scores:
        """Dice and IoU of the nucleus areas, the DSB score and AP at IoU 0.5 of the instances."""
        iou = self.iou_matrix(pred_labels)  # checks the labels and the shape first
        precisions = _precisions(iou, DSB_IOU_THRESHOLDS)
        dice_value, iou_value = binary_dice_iou(self.foreground, np.asarray(pred_labels).ravel() > 0)
        return Scores(dice_value, iou_value, float(np.mean(precisions)), float(precisions[0]), *iou.shape)


def _precisions(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) at each threshold of an (n_true, n_pred) IoU matrix."""
    n_true, n_pred = iou.shape
    if n_true == 0 or n_pred == 0:
        return np.full(thresholds.shape, float(n_true == n_pred))
    tp = (iou[None, :, :] > thresholds[:, None, None]).sum(axis=(1, 2))
    # With TP matches, the remaining predictions are false positives and the remaining truths misses.
    return tp / (tp + (n_pred - tp) + (n_true - tp))


def instance_iou_matrix(true_labels, pred_labels) -> np.ndarray:
    """IoU between every true instance (rows) and every predicted instance (columns) of two integer label
    images of the same shape (0 = background): ``TruthScorer.iou_matrix``."""
    return TruthScorer(true_labels).iou_matrix(pred_labels)


def matching_precisions(true_labels, pred_labels, thresholds=DSB_IOU_THRESHOLDS) -> np.ndarray:
    """TP / (TP + FP + FN) at each IoU threshold: the DSB-2018 metric before its mean.

    A true and a predicted instance match when their IoU is strictly greater than t.  Instances of one
    label image do not overlap, so for t >= 0.5 an instance can have at most one partner with IoU > t and
    counting the pairs above t counts the matches exactly; thresholds below 0.5 are refused for that
    reason.  Both images empty -> 1 everywhere; one empty and the other not -> 0 everywhere.
    """
    return TruthScorer(true_labels).precisions(pred_labels, thresholds)


def dsb_score(true_labels, pred_labels, thresholds=DSB_IOU_THRESHOLDS) -> float:
    """DSB-2018 score of one image: the mean over IoU thresholds t (0.5, 0.55, ..., 0.95) of
    TP / (TP + FP + FN); see ``matching_precisions``."""
    return float(np.mean(matching_precisions(true_labels, pred_labels, thresholds)))


def count_instances(labels) -> int:
    """Number of distinct nonzero labels in a label image."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "u" or (labels.dtype.kind == "i" and labels.size and labels.min() >= 0):
        return int(np.count_nonzero(label_sizes(labels)[1:]))  # no sorted copy of a large image
    ids = np.unique(labels)
    return int(np.count_nonzero(ids != 0))


@dataclasses.dataclass(frozen=True)
class Scores:
    """How one predicted label image compares with its ground truth."""

    dice: float
    iou: float
    dsb_score: float
    ap50: float  # TP / (TP + FP + FN) at IoU 0.5
    nuclei_true: int
    nuclei_pred: int

    def rounded(self, digits: int = 4) -> dict:
        """The scores as a JSON-ready dict, floats rounded."""
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def score_image(true_labels: np.ndarray, pred_labels: np.ndarray) -> Scores:
    """Dice and IoU of the nucleus areas, the DSB score and AP at IoU 0.5 of the instances."""
    return TruthScorer(true_labels)(pred_labels)


SCORE_KEYS = ("dice", "iou", "dsb_score", "ap50")


def mean_scores(scores: Sequence[Scores]) -> dict:
    """Mean of each score over images."""
    return {k: float(np.mean([getattr(s, k) for s in scores])) for k in SCORE_KEYS}

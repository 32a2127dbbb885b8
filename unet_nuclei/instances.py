"""From a model's output to labelled nuclei, and how good they are.

``instances_from_classes`` turns an instance-aware model's output (background, interior, boundary) into
an instance label image, seeded by the model's own interior markers; ``label_instances`` does it for a
binary probability map (touching nuclei split by a distance-transform watershed); ``PostProcessing``
picks between them and holds their thresholds.  ``dsb_score``, ``instance_iou_matrix`` and
``binary_dice_iou`` score labels against ground truth; ``rle_rows`` writes the DSB-2018 run-length
encoding; ``draw_outlines`` draws instances on an image; ``choose_post_processing`` picks the thresholds
on validation images; and ``Prediction`` carries one image's result between the steps.  Instance label
images (0 = background, 1..N = nuclei) are the currency between all of them.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation

from unet_nuclei.label_images import (label_means, label_sizes, relabel_sequential, remove_labels, remove_small,
                                      watershed_in_bands)

# The IoU thresholds of the DSB-2018 metric: 0.5, 0.55, ..., 0.95.  ``np.arange`` with a float step
# accumulates rounding error (0.5 + 4 * 0.05 is not exactly 0.7), and an IoU that is exactly 0.7 must
# compare equal to the 0.7 threshold, so the values are rounded to two decimals.
DSB_IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)

# The probability thresholds tried on validation after training (to 0.85: both defaults chose 0.70, the old top).
THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.3, 0.86, 0.05))

# Markers for splitting touching nuclei are the "h-maxima" of the smoothed distance transform: domes that
# rise at least h pixels above the saddle that joins them to a higher dome.  Two discs of radius r whose
# centres are d apart form a saddle of depth r - sqrt(r^2 - d^2 / 4), 0.2 r at d = 1.2 r before
# smoothing, while pixelation leaves ripples on the ridge of a single smoothed ellipse: up to about
# 0.45 px for aspect ratios up to 4, more for longer and thinner shapes (0.7 px at 10:1, which may then
# be split).  h is the larger of an absolute floor above those ripples and a small fraction of the
# component's largest distance, so that big lumpy nuclei are not cut at every bump.  The values were
# tuned on the repository's synthetic nuclei (perfect masks in, DSB score out): lower h splits more
# clumps but starts to cut single irregular nuclei.
MARKER_H_MIN = 0.5
MARKER_H_FRACTION = 0.05
# Smoothing of the distance transform before the domes are searched, in pixels (Gaussian sigma).
DISTANCE_SIGMA = 1.0

_EIGHT = np.ones((3, 3), bool)  # 8-connectivity for scipy.ndimage


def _as_label_image(labels, name):
    """Return ``labels`` as an int64 array, accepting integer and boolean images only."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _check_same_shape(true, pred, true_name, pred_name):
    if true.shape != pred.shape:
        raise ValueError(f"{true_name} has shape {true.shape} but {pred_name} has shape {pred.shape}; "
                         "they must match")


def binary_dice_iou(true_mask, pred_mask) -> tuple[float, float]:
    """Dice and IoU of two binary masks (any nonzero = foreground).

    Both empty -> (1.0, 1.0), because predicting nothing where there is nothing is perfect; one empty and
    the other not -> (0.0, 0.0).  Never NaN.
    """
    true_mask = np.asarray(true_mask) != 0
    pred_mask = np.asarray(pred_mask) != 0
    _check_same_shape(true_mask, pred_mask, "true_mask", "pred_mask")
    intersection = int(np.count_nonzero(true_mask & pred_mask))
    total = int(np.count_nonzero(true_mask)) + int(np.count_nonzero(pred_mask))
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return 2.0 * intersection / total, intersection / union


def _dense_index(labels):
    """Map the labels of an image to 0 (background) and 1..n (instances in increasing label order)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    # searchsorted gives each nonzero label its rank among the instance ids; background is forced to 0.
    index = np.searchsorted(ids, labels) + 1
    index[labels == 0] = 0
    return index, ids.size


def instance_iou_matrix(true_labels, pred_labels) -> np.ndarray:
    """IoU between every true instance (rows) and every predicted instance (columns).

    Both inputs are integer label images of the same shape (0 = background, labels need not be
    consecutive); rows and columns follow increasing label value.  The intersections of all pairs come
    from one ``np.bincount`` over the pair index ``true_idx * (n_pred + 1) + pred_idx``, so the cost does
    not grow with the number of instances.  Returns a float64 array of shape (n_true, n_pred).
    """
    true_labels = _as_label_image(true_labels, "true_labels")
    pred_labels = _as_label_image(pred_labels, "pred_labels")
    _check_same_shape(true_labels, pred_labels, "true_labels", "pred_labels")
    true_idx, n_true = _dense_index(true_labels.ravel())
    pred_idx, n_pred = _dense_index(pred_labels.ravel())
    # Row 0 and column 0 of the joint histogram count background, which gives the instance areas as
    # marginal sums without a second pass over the image.
    joint = np.bincount(true_idx * (n_pred + 1) + pred_idx, minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    true_area = joint[1:, :].sum(axis=1)
    pred_area = joint[:, 1:].sum(axis=0)
    intersection = joint[1:, 1:].astype(np.float64)
    union = true_area[:, None] + pred_area[None, :] - intersection
    # Every instance has at least one pixel, so the union is never zero.
    return intersection / union


def matching_precisions(true_labels, pred_labels, thresholds=DSB_IOU_THRESHOLDS) -> np.ndarray:
    """TP / (TP + FP + FN) at each IoU threshold: the DSB-2018 metric before its mean.

    A true and a predicted instance match when their IoU is strictly greater than t.  Instances of one
    label image do not overlap, so for t >= 0.5 an instance can have at most one partner with IoU > t and
    counting the pairs above t counts the matches exactly; thresholds below 0.5 are refused for that
    reason.  Both images empty -> 1 everywhere; one empty and the other not -> 0 everywhere.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0:
        raise ValueError("thresholds must not be empty")
    if np.any(thresholds < 0.5) or np.any(thresholds >= 1.0) or np.any(np.isnan(thresholds)):
        raise ValueError(f"thresholds must lie in [0.5, 1), got {thresholds.tolist()}")
    iou = instance_iou_matrix(true_labels, pred_labels)
    n_true, n_pred = iou.shape
    if n_true == 0 or n_pred == 0:
        return np.full(thresholds.shape, float(n_true == n_pred))
    tp = (iou[None, :, :] > thresholds[:, None, None]).sum(axis=(1, 2))
    # With TP matches, the remaining predictions are false positives and the remaining truths misses.
    return tp / (tp + (n_pred - tp) + (n_true - tp))


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


def _split_markers(distance, components):
    """Watershed markers: one label per h-dome of the smoothed distance (see MARKER_H_MIN).

    The h-domes are the regional maxima of the morphological reconstruction of ``distance - h`` under
    ``distance``; two equally high peaks on one dome give one marker.  A component whose distance has a
    single regional maximum (a convex nucleus, most of them) has exactly one dome, so only the components
    with several maxima are reconstructed, each in its bounding box: reconstruction sorts every pixel it
    is given, and on the whole image it would take ten times longer than everything else together.
    """
    foreground = components > 0
    maxima = morphology.local_maxima(distance, connectivity=2) & foreground
    markers, n_markers = ndi.label(maxima, structure=_EIGHT)
    owner = np.zeros(n_markers + 1, np.int64)
    owner[markers[maxima]] = components[maxima]
    maxima_per_component = np.bincount(owner[1:], minlength=int(components.max()) + 1)
    boxes = ndi.find_objects(components)
    next_label = n_markers
    for component in np.flatnonzero(maxima_per_component > 1):
        box = boxes[component - 1]
        inside = components[box] == component
        local = distance[box]
        h = max(MARKER_H_MIN, MARKER_H_FRACTION * float(local[inside].max()))
        # Outside the component both images sit below every distance, so nothing leaks in from a neighbour.
        ceiling = np.where(inside, local, -1.0)
        domes = morphology.reconstruction(np.where(inside, local - h, -1.0), ceiling, method="dilation")
        tops, count = ndi.label(morphology.local_maxima(domes, connectivity=2) & inside, structure=_EIGHT)
        box_markers = markers[box]
        box_markers[inside] = np.where(tops[inside] > 0, tops[inside] + next_label, 0)
        next_label += count
    return markers


def label_instances(probability, threshold=0.5, min_size=10, split_touching=True) -> np.ndarray:
    """Turn a HxW probability map into an int32 instance label image (0 = background, 1..N consecutive).

    The map is thresholded (pixels with probability > ``threshold`` are foreground; NaN counts as
    background).  Connected components (8-connected) smaller than ``min_size`` pixels are dropped.  If
    ``split_touching``, touching nuclei are separated by a marker-based watershed: markers are the
    h-maxima of the smoothed distance transform (one per dome of the distance that is deep enough, so a
    convex nucleus keeps one marker while two overlapping discs whose centres are more than about 1.2
    radii apart get two), and the foreground is flooded from them over the inverted distance.  Instances
    that end up smaller than ``min_size`` are removed as well.  Labels are numbered 1..N.
    """
    probability = np.asarray(probability)
    if probability.ndim != 2:
        raise ValueError(f"probability must be a 2-D HxW map, got shape {probability.shape}")
    if not (np.issubdtype(probability.dtype, np.floating) or np.issubdtype(probability.dtype, np.integer)
            or probability.dtype == bool):
        raise ValueError(f"probability must be numeric, got dtype {probability.dtype}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    components, _ = ndi.label(probability > threshold, structure=_EIGHT)
    # Specks are removed before splitting so that they cost nothing in the watershed.
    components = remove_small(components, min_size)
    foreground = components > 0
    if not foreground.any():
        return np.zeros(probability.shape, np.int32)
    labels = components
    if split_touching:
        # OpenCV's exact Euclidean distance and Gaussian blur take a quarter of the time of
        # scipy.ndimage's here.  Smoothing removes the one-pixel steps of the distance of a pixelated
        # outline, which would otherwise create many tiny peaks along the ridge of an elongated nucleus.
        distance = cv2.distanceTransform(foreground.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        distance = cv2.GaussianBlur(distance, (0, 0), DISTANCE_SIGMA)
        markers = _split_markers(distance, components)
        labels = remove_small(watershed_in_bands(distance, markers, foreground), min_size)
    return relabel_sequential(labels.astype(np.int32, copy=False))


def rle_rows(image_id: str, labels) -> list[tuple[str, str]]:
    """One ``(ImageId, EncodedPixels)`` row per instance of a label image, in increasing label order.

    EncodedPixels is the DSB-2018 run-length encoding: pixels numbered from 1, top to bottom and then
    left to right (column-major), written as ``"start length start length ..."``.  An image without
    instances gives a single row with empty EncodedPixels, as the Kaggle submission format wants.  All
    instances are encoded in one pass over the image rather than one pass each.
    """
    labels = _as_label_image(labels, "labels")
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    flat = labels.ravel(order="F")
    positions = np.flatnonzero(flat)
    if positions.size == 0:
        return [(image_id, "")]
    # A stable sort by label keeps each instance's pixels in column-major order.
    order = np.argsort(flat[positions], kind="stable")
    positions = positions[order]
    owner = flat[positions]
    # A run starts wherever the instance changes or the next pixel is not the following one.
    starts_run = np.ones(positions.size, bool)
    starts_run[1:] = (owner[1:] != owner[:-1]) | (positions[1:] != positions[:-1] + 1)
    run_first = np.flatnonzero(starts_run)
    run_lengths = np.diff(np.append(run_first, positions.size))
    run_starts = positions[run_first] + 1
    run_owner = owner[run_first]
    # Runs are grouped by instance already; split the run list where the owner changes.
    splits = np.flatnonzero(run_owner[1:] != run_owner[:-1]) + 1
    rows = []
    for starts, lengths in zip(np.split(run_starts, splits), np.split(run_lengths, splits)):
        pairs = np.column_stack((starts, lengths)).ravel()
        rows.append((image_id, " ".join(map(str, pairs.tolist()))))
    return rows


def draw_outlines(image_rgb, labels_or_mask, color=(255, 255, 0), thickness=1) -> np.ndarray:
    """Copy of a HxWx3 uint8 RGB image with the outline of every instance drawn in ``color``.

    ``labels_or_mask`` is a label image or a binary mask of the same height and width.  A pixel is on an
    outline when it belongs to an instance and lies within ``thickness`` pixels (8-neighbourhood) of a
    pixel with another label or of the image edge, so touching nuclei get separate outlines and a
    binary mask gets the outlines of its connected components.  A HxW grayscale image is accepted and
    turned into RGB.  The input image is not modified.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_rgb must be HxWx3 (or HxW), got shape {image.shape}")
    labels = np.asarray(labels_or_mask)
    # A float 0/1 mask (or float labels) is common after thresholding; whole numbers are accepted as labels.
    if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.rint(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels_or_mask must be an integer or boolean image (or whole-numbered floats), "
                         f"got dtype {labels.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"image_rgb has shape {image.shape} but labels_or_mask has shape {labels.shape}; "
                         "their height and width must match")
    color = tuple(int(c) for c in color)
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise ValueError(f"color must be three integers in 0..255, got {color!r}")
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"thickness must be a positive integer, got {thickness!r}")

    # A background frame makes instances cut by the image edge get a closed outline there.
    padded = np.pad(labels.astype(np.int64 if labels.dtype.itemsize > 4 else np.int32), 1)  # int32: less memory
    outline = segmentation.find_boundaries(padded, connectivity=2, mode="inner")[1:-1, 1:-1]
    if thickness > 1:
        outline = ndi.binary_dilation(outline, _EIGHT, iterations=int(thickness) - 1) & (labels != 0)
    result = image.copy()
    result[outline] = color
    return result


# The smallest interior blob, in pixels, that counts as a marker: smaller ones are noise on a boundary.
MIN_MARKER_SIZE = 4
# Rows of the nucleus probability turned into the nucleus area at a time (bounded float copies).
NUCLEUS_ROWS = 256


def instances_from_classes(probabilities, threshold=0.5, marker_threshold=0.5, min_size=15) -> np.ndarray:
    """Nuclei from an instance-aware model's H x W x 3 output (background, interior, boundary).

    The model marks where one nucleus ends and the next begins, so its interior class already holds one
    blob per nucleus.  Those blobs (interior probability above ``marker_threshold``) are the markers; a
    watershed over the inverted interior probability grows them to the nucleus area (one minus the
    background probability, above ``threshold``), so touching nuclei part where the model saw their
    boundary.  (Splitting blobs that still touch at the neck of their distance transform, as
    ``label_instances`` does, was tried and scored lower on the trained default's validation images.)
    A nucleus area without a marker becomes a nucleus of its own; pieces smaller than ``min_size``
    pixels are dropped.  Returns int32 labels 1..N (0 = background).  Float16 probabilities are not copied.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3 or probabilities.shape[2] != 3:
        raise ValueError(f"probabilities must be H x W x 3 (background, interior, boundary), got shape "
                         f"{probabilities.shape}")
    if probabilities.dtype.kind != "f":
        probabilities = probabilities.astype(np.float32)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    interior = probabilities[..., 1]  # a view; NaN is never above a threshold, and watershed_in_bands reads it as 0
    markers, _ = ndi.label(interior > marker_threshold)
    markers = remove_small(markers, MIN_MARKER_SIZE)
    # The nucleus area, one minus the background probability above ``threshold`` (NaN: background), a band
    # of rows at a time, so that a large image's float copies stay small.
    nuclei = markers > 0
    for top in range(0, nuclei.shape[0], NUCLEUS_ROWS):
        nucleus = np.subtract(1.0, np.nan_to_num(probabilities[top:top + NUCLEUS_ROWS, :, 0], nan=1.0))
        nuclei[top:top + NUCLEUS_ROWS] |= nucleus > threshold
    labels = watershed_in_bands(interior, markers, nuclei)  # the markers become the labels
    orphan = np.logical_and(nuclei, labels == 0, out=nuclei)
    orphans, count = ndi.label(orphan, structure=_EIGHT)
    if count:  # in place: an image of orphans (an untrained model's, say) makes no image-sized temporaries
        np.add(orphans, labels.max(), out=orphans, where=orphan)
        np.copyto(labels, orphans, where=orphan)
    del orphans, orphan, nuclei
    return relabel_sequential(remove_small(labels, min_size))


def drop_unsure(labels: np.ndarray, output: np.ndarray, min_confidence: float) -> np.ndarray:
    """Drop the nuclei whose mean nucleus probability in the model ``output`` (H x W x K) is below
    ``min_confidence`` (0 keeps every one), in place, and number the rest 1..N.  A faint blob of debris or
    tissue texture passes the pixel threshold here and there but stays unsure on average over its area."""
    if min_confidence <= 0 or not labels.any():
        return labels
    output = np.asarray(output)  # 3 classes: one minus the background probability (NaN: background)
    three = output.shape[-1] == 3
    confidence = 1.0 - label_means(labels, output[..., 0], nan=1.0) if three else label_means(labels, output[..., 0])
    unsure = confidence < min_confidence  # NaN (a label with no pixels) is never below
    return relabel_sequential(remove_labels(labels, unsure)) if unsure[1:].any() else labels


def foreground_probability(output: np.ndarray) -> np.ndarray:
    """The nucleus probability (H x W) of a model output: the sigmoid channel, or one minus background."""
    output = np.asarray(output)
    return output[..., 0] if output.shape[-1] == 1 else 1.0 - output[..., 0]


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """How a model output becomes nuclei; chosen on the validation images at the end of training."""

    threshold: float = 0.5  # nucleus probability
    marker_threshold: float = 0.5  # interior probability of a marker (instance-aware models only)
    min_size: int = 15  # pixels
    min_confidence: float = 0.0  # smallest mean nucleus probability of a nucleus (0: keep every one)

    @classmethod
    def of(cls, config) -> "PostProcessing":
        """The post-processing a run's ``Config`` holds."""
        return cls(config.threshold, config.marker_threshold, config.min_nucleus_size, config.min_confidence)

    def nuclei(self, output: np.ndarray) -> np.ndarray:
        """Instance labels of an H x W x K model output: the markers of an instance-aware (3-class)
        model, or the distance-transform watershed of a binary one; then the unsure ones dropped."""
        output = np.asarray(output)
        if output.ndim == 3 and output.shape[2] == 3:
            labels = instances_from_classes(output, self.threshold, self.marker_threshold, self.min_size)
        else:
            labels = label_instances(foreground_probability(output), self.threshold, self.min_size)
        return drop_unsure(labels, output, self.min_confidence)


# The marker thresholds (instance-aware models) and smallest nucleus sizes, in pixels, tried on the
# validation images.
MARKER_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_SIZE_GRID = (8, 15, 30)
# The smallest mean nucleus probabilities of a nucleus tried next, with the rest fixed (0 keeps all).
CONFIDENCE_GRID = (0.0, 0.75, 0.8, 0.85, 0.9, 0.95)


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
    true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
    dice_value, iou_value = binary_dice_iou(true_labels > 0, pred_labels > 0)
    precisions = matching_precisions(true_labels, pred_labels)
    return Scores(dice_value, iou_value, float(np.mean(precisions)), float(precisions[0]),
                  count_instances(true_labels), count_instances(pred_labels))


SCORE_KEYS = ("dice", "iou", "dsb_score", "ap50")


def mean_scores(scores: Sequence[Scores]) -> dict:
    """Mean of each score over images."""
    return {k: float(np.mean([getattr(s, k) for s in scores])) for k in SCORE_KEYS}


def choose_post_processing(truths: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                           thresholds: Sequence[float] = THRESHOLD_GRID,
                           marker_thresholds: Sequence[float] = MARKER_GRID,
                           min_sizes: Sequence[int] = MIN_SIZE_GRID,
                           confidences: Sequence[float] = CONFIDENCE_GRID) -> tuple[PostProcessing, dict, list[Scores]]:
    """The post-processing that maximises the mean DSB score over images (ties broken by Dice).

    ``truths`` are the images' ground-truth labels, ``outputs`` the model's H x W x K outputs; every
    combination of the thresholds and sizes is tried, marker thresholds only for instance-aware (3-class)
    outputs; then, with those fixed, each smallest confidence (``drop_unsure``; 0 keeps every nucleus,
    and wins ties).  Returns ``(post_processing, mean_scores, per_image_scores)``, the means rounded to 4
    decimals."""
    instance_aware = all(np.ndim(o) == 3 and np.shape(o)[2] == 3 for o in outputs)
    markers = tuple(marker_thresholds) if instance_aware else (PostProcessing.marker_threshold,)
    best = None

    def consider(post, per_image):
        nonlocal best
        mean = mean_scores(per_image)
        key = (round(mean["dsb_score"], 6), round(mean["dice"], 6))
        if best is None or key > best[0]:
            best = (key, post, mean, per_image)

    for threshold, marker, min_size in itertools.product(thresholds, markers, min_sizes):
        post = PostProcessing(float(threshold), float(marker), int(min_size))
        consider(post, [score_image(t, post.nuclei(o)) for t, o in zip(truths, outputs)])
    chosen, tried = best[1], {float(c): [] for c in confidences if c > 0}
    for truth, output in zip(truths, outputs):  # each confidence only drops some of the chosen nuclei
        found = chosen.nuclei(output)
        for confidence, per_image in tried.items():
            per_image.append(score_image(truth, drop_unsure(found.copy(), output, confidence)))
    for confidence, per_image in tried.items():
        consider(dataclasses.replace(chosen, min_confidence=confidence), per_image)
    _, post, mean, per_image = best
    return post, {k: round(v, 4) for k, v in mean.items()}, per_image


@dataclasses.dataclass
class Prediction:
    """One image's prediction: its nucleus probability, nuclei and count, with scores when the truth is
    known.

    The arrays may be dropped (``summary``) once the files are written, so that predicting a folder of
    large images keeps only a few numbers per image."""

    name: str
    height: int
    width: int
    count: int
    image: np.ndarray | None = None  # H x W x 3 uint8 RGB
    probability: np.ndarray | None = None  # H x W nucleus probability, in the output's float dtype
    labels: np.ndarray | None = None  # H x W int32 instances
    truth_labels: np.ndarray | None = None
    scores: Scores | None = None

    @classmethod
    def from_output(cls, name: str, image: np.ndarray, output: np.ndarray, post: PostProcessing,
                    truth_labels: np.ndarray | None = None) -> "Prediction":
        """Find the nuclei of a model ``output`` (H x W x K) once, and score them when ``truth_labels``
        are given."""
        labels = post.nuclei(output)
        scores = score_image(truth_labels, labels) if truth_labels is not None else None
        height, width = labels.shape
        return cls(name, height, width, count_instances(labels), image, foreground_probability(output),
                   labels, truth_labels, scores)

    def summary(self) -> "Prediction":
        """The same prediction without its arrays."""
        return dataclasses.replace(self, image=None, probability=None, labels=None, truth_labels=None)

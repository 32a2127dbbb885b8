"""From a model's output to labelled nuclei: the post-processing, and its choice on validation images.

``instances_from_classes`` turns an instance-aware model's output (background, interior, boundary) into
an instance label image, seeded by the model's own interior markers; ``label_instances`` does it for a
binary probability map (touching nuclei split by a distance-transform watershed); ``drop_unsure`` drops
the nuclei the model is unsure of on average.  ``PostProcessing`` holds the thresholds and picks the
method; ``choose_post_processing`` learns the thresholds on a run's validation images (what
``runs.POST_PROCESSING_FILE`` keeps).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import morphology

from unet_nuclei.label_images import label_means, relabel_sequential, remove_labels, remove_small, watershed_in_bands
from unet_nuclei.metrics import Scores, TruthScorer, mean_scores

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
    if not (
        np.issubdtype(probability.dtype, np.floating)
        or np.issubdtype(probability.dtype, np.integer)
        or probability.dtype == bool
    ):
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
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    return relabel_sequential(remove_small(grow_nuclei(probabilities, threshold, marker_threshold), min_size))


def grow_nuclei(probabilities, threshold=0.5, marker_threshold=0.5) -> np.ndarray:
    """``instances_from_classes`` before its last step: the int32 nuclei grown from the markers, of every
    size and not yet numbered 1..N.  Choosing among smallest sizes grows them once
    (``choose_post_processing``)."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3 or probabilities.shape[2] != 3:
        raise ValueError(
            f"probabilities must be H x W x 3 (background, interior, boundary), got shape {probabilities.shape}"
        )
    if probabilities.dtype.kind != "f":
        probabilities = probabilities.astype(np.float32)
    interior = probabilities[..., 1]  # a view; NaN is never above a threshold, and watershed_in_bands reads it as 0
    markers, _ = ndi.label(interior > marker_threshold)
    markers = remove_small(markers, MIN_MARKER_SIZE)
    # The nucleus area, one minus the background probability above ``threshold`` (NaN: background), a band
    # of rows at a time, so that a large image's float copies stay small.
    nuclei = markers > 0
    for top in range(0, nuclei.shape[0], NUCLEUS_ROWS):
        nucleus = np.subtract(1.0, np.nan_to_num(probabilities[top : top + NUCLEUS_ROWS, :, 0], nan=1.0))
        nuclei[top : top + NUCLEUS_ROWS] |= nucleus > threshold
    labels = watershed_in_bands(interior, markers, nuclei)  # the markers become the labels
    orphan = np.logical_and(nuclei, labels == 0, out=nuclei)
    orphans, count = ndi.label(orphan, structure=_EIGHT)
    if count:  # in place: an image of orphans (an untrained model's, say) makes no image-sized temporaries
        np.add(orphans, labels.max(), out=orphans, where=orphan)
        np.copyto(labels, orphans, where=orphan)
    del orphans, orphan, nuclei
    return labels


def drop_unsure(labels: np.ndarray, output: np.ndarray, min_confidence: float) -> np.ndarray:
    """Drop the nuclei whose mean nucleus probability in the model ``output`` (H x W x K) is below
    ``min_confidence`` (0 keeps every one), in place, and number the rest 1..N.  A faint blob of debris or
    tissue texture passes the pixel threshold here and there but stays unsure on average over its area."""
    if min_confidence <= 0 or not labels.any():
        return labels
    output = np.asarray(output)  # 3 classes: one minus the background probability (NaN: background)
    if output.shape[-1] == 3:
        # Background, interior, boundary: a nucleus's confidence is one minus its mean background probability.
        confidence = 1.0 - label_means(labels, output[..., 0], nan=1.0)
    else:
        confidence = label_means(labels, output[..., 0])  # the nucleus probability itself
    unsure = confidence < min_confidence  # NaN (a label with no pixels) is never below
    if not unsure[1:].any():
        return labels
    return relabel_sequential(remove_labels(labels, unsure))


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
    def of(cls, config) -> PostProcessing:
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


def _grid_scores(truth, output, settings: Sequence[PostProcessing], instance_aware: bool) -> list[Scores]:
    """One image's scores under each of ``settings``.  For an instance-aware output the nuclei of each
    threshold and marker threshold are grown once and shared by the smallest sizes that follow them in
    ``settings`` (sizes only remove whole nuclei at the end): the same nuclei as ``PostProcessing.nuclei``
    with a third of the watersheds, scored without renumbering (the score does not depend on it)."""
    score = TruthScorer(truth)
    if not instance_aware:
        return [score(post.nuclei(output)) for post in settings]
    scores, grown, grown_for = [], None, None
    for post in settings:
        if grown_for != (post.threshold, post.marker_threshold):
            grown_for = (post.threshold, post.marker_threshold)
            grown = grow_nuclei(output, *grown_for)
        scores.append(score(remove_small(grown.copy(), post.min_size)))
    return scores


def choose_post_processing(
    truths: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    thresholds: Sequence[float] = THRESHOLD_GRID,
    marker_thresholds: Sequence[float] = MARKER_GRID,
    min_sizes: Sequence[int] = MIN_SIZE_GRID,
    confidences: Sequence[float] = CONFIDENCE_GRID,
    workers: int = 1,
) -> tuple[PostProcessing, dict, list[Scores]]:
    """The post-processing that maximises the mean DSB score over images (ties broken by Dice).

    ``truths`` are the images' ground-truth labels, ``outputs`` the model's H x W x K outputs; every
    combination of the thresholds and sizes is tried, marker thresholds only for instance-aware (3-class)
    outputs; then, with those fixed, each smallest confidence (``drop_unsure``; 0 keeps every nucleus,
    and wins ties).  ``workers`` threads score images side by side (the same choice with any number).
    Returns ``(post_processing, mean_scores, per_image_scores)``, the means rounded to 4 decimals."""
    instance_aware = all(np.ndim(o) == 3 and np.shape(o)[2] == 3 for o in outputs)
    markers = tuple(marker_thresholds) if instance_aware else (PostProcessing.marker_threshold,)
    settings = [
        PostProcessing(float(threshold), float(marker), int(min_size))
        for threshold, marker, min_size in itertools.product(thresholds, markers, min_sizes)
    ]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        per_image_grid = list(
            pool.map(lambda pair: _grid_scores(*pair, settings, instance_aware), zip(truths, outputs))
        )
    best = None

    def consider(post, per_image):
        nonlocal best
        mean = mean_scores(per_image)
        key = (round(mean["dsb_score"], 6), round(mean["dice"], 6))
        if best is None or key > best[0]:
            best = (key, post, mean, per_image)

    for i, post in enumerate(settings):
        consider(post, [grid[i] for grid in per_image_grid])
    chosen, tried = best[1], {float(c): [] for c in confidences if c > 0}
    for truth, output in zip(truths, outputs):  # each confidence only drops some of the chosen nuclei
        found, score = chosen.nuclei(output), TruthScorer(truth)
        for confidence, per_image in tried.items():
            per_image.append(score(drop_unsure(found.copy(), output, confidence)))
    for confidence, per_image in tried.items():
        consider(dataclasses.replace(chosen, min_confidence=confidence), per_image)
    _, post, mean, per_image = best
    return post, {k: round(v, 4) for k, v in mean.items()}, per_image

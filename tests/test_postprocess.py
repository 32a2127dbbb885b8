"""Tests for unet_nuclei/postprocess.py: labelled nuclei from a model's output, and the post-processing's
choice on validation images.

The expected values are worked out by hand in the comments, so a wrong implementation fails here rather
than agreeing with itself.
"""

import cv2
import numpy as np
import pytest

from unet_nuclei.metrics import (
    count_instances,
    matching_precisions,
    score_image,
)
from unet_nuclei.postprocess import (
    PostProcessing,
    choose_post_processing,
    drop_unsure,
    instances_from_classes,
    label_instances,
)
from unet_nuclei.segmenter import Prediction

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


def _noisy_class_outputs(count, seed=0):
    """Images of touching and lone discs, each with a blurred, noisy 3-class output: a search over
    thresholds, marker thresholds and sizes then finds nuclei that differ from setting to setting."""
    from unet_model_core import instance_targets

    rng = np.random.default_rng(seed)
    truths, outputs = [], []
    for _ in range(count):
        truth = np.zeros((64, 80), np.int32)
        for label in range(1, 9):
            x, y, radius = rng.integers(8, 72), rng.integers(8, 56), rng.integers(3, 9)
            disc = _discs(truth.shape, (int(x), int(y), int(radius))) > 0
            truth[disc & (truth == 0)] = label
        classes = instance_targets(truth, contact=2)
        output = np.eye(3, dtype=np.float32)[classes] + rng.normal(0, 0.35, (*truth.shape, 3)).astype(np.float32)
        output = np.exp(cv2.GaussianBlur(output, (0, 0), 1.5) * 3)
        truths.append(truth)
        outputs.append(output / output.sum(axis=2, keepdims=True))
    return truths, outputs


def test_choose_post_processing_equals_the_plain_search_with_any_number_of_threads():
    # The search grows each threshold pair's nuclei once and scores them with one TruthScorer per image;
    # the plain search (every setting's nuclei from PostProcessing.nuclei, scored by score_image) must
    # give the same scores, setting by setting, and so the same choice.
    import dataclasses
    import itertools

    from unet_nuclei.metrics import mean_scores
    from unet_nuclei.postprocess import _grid_scores

    truths, outputs = _noisy_class_outputs(5)
    grid = dict(thresholds=[0.3, 0.5, 0.7], marker_thresholds=[0.3, 0.6], min_sizes=[8, 30])
    settings = [
        PostProcessing(t, m, s)
        for t, m, s in itertools.product(grid["thresholds"], grid["marker_thresholds"], grid["min_sizes"])
    ]
    plain = [[score_image(t, post.nuclei(o)) for post in settings] for t, o in zip(truths, outputs)]
    assert [_grid_scores(t, o, settings, True) for t, o in zip(truths, outputs)] == plain
    assert len({mean_scores([row[i] for row in plain])["dsb_score"] for i in range(len(settings))}) > 3
    one = choose_post_processing(truths, outputs, **grid, workers=1)
    two = choose_post_processing(truths, outputs, **grid, workers=2)
    assert one == two
    means = [mean_scores([row[i] for row in plain]) for i in range(len(settings))]
    keys = [(round(m["dsb_score"], 6), round(m["dice"], 6)) for m in means]
    first_best = keys.index(max(keys))  # ties: the first setting in grid order wins
    assert dataclasses.replace(one[0], min_confidence=0.0) == settings[first_best]

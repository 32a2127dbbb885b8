"""Known-answer tests for the Dice/IoU math, and each loss actually trains."""

import keras
import numpy as np
import pytest

import unet_model_core as core

EPS = 1e-9  # a vanishing smoothing term, so the values below are the exact set ratios


def arr(values):
    return np.array(values, np.float32).reshape(1, -1, 1, 1)


@pytest.mark.parametrize(
    "true, pred, dice, iou",
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0, 1.0),  # identical
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0, 0.0),  # disjoint
        ([1, 1, 1, 1], [1, 1, 0, 0], 2 * 2 / 6, 2 / 4),  # half: |A.B|=2, |A|+|B|=6, union 4
        ([1, 1, 0, 0], [1, 0.5, 0, 0], 2 * 1.5 / 3.5, 1.5 / 2.0),  # soft prediction
    ],
)
def test_dice_and_iou_known_answers(true, pred, dice, iou):
    assert float(core.dice_coefficient(arr(true), arr(pred), smooth=EPS)) == pytest.approx(dice, abs=1e-6)
    assert float(core.iou_coefficient(arr(true), arr(pred), smooth=EPS)) == pytest.approx(iou, abs=1e-6)


def test_empty_masks_give_one_not_nan():
    empty = arr([0, 0, 0, 0])
    for smooth in (EPS, 1.0):
        assert float(core.dice_coefficient(empty, empty, smooth)) == pytest.approx(1.0)
        assert float(core.iou_coefficient(empty, empty, smooth)) == pytest.approx(1.0)
    # Predicting something where there is nothing scores (almost) zero, still not NaN.
    assert float(core.dice_coefficient(empty, arr([1, 0, 0, 0]), EPS)) == pytest.approx(0.0, abs=1e-6)
    assert not np.isnan(float(core.DiceLoss()(empty, empty)))


def test_dice_is_averaged_per_image():
    true = np.stack([np.ones((2, 2, 1)), np.zeros((2, 2, 1))]).astype(np.float32)
    pred = np.stack([np.ones((2, 2, 1)), np.ones((2, 2, 1))]).astype(np.float32)
    # Image 1 perfect (1.0), image 2 all false positive (0.0): the mean is 0.5, not the pooled 8/12.
    assert float(core.dice_coefficient(true, pred, EPS)) == pytest.approx(0.5, abs=1e-6)


def test_metrics_threshold_the_prediction_at_one_half():
    true = arr([1, 1, 0, 0])
    assert float(core.dice(true, arr([0.9, 0.6, 0.4, 0.1]))) == pytest.approx(1.0)
    assert float(core.iou(true, arr([0.9, 0.4, 0.4, 0.1]))) == pytest.approx((1 + 1) / (2 + 1))  # smooth=1


def test_losses_are_zero_for_a_perfect_prediction_and_positive_otherwise():
    true = arr([1, 1, 0, 0])
    for name in core.LOSSES:
        loss = core.make_loss(name)
        assert float(loss(true, arr([1, 1, 0, 0]))) == pytest.approx(0.0, abs=1e-5)
        assert float(loss(true, arr([0.2, 0.3, 0.7, 0.6]))) > 0.3
    with pytest.raises(ValueError, match=r"loss\b.*\bbce\b"):  # the setting and a loss that works
        core.make_loss("focal")


@pytest.mark.parametrize("name", core.LOSSES)
def test_each_loss_trains_a_toy_segmentation(name):
    # Toy problem: the mask is the bright square of the image; a tiny U-Net must learn it.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = np.zeros((16, 16, 16, 3), np.float32)
    y = np.zeros((16, 16, 16, 1), np.float32)
    for i in range(16):
        top, left = rng.integers(0, 10, 2)
        x[i, top : top + 6, left : left + 6] = 200
        y[i, top : top + 6, left : left + 6] = 1
    x += rng.normal(0, 10, x.shape).astype(np.float32)
    config = core.Config(
        image_size=16,
        channels=(8, 16),
        loss=name,
        learning_rate=1e-2,
        targets="binary",
        preprocessing="rgb",
        batch_norm=False,
    )
    model = core.compile_unet(core.build_unet_from_config(config), config)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    model.fit(x, y, epochs=40, batch_size=8, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["dice"] > 0.8, after


def test_softmax_model_trains_with_one_hot_targets():
    keras.utils.set_random_seed(1)
    x = np.random.default_rng(1).uniform(0, 255, (8, 16, 16, 1)).astype(np.float32)
    classes = (x[..., 0] > 85).astype(int) + (x[..., 0] > 170)
    y = keras.utils.to_categorical(classes, 3).astype(np.float32)
    config = core.Config(image_size=16, channels=(4, 8), targets="instance", preprocessing="grey", learning_rate=1e-2)
    model = core.compile_unet(core.build_unet_from_config(config), config)
    assert model.output_shape == (None, 16, 16, 3) and model.input_shape == (None, 16, 16, 1)
    before = model.evaluate(x, y, verbose=0)[0]
    model.fit(x, y, epochs=30, verbose=0)
    assert model.evaluate(x, y, verbose=0)[0] < before


def test_softmax_dice_weighs_each_class_the_same_however_thin():
    # 100 pixels: 40 interior, 4 boundary, 56 background.  A prediction that is right everywhere except
    # that it calls the boundary interior has interior Dice (80+1)/(84+1) and boundary Dice (0+1)/(4+1)
    # = 0.2 (smooth 1): the loss is 1 - their mean, not the near-zero loss of a pixel-weighted Dice.
    truth = np.zeros((1, 10, 10), int)
    truth[0, :4] = 1
    truth[0, 4, :4] = 2
    y_true = keras.utils.to_categorical(truth, 3).astype(np.float32)
    guess = np.where(truth == 2, 1, truth)
    y_pred = keras.utils.to_categorical(guess, 3).astype(np.float32)
    loss = float(core.DiceLoss()(y_true, y_pred))
    assert loss == pytest.approx(1 - (81 / 85 + 0.2) / 2, abs=1e-5)
    assert float(core.DiceLoss()(y_true, y_true)) == pytest.approx(0.0, abs=1e-6)

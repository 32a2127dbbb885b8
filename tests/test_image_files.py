"""Files as microscopes write them (issue 33): any bit depth, channels, planes, pixel sizes and folders.

Every file is made in a temporary folder from one known answer, an image of separate discs, and checked
against the 8-bit PNG of the same image: the model's input (``preprocess_image(read_image(...))``) must
show the same nuclei, so these tests need no model.  The scripts' behaviour with each kind of file is
at the end, through ``Predict_mask.main`` on the session's quickly trained run."""
import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import draw, filters

import unet_model_core as core

# --------------------------------------------------------------------------------------------------
# The known answer
# --------------------------------------------------------------------------------------------------
SHAPE = (160, 192)


def disc_scene(shape=SHAPE, count=24, seed=0):
    """Separate discs (radius 5-9 px, brightness 0.45-1) on a background of 0.06, blurred like an optical
    image, with faint noise: values in [0, 1] and the discs' labels 1..N."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    scene = np.zeros(shape)
    placed = []
    while len(placed) < count:
        radius = rng.uniform(5, 9)
        centre = rng.uniform(radius + 2, np.array(shape) - radius - 2)
        if all(np.hypot(*(centre - c)) > radius + r + 4 for c, r in placed):
            placed.append((centre, radius))
            rr, cc = draw.disk(tuple(centre), radius, shape=shape)
            labels[rr, cc] = len(placed)
            scene[rr, cc] = rng.uniform(0.45, 1.0)
    scene = ndimage.gaussian_filter(scene, 1.0) + 0.06 + rng.normal(0, 0.01, shape)
    return np.clip(scene, 0, 1), labels


@pytest.fixture(scope="module")
def scene():
    return disc_scene()


def eight_bit(scene):
    return np.round(scene * 255).astype(np.uint8)


def model_input(path, channel=None):
    """What the model sees of a file: H x W grey uint8."""
    return core.preprocess_image(core.read_image(path, channel), "grey")[..., 0]


def nuclei_of(view):
    """The nuclei of a model input by Otsu's threshold, less specks under the run's smallest nucleus size
    (a hot pixel is not a nucleus): their labels.  A stand-in for the model, which finds the same nuclei
    in the same input."""
    labels = ndimage.label(view > filters.threshold_otsu(view))[0]
    small = np.bincount(labels.ravel()) < core.Config.min_nucleus_size
    small[0] = False
    labels[small[labels]] = 0
    return ndimage.label(labels > 0)[0]


def assert_same_nuclei(view, reference, truth, raw=None):
    """``view`` shows ``reference``'s nuclei: the same count as the known discs, the same foreground, the
    nuclei bright on a dark background, and their intensities not squeezed into fewer grey levels than
    the file (``raw``) and the reference hold."""
    found, expected = nuclei_of(view), nuclei_of(reference)
    assert expected.max() == truth.max()  # the reference itself finds every disc: the test can fail
    assert found.max() == truth.max()
    union = np.count_nonzero((found > 0) | (expected > 0))
    assert np.count_nonzero((found > 0) & (expected > 0)) / union >= 0.95
    assert np.corrcoef(view.ravel().astype(float), reference.ravel().astype(float))[0, 1] >= 0.98
    assert view[truth > 0].mean() > view[truth == 0].mean() + 100  # not inverted as if brightfield
    levels = len(np.unique(reference[truth > 0]))
    if raw is not None:
        levels = min(levels, len(np.unique(raw[truth > 0])))
    assert len(np.unique(view[truth > 0])) >= 0.8 * levels


# --------------------------------------------------------------------------------------------------
# 1. Intensities: every depth gives the 8-bit image's nuclei
# --------------------------------------------------------------------------------------------------
def test_an_8_bit_png_and_tiff_give_the_input_they_always_gave(tmp_path, scene):
    import cv2

    image, truth = scene
    cv2.imwrite(str(tmp_path / "cells.png"), eight_bit(image))
    tifffile.imwrite(tmp_path / "cells.tif", eight_bit(image))
    expected = core.preprocess_image(cv2.cvtColor(eight_bit(image), cv2.COLOR_GRAY2RGB), "grey")[..., 0]
    for name in ("cells.png", "cells.tif"):
        np.testing.assert_array_equal(model_input(tmp_path / name), expected)
    assert nuclei_of(expected).max() == truth.max()


# Each kind of file from the issue, made from the same scene: (file name, values from the scene in [0, 1]).
DEPTHS = {
    # A fluorescence camera's offset: background 180, nuclei up to 300 (was inverted as brightfield).
    "offset-16bit.tif": lambda s: np.round(180 + 120 * s).astype(np.uint16),
    "offset-16bit.png": lambda s: np.round(180 + 120 * s).astype(np.uint16),
    # 12-bit data with one hot pixel at the top of 12 bits, or of 16 bits (was squeezed into ~16 levels).
    "hot-4095.tif": lambda s: hot(np.round(20 + 240 * s).astype(np.uint16), 4095),
    "hot-65535.tif": lambda s: hot(np.round(20 + 240 * s).astype(np.uint16), 65535),
    "dim-hot-4095.tif": lambda s: hot(np.round(10 + 90 * s).astype(np.uint16), 4095),
    # Floats with negative values (background-subtracted data; was clipped at 0).
    "negative-float.tif": lambda s: (2.0 * s - 0.7).astype(np.float32),
    "signed-16bit.tif": lambda s: np.round(3000 * s - 1000).astype(np.int16),
}


def hot(values, level):
    values[7, 11] = level
    return values


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_every_bit_depth_gives_the_8_bit_image_s_nuclei(tmp_path, scene, name):
    import cv2

    image, truth = scene
    cv2.imwrite(str(tmp_path / "reference.png"), eight_bit(image))
    values = DEPTHS[name](image)
    if name.endswith(".png"):
        cv2.imwrite(str(tmp_path / name), values)
    else:
        tifffile.imwrite(tmp_path / name, values)
    assert core.decode_image(tmp_path / name).pixels.dtype == values.dtype  # read at its own depth
    assert_same_nuclei(model_input(tmp_path / name), model_input(tmp_path / "reference.png"), truth, values)


def test_the_bright_background_decision_is_taken_on_the_stretched_image(scene):
    image, truth = scene
    offset = np.round(180 + 120 * image).astype(np.float32)  # raw median 187 of 300: above half the range
    assert np.median(offset) / offset.max() > 0.5
    assert not core.has_bright_background(offset, np.uint16)
    # Dark nuclei on a bright background (brightfield) are still inverted, at 8 bits and at 16.
    for brightfield in (np.round(255 - 150 * image).astype(np.uint8), np.round(60000 - 40000 * image).astype(np.uint16)):
        assert core.has_bright_background(brightfield.astype(np.float32), brightfield.dtype)
        view = core.preprocess_image(core.to_rgb_uint8(brightfield), "grey")[..., 0]
        assert view[truth > 0].mean() > view[truth == 0].mean() + 100
        assert nuclei_of(view).max() == truth.max()

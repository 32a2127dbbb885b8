"""Section 1 of unet_model_core (data preprocessing): decoding, discovery, resizing, the input pipelines
and augmentation.  Every test writes its own tiny fixture under ``tmp_path``; nothing in the repository
is read or written.  The train/validation split and the choice of data folder (``unet_nuclei.training``)
are tested in test_training_data.py, the built-in sample in test_synthetic.py, the cache in test_cache.py."""

import logging
import os
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from scipy import ndimage

import unet_model_core as core
from conftest import snapshot
from unet_nuclei import cache, evaluation


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _write(path, array, params=()):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array, list(params)), f"cv2 could not write {path}"
    return path


def _rect(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _dsb_sample(root, sample_id, image, masks):
    """Write <root>/<id>/images/<id>.png and one 0/255 PNG per nucleus in <root>/<id>/masks/."""
    _write(Path(root) / sample_id / "images" / f"{sample_id}.png", image)
    for k, mask in enumerate(masks):
        _write(Path(root) / sample_id / "masks" / f"{sample_id}_nucleus{k:02d}.png", mask.astype(np.uint8) * 255)


def _dihedral(array):
    """The 8 flips/rotations of an H x W (x C) array, as (name, array) pairs."""
    out = []
    for k in range(4):
        rotated = np.rot90(array, k, axes=(0, 1))
        out.append((f"rot{k}", rotated))
        out.append((f"rot{k}+flip", rotated[:, ::-1]))
    return out


def _block_pattern(h, w, seed, block=4):
    """A random, asymmetric 0/1 pattern of block x block squares (every 32x32 window holds both values)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 2, size=(-(-h // block), -(-w // block)), dtype=np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def _saturated_sample(sample_id, h, w, seed):
    """An RGB sample whose red channel is 255 exactly on the nuclei and 0 elsewhere (green and blue are
    noise), so the mask can be recomputed from the image after any flip/rotation/intensity jitter."""
    rng = np.random.default_rng(seed + 1000)
    mask = _block_pattern(h, w, seed)
    image = np.empty((h, w, 3), np.uint8)
    image[..., 0] = mask * 255
    image[..., 1:] = rng.integers(0, 256, size=(h, w, 2), dtype=np.uint8)
    return core.LoadedSample(sample_id, image, mask.astype(np.uint16))


def _mask_from_red(image):
    """Recover the 0/1 mask from an (augmented) saturated image's red channel.

    The jitter is a strictly increasing function of the value per sample and channel, so nuclei and
    background keep two distinct red values: split at their midpoint.  A uniform patch cannot be split;
    the jitter bounds keep 255 above 128 and 0 below it there."""
    red = image[..., 0]
    low, high = float(red.min()), float(red.max())
    threshold = (low + high) / 2 if high - low > 1.0 else 128.0
    return (red > threshold).astype(np.uint8)


def _assert_monotone(out_channel, in_channel):
    """out is a non-decreasing function of in (pixel by pixel): the same geometry, jittered intensities."""
    order = np.argsort(in_channel.ravel(), kind="stable")
    assert np.all(np.diff(out_channel.ravel()[order].astype(np.float64)) >= -1e-3)


def _config(**overrides):
    # The pipeline's mechanics are tested on binary targets of RGB patches at their native scale, where
    # every target pixel can be checked against the image; the instance targets, the grey preprocessing
    # and the scaled patches have tests of their own below.
    base = dict(
        image_size=32,
        batch_size=4,
        channels=(4, 8),
        steps_per_epoch=2,
        seed=0,
        targets="binary",
        preprocessing="rgb",
        scale_range=None,
    )
    base.update(overrides)
    return core.Config(**base)


def _take(dataset, n=None):
    """The first ``n`` batches (all of a finite dataset) as NumPy arrays, of a tf.data dataset or a PyDataset."""
    if hasattr(dataset, "as_numpy_iterator"):
        return list((dataset.take(n) if n else dataset).as_numpy_iterator())
    return [dataset[i] for i in range(n or dataset.num_batches)]


# --------------------------------------------------------------------------------------------------
# 1. Mask union and instance labels (DSB layout)
# --------------------------------------------------------------------------------------------------
def test_dsb_masks_merge_into_exact_union_with_one_label_per_file(tmp_path):
    shape = (30, 40)
    masks = [
        _rect(shape, 2, 9, 3, 15),
        _disc(shape, 20, 10, 6),
        _rect(shape, 22, 28, 25, 38),
        _disc(shape, 8, 30, 4),
        _rect(shape, 15, 16, 30, 31),
    ]  # the last: a single pixel
    assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum(), "fixture masks must not overlap"
    image = (np.arange(30 * 40) % 251).astype(np.uint8).reshape(shape)
    _dsb_sample(tmp_path, "cells", image, masks)
    overlapping = [_rect(shape, 5, 20, 5, 20), _disc(shape, 15, 15, 8), _rect(shape, 0, 1, 0, 40)]
    _dsb_sample(tmp_path, "crowded", np.full(shape, 77, np.uint8), overlapping)

    samples, problems = core.find_samples(tmp_path)
    assert problems == []
    assert [s.sample_id for s in samples] == ["cells", "crowded"]
    assert all(s.layout == "dsb" for s in samples) and len(samples[0].mask_paths) == len(masks)
    loaded, problems = core.load_samples(samples, progress=False)
    assert problems == [] and [s.sample_id for s in loaded] == ["cells", "crowded"]

    cells = loaded[0]
    union = np.logical_or.reduce(masks)
    assert cells.labels.dtype == np.uint16 and cells.labels.shape == shape
    np.testing.assert_array_equal(cells.labels > 0, union)
    assert cells.mask.dtype == np.uint8 and set(np.unique(cells.mask)) == {0, 1}
    np.testing.assert_array_equal(cells.mask, union.astype(np.uint8))
    per_file = []
    for mask in masks:
        values = np.unique(cells.labels[mask])
        assert len(values) == 1 and values[0] > 0, "one nucleus file must map to one label"
        per_file.append(int(values[0]))
    assert len(set(per_file)) == len(masks), "each mask file must get its own label"
    assert set(np.unique(cells.labels)) == {0, *per_file}
    np.testing.assert_array_equal(cells.image, np.repeat(image[..., None], 3, axis=2))

    # Overlapping nuclei: the union is still exact.
    np.testing.assert_array_equal(loaded[1].labels > 0, np.logical_or.reduce(overlapping))


def test_read_instance_labels_rejects_a_mask_of_another_size(tmp_path):
    path = _write(tmp_path / "m.png", np.full((10, 12), 255, np.uint8))
    with pytest.raises(core.DataError, match=r"12x10.*16x16"):
        core.read_instance_labels([path], (16, 16))
    with pytest.raises(core.DataError, match=r"12x10"):
        core.read_instance_labels([path], (16, 16), layout="pairs")


# --------------------------------------------------------------------------------------------------
# 2. Every image kind -> H x W x 3 uint8 RGB
# --------------------------------------------------------------------------------------------------
def _colour_rgb():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = np.arange(8, dtype=np.uint8)[None, :] * 30  # red ramp left -> right
    rgb[..., 1] = 100
    rgb[..., 2] = np.arange(6, dtype=np.uint8)[:, None] * 40  # blue ramp top -> bottom
    return rgb


def test_pure_red_written_in_bgr_reads_back_as_rgb_red(tmp_path):
    path = _write(tmp_path / "red.png", np.dstack([np.zeros((5, 7), np.uint8)] * 2 + [np.full((5, 7), 255, np.uint8)]))
    image = core.read_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert np.all(image == np.array([255, 0, 0], np.uint8))


@pytest.mark.parametrize("kind", ["grey8.png", "rgb.png", "rgba.png", "rgb.tif", "grey8.tif", "rgb.bmp"])
def test_8bit_images_are_read_exactly_as_rgb(tmp_path, kind):
    rgb = _colour_rgb()
    if kind.startswith("grey8"):
        grey = rgb[..., 0]
        written, expected = grey, np.repeat(grey[..., None], 3, axis=2)
    elif kind == "rgba.png":
        alpha = np.tile(np.array([0, 64, 128, 255], np.uint8), (6, 2))  # alpha must not leak into colour
        written, expected = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha]), rgb
    else:
        written, expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), rgb
    path = _write(tmp_path / kind, written)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[2:] == written.shape[2:], "fixture kind not kept"
    image = core.read_image(path)
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_is_stretched_to_full_range(tmp_path, ext):
    values = np.array([[0, 100, 1000], [2000, 3000, 4095]], np.uint16)  # a 12-bit camera in 16-bit words
    path = _write(tmp_path / f"grey16.{ext}", values)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    image = core.read_image(path)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert image.max() == 255 and image[1, 2].tolist() == [255, 255, 255] and image[0, 0].tolist() == [0, 0, 0]
    expected = np.round(values.astype(np.float64) * 255 / 4095)
    assert np.abs(image[..., 0].astype(int) - expected).max() <= 1
    assert np.all(image[..., 0] == image[..., 1]) and np.all(image[..., 1] == image[..., 2])


def test_16bit_colour_keeps_channel_order(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 2] = 4000  # red, the brightest: stretched to 255
    bgr[..., 1] = 2000
    path = _write(tmp_path / "rgb16.png", bgr)
    image = core.read_image(path)
    assert image.dtype == np.uint8 and image.shape == (4, 4, 3)
    assert np.all(image[..., 0] == 255) and np.all(np.abs(image[..., 1].astype(int) - 128) <= 1)
    assert np.all(image[..., 2] == 0)


def test_jpeg_is_read_approximately_in_rgb_order(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (200, 120, 40)]
    rgb = np.zeros((32, 48, 3), np.uint8)
    for i, colour in enumerate(colours):
        rgb[(i // 3) * 16 : (i // 3 + 1) * 16, (i % 3) * 16 : (i % 3 + 1) * 16] = colour
    path = _write(tmp_path / "photo.jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (cv2.IMWRITE_JPEG_QUALITY, 95))
    image = core.read_image(path)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    for i, colour in enumerate(colours):
        centre = image[(i // 3) * 16 + 8, (i % 3) * 16 + 8].astype(int)
        assert np.abs(centre - np.array(colour)).max() <= 12, (colour, centre)


def test_to_rgb_uint8_other_arrays():
    flat = core.to_rgb_uint8(np.full((2, 2), 0.5, np.float32))
    assert flat.dtype == np.uint8 and np.ptp(flat) == 0  # a flat image is not stretched into noise
    assert core.to_rgb_uint8(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]
    assert core.to_rgb_uint8(np.full((3, 2, 1), 9, np.uint8)).shape == (3, 2, 3)
    grey_alpha = np.dstack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 200, np.uint8)])
    assert np.all(core.to_rgb_uint8(grey_alpha) == 50)
    with pytest.raises(core.DataError, match=r"\(2, 2, 5\)"):  # the shape it cannot read
        core.to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


@pytest.mark.parametrize(
    "values, kind", [((0, 255), "png"), ((0, 1), "png"), ((0, 255), "colour"), ((0, 255), "jpg"), ((0, 7), "png16")]
)
def test_read_mask_is_binary_whatever_the_encoding(tmp_path, values, kind):
    truth = _disc((20, 24), 9, 11, 6) | _rect((20, 24), 0, 3, 18, 24)
    array = np.where(truth, values[1], values[0]).astype(np.uint16 if kind == "png16" else np.uint8)
    if kind == "colour":
        array = np.dstack([np.zeros_like(array), array, np.zeros_like(array)])  # green on black
    path = _write(tmp_path / f"mask.{'jpg' if kind == 'jpg' else 'png'}", array)
    mask = core.read_mask(path)
    assert mask.dtype == bool and mask.shape == (20, 24)
    if kind == "jpg":
        assert (mask != truth).sum() <= 3
    else:
        np.testing.assert_array_equal(mask, truth)


def test_dsb_rgba_image_loads_as_rgb(tmp_path):
    rgb = _colour_rgb()
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((6, 8), 255, np.uint8)])
    _dsb_sample(tmp_path, "rgba", bgra, [_rect((6, 8), 1, 3, 1, 4)])
    _dsb_sample(tmp_path, "other", np.zeros((6, 8), np.uint8), [_rect((6, 8), 0, 1, 0, 1)])
    loaded, problems = core.load_samples(core.find_samples(tmp_path)[0], progress=False)
    assert problems == []
    np.testing.assert_array_equal({s.sample_id: s for s in loaded}["rgba"].image, rgb)


def test_pairs_layout_with_0_255_and_0_1_masks(tmp_path):
    shape = (18, 22)
    rgb = np.zeros((*shape, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    blobs_a = _rect(shape, 1, 6, 1, 8) | _disc(shape, 12, 15, 4)  # two separate nuclei
    blob_b = _rect(shape, 3, 15, 5, 10)
    _write(tmp_path / "images" / "a.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    _write(tmp_path / "masks" / "a.png", blobs_a.astype(np.uint8) * 255)
    _write(tmp_path / "images" / "b.tif", np.full(shape, 40, np.uint8))
    _write(tmp_path / "masks" / "b.png", blob_b.astype(np.uint8))  # saved as 0/1, not 0/255
    _write(tmp_path / "images" / "c.png", np.full(shape, 90, np.uint8))
    _write(tmp_path / "masks" / "c_mask.png", blob_b.astype(np.uint8) * 255)
    _write(tmp_path / "images" / "d.png", np.full(shape, 10, np.uint8))  # no mask
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "masks" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")

    samples, problems = core.find_samples(tmp_path)
    assert [s.sample_id for s in samples] == ["a", "b", "c"] and {s.layout for s in samples} == {"pairs"}
    reasons = dict(problems)
    # Stray system files among the images are reported by name (and skipped); inside masks/ they
    # are simply not masks.
    assert set(reasons) == {"d", "notes.txt", ".DS_Store"}, problems
    assert "stray" in reasons[".DS_Store"]
    assert "no mask" in reasons["d"] and "not an image" in reasons["notes.txt"]

    loaded, problems = core.load_samples(samples, progress=False)
    assert problems == []
    by_id = {s.sample_id: s for s in loaded}
    assert np.all(by_id["a"].image == np.array([255, 0, 0], np.uint8))
    np.testing.assert_array_equal(by_id["a"].mask, blobs_a.astype(np.uint8))
    assert set(np.unique(by_id["a"].labels)) == {0, 1, 2}, "two separate blobs -> two instances"
    np.testing.assert_array_equal(by_id["b"].mask, blob_b.astype(np.uint8))  # 0/1 mask not lost
    np.testing.assert_array_equal(by_id["c"].mask, blob_b.astype(np.uint8))
    assert by_id["b"].image.shape == (*shape, 3)

    # require_masks=False keeps the unlabelled image (for prediction).
    samples, _ = core.find_samples(tmp_path, require_masks=False)
    assert "d" in [s.sample_id for s in samples]


def test_pairs_layout_with_an_image_named_like_its_folder(tmp_path):
    root = tmp_path / "cells"
    for name in ("cells", "other"):
        _write(root / "images" / f"{name}.png", np.full((8, 8), 40, np.uint8))
        _write(root / "masks" / f"{name}.png", _rect((8, 8), 2, 5, 2, 5).astype(np.uint8) * 255)
    samples, problems = core.find_samples(root)
    assert [s.sample_id for s in samples] == ["cells", "other"] and problems == []


def test_pairs_layout_reads_16_bit_label_masks_as_instances(tmp_path):
    labels = np.zeros((40, 40), np.uint16)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2  # touching the first: a binary mask would merge them
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((40, 40), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), labels)
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.full((40, 40), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "b.png"), ((labels > 0) * 255).astype(np.uint8))
    loaded, problems = core.load_samples(core.find_samples(tmp_path)[0], progress=False)
    by_id = {s.sample_id: s for s in loaded}
    assert not problems
    assert np.array_equal(by_id["a"].labels, labels)
    assert by_id["b"].labels.max() == 1  # a binary mask: one connected blob


# --------------------------------------------------------------------------------------------------
# 3. Resizing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, dst", [((37, 23), 64), ((37, 23), (11, 7)), ((37, 23), (75, 13)), ((9, 9), 33), ((64, 48), 5)]
)
def test_resize_mask_stays_binary_and_resize_image_has_the_right_shape(src, dst):
    mask = _block_pattern(*src, seed=3, block=3)
    mask[0, 0], mask[-1, -1] = 0, 1
    out = core.resize_mask(mask, dst)
    expected_hw = (dst, dst) if isinstance(dst, int) else dst
    assert out.shape == expected_hw and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    # Sparse label values: any interpolation other than nearest-neighbour invents values in between.
    labels = (mask * np.where(np.arange(mask.size).reshape(mask.shape) % 3, 7, 3000)).astype(np.uint16)
    assert set(np.unique(core.resize_mask(labels, dst))) <= set(np.unique(labels)), "labels must stay labels"

    image = np.random.default_rng(0).integers(0, 256, size=(*src, 3), dtype=np.uint8)
    resized = core.resize_image(image, dst)
    assert resized.shape == (*expected_hw, 3) and resized.dtype == np.uint8


def test_resize_mask_nearest_neighbour_upscale_is_exact():
    mask = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 1]], np.uint8)
    np.testing.assert_array_equal(core.resize_mask(mask, 9), np.kron(mask, np.ones((3, 3), np.uint8)))
    labels = np.array([[0, 5], [900, 0]], np.uint16)
    np.testing.assert_array_equal(core.resize_mask(labels, (6, 4)), np.kron(labels, np.ones((3, 2), np.uint16)))


def test_pad_to_min_size_mirrors_at_bottom_right():
    image = np.arange(20 * 25 * 3, dtype=np.int64).reshape(20, 25, 3).astype(np.uint8)
    padded = core.pad_to_min_size(image, 32)
    assert padded.shape == (32, 32, 3)
    np.testing.assert_array_equal(padded, np.pad(image, ((0, 12), (0, 7), (0, 0)), mode="symmetric"))
    np.testing.assert_array_equal(padded[:20, :25], image)
    np.testing.assert_array_equal(padded[20, :25], image[19])  # the edge row is mirrored
    thin = np.array([[1], [0], [1]], np.uint8)
    assert core.pad_to_min_size(thin, 8).shape == (8, 8) and set(np.unique(core.pad_to_min_size(thin, 8))) == {0, 1}
    assert core.pad_to_min_size(image, 16) is image


@pytest.mark.parametrize(
    "length, size, exact",
    [
        (40, 32, [0, 8]),
        (32, 32, [0]),
        (20, 32, [0]),
        (33, 32, [0, 1]),
        (100, 32, None),
        (97, 16, None),
        (64, 32, [0, 32]),
    ],
)
def test_validation_grid_covers_the_length_with_windows_inside(length, size, exact):
    positions = core.grid_positions(length, size)
    if exact is not None:
        assert positions == exact
    assert positions == sorted(set(positions)) and positions[0] == 0
    if length > size:
        assert positions[-1] == length - size, "the last window must be flush with the end"
        assert len(positions) == -(-length // size), "no more windows than needed"
    covered = np.zeros(max(length, size), bool)
    for p in positions:
        assert p + size <= max(length, size)
        covered[p : p + size] = True
    assert covered[:length].all()


def test_validation_patches_cover_every_pixel_of_a_large_image():
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, size=(70, 45, 3), dtype=np.uint8)
    mask = _block_pattern(70, 45, seed=4)
    sample = core.LoadedSample("large", image, mask.astype(np.uint16))
    _, val, _ = core.make_datasets([sample], [sample], _config(batch_size=8))
    batches = _take(val)
    x = np.concatenate([b[0] for b in batches]).astype(np.uint8)
    y = np.concatenate([b[1] for b in batches])
    assert len(x) == 3 * 2  # ceil(70/32) x ceil(45/32) windows
    covered = np.zeros((70, 45), bool)
    for patch, target in zip(x, y):
        found = [
            (t, c)
            for t in range(70 - 31)
            for c in range(45 - 31)
            if np.array_equal(image[t : t + 32, c : c + 32], patch)
        ]
        assert len(found) == 1, "each validation patch is one window of the image"
        t, c = found[0]
        np.testing.assert_array_equal(target[..., 0], mask[t : t + 32, c : c + 32])
        covered[t : t + 32, c : c + 32] = True
    assert covered.all(), "validation must see every pixel"


# --------------------------------------------------------------------------------------------------
# 4. The input pipelines
# --------------------------------------------------------------------------------------------------
def _expected_val_patches(samples, size=32):
    """The validation grid, computed independently: big 40x48 -> windows at tops [0, 8] x lefts [0, 16];
    small 20x25 -> one mirror-padded 32x32 window."""
    big, small = samples
    images, masks = [], []
    for top in (0, 8):
        for left in (0, 16):
            images.append(big.image[top : top + size, left : left + size])
            masks.append(big.mask[top : top + size, left : left + size])
    images.append(np.pad(small.image, ((0, 12), (0, 7), (0, 0)), mode="symmetric"))
    masks.append(np.pad(small.mask, ((0, 12), (0, 7)), mode="symmetric"))
    return np.stack(images), np.stack(masks)[..., None]


@pytest.fixture(scope="module")
def pipeline_samples():
    return [_saturated_sample("big", 40, 48, seed=1), _saturated_sample("small", 20, 25, seed=2)]


@pytest.mark.parametrize("sampling", ["patch", "resize"])
def test_train_batches_have_the_model_dtypes_shapes_and_ranges(pipeline_samples, sampling):
    train, val, steps = core.make_datasets(pipeline_samples, pipeline_samples, _config(sampling=sampling))
    assert steps == 2
    batches = _take(train, 3)
    assert len(batches) == 3  # the training set repeats
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape == (4, 32, 32, 3)
        assert y.dtype == np.float32 and y.shape == (4, 32, 32, 1)
        assert x.min() >= 0.0 and x.max() <= 255.0 and x.max() > 1.0, "images stay in [0, 255], not [0, 1]"
        assert set(np.unique(y)) <= {0.0, 1.0}
    if sampling == "patch":
        for x, y in batches:  # augmented patches still match their masks pixel for pixel
            for image, mask in zip(x, y):
                np.testing.assert_array_equal(_mask_from_red(image), mask[..., 0])
    else:  # each augmented image is a flip/rotation of a resized image, its mask the same flip/rotation
        resized = [(core.resize_image(s.image, 32), core.resize_mask(s.mask, 32)) for s in pipeline_samples]
        for x, y in batches:
            for image, mask in zip(x, y):
                matches = [
                    (src_img, t_img)
                    for src_img, src_mask in resized
                    for (_, t_mask), (_, t_img) in zip(_dihedral(src_mask), _dihedral(src_img))
                    if np.array_equal(t_mask, mask[..., 0])
                ]
                assert matches, "mask is not a flip/rotation of any resized mask"
                assert any(_monotone_ok(image, t_img) for _, t_img in matches)


def _monotone_ok(out, src):
    try:
        for c in range(3):
            _assert_monotone(out[..., c], src[..., c])
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("sampling", ["patch", "resize"])
def test_validation_is_deterministic_and_never_augmented(pipeline_samples, sampling):
    config = _config(sampling=sampling, augment=True)
    _, val, _ = core.make_datasets(pipeline_samples, pipeline_samples, config)
    first, second = _take(val), _take(val)
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x = np.concatenate([b[0] for b in first])
    y = np.concatenate([b[1] for b in first])
    assert x.dtype == np.float32 and y.dtype == np.float32
    if sampling == "patch":
        assert [len(b[0]) for b in first] == [4, 1]
        images, masks = _expected_val_patches(pipeline_samples)
    else:
        images = np.stack([core.resize_image(s.image, 32) for s in pipeline_samples])
        masks = np.stack([core.resize_mask(s.mask, 32) for s in pipeline_samples])[..., None]
    np.testing.assert_array_equal(x, images.astype(np.float32))  # raw pixels: no jitter, no flips
    np.testing.assert_array_equal(y, masks.astype(np.float32))
    # A re-built pipeline gives the very same validation data.
    _, val_again, _ = core.make_datasets(pipeline_samples, pipeline_samples, config)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in _take(val_again)]), x)


def test_unaugmented_train_patches_are_real_windows_and_small_images_are_mirror_padded(pipeline_samples):
    big, small = pipeline_samples
    # Only the small image: every 32x32 patch is the whole mirror-padded image.
    train, _, _ = core.make_datasets([small], [small], _config(augment=False))
    padded_image = np.pad(small.image, ((0, 12), (0, 7), (0, 0)), mode="symmetric").astype(np.float32)
    padded_mask = np.pad(small.mask, ((0, 12), (0, 7)), mode="symmetric")[..., None].astype(np.float32)
    for x, y in _take(train, 2):
        for image, mask in zip(x, y):
            np.testing.assert_array_equal(image, padded_image)
            np.testing.assert_array_equal(mask, padded_mask)
    # The big image: every patch is a window of it with its own mask window.
    train, _, _ = core.make_datasets([big], [small], _config(augment=False))
    offsets = set()
    for x, y in _take(train, 3):
        for image, mask in zip(x, y):
            found = [
                (t, c) for t in range(9) for c in range(17) if np.array_equal(big.image[t : t + 32, c : c + 32], image)
            ]
            assert found, "a training patch is not a window of its image"
            t, c = found[0]
            np.testing.assert_array_equal(mask[..., 0], big.mask[t : t + 32, c : c + 32])
            offsets.add((t, c))
    assert len(offsets) > 1, "random patches should come from different places"


def test_train_stream_is_reproducible_for_a_seed(pipeline_samples):
    config = _config()
    a = _take(core.make_datasets(pipeline_samples, pipeline_samples, config)[0], 2)
    b = _take(core.make_datasets(pipeline_samples, pipeline_samples, config)[0], 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0]), "batches within the stream should differ"


def test_valid_padding_centre_crops_the_target(pipeline_samples):
    size = 32
    assert size in core.valid_input_sizes(1, "valid", 30, 80)
    out = core.unet_output_size(size, 1, "valid")
    assert out == 16
    crop = (size - out) // 2
    config = _config(padding="valid", augment=False)
    train, val, _ = core.make_datasets(pipeline_samples, pipeline_samples, config)
    for x, y in _take(train, 2):
        assert x.shape == (4, size, size, 3) and y.shape == (4, out, out, 1)
        for image, mask in zip(x, y):  # the target is the centre of the input patch's own mask
            np.testing.assert_array_equal(mask[..., 0], _mask_from_red(image)[crop : crop + out, crop : crop + out])
    images, masks = _expected_val_patches(pipeline_samples)
    vx = np.concatenate([b[0] for b in _take(val)])
    vy = np.concatenate([b[1] for b in _take(val)])
    assert vx.shape == (5, size, size, 3) and vy.shape == (5, out, out, 1)
    np.testing.assert_array_equal(vx, images.astype(np.float32))
    np.testing.assert_array_equal(vy, masks[:, crop : crop + out, crop : crop + out].astype(np.float32))


def test_instance_targets_give_three_one_hot_classes_from_the_labels(pipeline_samples):
    config = _config(targets="instance", augment=False)
    train, val, _ = core.make_datasets(pipeline_samples, pipeline_samples, config)
    big = pipeline_samples[0]
    for x, y in _take(train, 2):
        assert y.shape == (4, 32, 32, 3) and y.dtype == np.float32
        np.testing.assert_array_equal(y.sum(axis=-1), np.ones((4, 32, 32), np.float32))
        for image, target in zip(x, y):
            # Interior and boundary together are the nuclei; the classes are those of the window's labels.
            np.testing.assert_array_equal(target[..., 1] + target[..., 2], _mask_from_red(image))
            found = [
                (t, c) for t in range(9) for c in range(17) if np.array_equal(big.image[t : t + 32, c : c + 32], image)
            ]
            if found:
                t, c = found[0]
                expected = core.instance_targets(big.labels[t : t + 32, c : c + 32])
                np.testing.assert_array_equal(target.argmax(axis=-1), expected)
    vy = np.concatenate([b[1] for b in _take(val)])
    assert vy.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(vy[0].argmax(axis=-1), core.instance_targets(big.labels)[:32, :32])


def test_patch_sampler_weights_and_epoch_length(pipeline_samples):
    views = [(s.image, s.labels) for s in pipeline_samples]
    sampler = core.PatchSampler(views, 32, seed=0)
    np.testing.assert_allclose(sampler.weights, np.array([40 * 48, 20 * 25]) / (40 * 48 + 20 * 25))
    assert sampler.patches_per_epoch() == int(np.ceil((40 * 48 + 20 * 25) / 32**2))
    # area_power 0: every image as likely; 0.5: in proportion to the square roots of the areas.
    np.testing.assert_allclose(core.PatchSampler(views, 32, area_power=0.0).weights, [0.5, 0.5])
    roots = np.sqrt([40 * 48, 20 * 25])
    np.testing.assert_allclose(core.PatchSampler(views, 32, area_power=0.5).weights, roots / roots.sum())
    # The epoch length still counts every training pixel once.
    assert core.PatchSampler(views, 32, area_power=0.0).patches_per_epoch() == sampler.patches_per_epoch()
    with pytest.raises(core.DataError):
        core.PatchSampler([], 32)


def test_scaled_patches_resize_image_and_labels_together():
    # Nuclei are 6x6 squares on a 12 px grid, their labels all different; at scale s a patch holds
    # nuclei about 6 * s px wide, and the image's red channel still marks the target's nuclei.
    labels = np.zeros((200, 200), np.uint16)
    for index, (top, left) in enumerate((t, c) for t in range(3, 200, 12) for c in range(3, 200, 12)):
        labels[top : top + 6, left : left + 6] = index + 1
    image = np.zeros((200, 200, 3), np.uint8)
    image[..., 0] = (labels > 0) * 255
    sampler = core.PatchSampler([(image, labels)], 32, seed=3, targets="instance", scale_range=(0.5, 2.0))
    widths = []
    for patch, target in zip(*sampler.batch(0, 40)):
        assert patch.shape == (32, 32, 3) and target.shape == (32, 32, 1)
        # The image is interpolated and the labels are not, so they may differ on the nuclei's edges only.
        red, nuclei = patch[..., 0] > 127, target[..., 0] > 0
        assert not (red & ~ndimage.binary_dilation(nuclei)).any()
        assert not (ndimage.binary_erosion(nuclei) & ~red).any()
        assert set(np.unique(target)) <= {0, 1, 2}
        rows = np.flatnonzero((target[..., 0] > 0).any(axis=1))
        runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
        widths += [len(r) for r in runs[1:-1]]  # whole nuclei only, not ones cut by the patch edge
    assert min(widths) <= 4 and max(widths) >= 10, f"nucleus sizes {sorted(set(widths))} do not span the scales"


def _square_nuclei(side: int, step: int, size: int = 200):
    """Instance labels of ``side`` x ``side`` squares on a ``step`` px grid, and an image whose red channel
    marks them."""
    labels = np.zeros((size, size), np.uint16)
    for index, (top, left) in enumerate(
        (t, c) for t in range(3, size - side, step) for c in range(3, size - side, step)
    ):
        labels[top : top + side, left : left + side] = index + 1
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = (labels > 0) * 255
    return image, labels


def test_nucleus_scale_brings_the_median_diameter_to_the_target():
    _, labels = _square_nuclei(8, 16)  # 64 px each: a disc of that area is 9.03 px across
    across = np.sqrt(64 * 4 / np.pi)
    assert core.nucleus_scale(labels, 18) == pytest.approx(18 / across)
    assert core.nucleus_scale(labels, 6) == pytest.approx(6 / across)
    assert core.nucleus_scale(labels, 100) == core.SCALE_LIMIT  # clipped both ways
    assert core.nucleus_scale(labels, 1) == 1 / core.SCALE_LIMIT
    assert core.nucleus_scale(labels, None) == 1.0
    assert core.nucleus_scale(np.zeros((20, 20), np.uint16), 18) == 1.0  # no nuclei, nothing to measure
    image, scaled = core.rescale_view(np.zeros((200, 200, 1), np.uint8), labels, 1.5)
    assert image.shape == (300, 300, 1) and scaled.shape == (300, 300) and scaled.dtype == labels.dtype
    assert core.nucleus_scale(scaled, 18) == pytest.approx(18 / (1.5 * across), rel=0.05)


def test_patches_at_a_nucleus_diameter_bring_every_image_to_it():
    # Two images, with 6 px and with 12 px nuclei: at a diameter of 9 px both give patches whose whole
    # nuclei are about 6 * 9 / 6.77 = 8 px wide (6.77: the diameter of a disc of 36 px).
    views = [_square_nuclei(6, 12), _square_nuclei(12, 24)]
    widths = {0: [], 1: []}
    for diameter in (None, 9.0):
        sampler = core.PatchSampler(views, 32, seed=5, targets="instance", diameter=diameter)
        for patch, target in zip(*sampler.batch(0, 60)):
            assert patch.shape == (32, 32, 3) and target.shape == (32, 32, 1)
            rows = np.flatnonzero((target[..., 0] > 0).any(axis=1))
            runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
            widths[diameter is not None] += [len(r) for r in runs if len(r) and r[0] > 0 and r[-1] < 31]
    assert set(widths[0]) == {6, 12}, "native scale: the nuclei as drawn"
    assert min(widths[1]) >= 7 and max(widths[1]) <= 9, f"normalised sizes {sorted(set(widths[1]))}"


def test_the_pipelines_of_a_two_stage_config_are_its_first_stage_s():
    # 6-px squares (a disc of their area is 6.77 px across) in a 96-px image: brought to 12 px, the image
    # grows 1.77 times to 170 px, and its validation grid of 32-px patches from 3 x 3 to 6 x 6.
    image, labels = _square_nuclei(6, 12, size=96)
    samples = [core.LoadedSample(name, image, labels) for name in ("a", "b")]
    common = dict(image_size=32, channels=(4, 8), batch_size=64, augment=False, seed=1)
    for config, patches in (
        (core.Config(nucleus_diameter=None, **common), 9),
        (core.Config(nucleus_diameter=12.0, **common), 9),  # two stages: the first, native
        (core.Config(nucleus_diameter=12.0, nucleus_epochs=0, **common), 36),
    ):  # one size
        _, val, _ = core.make_datasets(samples[:1], samples[1:], config)
        assert sum(len(batch[0]) for batch in val) == patches, config


def test_preprocessing_makes_every_kind_bright_on_dark_and_stretched():
    rng = np.random.default_rng(0)
    nuclei = np.zeros((64, 64), bool)
    nuclei[20:40, 20:40] = True
    # Brightfield: dark nuclei (60) on a bright background (200); dim fluorescence: 30 on 10.
    brightfield = np.repeat(np.where(nuclei, 60, 200).astype(np.uint8)[..., None], 3, axis=2)
    fluorescence = np.repeat(np.where(nuclei, 30, 10).astype(np.uint8)[..., None], 3, axis=2)
    stained = np.stack(
        [np.where(nuclei, 90, 230), np.where(nuclei, 40, 180), np.where(nuclei, 150, 220)], axis=2
    ).astype(np.uint8)
    for image, kind in ((brightfield, "brightfield"), (fluorescence, "fluorescence"), (stained, "stained")):
        assert evaluation.image_kind(image) == kind
        grey = core.preprocess_image(image, "grey")
        assert grey.shape == (64, 64, 1) and grey.dtype == np.uint8
        assert grey[nuclei].min() == 255 and grey[~nuclei].max() == 0, kind
    np.testing.assert_array_equal(core.preprocess_image(stained, "rgb"), stained)
    # A flat image is not stretched into noise.
    flat = rng.integers(100, 103, (32, 32, 3)).astype(np.uint8)
    assert np.ptp(core.preprocess_image(flat, "grey")) <= 3 * 255 // 16 + 1
    with pytest.raises(ValueError, match="preprocessing"):
        core.preprocess_image(stained, "hsv")


def test_instance_targets_of_two_touching_nuclei():
    # Two 6x6 squares side by side: label 1 in columns 2-7, label 2 in columns 8-13, rows 2-7.
    labels = np.zeros((10, 16), np.int32)
    labels[2:8, 2:8], labels[2:8, 8:14] = 1, 2
    expected = np.zeros((10, 16), np.uint8)
    expected[2:8, 2:14] = 2  # every rim pixel, and within 2 px of the other nucleus, is boundary
    expected[3:7, 3:6] = 1  # interior of 1: inside its rim, 3+ px from column 8
    expected[3:7, 10:13] = 1  # interior of 2: inside its rim, 3+ px from column 7
    np.testing.assert_array_equal(core.instance_targets(labels), expected)
    # One nucleus alone has only its 1-px rim as boundary.
    alone = np.where(labels == 1, 1, 0)
    assert (core.instance_targets(alone)[3:7, 3:7] == 1).all()
    assert core.targets_from_labels(labels, "binary").max() == 1


# --------------------------------------------------------------------------------------------------
# 5. Augmentation keeps image and mask aligned
# --------------------------------------------------------------------------------------------------
def test_augment_batch_applies_the_same_geometry_to_image_and_mask():
    size, batch = 32, 16
    pattern = np.zeros((size, size), np.uint8)
    pattern[4:28, 4:9] = 1  # an "L" ...
    pattern[23:28, 4:20] = 1
    pattern[6:10, 22:24] = 1  # ... and a dot: no flip/rotation maps it onto itself
    assert sum(np.array_equal(t, pattern) for _, t in _dihedral(pattern)) == 1, "the fixture must be asymmetric"
    rng = np.random.default_rng(5)
    images = np.empty((batch, size, size, 3), np.float32)
    images[..., 0] = pattern * 255.0
    images[..., 1:] = rng.integers(0, 256, size=(batch, size, size, 2))
    masks = np.repeat(pattern[None, :, :, None], batch, axis=0)

    draws = core.augmentation_draws(7, 3, batch, 3)
    out_images, out_masks = core.augment_batch(images, masks, *draws)
    assert out_images.shape == images.shape and out_images.dtype == np.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == np.uint8
    assert out_images.min() >= 0 and out_images.max() <= 255
    transformed = 0
    for i in range(batch):
        mask = out_masks[i, ..., 0]
        assert set(np.unique(mask)) == {0, 1}
        np.testing.assert_array_equal(_mask_from_red(out_images[i]), mask)
        kinds = [k for k, (_, t_mask) in enumerate(_dihedral(pattern)) if np.array_equal(t_mask, mask)]
        assert len(kinds) == 1, "the mask must be one flip/rotation of the input mask"
        t_img = _dihedral(images[i])[kinds[0]][1]
        for c in range(3):  # the noise channels moved with the mask too (same geometry, monotone jitter)
            _assert_monotone(out_images[i, ..., c], t_img[..., c])
        transformed += kinds[0] != 0
        assert not np.allclose(out_images[i], t_img), "intensity jitter expected on the image"
    assert transformed >= 4, f"only {transformed} of {batch} samples were flipped/rotated"
    assert len({out_masks[i].tobytes() for i in range(batch)}) >= 4, "all 8 orientations should occur"

    again = core.augment_batch(images, masks, *core.augmentation_draws(7, 3, batch, 3))
    np.testing.assert_array_equal(again[0], out_images)
    other = core.augment_batch(images, masks, *core.augmentation_draws(7, 4, batch, 3))
    assert not np.array_equal(other[0], out_images)


# --------------------------------------------------------------------------------------------------
# 5b. One stream of batches for every backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["patch", "resize"])
@pytest.mark.parametrize("targets", ["binary", "instance"])
def test_tf_data_and_the_pydataset_give_the_same_batches(pipeline_samples, sampling, targets):
    """TensorFlow trains on tf.data and JAX and PyTorch on the PyDataset: the same batches, bit for bit."""
    config = _config(sampling=sampling, targets=targets)
    tf_train, tf_val, tf_steps = core.make_datasets(pipeline_samples, pipeline_samples, config, tf_data=True)
    np_train, np_val, np_steps = core.make_datasets(pipeline_samples, pipeline_samples, config, tf_data=False)
    assert isinstance(np_train, keras.utils.PyDataset) and isinstance(np_val, keras.utils.PyDataset)
    assert tf_steps == np_steps
    for (tx, ty), (nx, ny) in zip(_take(tf_train, 5), _take(np_train, 5), strict=True):
        np.testing.assert_array_equal(tx, nx)
        np.testing.assert_array_equal(ty, ny)
    for (tx, ty), (nx, ny) in zip(_take(tf_val), _take(np_val), strict=True):
        np.testing.assert_array_equal(tx, nx)
        np.testing.assert_array_equal(ty, ny)


def test_a_batch_is_the_same_whatever_was_drawn_before(pipeline_samples):
    """Keras's worker threads make batches in any order: batch i must depend on its number alone."""
    train, _, _ = core.make_datasets(pipeline_samples, pipeline_samples, _config(), tf_data=False)
    late_first = train[5]
    in_order = [train[i] for i in range(6)]
    np.testing.assert_array_equal(late_first[0], in_order[5][0])
    np.testing.assert_array_equal(late_first[1], in_order[5][1])
    assert not np.array_equal(in_order[4][0], in_order[5][0])


def test_resize_sampling_shows_every_image_once_per_pass_in_a_new_order():
    images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1) * np.ones((7, 4, 4, 1), np.uint8)
    source = core.ShuffledImages(images, images.copy(), seed=3)
    drawn = np.concatenate([source.batch(i, 3)[0][:, 0, 0, 0] for i in range(7)])  # 21 items: 3 passes
    passes = drawn.reshape(3, 7)
    for order in passes:
        assert sorted(order) == list(range(7))
    assert len({tuple(order) for order in passes}) > 1, "each pass should have its own order"


# --------------------------------------------------------------------------------------------------
# 6. Bad inputs are reported and skipped
# --------------------------------------------------------------------------------------------------
def _messy_dsb(root):
    shape = (16, 16)
    good_masks = [_rect(shape, 2, 6, 2, 6), _disc(shape, 11, 11, 3)]
    _dsb_sample(root, "good1", np.full(shape, 50, np.uint8), good_masks)
    _dsb_sample(root, "good2", np.full(shape, 60, np.uint8), [_rect(shape, 0, 4, 8, 16)])
    _dsb_sample(root, "garbage", np.zeros(shape, np.uint8), [_rect(shape, 1, 3, 1, 3)])
    (root / "garbage" / "images" / "garbage.png").write_bytes(b"this is not a PNG file at all")
    _dsb_sample(root, "badmask", np.zeros(shape, np.uint8), [_rect(shape, 1, 3, 1, 3)])
    (root / "badmask" / "masks" / "badmask_nucleus00.png").write_bytes(b"\x89PNG truncated")
    _write(root / "nomasks" / "images" / "nomasks.png", np.zeros(shape, np.uint8))
    _write(root / "emptymasks" / "images" / "emptymasks.png", np.zeros(shape, np.uint8))
    (root / "emptymasks" / "masks").mkdir()
    (root / "emptymasks" / "masks" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "emptymasks" / "masks" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    _write(root / "noimages" / "masks" / "m.png", np.zeros(shape, np.uint8))
    _dsb_sample(root, "mismatch", np.zeros(shape, np.uint8), [])
    _write(root / "mismatch" / "masks" / "m.png", np.full((10, 12), 255, np.uint8))
    for stray in (
        root / ".DS_Store",
        root / "Thumbs.db",
        root / "good1" / ".DS_Store",
        root / "good1" / "images" / ".DS_Store",
        root / "good1" / "masks" / "Thumbs.db",
        root / "good1" / "masks" / "._good1_nucleus00.png",
    ):
        stray.write_bytes(b"\0\0\0\1junk")
    return good_masks


def test_bad_samples_are_reported_with_reasons_and_good_ones_load(tmp_path, caplog):
    good_masks = _messy_dsb(tmp_path)
    before = snapshot(tmp_path)

    samples, problems = core.find_samples(tmp_path)
    ids = [s.sample_id for s in samples]
    assert ids == ["badmask", "garbage", "good1", "good2", "mismatch"]
    reasons = dict(problems)
    assert "no masks/" in reasons["nomasks"]
    assert "no mask image" in reasons["emptymasks"]
    assert "no image" in reasons["noimages"]
    good1 = samples[ids.index("good1")]
    assert [p.name for p in good1.mask_paths] == ["good1_nucleus00.png", "good1_nucleus01.png"]
    assert good1.image_path.name == "good1.png"

    loaded, load_problems = core.load_samples(samples, progress=False, workers=2)
    assert [s.sample_id for s in loaded] == ["good1", "good2"]
    reasons = dict(load_problems)
    assert set(reasons) == {"garbage", "badmask", "mismatch"}
    assert "garbage.png" in reasons["garbage"] and "decode" in reasons["garbage"]
    assert "badmask_nucleus00.png" in reasons["badmask"]
    assert "m.png" in reasons["mismatch"] and "12x10" in reasons["mismatch"] and "16x16" in reasons["mismatch"]
    np.testing.assert_array_equal(loaded[0].labels > 0, np.logical_or.reduce(good_masks))
    assert len(np.unique(loaded[0].labels)) == 3

    # Reported as one warning on the log (a script shows it on stderr, as it is).
    caplog.set_level(logging.WARNING, logger="unet_nuclei")
    cache.report_problems(problems + load_problems)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name == "unet_nuclei.cache"
    for sample_id in ("nomasks", "emptymasks", "noimages", "garbage", "badmask", "mismatch"):
        assert sample_id in record.getMessage()
    caplog.clear()
    cache.report_problems(load_problems, limit=1)
    assert caplog.messages[0].startswith("Skipped 3 entries:") and caplog.messages[0].endswith("... and 2 more")
    caplog.clear()
    cache.report_problems([])
    assert caplog.records == []

    assert snapshot(tmp_path) == before, "reading a dataset must not modify it"


def test_stray_system_files_are_reported_by_name_and_never_loaded(tmp_path):
    # Stray files (.DS_Store, Thumbs.db, AppleDouble "._x") are reported by id and skipped.
    _messy_dsb(tmp_path)
    (tmp_path / "._good1").write_bytes(b"\0\5\26\7")  # a macOS AppleDouble file
    samples, problems = core.find_samples(tmp_path)
    reported = dict(problems)
    assert {"nomasks", "emptymasks", "noimages"} <= set(reported)
    for stray in (".DS_Store", "Thumbs.db", "._good1"):
        assert "stray" in reported[stray], problems
    assert not {".DS_Store", "Thumbs.db", "._good1"} & {s.sample_id for s in samples}


def test_all_bad_error_names_a_real_problem_not_a_stray_file(tmp_path):
    _write(tmp_path / "nomasks" / "images" / "nomasks.png", np.zeros((8, 8), np.uint8))
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(core.DataError) as info:
        core.find_samples(tmp_path)
    assert "nomasks" in str(info.value) and ".DS_Store" not in str(info.value)


def test_all_bad_folder_raises_with_the_expected_layout(tmp_path):
    _write(tmp_path / "nomasks" / "images" / "nomasks.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "emptymasks" / "masks").mkdir(parents=True)
    _write(tmp_path / "emptymasks" / "images" / "emptymasks.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "readme.txt").write_text("hello")
    before = snapshot(tmp_path)
    with pytest.raises(core.DataError) as info:
        core.find_samples(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "no usable sample" in message
    assert "<id>/images/<id>.png" in message and "masks/" in message and "DSB" in message
    assert "<folder>/images/<name>.png" in message  # the pairs layout is explained too
    assert "3 entries" in message
    assert snapshot(tmp_path) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(core.DataError, match="no usable sample"):
        core.find_samples(empty)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(core.DataError, match="not found"):
        core.find_samples(tmp_path / "does_not_exist")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(core.DataError, match="not found"):
        core.find_samples(tmp_path / "file.png")


def test_read_image_errors_are_data_errors(tmp_path):
    with pytest.raises(core.DataError, match="not found"):
        core.read_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(core.DataError, match="decode"):
        core.read_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(os.urandom(64))
    with pytest.raises(core.DataError, match=r"junk\.png"):
        core.read_mask(tmp_path / "junk.png")

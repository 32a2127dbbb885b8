"""Tests for the overlap-tile prediction helpers in unet_nuclei/tiling.py.

The "models" here are small NumPy functions whose full-image result is known,
so the tiled result can be compared against it directly.
"""

import math

import numpy as np
import pytest

from unet_nuclei.tiling import blend_window, predict_tiled, tile_positions

RNG_SEED = 1234
CHANNEL_WEIGHTS = np.array([[0.8, -1.3], [-0.5, 0.7], [1.1, 0.4]], dtype=np.float32)
CHANNEL_BIAS = np.array([0.1, -0.2], dtype=np.float32)


def random_image(height, width, channels=3, seed=RNG_SEED):
    """A reproducible random image with values in [0, 1)."""
    rng = np.random.default_rng(seed)
    return rng.random((height, width, channels), dtype=np.float32)


def pointwise(x):
    """A per-pixel 'model': sigmoid of two weighted sums of the channels (K=2)."""
    logits = x @ CHANNEL_WEIGHTS + CHANNEL_BIAS
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def box_blur(x, radius=2, pad=True):
    """A 'same' (reflect-padded) or 'valid' box blur over the two spatial axes.

    Works on a single image (H, W, C) or a batch (n, H, W, C); it stands in for
    a convolutional network with a receptive radius of ``radius`` pixels.
    """
    spatial = (x.ndim - 3, x.ndim - 2)
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[spatial[0]] = (radius, radius)
        widths[spatial[1]] = (radius, radius)
        x = np.pad(x, widths, mode="reflect")
    size = 2 * radius + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=spatial)
    return windows.mean(axis=(-2, -1)).astype(np.float32)


def tile_boundaries(length, output_size, overlap):
    """Interior coordinates where some output tile starts or ends."""
    edges = set()
    for start in tile_positions(length, output_size, overlap):
        for edge in (start, start + output_size):
            if 0 < edge < length:
                edges.add(edge)
    return sorted(edges)


def seam_excess(tiled, full, output_size, overlap):
    """Largest change of the pixel-to-pixel jump across tile boundaries.

    For each boundary row/column b the jump |y[b] - y[b-1]| of the tiled result
    is compared with the same jump in the full-image result; a visible seam
    shows up as a large difference.
    """
    height, width = tiled.shape[:2]
    worst = 0.0
    for b in tile_boundaries(height, output_size, overlap):
        jump_tiled = np.abs(tiled[b] - tiled[b - 1])
        jump_full = np.abs(full[b] - full[b - 1])
        worst = max(worst, float(np.max(np.abs(jump_tiled - jump_full))))
    for b in tile_boundaries(width, output_size, overlap):
        jump_tiled = np.abs(tiled[:, b] - tiled[:, b - 1])
        jump_full = np.abs(full[:, b] - full[:, b - 1])
        worst = max(worst, float(np.max(np.abs(jump_tiled - jump_full))))
    return worst


# --------------------------------------------------------------------------
# tile_positions and blend_window
# --------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [1, 7, 32, 64, 100])
@pytest.mark.parametrize("length", [1, 5, 31, 64, 65, 100, 199, 517, 1000])
def test_tile_positions_cover_axis(length, output_size):
    for overlap in sorted({0, output_size // 4, output_size // 2, output_size - 1}):
        positions = tile_positions(length, output_size, overlap)
        assert positions[0] == 0
        assert positions == sorted(set(positions))
        if length >= output_size:
            assert positions[-1] == length - output_size
        else:
            assert positions == [0]
        steps = np.diff(positions)
        assert np.all(steps >= 1)
        assert np.all(steps <= output_size - overlap)
        covered = np.zeros(length, dtype=bool)
        for start in positions:
            covered[start : start + output_size] = True
        assert covered.all()


def test_tile_positions_uses_minimal_tile_count():
    # 1000 pixels, tiles of 100 with step 75: ceil(900 / 75) + 1 = 13 tiles.
    assert len(tile_positions(1000, 100, 25)) == 13
    # An exact fit needs no extra tile and gives exact multiples of the step.
    assert tile_positions(192, 64, 0) == [0, 64, 128]


def test_tile_positions_rejects_bad_overlap():
    with pytest.raises(ValueError):
        tile_positions(100, 32, 32)
    with pytest.raises(ValueError):
        tile_positions(100, 32, -1)


@pytest.mark.parametrize("size", [1, 2, 5, 64, 256])
def test_blend_window_shape_and_positivity(size):
    window = blend_window(size)
    assert window.shape == (size, size)
    assert window.dtype == np.float32
    assert np.all(window > 0)
    assert np.all(window <= 1)
    np.testing.assert_allclose(window, window.T)
    np.testing.assert_allclose(window, window[::-1, ::-1])
    if size >= 5:
        # The centre must dominate the border, otherwise blending would not
        # down-weight the tile edges.
        assert window[size // 2, size // 2] > 5 * window[0, size // 2]
    if size >= 64:
        assert window[size // 2, size // 2] > 100 * window[0, size // 2]


def test_blend_window_has_floor_for_large_tiles():
    # Without a floor the corner weight of a large Hann window shrinks to
    # ~1e-10, where float32 accumulation of single-tile borders gets fragile.
    assert blend_window(1024).min() >= 1e-6


# --------------------------------------------------------------------------
# predict_tiled: correctness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (300, 517), (64, 64), (1, 1), (2, 97)])
@pytest.mark.parametrize(
    "tile_size, overlap",
    [(64, None), (64, 0), (32, 8), (48, 31), (17, 5)],
)
def test_pointwise_model_matches_full_image(shape, tile_size, overlap):
    image = random_image(*shape)
    tiled = predict_tiled(pointwise, image, tile_size, overlap=overlap, batch_size=5)
    assert tiled.shape == (*shape, 2)
    assert tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, pointwise(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(37, 53), (300, 517), (200, 131)])
@pytest.mark.parametrize("tile_size, overlap", [(64, 16), (48, 12), (64, None)])
def test_same_padding_blur_matches_without_seams(shape, tile_size, overlap):
    image = random_image(*shape)
    full = box_blur(image)
    tiled = predict_tiled(box_blur, image, tile_size, overlap=overlap, batch_size=4)
    assert tiled.shape == full.shape
    # The tile borders are only wrong within the receptive radius and are
    # down-weighted there by the window, so the error stays small everywhere.
    assert np.max(np.abs(tiled - full)) < 1e-2
    used_overlap = tile_size // 4 if overlap is None else overlap
    assert seam_excess(tiled, full, tile_size, used_overlap) < 1e-2


def test_seam_metric_detects_hard_stitching():
    # Without overlap a same-padding model leaves visible seams; this checks
    # that the seam test above is able to fail.
    image = random_image(192, 192)
    full = box_blur(image)
    tiled = predict_tiled(box_blur, image, 64, overlap=0)
    assert seam_excess(tiled, full, 64, 0) > 0.05
    assert np.max(np.abs(tiled - full)) > 0.05


@pytest.mark.parametrize("shape", [(37, 53), (300, 517), (64, 64), (3, 5)])
@pytest.mark.parametrize(
    "tile_size, output_size, overlap",
    [(60, 44, None), (41, 25, 0), (41, 25, 7), (92, 4, 1)],
)
def test_valid_mode_pointwise_exact(shape, tile_size, output_size, overlap):
    margin = (tile_size - output_size) // 2

    def valid_pointwise(batch):
        assert batch.shape[1:3] == (tile_size, tile_size)
        centre = batch[:, margin : margin + output_size, margin : margin + output_size]
        return pointwise(centre)

    image = random_image(*shape)
    tiled = predict_tiled(valid_pointwise, image, tile_size, output_size, overlap)
    assert tiled.shape == (*shape, 2)
    np.testing.assert_allclose(tiled, pointwise(image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(37, 53), (300, 517), (3, 5), (1, 9)])
@pytest.mark.parametrize("tile_size, output_size, overlap", [(36, 32, 0), (44, 40, 9)])
def test_valid_mode_blur_uses_mirrored_context(shape, tile_size, output_size, overlap):
    # A valid 5x5 blur consumes exactly 2 pixels of context on each side; with
    # mirrored context the tiled result must equal the reflect-padded full blur
    # everywhere, including the image border (the point of overlap-tile).
    image = random_image(*shape)
    full = box_blur(image)
    tiled = predict_tiled(lambda b: box_blur(b, pad=False), image, tile_size, output_size, overlap)
    np.testing.assert_allclose(tiled, full, atol=1e-5, rtol=0)


def test_tile_content_is_mirror_padded_image():
    # A single tile around a small image must equal np.pad(..., "reflect"),
    # including pads much larger than the image (repeated reflection).
    image = random_image(4, 6)
    tile_size, output_size = 50, 10
    margin = (tile_size - output_size) // 2
    seen = []

    def record(batch):
        seen.append(batch.copy())
        centre = batch[:, margin : margin + output_size, margin : margin + output_size]
        return centre[..., :1]

    out = predict_tiled(record, image, tile_size, output_size)
    assert out.shape == (4, 6, 1)
    np.testing.assert_allclose(out[..., 0], image[..., 0], atol=1e-6)
    assert len(seen) == 1 and seen[0].shape == (1, tile_size, tile_size, 3)
    expected = np.pad(
        image,
        ((margin, tile_size - margin - 4), (margin, tile_size - margin - 6), (0, 0)),
        mode="reflect",
    )
    np.testing.assert_array_equal(seen[0][0], expected)


def test_image_smaller_than_tile():
    image = random_image(20, 30)
    calls = []

    def model(batch):
        calls.append(batch.shape)
        return pointwise(batch)

    tiled = predict_tiled(model, image, 64)
    assert tiled.shape == (20, 30, 2)
    assert calls == [(1, 64, 64, 3)]
    np.testing.assert_allclose(tiled, pointwise(image), atol=1e-5, rtol=0)


def test_accepts_float64_and_single_channel():
    image = random_image(33, 47, channels=1).astype(np.float64)
    tiled = predict_tiled(lambda b: 1.0 - b, image, 16, overlap=3)
    assert tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, 1.0 - image, atol=1e-6)


# --------------------------------------------------------------------------
# predict_tiled: batching and progress
# --------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8, 1000])
def test_batching_and_progress(batch_size):
    image = random_image(150, 230)
    tile_size, overlap = 32, 8
    n_tiles = len(tile_positions(150, tile_size, overlap)) * len(tile_positions(230, tile_size, overlap))
    sizes = []
    reports = []

    def model(batch):
        assert batch.dtype == np.float32
        sizes.append(batch.shape[0])
        return pointwise(batch)

    predict_tiled(
        model,
        image,
        tile_size,
        overlap=overlap,
        batch_size=batch_size,
        progress=lambda done, total: reports.append((done, total)),
    )
    assert max(sizes) <= batch_size
    assert sum(sizes) == n_tiles
    assert len(sizes) == math.ceil(n_tiles / batch_size)
    assert len(reports) == len(sizes)
    assert [done for done, _ in reports] == list(np.cumsum(sizes))
    assert all(total == n_tiles for _, total in reports)
    assert reports[-1] == (n_tiles, n_tiles)


# --------------------------------------------------------------------------
# predict_tiled: validation
# --------------------------------------------------------------------------


def test_rejects_2d_image():
    with pytest.raises(ValueError, match=r"\(40, 40\)"):
        predict_tiled(pointwise, np.zeros((40, 40), np.float32), 32)


def test_rejects_4d_image():
    with pytest.raises(ValueError, match="3-D"):
        predict_tiled(pointwise, np.zeros((1, 40, 40, 3), np.float32), 32)


def test_rejects_wrong_model_output_shape():
    image = random_image(40, 40)
    with pytest.raises(ValueError, match="predict_batch returned shape"):
        # A valid model that forgets to crop returns tile_size instead of output_size.
        predict_tiled(pointwise, image, 36, output_size=32)
    with pytest.raises(ValueError, match="predict_batch returned shape"):
        # Missing class axis.
        predict_tiled(lambda b: b[..., 0], image, 32)
    with pytest.raises(ValueError, match="predict_batch returned shape"):
        # Wrong number of tiles in the answer.
        predict_tiled(lambda b: pointwise(b[:1]), image, 16, batch_size=4)


def test_rejects_changing_class_count():
    image = random_image(40, 40)
    state = {"calls": 0}

    def model(batch):
        state["calls"] += 1
        out = pointwise(batch)
        return out if state["calls"] == 1 else out[..., :1]

    with pytest.raises(ValueError, match="predict_batch returned shape"):
        predict_tiled(model, image, 16, batch_size=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size": 32, "overlap": 32},
        {"tile_size": 32, "overlap": 40},
        {"tile_size": 32, "overlap": -1},
        {"tile_size": 36, "output_size": 32, "overlap": 32},
        {"tile_size": 0},
        {"tile_size": 32, "output_size": 0},
        {"tile_size": 32, "output_size": 40},
        {"tile_size": 32, "output_size": 29},
        {"tile_size": 32, "batch_size": 0},
    ],
)
def test_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        predict_tiled(pointwise, random_image(40, 40), **kwargs)


# --------------------------------------------------------------------------
# Compact results: the float32 band, float16 output, and the nuclei found from it
# --------------------------------------------------------------------------


def blend_reference(image, tile_size, overlap, tile_values):
    """Overlap-tile blending with whole-image float32 sums (the way predict_tiled worked before it kept
    only one band of rows): tile i predicts its input tile plus ``tile_values[i]``."""
    height, width = image.shape[:2]
    total = np.zeros(image.shape, np.float32)
    weights = np.zeros((height, width), np.float32)
    window = blend_window(tile_size)
    tops, lefts = tile_positions(height, tile_size, overlap), tile_positions(width, tile_size, overlap)
    for index, (top, left) in enumerate((t, c) for t in tops for c in lefts):
        rows, cols = min(tile_size, height - top), min(tile_size, width - left)
        tile = image[top : top + rows, left : left + cols] + tile_values[index]
        total[top : top + rows, left : left + cols] += tile * window[:rows, :cols, None]
        weights[top : top + rows, left : left + cols] += window[:rows, :cols]
    return total / weights[:, :, None]


class TileOffsets:
    """A same-padding 'model' whose every tile differs (input + its own constant), so the result depends on
    which tiles were blended where with which weights, band by band."""

    def __init__(self, seed=0):
        self.values = np.random.default_rng(seed).uniform(-0.5, 0.5, 10_000).astype(np.float32)
        self.calls = 0

    def __call__(self, batch):
        offsets = self.values[self.calls : self.calls + len(batch)]
        self.calls += len(batch)
        return batch + offsets[:, None, None, None]


@pytest.mark.parametrize(
    "shape, tile_size, overlap, batch_size",
    [((150, 230), 32, 8, 3), ((97, 41), 16, 5, 1), ((65, 300), 64, 16, 7), ((40, 40), 24, 0, 2)],
)
def test_band_blending_equals_whole_image_sums(shape, tile_size, overlap, batch_size):
    image = random_image(*shape)
    model = TileOffsets()
    tiled = predict_tiled(model, image, tile_size, overlap=overlap, batch_size=batch_size)
    reference = blend_reference(image, tile_size, overlap, model.values)
    assert len(tile_positions(shape[0], tile_size, overlap)) > 1  # several bands are finished and shifted
    np.testing.assert_allclose(tiled, reference, atol=1e-6, rtol=0)


def test_float16_result_is_the_float32_result_rounded():
    image = random_image(150, 230)
    exact = predict_tiled(TileOffsets(), image, 32, overlap=8, batch_size=3)
    compact = predict_tiled(TileOffsets(), image, 32, overlap=8, batch_size=3, dtype=np.float16)
    assert compact.dtype == np.float16 and compact.shape == exact.shape
    np.testing.assert_array_equal(compact, exact.astype(np.float16))


def test_rejects_a_non_float_result_dtype():
    with pytest.raises(ValueError, match="floating dtype"):
        predict_tiled(pointwise, random_image(40, 40), 32, dtype=np.uint8)


def test_tile_geometry_takes_smaller_tiles_once_an_image_needs_several():
    from types import SimpleNamespace

    from unet_model_core import Config
    from unet_nuclei.tiling import PREDICT_TILE, TILED_TILE, tile_geometry

    padded_model = SimpleNamespace(input_shape=(None, None, None, 1))
    config = Config()
    size, out_size, margin = tile_geometry(padded_model, config, (1400, 1450))
    assert max(size) > TILED_TILE and max(size) <= PREDICT_TILE  # one forward pass: the image fits one tile
    assert out_size[0] >= 1400 and out_size[1] >= 1450
    size, out_size, margin = tile_geometry(padded_model, config, (4096, 8000))
    assert max(np.ravel(size)) <= TILED_TILE and margin > 0
    # The tiles still cover the image, several along each axis.
    height_out, width_out = (out_size, out_size) if np.ndim(out_size) == 0 else out_size
    assert len(tile_positions(4096, height_out, height_out // 8)) > 1
    assert len(tile_positions(8000, width_out, width_out // 8)) > 1


def soft_class_output(seed=0, size=192):
    """A synthetic sample and an instance-aware output (background, interior, boundary) for it: the
    one-hot training targets, blurred and mixed with noise so that the probabilities are soft."""
    import cv2

    from unet_model_core import instance_targets
    from unet_nuclei import synthetic

    rng = np.random.default_rng(seed)
    # The generator draws the scale per image, so it is asked again (deterministically) until the field
    # holds enough nuclei for the comparisons to mean something.
    for _ in range(30):
        _, labels = synthetic.generate_sample(rng, size, size, "fluorescence")
        if labels.max() >= 20:
            break
    else:
        raise RuntimeError("no synthetic field with 20 nuclei in 30 tries")
    one_hot = np.eye(3, dtype=np.float32)[instance_targets(labels)]
    soft = cv2.GaussianBlur(one_hot, (0, 0), 1.5) + rng.uniform(0, 0.15, one_hot.shape).astype(np.float32)
    return labels, soft / soft.sum(axis=2, keepdims=True)


def test_compact_path_finds_the_same_nuclei_as_the_float32_path():
    from unet_nuclei.postprocess import PostProcessing

    _, output = soft_class_output()
    identity = lambda batch: batch  # noqa: E731  (the output goes through the blending as it is)
    exact = predict_tiled(identity, output, 64, overlap=16, batch_size=3)
    compact = predict_tiled(identity, output, 64, overlap=16, batch_size=3, dtype=np.float16)
    post = PostProcessing()
    reference = post.nuclei(exact)
    labels = post.nuclei(compact)
    assert reference.max() > 10  # the image has many nuclei to agree on
    assert np.mean((labels > 0) == (reference > 0)) > 0.999
    assert labels.max() == reference.max()


def test_watershed_in_bands_equals_the_whole_image_watershed():
    from scipy import ndimage
    from skimage import segmentation

    from unet_nuclei.label_images import watershed_in_bands

    _, output = soft_class_output(seed=3)
    interior = output[..., 1].copy()
    interior[5, 7] = np.nan  # NaN counts as 0, as it did before
    mask = output[..., 0] < 0.5
    markers, _ = ndimage.label((np.nan_to_num(interior) > 0.5) & mask)
    whole = segmentation.watershed(-np.nan_to_num(interior), markers, mask=mask)
    # Bands of 8 rows cut through many nuclei unless they end where no nucleus crosses.
    banded = watershed_in_bands(interior, markers.copy(), mask, band_rows=8)
    assert banded.dtype == np.int32
    np.testing.assert_array_equal(banded, whole)
    assert np.array_equal(watershed_in_bands(interior, markers.copy(), mask, band_rows=10_000), whole)
    assert watershed_in_bands(interior, markers, mask) is markers  # in place: no second label image


def test_watershed_in_bands_never_cuts_through_a_nucleus():
    from unet_nuclei.label_images import watershed_in_bands

    # One tall nucleus spanning rows 2..17 with one marker at its top: cut into bands of 4 rows it would
    # leave its lower part unlabelled.
    mask = np.zeros((20, 6), bool)
    mask[2:18, 2:4] = True
    markers = np.zeros((20, 6), np.int32)
    markers[2, 2] = 7
    peaks = np.zeros((20, 6), np.float32)
    labels = watershed_in_bands(peaks, markers, mask, band_rows=4)
    assert np.all(labels[mask] == 7) and np.all(labels[~mask] == 0)
    with pytest.raises(ValueError, match="band_rows"):
        watershed_in_bands(peaks, markers, mask, band_rows=0)


def test_watershed_in_bands_bounds_a_mask_no_row_is_free_of():
    """A confluent mask (a column of nucleus crosses every row, as in dense tissue) has no clean cut: the
    bands are cut anyway, with rows of context around them, and still flood as the whole image does."""
    from scipy import ndimage
    from skimage import segmentation

    from unet_nuclei import label_images

    _, output = soft_class_output(seed=5)
    interior = output[..., 1].copy()
    mask = output[..., 0] < 0.5
    mask[:, 3] = True  # every row boundary is crossed
    markers, _ = ndimage.label((interior > 0.5) & mask)
    markers[::9, 3] = np.arange(1000, 1000 + len(markers[::9, 3]))  # no basin taller than the halo
    whole = segmentation.watershed(-interior, markers, mask=mask)
    calls = []
    real = segmentation.watershed

    def counting(surface, band, mask):
        calls.append(surface.shape[0])
        return real(surface, band, mask=mask)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(label_images.segmentation, "watershed", counting)
        banded = label_images.watershed_in_bands(interior, markers.copy(), mask, band_rows=6, halo_rows=20)
    np.testing.assert_array_equal(banded, whole)
    assert len(calls) > 3 and max(calls) <= 6 + 6 + 2 * 20  # never the whole image at once
    with pytest.raises(ValueError, match="halo_rows"):
        label_images.watershed_in_bands(interior, markers, mask, halo_rows=-1)


def test_relabel_sequential_known_answer():
    from unet_nuclei.label_images import relabel_sequential

    labels = np.array([[0, 5, 5, 0], [9, 0, 2, 2], [9, 9, 0, 40]], np.int32)
    result = relabel_sequential(labels)
    np.testing.assert_array_equal(result, [[0, 2, 2, 0], [3, 0, 1, 1], [3, 3, 0, 4]])
    assert result is labels and result.dtype == np.int32  # in place, no copy of a large image


def test_label_sizes_counts_in_chunks_like_bincount(monkeypatch):
    from unet_nuclei import label_images

    monkeypatch.setattr(label_images, "COUNT_CHUNK", 5)  # many chunks, the last one short
    labels = np.array([[0, 3, 3, 1], [7, 7, 7, 0], [3, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(label_images.label_sizes(labels), [5, 1, 0, 3, 0, 0, 0, 3])
    np.testing.assert_array_equal(label_images.label_sizes(np.zeros((2, 2), np.int32)), [4])
    with pytest.raises(ValueError, match="non-negative"):
        label_images.label_sizes(np.array([[0, -2]]))

"""Files as microscopes write them (issue 33): any bit depth, channels, planes, pixel sizes and folders.

Every file is made in a temporary folder from one known answer, an image of separate discs, and checked
against the 8-bit PNG of the same image: the model's input (``preprocess_image(read_image(...))``) must
show the same nuclei, so these tests need no model.  The scripts' behaviour with each kind of file is
at the end, through ``Predict_mask.main`` on the session's quickly trained run."""

import csv
import json
import re
import shutil

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import draw, filters

import Predict_mask
import unet_model_core as core
from conftest import run_main
from unet_nuclei import cache, formats, image_files, segmenter, training
from unet_nuclei import predict as predicting

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
    for brightfield in (
        np.round(255 - 150 * image).astype(np.uint8),
        np.round(60000 - 40000 * image).astype(np.uint16),
    ):
        assert core.has_bright_background(brightfield.astype(np.float32), brightfield.dtype)
        view = core.preprocess_image(core.to_rgb_uint8(brightfield), "grey")[..., 0]
        assert view[truth > 0].mean() > view[truth == 0].mean() + 100
        assert nuclei_of(view).max() == truth.max()


# --------------------------------------------------------------------------------------------------
# 2. Channels
# --------------------------------------------------------------------------------------------------
def other_stain(image):
    """A second stain that is not nuclear: broad smooth patches that know nothing of the discs."""
    field = ndimage.gaussian_filter(np.random.default_rng(1).random(image.shape), 12)
    return np.round(200 + 3000 * (field - field.min()) / np.ptp(field)).astype(np.uint16)


def overlap(found, truth):
    """Intersection over union of two foregrounds."""
    return np.count_nonzero((found > 0) & (truth > 0)) / np.count_nonzero((found > 0) | (truth > 0))


def nuclear_stain(image):
    return np.round(180 + 3000 * image).astype(np.uint16)


@pytest.fixture()
def reference(tmp_path, scene):
    path = tmp_path / "reference.png"
    cv2.imwrite(str(path), eight_bit(scene[0]))
    return model_input(path)


def test_a_two_channel_imagej_file_is_refused_without_a_channel_and_gives_the_nuclei_with_one(
    tmp_path, scene, reference
):
    image, truth = scene
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, np.stack([other_stain(image), nuclear_stain(image)]), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(core.DataError) as refused:
        core.read_image(path)
    assert "2 channels" in str(refused.value) and "--channel" in str(refused.value)
    assert_same_nuclei(model_input(path, channel=1), reference, truth)
    # The other stain is what the issue saw segmented: it shows other things than the nuclei.
    assert overlap(nuclei_of(model_input(path, channel=0)), truth) < 0.5
    with pytest.raises(core.DataError, match=r"--channel 2.*2 channels"):
        core.read_image(path, 2)


def test_an_ome_tiff_lists_its_channel_names_and_more_than_four_channels_are_refused(tmp_path, scene, reference):
    image, truth = scene
    stains = np.stack([other_stain(image), other_stain(image) // 2, nuclear_stain(image)])
    tifffile.imwrite(
        tmp_path / "named.ome.tif",
        stains,
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": ["Actin", "Tubulin", "DAPI"]}},
    )
    with pytest.raises(core.DataError, match=r"3 channels.*0\W+Actin.*1\W+Tubulin.*2\W+DAPI.*--channel"):
        core.read_image(tmp_path / "named.ome.tif")
    assert_same_nuclei(model_input(tmp_path / "named.ome.tif", channel=2), reference, truth)
    # Five interleaved samples per pixel with no colour meaning: channels, refused without a choice.
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.stack([nuclear_stain(image)] * 5, axis=-1),
        planarconfig="contig",
        photometric="minisblack",
    )
    with pytest.raises(core.DataError, match="5 channels"):
        core.read_image(tmp_path / "five.tif")
    assert_same_nuclei(model_input(tmp_path / "five.tif", channel=4), reference, truth)


def test_rgb_keeps_working_and_a_channel_of_it_is_one_colour(tmp_path, scene, reference):
    image, truth = scene
    rgb = np.dstack([np.round(255 * (1 - image)), np.zeros(SHAPE), np.round(255 * image)]).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    for name in ("rgb.png", "rgb.tif"):
        np.testing.assert_array_equal(core.read_image(tmp_path / name), rgb)  # colour as it always was
        assert_same_nuclei(model_input(tmp_path / name, channel=2), reference, truth)  # blue
    with pytest.raises(core.DataError, match=r"--channel 3.*3 channels"):
        core.read_image(tmp_path / "rgb.png", 3)
    with pytest.raises(core.DataError, match="one channel"):
        core.read_image(tmp_path / "reference.png", 1)
    np.testing.assert_array_equal(model_input(tmp_path / "reference.png", 0), reference)


def test_training_reads_the_channel_of_its_config_and_caches_each_channel_apart(tmp_path, scene):
    image, truth = scene
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(
            data / "images" / f"{name}.tif",
            np.stack([other_stain(image), nuclear_stain(image)]),
            imagej=True,
            metadata={"axes": "CYX"},
        )
        tifffile.imwrite(data / "masks" / f"{name}.tif", truth)
    samples, _ = core.find_samples(data)
    assert cache.dataset_key(samples, 1) != cache.dataset_key(samples, 0) != cache.dataset_key(samples)
    loaded, problems = core.load_samples(samples, progress=False)
    assert not loaded and all("2 channels" in reason and "--channel" in reason for _, reason in problems)
    config = core.quick_config(data_dir=str(data), channel=1, val_size=1)
    train, val, _, _ = training.prepare_data(config, progress=False)
    for sample in train + val:
        view = core.preprocess_image(sample.image, "grey")[..., 0]
        assert nuclei_of(view).max() == truth.max() and np.array_equal(sample.labels, truth)
    with pytest.raises(ValueError, match="channel"):
        core.Config(channel=-1)


# --------------------------------------------------------------------------------------------------
# 3. Planes: z-stacks and time series, and their projection
# --------------------------------------------------------------------------------------------------
def stack_of(image, truth, planes=5):
    """A z-stack in which each disc is in focus in one plane only (disc k in plane k % planes): each plane
    has its own nuclei, and the maximum projection has them all.  Returns 16-bit planes and their truth."""
    values, truths = [], []
    for plane in range(planes):
        keep = (truth % planes == plane) & (truth > 0)
        values.append(np.where(keep | (truth == 0), nuclear_stain(image), nuclear_stain(np.full(SHAPE, 0.06))))
        truths.append(np.where(keep, truth, 0))
    return np.stack(values).astype(np.uint16), np.stack(truths)


def test_a_z_stack_is_read_plane_by_plane_and_its_projection_has_every_nucleus(tmp_path, scene, reference):
    image, truth = scene
    values, truths = stack_of(image, truth)
    tifffile.imwrite(tmp_path / "stack.tif", values, imagej=True, metadata={"axes": "ZYX"})
    opened = image_files.open_image(tmp_path / "stack.tif")
    assert opened.is_stack and len(opened) == 5 and opened.plane_axes == "Z"
    assert "5 z-planes" in "; ".join(opened.notes)
    for plane in range(5):
        view = core.preprocess_image(opened.rgb(plane), "grey")[..., 0]
        assert nuclei_of(view).max() == len(np.unique(truths[plane])) - 1 > 0
    projected = image_files.open_image(tmp_path / "stack.tif", project="max")
    assert not projected.is_stack and len(projected) == 1
    assert any("projection" in note and "5 z-planes" in note for note in projected.notes)
    assert_same_nuclei(core.preprocess_image(projected.rgb(0), "grey")[..., 0], reference, truth)
    with pytest.raises(core.DataError, match=r"5 z-planes.*Predict_mask\.py"):
        core.read_image(tmp_path / "stack.tif")  # one plane per training image, and it says so


def test_a_hyperstack_keeps_its_time_points_when_projected_and_pages_without_names_are_planes(tmp_path, scene):
    image, truth = scene
    values, _ = stack_of(image, truth, planes=3)
    both = np.stack([np.stack([values, values // 2], axis=1)] * 2)  # T=2, Z=3, C=2, Y, X
    tifffile.imwrite(tmp_path / "tzc.tif", both, imagej=True, metadata={"axes": "TZCYX"})
    opened = image_files.open_image(tmp_path / "tzc.tif", channel=0)
    assert (len(opened), opened.plane_axes, opened.plane_sizes) == (6, "TZ", (2, 3))
    projected = image_files.open_image(tmp_path / "tzc.tif", channel=0, project="max")
    assert (len(projected), projected.plane_axes) == (2, "T")
    np.testing.assert_array_equal(projected.planes[1], values.max(axis=0))
    tifffile.imwrite(tmp_path / "pages.tif", values, photometric="minisblack")  # pages with no axis names
    assert len(image_files.open_image(tmp_path / "pages.tif")) == 3
    as_channels = image_files.open_image(tmp_path / "pages.tif", channel=2)
    assert len(as_channels) == 1 and "pages" in as_channels.notes[0] and "channels" in as_channels.notes[0]
    np.testing.assert_array_equal(as_channels.planes[0], values[2])
    with tifffile.TiffWriter(tmp_path / "series.tif") as tiff:  # two images of other sizes in one file
        tiff.write(values[0])
        tiff.write(values[1, :50, :60])
    two = image_files.open_image(tmp_path / "series.tif")
    assert two.notes == ("the file's first image series only (1 more left out)",) and two.planes.shape == (1, *SHAPE)


# --------------------------------------------------------------------------------------------------
# 4. Pixel size from the file's metadata
# --------------------------------------------------------------------------------------------------
def test_the_pixel_size_is_read_from_imagej_ome_and_resolution_tags(tmp_path):
    plane = np.zeros((20, 24), np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif", plane, imagej=True, resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"}
    )
    tifffile.imwrite(tmp_path / "ij-nm.tif", plane, imagej=True, resolution=(1 / 650, 1 / 650), metadata={"unit": "nm"})
    tifffile.imwrite(
        tmp_path / "ome.ome.tif", plane, ome=True, metadata={"PhysicalSizeX": 108.3, "PhysicalSizeXUnit": "nm"}
    )
    tifffile.imwrite(tmp_path / "cm.tif", plane, resolution=(1e4 / 0.2, 1e4 / 0.2), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi.tif", plane, resolution=(72, 72), resolutionunit="INCH")
    cv2.imwrite(str(tmp_path / "plain.png"), plane)
    formats.write_label_tiff(tmp_path / "labels.tif", plane, pixel_size=0.5)  # what --labels tif writes
    expected = {
        "ij.tif": (0.325, "ImageJ metadata"),
        "ij-nm.tif": (0.65, "ImageJ metadata"),
        "ome.ome.tif": (0.1083, "OME-TIFF metadata"),
        "cm.tif": (0.2, "TIFF resolution tags"),
        "dpi.tif": (None, ""),
        "plain.png": (None, ""),
        "labels.tif": (0.5, "ImageJ metadata"),
    }
    for name, (size, source) in expected.items():
        found = image_files.read_pixel_size(tmp_path / name)
        assert found[1] == source and (found[0] == pytest.approx(size, rel=1e-6) if size else found[0] is None), name
    given = image_files.open_image(tmp_path / "ij.tif", pixel_size=0.1)
    assert (given.pixel_size, given.pixel_size_source) == (0.1, "--pixel-size")
    assert image_files.open_image(tmp_path / "ij.tif").pixel_size_text() == "pixel size 0.325 um (ImageJ metadata)"


# --------------------------------------------------------------------------------------------------
# 5. Predict_mask.py with each kind of file (the session's quickly trained run)
# --------------------------------------------------------------------------------------------------
def predict(run, out, *argv):
    return run_main(Predict_mask, *argv, "--model", str(run), "--out", str(out))


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture()
def run(quick_run):
    return quick_run[1]


def test_every_kind_of_file_gives_the_8_bit_image_s_mask(run, tmp_path, scene):
    image, _ = scene
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "reference.png"), eight_bit(image))
    for name in ("offset-16bit.tif", "hot-4095.tif", "negative-float.tif"):
        tifffile.imwrite(folder / name, DEPTHS[name](image))
    tifffile.imwrite(
        folder / "two.tif", np.stack([other_stain(image), nuclear_stain(image)]), imagej=True, metadata={"axes": "CYX"}
    )
    status, stdout, stderr = predict(run, tmp_path / "out", str(folder), "--channel", "1")
    assert status == 1 and "Traceback" not in stderr  # the grey images have no channel 1: skipped, named
    assert re.search(r"reference\b.*\bskipped", stderr) and "--channel 1" in stderr
    assert re.search(r"two\b.*\bchannel 1 of 2", stdout)  # the first line for that file says what was done
    status, stdout, stderr = predict(run, tmp_path / "out", str(folder), "--overwrite")
    assert status == 1 and re.search(r"two\b.*\bskipped", stderr) and "2 channels" in stderr and "--channel" in stderr
    expected = read(tmp_path / "out" / "reference_mask.png") > 0
    assert 0.01 < expected.mean() < 0.9  # the model finds nuclei in the reference: the comparison can fail
    for stem in ("offset-16bit", "hot-4095", "negative-float", "two"):
        # The inputs agree closely (section 1); a model of two short epochs magnifies their rounding
        # differences a little, while an inverted or squeezed input would share almost nothing.
        assert overlap(read(tmp_path / "out" / f"{stem}_mask.png"), expected) >= 0.8, stem


def test_a_z_stack_gives_stacks_with_one_page_per_plane_and_a_plane_column(run, tmp_path, scene):
    image, truth = scene
    values, _ = stack_of(image, truth, planes=2)
    tifffile.imwrite(tmp_path / "stack.tif", values, imagej=True, metadata={"axes": "ZYX"})
    status, stdout, stderr = predict(run, tmp_path / "out", str(tmp_path / "stack.tif"), "--labels", "--measure")
    assert status == 0, stderr
    assert re.search(r"stack\b.*\b2 z-planes\b.*\bTIFF", stdout.splitlines()[1])
    assert re.search(r"stack\b.*\b192x160\b.*\b2 planes", stdout)
    masks, labels = (tifffile.imread(tmp_path / "out" / f"stack_{kind}.tif") for kind in ("mask", "labels"))
    with tifffile.TiffFile(tmp_path / "out" / "stack_overlay.tif") as overlay:
        assert overlay.series[0].shape == (2, *SHAPE, 3) and overlay.series[0].axes == "ZYXS"
    assert masks.shape == labels.shape == (2, *SHAPE) and masks.any()
    np.testing.assert_array_equal(masks > 0, labels > 0)
    with open(tmp_path / "out" / "nuclei.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for plane in range(2):  # labels 1..n within each plane, and one row per nucleus with its plane
        count = len(np.unique(labels[plane])) - 1
        assert labels[plane].max() == count == sum(row["plane"] == str(plane) for row in rows)
    with open(tmp_path / "out" / "images.csv", newline="") as handle:
        assert [(row["image"], row["plane"]) for row in csv.DictReader(handle)] == [("stack", "0"), ("stack", "1")]


def test_a_time_and_z_hyperstack_gives_outline_files_on_each_plane_s_z_and_time(run, tmp_path, scene):
    roifile = pytest.importorskip("roifile")
    image, truth = scene
    values, _ = stack_of(image, truth, planes=2)
    tifffile.imwrite(tmp_path / "tz.tif", np.stack([values, values]), imagej=True, metadata={"axes": "TZYX"})
    status, stdout, stderr = predict(
        run, tmp_path / "out", str(tmp_path / "tz.tif"), "--labels", "tif", "--rois", "--geojson"
    )
    assert status == 0, stderr
    labels = tifffile.imread(tmp_path / "out" / "tz_labels.tif")  # T=2, Z=2
    features = json.loads((tmp_path / "out" / "tz.geojson").read_text())["features"]
    rois = roifile.roiread(tmp_path / "out" / "tz_rois.zip")
    for t in range(2):
        for z in range(2):
            count = len(np.unique(labels[t, z])) - 1
            assert count and count == sum(f["geometry"]["plane"] == {"c": -1, "z": z, "t": t} for f in features)
            assert count == sum((r.z_position, r.t_position) == (z + 1, t + 1) for r in rois)


@pytest.mark.slow
def test_each_page_is_the_plane_s_own_prediction_and_the_projection_the_projection_s(run, tmp_path, scene):
    image, truth = scene
    values, _ = stack_of(image, truth, planes=3)
    tifffile.imwrite(tmp_path / "stack.tif", values, imagej=True, metadata={"axes": "ZYX"})
    for plane in range(3):
        cv2.imwrite(str(tmp_path / f"plane{plane}.png"), values[plane])
    cv2.imwrite(str(tmp_path / "projection.png"), values.max(axis=0))
    status, _, stderr = predict(run, tmp_path / "out", str(tmp_path / "stack.tif"))
    assert status == 0, stderr
    masks = tifffile.imread(tmp_path / "out" / "stack_mask.tif")
    for plane in range(3):
        status, _, stderr = predict(run, tmp_path / "alone", str(tmp_path / f"plane{plane}.png"))
        assert status == 0, stderr
        np.testing.assert_array_equal(masks[plane], read(tmp_path / "alone" / f"plane{plane}_mask.png"))
    assert any(masks[plane].any() for plane in range(3))  # the pages hold nuclei: the comparison can fail
    status, stdout, stderr = predict(run, tmp_path / "max", str(tmp_path / "stack.tif"), "--project", "max")
    assert status == 0 and re.search(r"stack\b.*\bprojection\b.*\b3 z-planes", stdout), stderr
    status, _, stderr = predict(run, tmp_path / "max", str(tmp_path / "projection.png"))
    assert status == 0, stderr
    np.testing.assert_array_equal(
        read(tmp_path / "max" / "stack_mask.png"), read(tmp_path / "max" / "projection_mask.png")
    )


def test_the_file_s_pixel_size_reaches_the_tables_and_the_label_tiff_and_the_flag_overrides_it(run, tmp_path, scene):
    image, _ = scene
    tifffile.imwrite(
        tmp_path / "cells.tif", nuclear_stain(image), imagej=True, resolution=(2, 2), metadata={"unit": "um"}
    )
    status, stdout, stderr = predict(run, tmp_path / "out", str(tmp_path / "cells.tif"), "--measure", "--labels", "tif")
    assert status == 0 and "0.5 um" in stdout and "ImageJ" in stdout, stderr
    with open(tmp_path / "out" / "images.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["pixel_size_um"], row["pixel_size_from"]) == ("0.5", "ImageJ metadata")
    with open(tmp_path / "out" / "nuclei.csv", newline="") as handle:
        nuclei = list(csv.DictReader(handle))
    assert nuclei and all(float(n["area_um2"]) == pytest.approx(float(n["area_px"]) / 4, abs=1e-3) for n in nuclei)
    assert image_files.read_pixel_size(tmp_path / "out" / "cells_labels.tif") == (0.5, "ImageJ metadata")
    status, stdout, stderr = predict(
        run,
        tmp_path / "out",
        str(tmp_path / "cells.tif"),
        "--measure",
        "--labels",
        "tif",
        "--pixel-size",
        "0.25",
        "--overwrite",
    )
    assert status == 0 and "0.25 um" in stdout and "--pixel-size" in stdout, stderr
    with open(tmp_path / "out" / "images.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["pixel_size_from"] == "--pixel-size"
    assert image_files.read_pixel_size(tmp_path / "out" / "cells_labels.tif")[0] == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------------
# 6. Folders
# --------------------------------------------------------------------------------------------------
def scans_folder(root, image):
    """The issue's folder: loose images beside a DSB-layout sample, images in nested subfolders, and
    files that are not images."""
    picture = eight_bit(image)
    for relative in ("a.png", "b.png", "s1/images/s1.png", "deep/d.png", "deep/er/e.tif"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / relative), picture)
    (root / "notes.txt").write_text("exposure 200 ms")
    (root / "deep" / "table.csv").write_text("a,b\n")
    return root


def test_collect_inputs_predicts_loose_images_names_the_left_out_ones_and_passes_over_other_files(tmp_path, scene):
    scans = scans_folder(tmp_path / "scans", scene[0])
    found = predicting.collect_inputs([str(scans)])
    assert sorted(item.label for item in found.items) == ["a", "b", "s1"]
    assert sorted(p.relative_to(scans).as_posix() for p in found.left_out) == ["deep/d.png", "deep/er/e.tif"]
    assert [p.name for p in found.passed_over] == ["notes.txt"] and not found.problems
    found = predicting.collect_inputs([str(scans)], recursive=True, exclude=[scans / "deep" / "er"])
    assert sorted(item.label for item in found.items) == ["a", "b", "deep/d", "s1"]  # the output folder: not read
    assert sorted(p.name for p in found.passed_over) == ["notes.txt", "table.csv"] and not found.left_out
    only_nested = tmp_path / "only"
    (only_nested / "sub").mkdir(parents=True)
    (only_nested / "sub" / "x.png").write_bytes((scans / "a.png").read_bytes())
    problems = predicting.collect_inputs([str(only_nested)]).problems
    assert problems and "--recursive" in problems[0][1]


def test_recursive_prediction_mirrors_the_subfolders_and_other_files_leave_the_exit_status_alone(run, tmp_path, scene):
    scans = scans_folder(tmp_path / "scans", scene[0])
    status, stdout, stderr = predict(run, tmp_path / "flat", str(scans))
    assert status == 0, stderr
    assert sorted(p.name for p in (tmp_path / "flat").glob("*_mask.png")) == ["a_mask.png", "b_mask.png", "s1_mask.png"]
    assert "2 images" in stdout and "deep/d.png" in stdout and "--recursive" in stdout
    assert "notes.txt" in stdout and "notes" not in stderr
    status, stdout, stderr = predict(run, tmp_path / "deep", str(scans), "--recursive")
    assert status == 0, stderr
    for relative in ("a_mask.png", "s1_mask.png", "deep/d_mask.png", "deep/er/e_overlay.png"):
        assert (tmp_path / "deep" / relative).is_file(), relative
    assert re.search(r"deep/er/e\b.*\b192x160", stdout) and "Left out" not in stdout
    (scans / "deep" / "broken.png").write_bytes(b"\x89PNG not really")  # an image by name that is not one
    status, stdout, stderr = predict(run, tmp_path / "again", str(scans), "--recursive")
    assert status == 1 and "deep/broken" in stderr and "Traceback" not in stderr


# --------------------------------------------------------------------------------------------------
# 7. Messages: every flag checked before the model loads; runs that have not finished
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, words",
    [
        (("--min-size", "-5"), ("--min-size -5", "0 or more")),
        (("--threshold", "1.5"), ("threshold", "(0, 1)")),
        (("--threshold", "nan"), ("--threshold nan",)),
        (("--batch-size", "0"), ("--batch-size 0",)),
        (("--channel", "-1"), ("--channel -1",)),
        (("--tile-size", "16"), ("--tile-size 16", "--tile-size 64")),
        (("--project", "mean"), ("invalid choice", "max")),
        (("--pixel-size", "inf", "--measure"), ("--pixel-size inf",)),
    ],
)
def test_bad_flags_are_refused_before_the_model_loads(run, tmp_path, monkeypatch, flags, words):
    def must_not_load(path):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(segmenter, "load_unet", must_not_load)
    status, _, stderr = predict(run, tmp_path / "out", str(tmp_path / "x.png"), *flags)
    assert status == 2 and "Traceback" not in stderr, stderr
    assert all(word in stderr for word in words), stderr


def test_an_output_folder_that_is_a_file_is_named(run, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    status, _, stderr = predict(run, tmp_path / "out", str(tmp_path / "x.png"))
    assert status == 2 and "not a folder" in stderr and "File exists" not in stderr


def test_a_run_that_has_not_finished_is_used_with_a_warning_naming_its_last_epoch(run, tmp_path, scene):
    cv2.imwrite(str(tmp_path / "cells.png"), eight_bit(scene[0]))
    status, _, stderr = predict(run, tmp_path / "finished", str(tmp_path / "cells.png"))
    assert status == 0 and "warning" not in stderr
    unfinished = tmp_path / "runs" / "unfinished"
    shutil.copytree(run, unfinished)
    # A run stopped before its end has neither the post-processing nor the scores learned at the end.
    (unfinished / "postprocessing.json").unlink()
    (unfinished / "scores.json").unlink()
    status, _, stderr = predict(unfinished, tmp_path / "early", str(tmp_path / "cells.png"))
    assert status == 0 and "warning" in stderr and "not finished" in stderr
    assert "2 of 2" in stderr and "--resume" in stderr

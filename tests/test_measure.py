"""Per-nucleus measurements (unet_nuclei/measure.py) with known answers, the label TIFF, and
``Predict_mask.py --measure`` end to end on a quickly trained model."""

import csv
import math
import re

import cv2
import numpy as np
import pytest
import tifffile
from skimage import draw

import Predict_mask
import unet_model_core as core
from conftest import run_main
from unet_nuclei import files, formats, measure

# Discs drawn into a 200 x 240 image: (centre row, centre column, radius, grey value).  The last one is
# centred 5 px inside the right edge, so part of it is cut off by the border.
DISCS = ((50, 60, 6, 40), (120, 70, 10, 120), (100, 160, 15, 200), (160, 235, 12, 90))
BACKGROUND = 10


def disc_image(discs=DISCS, shape=(200, 240), dtype=np.uint8):
    """Instance labels 1..N and a grey image with each disc at its own constant value."""
    labels = np.zeros(shape, np.uint16)
    grey = np.full(shape, BACKGROUND, dtype)
    for label, (row, col, radius, value) in enumerate(discs, start=1):
        rr, cc = draw.disk((row, col), radius, shape=shape)
        labels[rr, cc] = label
        grey[rr, cc] = value
    return labels, grey


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_discs_of_known_size_and_intensity_give_their_measurements():
    labels, grey = disc_image()
    columns = measure.measure_nuclei(labels, grey)
    assert list(columns["label"]) == [1, 2, 3, 4]
    for index, (row, col, radius, value) in enumerate(DISCS[:3]):  # the three discs inside the image
        # A digital disc's edge is off the true circle by up to half a pixel: allow a half-pixel ring.
        assert columns["area_px"][index] == pytest.approx(math.pi * radius**2, abs=math.pi * radius)
        assert columns["equivalent_diameter_px"][index] == pytest.approx(2 * radius, abs=1)
        assert columns["perimeter_px"][index] == pytest.approx(2 * math.pi * radius, rel=0.1)
        assert columns["centroid_y"][index] == pytest.approx(row, abs=0.5)
        assert columns["centroid_x"][index] == pytest.approx(col, abs=0.5)
        assert columns["eccentricity"][index] < 0.2 and columns["solidity"][index] > 0.9
        # Every pixel of a disc has its value, so mean and max are exactly that value (not the background).
        assert columns["mean_intensity"][index] == value and columns["max_intensity"][index] == value
        assert columns["touches_border"][index] == 0
    # The disc cut by the right edge touches the border, and only the part inside the image counts.
    assert columns["touches_border"][3] == 1
    assert columns["area_px"][3] < 0.75 * math.pi * 12**2
    assert columns["centroid_x"][3] < 235


def test_an_ellipse_has_its_known_eccentricity_and_a_notched_disc_a_lower_solidity():
    labels = np.zeros((100, 100), np.uint8)
    rr, cc = draw.ellipse(50, 50, 10, 20, shape=labels.shape)  # semi-axes 10 (rows) and 20 (columns)
    labels[rr, cc] = 1
    rr, cc = draw.disk((50, 50), 20, shape=labels.shape)
    notched = np.zeros_like(labels)
    notched[rr, cc] = 1
    notched[30:50, 45:55] = 0  # a slot cut from the top edge to the centre
    ellipse = measure.measure_nuclei(labels, labels)
    cut = measure.measure_nuclei(notched, notched)
    assert ellipse["eccentricity"][0] == pytest.approx(math.sqrt(1 - (10 / 20) ** 2), abs=0.02)
    assert cut["solidity"][0] < 0.9 < measure.measure_nuclei(labels, labels)["solidity"][0]


def test_a_16_bit_file_is_measured_in_its_own_units_not_the_8_bit_copy(tmp_path):
    discs = ((40, 40, 10, 1000), (40, 100, 10, 40000))
    labels, grey = disc_image(discs, shape=(80, 140), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), grey)
    cv2.imwrite(str(tmp_path / "deep.tif"), grey)
    for name in ("deep.png", "deep.tif"):
        read = measure.read_grey(tmp_path / name)
        assert read.dtype == np.uint16
        columns = measure.measure_nuclei(labels, read)
        assert list(columns["mean_intensity"]) == [1000, 40000]
        assert list(columns["max_intensity"]) == [1000, 40000]
    # The model's 8-bit copy of the same file has other values: the measurement must not use it.
    assert core.read_image(tmp_path / "deep.png")[40, 100, 0] == 255


def test_colour_becomes_the_mean_of_its_channels_and_alpha_is_ignored(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[...] = (30, 60, 120)  # R, G, B
    cv2.imwrite(str(tmp_path / "colour.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    rgba = np.dstack([rgb, np.full((30, 40), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "alpha.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    for name in ("colour.png", "alpha.png"):
        grey = measure.read_grey(tmp_path / name)
        assert grey.shape == (30, 40) and np.all(grey == 70)
    with pytest.raises(core.DataError, match="not an image"):
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        measure.read_grey(tmp_path / "broken.png")


def test_pixel_size_adds_micrometre_columns_scaled_by_um_and_um_squared():
    labels, grey = disc_image()
    plain = measure.measure_nuclei(labels, grey)
    scaled = measure.measure_nuclei(labels, grey, pixel_size=0.5)
    assert "area_um2" not in plain
    np.testing.assert_allclose(scaled["area_um2"], plain["area_px"] * 0.25)
    np.testing.assert_allclose(scaled["equivalent_diameter_um"], plain["equivalent_diameter_px"] * 0.5)
    np.testing.assert_allclose(scaled["perimeter_um"], plain["perimeter_px"] * 0.5)
    np.testing.assert_array_equal(scaled["centroid_x"], plain["centroid_x"])  # centroids stay in pixels
    summary = measure.summarize_image(labels, plain["area_px"], pixel_size=0.5)
    assert summary["mean_area_um2"] == pytest.approx(plain["area_px"].mean() * 0.25)
    with pytest.raises(ValueError, match="positive"):
        measure.Measurements(pixel_size=0)


def test_image_summary_counts_areas_and_coverage():
    labels = np.zeros((10, 20), np.uint8)
    labels[0:2, 0:5] = 1  # 10 px
    labels[5:9, 5:10] = 2  # 20 px
    labels[5:9, 12:18] = 3  # 24 px
    areas = measure.measure_nuclei(labels, labels)["area_px"]
    summary = measure.summarize_image(labels, areas)
    assert summary == {
        "width": 20,
        "height": 10,
        "count": 3,
        "mean_area_px": 18.0,
        "median_area_px": 20.0,
        "coverage": 54 / 200,
    }
    empty = measure.summarize_image(np.zeros((4, 5), np.uint8), [])
    assert empty["count"] == 0 and empty["mean_area_px"] is None and empty["coverage"] == 0


def test_measurements_are_written_whole_and_never_replace_a_file(tmp_path):
    labels, grey = disc_image()
    collected = measure.Measurements(pixel_size=0.25)
    assert collected.add("first", labels, grey) == 4
    assert collected.add("empty", np.zeros((20, 30), np.uint16), np.zeros((20, 30), np.uint8)) == 0
    written = collected.write(tmp_path)
    assert [p.name for p in written] == ["nuclei.csv", "images.csv", "summary.png"]
    nuclei, images = read_csv(tmp_path / "nuclei.csv"), read_csv(tmp_path / "images.csv")
    assert [r["image"] for r in nuclei] == ["first"] * 4
    assert [r["touches_border"] for r in nuclei] == ["0", "0", "0", "1"]
    assert [r["mean_intensity"] for r in nuclei] == [str(v) for *_, v in DISCS]
    assert float(nuclei[1]["area_um2"]) == pytest.approx(float(nuclei[1]["area_px"]) / 16)
    assert [(r["image"], r["count"]) for r in images] == [("first", "4"), ("empty", "0")]
    assert images[1]["mean_area_px"] == "" and "median_area_um2" in images[0]
    assert cv2.imread(str(tmp_path / "summary.png")) is not None
    # A second write refuses, naming the file, and leaves every file as it was.
    before = {p.name: p.read_bytes() for p in written}
    with pytest.raises(FileExistsError, match=r"nuclei\.csv.*--overwrite"):
        collected.write(tmp_path)
    assert {p.name: p.read_bytes() for p in written} == before
    # One image gives no figure.
    single = measure.Measurements()
    single.add("only", labels, grey)
    (tmp_path / "single").mkdir()
    assert [p.name for p in single.write(tmp_path / "single")] == ["nuclei.csv", "images.csv"]
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["images.csv", "nuclei.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "nuclei.csv"
    target.write_text("the old table\n")

    def fail_half_way(temporary):
        temporary.write_text("half a ta")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_with(target, fail_half_way, overwrite=True)
    assert target.read_text() == "the old table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.csv"]


def test_label_tiff_round_trips_with_its_pixel_size_and_beyond_65535_nuclei(tmp_path):
    labels, _ = disc_image()
    path = formats.write_label_tiff(tmp_path / "cells_labels.tif", labels, pixel_size=0.5)
    with tifffile.TiffFile(path) as tiff:
        read = tiff.asarray()
        assert tiff.is_imagej and tiff.imagej_metadata["unit"] == "um"
        x_resolution = tiff.pages[0].tags["XResolution"].value
    assert read.dtype == np.uint16 and np.array_equal(read, labels)
    assert x_resolution[0] / x_resolution[1] == pytest.approx(2.0)  # 2 pixels per micrometre
    many = np.arange(70000, dtype=np.int32).reshape(250, 280)  # more labels than 16 bits hold
    read_many = tifffile.imread(formats.write_label_tiff(tmp_path / "many.tif", many))
    assert read_many.dtype == np.uint32 and np.array_equal(read_many, many)
    with pytest.raises(FileExistsError, match="overwrite"):
        formats.write_label_tiff(path, labels)


def test_pixel_size_and_labels_flags_are_checked_before_any_work():
    status, _, stderr = run_main(Predict_mask, "x.png", "--measure", "--pixel-size", "-1")
    assert status == 2 and "positive" in stderr
    status, _, stderr = run_main(Predict_mask, "x.png", "--pixel-size", "0.5")
    assert status == 2 and "--measure" in stderr
    status, _, stderr = run_main(Predict_mask, "x.png", "--labels=jpg")
    assert status == 2 and "invalid choice" in stderr
    # The bare flag keeps working anywhere on the line, also right before an image.
    parser = Predict_mask.build_parser()
    for argv, expected in (
        (["--labels", "a.png"], ("png", ["a.png"])),
        (["a.png", "--labels"], ("png", ["a.png"])),
        (["--labels", "tif", "a.png"], ("tif", ["a.png"])),
        (["a.png"], (None, ["a.png"])),
    ):
        args = parser.parse_args(Predict_mask._labels_value_given(argv))
        assert (args.labels, args.images) == expected, argv


def test_predict_mask_measure_writes_the_tables_and_figure_and_refuses_to_replace_them(
    quick_run, tiny_dataset, tmp_path
):
    work, run, _ = quick_run
    out = tmp_path / "out"
    argv = (
        str(tiny_dataset),
        "--model",
        str(run),
        "--out",
        str(out),
        "--measure",
        "--labels",
        "tif",
        "--pixel-size",
        "0.5",
    )
    status, stdout, stderr = run_main(Predict_mask, *argv)
    assert status == 0, stderr
    ids = sorted(p.name for p in tiny_dataset.iterdir())
    nuclei, images = read_csv(out / "nuclei.csv"), read_csv(out / "images.csv")
    assert sorted(r["image"] for r in images) == ids
    assert cv2.imread(str(out / "summary.png")) is not None
    for row in images:
        labels = tifffile.imread(out / f"{row['image']}_labels.tif")
        rows = [r for r in nuclei if r["image"] == row["image"]]
        # One row per nucleus of the label image, and the image's count is that number.
        assert int(row["count"]) == len(rows) == np.count_nonzero(np.unique(labels))
        assert re.search(rf"{re.escape(row['image'])}\b.*\b{len(rows)} nuclei\b", stdout)
        grey = measure.read_grey(tiny_dataset / row["image"] / "images" / f"{row['image']}.png")
        for r in rows[:3]:
            inside = labels == int(r["label"])
            assert int(r["area_px"]) == np.count_nonzero(inside)
            assert float(r["mean_intensity"]) == pytest.approx(grey[inside].mean(), abs=1e-3)
            assert float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.25)
    # Run again without --overwrite: refused before any prediction, naming the file, nothing replaced.
    # (scores.csv, of the scored inputs, would be refused first: it goes, so the tables are what is tested.)
    (out / "scores.csv").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, stdout, stderr = run_main(Predict_mask, *argv)
    assert status == 2 and "nuclei.csv" in stderr and "--overwrite" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_more_nuclei_than_a_16_bit_png_holds_are_refused_as_png_and_kept_whole_as_tif(tmp_path, monkeypatch):
    from unet_nuclei import predict
    from unet_nuclei.segmenter import Prediction, Segmenter

    cv2.imwrite(str(tmp_path / "crowded.png"), np.zeros((250, 280), np.uint8))
    many = np.arange(1, 250 * 280 + 1, dtype=np.int32).reshape(250, 280)  # 70,000 one-pixel "nuclei"

    def fake_prediction(self, image, name, *args):
        return Prediction(name, 250, 280, int(many.max()), image, None, many)

    monkeypatch.setattr(Segmenter, "segment", fake_prediction)
    segmenter = Segmenter(None, core.Config())
    item = predict.PredictionInput("crowded", tmp_path / "crowded.png")
    (tmp_path / "png").mkdir()
    with pytest.raises(core.DataError, match="--labels tif"):
        predict.predict_input(segmenter, item, tmp_path / "png", labels=True)
    assert list((tmp_path / "png").iterdir()) == []  # refused, and the mask and overlay taken back
    (tmp_path / "tif").mkdir()
    predict.predict_input(segmenter, item, tmp_path / "tif", labels="tif", pixel_size=0.5)
    assert np.array_equal(tifffile.imread(tmp_path / "tif" / "crowded_labels.tif"), many)

"""Nucleus outlines for Fiji (ImageJ ROI sets) and QuPath (GeoJSON): the polygons enclose exactly each
label's pixels, holes and border nuclei included, and Predict_mask.py writes both on request."""

import json

import cv2
import numpy as np
import pytest
from skimage.draw import polygon2mask
from skimage.measure import label as connected

import Predict_mask
from conftest import run_main
from unet_nuclei import outlines


def rasterise(rings, shape) -> np.ndarray:
    """The pixels inside ``rings`` of (x, y) pixel-corner vertices, by the even-odd rule.  A pixel is
    inside when its centre is; the centres lie half a pixel off every edge, so no test is on a line."""
    mask = np.zeros(shape, bool)
    for ring in rings:
        ring = np.asarray(ring, float)
        mask ^= polygon2mask(shape, ring[:, ::-1] - 0.5)  # (row, col) with pixel centres at whole numbers
    return mask


def shoelace(ring) -> float:
    x, y = np.asarray(ring, float).T
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


def awkward_labels() -> np.ndarray:
    """Nuclei a tracer gets wrong: a hole, the image border, a corner-only contact, an island of the same
    label inside its own hole, two labels touching, a single pixel."""
    labels = np.zeros((20, 24), np.int32)
    labels[0:5, 0:5] = 1
    labels[2, 2] = 0  # a hole, and a nucleus cut by two borders
    labels[7, 7] = labels[8, 8] = 2  # two pixels touching only at a corner
    labels[10:17, 10:17] = 3
    labels[11:16, 11:16] = 0
    labels[13, 13] = 3  # an island inside its own hole
    labels[2:6, 20:24] = 4  # on the right border, touching nucleus 5
    labels[6:9, 20:24] = 5
    labels[18, 2] = 6  # one pixel
    return labels


def test_polygons_enclose_exactly_each_labels_pixels():
    labels = awkward_labels()
    traced = {o.label: o for o in outlines.trace_outlines(labels)}
    assert sorted(traced) == [1, 2, 3, 4, 5, 6]
    for value, outline in traced.items():
        rings = [ring for part in outline.parts for ring in part]
        assert outline.area == np.count_nonzero(labels == value)
        assert sum(shoelace(r) for r in rings) == outline.area  # holes count negative
        assert np.array_equal(rasterise(rings, labels.shape), labels == value)
        for part in outline.parts:  # outer rings counter-clockwise in (x, y), holes clockwise
            assert shoelace(part[0]) > 0 and all(shoelace(hole) < 0 for hole in part[1:])
    assert [len(p) for p in traced[1].parts] == [2]  # one part with its hole
    assert len(traced[2].parts) == 2  # corner contact: two parts, no ring touching itself
    assert sorted(len(p) for p in traced[3].parts) == [1, 2]  # the frame with its hole, and the island
    assert traced[6].parts[0][0].tolist() == [[2, 18], [3, 18], [3, 19], [2, 19]]  # pixel corners
    assert traced[4].parts[0][0].max(axis=0).tolist() == [24, 6]  # closed along the border


def test_random_label_images_trace_exactly():
    rng = np.random.default_rng(7)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 40, 2))
        labels = connected(rng.random(shape) > 0.45, connectivity=2)  # 8-connected: corner contacts abound
        labels[rng.random(shape) > 0.9] = 0
        for outline in outlines.trace_outlines(labels):
            rings = [ring for part in outline.parts for ring in part]
            assert np.array_equal(rasterise(rings, shape), labels == outline.label)


def test_imagej_roi_set_has_one_roi_per_nucleus_with_its_area(tmp_path):
    roifile = pytest.importorskip("roifile")  # a runtime requirement; here only if the install is broken
    labels = awkward_labels()
    path = outlines.write_imagej_rois(tmp_path / "cells_rois.zip", labels)
    rois = roifile.roiread(path)
    assert [r.name for r in rois] == ["1", "2", "3", "4", "5", "6"]
    for roi in rois:
        value = int(roi.name)
        rings = roi.coordinates(multi=True)
        area = abs(sum(shoelace(ring) for ring in rings))
        assert abs(area - np.count_nonzero(labels == value)) <= 0.02 * np.count_nonzero(labels == value)
        assert np.array_equal(rasterise(rings, labels.shape), labels == value)
    by_name = {r.name: r for r in rois}
    assert by_name["6"].roitype == roifile.ROI_TYPE.TRACED and not by_name["6"].composite
    assert by_name["1"].composite and by_name["2"].composite  # a hole; two parts
    with pytest.raises(FileExistsError, match="--overwrite"):
        outlines.write_imagej_rois(path, labels)
    assert len(roifile.roiread(outlines.write_imagej_rois(path, labels[:, :12], overwrite=True))) == 4  # 1, 2, 3 cut, 6


def test_geojson_is_a_feature_collection_of_one_polygon_per_nucleus(tmp_path):
    labels = awkward_labels()
    path = outlines.write_geojson(tmp_path / "cells.geojson", labels, pixel_size=0.5)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert [f["properties"]["label"] for f in features] == [1, 2, 3, 4, 5, 6]
    for feature in features:
        assert feature["type"] == "Feature"
        properties, geometry = feature["properties"], feature["geometry"]
        assert properties["objectType"] == "detection" and properties["name"] == str(properties["label"])
        value = properties["label"]
        assert properties["area"] == properties["measurements"]["area_px"] == np.count_nonzero(labels == value)
        assert properties["measurements"]["area_um2"] == pytest.approx(properties["area"] * 0.25)
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        assert geometry["type"] == ("MultiPolygon" if value in (2, 3) else "Polygon")
        rings = []
        for polygon in polygons:
            for index, ring in enumerate(polygon):
                assert len(ring) >= 5 and ring[0] == ring[-1]  # closed, at least a square
                assert all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in ring)
                assert (shoelace(ring[:-1]) > 0) == (index == 0)  # RFC 7946: exterior counter-clockwise
                rings.append(ring[:-1])
        assert sum(shoelace(r) for r in rings) == properties["area"]
        assert np.array_equal(rasterise(rings, labels.shape), labels == value)
    hole_feature = features[0]["geometry"]["coordinates"]
    assert len(hole_feature) == 2  # exterior and hole


def test_a_stack_gives_one_set_per_plane(tmp_path):
    roifile = pytest.importorskip("roifile")
    stack = np.stack([awkward_labels(), np.zeros((20, 24), np.int32), awkward_labels()[::-1]])
    rois = roifile.roiread(outlines.write_imagej_rois(tmp_path / "stack_rois.zip", stack))
    assert len(rois) == 12 and {r.position for r in rois} == {1, 3}
    assert {r.name for r in rois if r.position == 3} == {f"{v}-z3" for v in range(1, 7)}
    features = outlines.geojson_collection(stack)["features"]
    assert [f["properties"]["plane"] for f in features] == [0] * 6 + [2] * 6
    assert features[-1]["geometry"]["plane"] == {"c": -1, "z": 2, "t": 0}
    # A time series: the planes are time points, not z slices.
    features = outlines.geojson_collection(stack, plane_axes="T", plane_shape=(3,))["features"]
    assert features[-1]["geometry"]["plane"] == {"c": -1, "z": 0, "t": 2}
    assert outlines.plane_position(5, "TZ", (2, 3)) == {"z": 2, "t": 1}


def test_empty_images_and_bad_labels():
    assert outlines.trace_outlines(np.zeros((5, 5), np.uint16)) == []
    assert outlines.geojson_collection(np.zeros((0, 0), np.int32))["features"] == []
    with pytest.raises(ValueError, match="integer"):
        outlines.trace_outlines(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        outlines.trace_outlines(np.full((4, 4), -1))
    with pytest.raises(ValueError, match="kind"):
        outlines.output_path("out", "x", "svg")


def test_predict_mask_writes_rois_and_geojson_matching_the_labels(quick_run, tmp_path):
    roifile = pytest.importorskip("roifile")
    _, run, _ = quick_run
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (70, 90), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(tmp_path / "cells.png"), image)
    out = tmp_path / "out"
    status, _, stderr = run_main(
        Predict_mask,
        str(tmp_path / "cells.png"),
        "--model",
        str(run),
        "--out",
        str(out),
        "--labels",
        "tif",
        "--rois",
        "--geojson",
        "--min-confidence",
        "0",
    )
    assert status == 0, stderr
    import tifffile

    labels = tifffile.imread(out / "cells_labels.tif")
    values = [int(v) for v in np.unique(labels) if v]
    rois = roifile.roiread(out / "cells_rois.zip")
    assert sorted(int(r.name) for r in rois) == values
    for roi in rois:
        assert np.array_equal(rasterise(roi.coordinates(multi=True), labels.shape), labels == int(roi.name))
    features = json.loads((out / "cells.geojson").read_text())["features"]
    assert sorted(f["properties"]["label"] for f in features) == values
    assert all(f["properties"]["area"] == np.count_nonzero(labels == f["properties"]["label"]) for f in features)
    # An existing outline file is refused before the image is predicted, and left as it was.
    (out / "again.geojson").write_text("the user's own file")
    cv2.imwrite(str(tmp_path / "again.png"), image)
    status, _, stderr = run_main(
        Predict_mask, str(tmp_path / "again.png"), "--model", str(run), "--out", str(out), "--geojson"
    )
    assert status == 1 and "again.geojson" in stderr
    assert (out / "again.geojson").read_text() == "the user's own file" and not (out / "again_mask.png").exists()

"""Nucleus outlines as polygons, and the two files that carry them to Fiji and QuPath.

``trace_outlines`` turns an instance label image into one ``Outline`` per nucleus: polygons that run
along the pixel edges of the label image (vertices at pixel corners, (0, 0) being the top-left corner of
the top-left pixel), so each polygon encloses exactly its label's pixels and its area equals the label's
pixel count.  Holes become inner rings; a nucleus cut by the image border is closed along the border;
pixels of one label that touch only at a corner become separate parts (4-connectivity), so that no ring
touches itself.  scikit-image and OpenCV trace contours through pixel centres (areas short by about
half the perimeter), which is why the edges are followed here, with array operations.

``write_imagej_rois`` writes ``<stem>_rois.zip``, an ImageJ ROI set that Fiji's ROI Manager opens: one
traced polygon per nucleus, named by its label (a composite ROI where a nucleus has a hole or several
parts).  ``write_geojson`` writes ``<stem>.geojson``, a GeoJSON FeatureCollection that QuPath imports as
detection objects: one Polygon (MultiPolygon for several parts) per nucleus, with its label and area.
A z-stack of labels (planes x height x width) gives one set per plane: the ROIs carry their slice, the
features their plane.  Both are written whole or not at all, and never over an existing file unless
``overwrite`` is set (``unet_nuclei.files``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import points_in_poly

from unet_nuclei import files

# The outline files Predict_mask.py writes on request, by the name of their flag.
OUTLINE_FILES = {"rois": "{stem}_rois.zip", "geojson": "{stem}.geojson"}
# What QuPath calls the objects and their class; the colour is the overlay's yellow.
QUPATH_OBJECT_TYPE = "detection"
QUPATH_CLASS = {"name": "Nucleus", "color": [255, 255, 0]}


@dataclasses.dataclass(frozen=True)
class Outline:
    """One nucleus's outline in one plane.

    ``parts`` holds one entry per 4-connected piece of the nucleus (almost always one): a list of rings,
    the outer ring first and then its holes.  A ring is an N x 2 int64 array of (x, y) pixel-corner
    vertices, not repeated at the end, outer rings counter-clockwise and holes clockwise in (x, y) (the
    GeoJSON convention; on screen, with y pointing down, the turn is mirrored)."""

    label: int
    area: int  # pixels
    parts: list[list[np.ndarray]]
    plane: int | None = None  # the z index in a stack, None for a 2-D image


def output_path(out_dir, stem: str, kind: str) -> Path:
    """Where Predict_mask.py writes the outline file ``kind`` ("rois" or "geojson") of input ``stem``."""
    if kind not in OUTLINE_FILES:
        raise ValueError(f"outline file kind must be one of {sorted(OUTLINE_FILES)}, got {kind!r}")
    return Path(out_dir) / OUTLINE_FILES[kind].format(stem=stem)


def check_available(kinds) -> None:
    """Raise ValueError, saying what to install, when an outline file of ``kinds`` needs a missing package
    (the ROI set needs ``roifile``); called before the first image is predicted."""
    if "rois" in kinds:
        try:
            import roifile  # noqa: F401
        except ImportError:
            raise ValueError("--rois needs the roifile package: pip install -r requirements.txt") from None


def write_outlines(
    kind: str,
    path,
    labels: np.ndarray,
    pixel_size: float | None = None,
    overwrite: bool = False,
    plane_axes: str = "Z",
    plane_shape: tuple | None = None,
) -> Path:
    """Write the outline file ``kind`` ("rois" or "geojson") of ``labels`` to ``path``.  For a stack
    (planes x height x width) ``plane_axes`` ("Z", "T" or "TZ") and ``plane_shape`` (their sizes) say
    which z and time point each plane is (default: every plane a z slice)."""
    if kind == "rois":
        return write_imagej_rois(path, labels, overwrite, plane_axes, plane_shape)
    if kind == "geojson":
        return write_geojson(path, labels, pixel_size, overwrite, plane_axes, plane_shape)
    raise ValueError(f"outline file kind must be one of {sorted(OUTLINE_FILES)}, got {kind!r}")


def plane_position(plane: int, plane_axes: str = "Z", plane_shape: tuple | None = None) -> dict[str, int]:
    """The 0-based z slice and time point of plane ``plane`` of a stack whose planes run along
    ``plane_axes`` ("Z", "T" or "TZ", time outermost) with sizes ``plane_shape``."""
    shape = tuple(plane_shape) if plane_shape else (plane + 1,)
    index = dict(zip(plane_axes, (int(i) for i in np.unravel_index(plane, shape))))
    return {"z": index.get("Z", 0), "t": index.get("T", 0)}


def _planes(labels) -> list[tuple[int | None, np.ndarray]]:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be an integer image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("instance labels must not be negative")
    if labels.ndim == 2:
        return [(None, labels)]
    if labels.ndim == 3:
        return list(enumerate(labels))
    raise ValueError(f"labels must be height x width or planes x height x width, got shape {labels.shape}")


def trace_outlines(labels: np.ndarray) -> list[Outline]:
    """The outline of every nucleus of a label image (0 = background), in label order; a stack of
    planes gives each plane's outlines in turn, each with its ``plane``."""
    outlines = []
    for plane, image in _planes(labels):
        outlines.extend(dataclasses.replace(o, plane=plane) for o in _trace_plane(image))
    return outlines


def _boundary_edges(labels: np.ndarray) -> np.ndarray:
    """Every pixel edge between two different labels, once for each non-zero side, directed so that its
    label lies on its left in (x, y) (on screen: the pixel is walked round clockwise).

    Returns an E x 5 int64 array: label, x0, y0, x1, y1."""
    padded = np.pad(labels.astype(np.int64, copy=False), 1)  # a background frame closes border nuclei
    pieces = []
    # Horizontal edges at y = a between padded rows a and a + 1 (the image's rows a - 1 and a).
    upper, lower = padded[:-1, 1:-1], padded[1:, 1:-1]
    a, c = np.nonzero((upper != lower) & (lower != 0))  # the top edge of the pixel below: x increasing
    pieces.append(np.column_stack([lower[a, c], c, a, c + 1, a]))
    a, c = np.nonzero((upper != lower) & (upper != 0))  # the bottom edge of the pixel above: x decreasing
    pieces.append(np.column_stack([upper[a, c], c + 1, a, c, a]))
    # Vertical edges at x = b between padded columns b and b + 1.
    left, right = padded[1:-1, :-1], padded[1:-1, 1:]
    r, b = np.nonzero((left != right) & (right != 0))  # the left edge of the pixel to the right: y decreasing
    pieces.append(np.column_stack([right[r, b], b, r + 1, b, r]))
    r, b = np.nonzero((left != right) & (left != 0))  # the right edge of the pixel to the left: y increasing
    pieces.append(np.column_stack([left[r, b], b, r, b, r + 1]))
    return np.concatenate(pieces).astype(np.int64)


def _successors(edges: np.ndarray, width: int, height: int) -> np.ndarray:
    """For each edge, the index of the edge of the same label that starts where it ends.

    Where a label's pixels meet only at a corner, two of its edges start at that vertex; the one that
    turns right on screen (clockwise round the pixel just walked) is taken, so those pixels stay apart."""
    corners = (width + 1) * (height + 1)
    start = edges[:, 0] * corners + edges[:, 2] * (width + 1) + edges[:, 1]
    end = edges[:, 0] * corners + edges[:, 4] * (width + 1) + edges[:, 3]
    order = np.argsort(start, kind="stable")
    first = np.minimum(np.searchsorted(start[order], end, side="left"), len(order) - 1)
    candidate = order[first]
    # A second edge from the same vertex, if there is one: the right turn of the incoming direction.
    second_position = np.minimum(first + 1, len(order) - 1)
    second = order[second_position]
    has_two = (second_position != first) & (start[second] == end)
    direction = edges[:, 3:5] - edges[:, 1:3]
    right_turn = np.column_stack([-direction[:, 1], direction[:, 0]])  # screen right of (dx, dy), y down
    first_turns_right = (edges[candidate, 3:5] - edges[candidate, 1:3] == right_turn).all(axis=1)
    return np.where(has_two & ~first_turns_right, second, candidate)


def _ring_order(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each edge's ring and its position along the ring, counted from the ring's first edge.

    The successors form disjoint cycles: connected components name the rings, and pointer doubling
    counts each edge's distance to its ring's first edge (about log2 of the longest ring steps)."""
    count = len(successor)
    graph = coo_matrix((np.ones(count, np.int8), (np.arange(count), successor)), shape=(count, count))
    _, ring = connected_components(graph, directed=True, connection="weak")
    head = np.full(ring.max(initial=-1) + 1, count, np.int64)
    np.minimum.at(head, ring, np.arange(count))
    # Cut each cycle before its head, then let every edge jump towards the cut, adding up the steps.
    pointer = np.where(successor == head[ring], -1, successor)
    steps = (pointer >= 0).astype(np.int64)
    while (pointer >= 0).any():
        valid = pointer >= 0
        target = np.where(valid, pointer, 0)
        steps = steps + np.where(valid, steps[target], 0)
        pointer = np.where(valid, pointer[target], -1)
    # ``steps`` is the distance to the ring's last edge; the position along the ring is the rest.
    length = np.bincount(ring)
    return ring, length[ring] - 1 - steps


def _trace_plane(labels: np.ndarray) -> list[Outline]:
    height, width = labels.shape
    edges = _boundary_edges(labels)
    if not len(edges):
        return []
    ring, position = _ring_order(_successors(edges, width, height))
    order = np.lexsort((position, ring))
    edges, ring = edges[order], ring[order]
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    ring_labels = edges[starts, 0]
    # A vertex is kept where the direction changes: straight runs of pixel edges become one side.
    direction = edges[:, 3:5] - edges[:, 1:3]
    previous = np.roll(direction, 1, axis=0)
    previous[starts] = direction[np.r_[starts[1:], len(edges)] - 1]  # each ring's last edge leads into its first
    corner = (direction != previous).any(axis=1)
    # Shoelace areas: positive for outer rings, negative for holes.
    cross = edges[:, 1] * edges[:, 4] - edges[:, 3] * edges[:, 2]
    ring_area = np.add.reduceat(cross, starts) // 2
    values, counts = np.unique(labels, return_counts=True)
    areas = dict(zip(values.tolist(), counts.tolist()))
    ends = np.r_[starts[1:], len(edges)]
    rings_of = {}
    for index, (start, stop) in enumerate(zip(starts, ends)):
        keep = start + np.flatnonzero(corner[start:stop])
        rings_of.setdefault(int(ring_labels[index]), []).append((int(ring_area[index]), edges[keep, 1:3]))
    return [Outline(label, areas[label], _polygons(rings_of[label])) for label in sorted(rings_of)]


def _polygons(rings: list[tuple[int, np.ndarray]]) -> list[list[np.ndarray]]:
    """Group one label's rings into parts: each outer ring with the holes that lie inside it."""
    outers = [(area, vertices) for area, vertices in rings if area > 0]
    parts = [[vertices] for _, vertices in outers]
    for area, hole in rings:
        if area > 0:
            continue
        if len(parts) == 1:
            parts[0].append(hole)
            continue
        # The midpoint of a hole's first side is inside the outer rings around the hole, never on one;
        # the smallest of them is the hole's own (a part may sit inside another part's hole).
        midpoint = (hole[0] + hole[1])[None] / 2.0
        around = [
            (outer_area, index)
            for index, (outer_area, outer) in enumerate(outers)
            if points_in_poly(midpoint, outer.astype(float))[0]
        ]
        parts[min(around)[1] if around else 0].append(hole)
    return parts


def ring_area(vertices: np.ndarray) -> float:
    """The signed shoelace area of a ring of (x, y) vertices (positive counter-clockwise in (x, y))."""
    x, y = np.asarray(vertices, dtype=np.float64).T
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


# --- ImageJ ROI set -----------------------------------------------------------------------------------
# ImageJ path operations of a composite ROI (java.awt.geom.PathIterator): move to, line to, close.
_MOVETO, _LINETO, _CLOSE = 0, 1, 4


def _roi_name(outline: Outline, plane_axes: str = "Z", plane_shape: tuple | None = None) -> str:
    if outline.plane is None:
        return str(outline.label)
    where = plane_position(outline.plane, plane_axes, plane_shape)
    return f"{outline.label}" + "".join(f"-{axis.lower()}{where[axis.lower()] + 1}" for axis in plane_axes)


def _place(roi, outline: Outline, plane_axes: str, plane_shape: tuple | None) -> None:
    # The stack position ImageJ reads for a plain stack, and the hyperstack's own z and t positions.
    if outline.plane is None:
        return
    roi.position = outline.plane + 1
    if plane_axes != "Z":
        where = plane_position(outline.plane, plane_axes, plane_shape)
        roi.z_position, roi.t_position = where["z"] + 1, where["t"] + 1


def imagej_roi(outline: Outline, plane_axes: str = "Z", plane_shape: tuple | None = None):
    """The ImageJ ROI of one outline (``roifile.ImagejRoi``): a traced polygon, or a composite ROI where
    the nucleus has a hole or several parts; named by its label, on its slice (and time point) in a stack."""
    import roifile

    rings = [ring for part in outline.parts for ring in part]
    if len(rings) == 1:
        roi = roifile.ImagejRoi.frompoints(rings[0], name=_roi_name(outline, plane_axes, plane_shape))
        _place(roi, outline, plane_axes, plane_shape)
        # "Traced" is what ImageJ's wand makes: integer corners, area counted in pixels; its bounds end at
        # the last corner (roifile's end one pixel further, as for pixel-centre points).
        roi.roitype = roifile.ROI_TYPE.TRACED
        roi.right, roi.bottom = (int(v) for v in rings[0].max(axis=0))
        return roi
    path = []
    for ring in rings:
        path += [_MOVETO, *ring[0]]
        for x, y in ring[1:]:
            path += [_LINETO, x, y]
        path.append(_CLOSE)
    every = np.concatenate(rings)
    roi = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name=_roi_name(outline, plane_axes, plane_shape))
    roi.multi_coordinates = np.asarray(path, np.float32)
    roi.shape_roi_size = len(path)
    roi.left, roi.top = (int(v) for v in every.min(axis=0))
    roi.right, roi.bottom = (int(v) for v in every.max(axis=0))
    _place(roi, outline, plane_axes, plane_shape)
    return roi


def write_imagej_rois(
    path, labels: np.ndarray, overwrite: bool = False, plane_axes: str = "Z", plane_shape: tuple | None = None
) -> Path:
    """Write ``labels``' outlines as an ImageJ ROI set (a .zip of .roi files) for Fiji's ROI Manager,
    one ROI per nucleus (per plane in a stack); an image without nuclei gives an empty set."""
    import roifile  # only when a ROI set is asked for

    rois = [imagej_roi(outline, plane_axes, plane_shape) for outline in trace_outlines(labels)]

    # An image without nuclei gives an empty zip file, which the ROI Manager opens as an empty set.
    return files.write_with(path, lambda temporary: roifile.roiwrite(temporary, rois, mode="w"), overwrite)


# --- GeoJSON for QuPath --------------------------------------------------------------------------------


def _closed(ring: np.ndarray) -> list[list[int]]:
    return [[int(x), int(y)] for x, y in ring] + [[int(ring[0][0]), int(ring[0][1])]]


def geojson_feature(
    outline: Outline, pixel_size: float | None = None, plane_axes: str = "Z", plane_shape: tuple | None = None
) -> dict:
    """The GeoJSON Feature of one outline, as QuPath reads a detection object: the polygon in pixel
    coordinates, and the label and area (in pixels, and in um^2 with ``pixel_size``) as properties and
    as QuPath measurements."""
    polygons = [[_closed(ring) for ring in part] for part in outline.parts]
    geometry = (
        {"type": "Polygon", "coordinates": polygons[0]}
        if len(polygons) == 1
        else {"type": "MultiPolygon", "coordinates": polygons}
    )
    measurements = {"label": outline.label, "area_px": outline.area}
    if pixel_size is not None:
        measurements["area_um2"] = outline.area * float(pixel_size) ** 2
    properties = {
        "objectType": QUPATH_OBJECT_TYPE,
        "name": str(outline.label),
        "classification": QUPATH_CLASS,
        "label": outline.label,
        "area": outline.area,
        "measurements": measurements,
    }
    if outline.plane is not None:
        geometry["plane"] = {"c": -1, **plane_position(outline.plane, plane_axes, plane_shape)}  # QuPath's plane
        properties["plane"] = outline.plane
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def geojson_collection(
    labels: np.ndarray, pixel_size: float | None = None, plane_axes: str = "Z", plane_shape: tuple | None = None
) -> dict:
    """The GeoJSON FeatureCollection of every nucleus of ``labels``."""
    return {
        "type": "FeatureCollection",
        "features": [
            geojson_feature(outline, pixel_size, plane_axes, plane_shape) for outline in trace_outlines(labels)
        ],
    }


def write_geojson(
    path,
    labels: np.ndarray,
    pixel_size: float | None = None,
    overwrite: bool = False,
    plane_axes: str = "Z",
    plane_shape: tuple | None = None,
) -> Path:
    """Write ``labels``' outlines as a GeoJSON FeatureCollection that QuPath imports as detections."""
    text = json.dumps(geojson_collection(labels, pixel_size, plane_axes, plane_shape), separators=(",", ":"))
    return files.write_text(path, text + "\n", overwrite)

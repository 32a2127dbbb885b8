"""Per-nucleus measurements, and the files a biologist opens next (Fiji, napari, a spreadsheet).

``Measurements`` collects one row per predicted nucleus (centroid, area, equivalent diameter, perimeter,
eccentricity, solidity, mean and max intensity, whether it touches the image border) and one summary row
per image (count, mean and median area, coverage), and writes them as ``nuclei.csv`` and ``images.csv``,
with ``summary.png`` (counts per image and the area histogram) when more than one image was measured.
The shape and intensity measurements are scikit-image's ``regionprops_table``; the label TIFF that Fiji
and napari open beside them is ``formats.write_label_tiff``.

Intensities are grey values in the input file's own units: a 16-bit image is measured in 0-65535 and a
12-bit camera's image in 0-4095, not in the 8-bit copy that the model sees.  A colour image becomes grey
as the unweighted mean of its red, green and blue channels (what Fiji's "8-bit" conversion does by
default), so an 8-bit RGB image is measured in 0-255; an alpha channel is ignored.

The planes of a stack are measured one by one, each a row of images.csv, with a ``plane`` column (from
0, the page of the label stack) in both tables.  Each image has its own pixel size, the file's or the one
the user gives; images.csv says which (``pixel_size_um``, ``pixel_size_from``).

Every file is written whole or not at all (a temporary file in the same folder, then a rename), and no
existing file is replaced unless ``overwrite`` is set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from skimage import measure as skmeasure

from unet_model_core import DataError, decode_image
from unet_nuclei import files
from unet_nuclei.formats import check_pixel_size

NUCLEI_FILE = "nuclei.csv"
IMAGES_FILE = "images.csv"
SUMMARY_FILE = "summary.png"

# What regionprops_table computes for each nucleus, and the column each property becomes.  "centroid"
# and "bbox" expand to numbered columns (centroid-0 is the row, y; centroid-1 the column, x).
_PROPERTIES = (
    "label",
    "centroid",
    "bbox",
    "area",
    "equivalent_diameter_area",
    "perimeter",
    "eccentricity",
    "solidity",
    "intensity_mean",
    "intensity_max",
)
NUCLEUS_COLUMNS = (
    "image",
    "label",
    "centroid_y",
    "centroid_x",
    "area_px",
    "equivalent_diameter_px",
    "perimeter_px",
    "eccentricity",
    "solidity",
    "mean_intensity",
    "max_intensity",
    "touches_border",
)
NUCLEUS_UM_COLUMNS = ("area_um2", "equivalent_diameter_um", "perimeter_um")
IMAGE_COLUMNS = ("image", "width", "height", "count", "mean_area_px", "median_area_px", "coverage")
IMAGE_UM_COLUMNS = ("mean_area_um2", "median_area_um2")
PIXEL_SIZE_COLUMNS = ("pixel_size_um", "pixel_size_from")  # the image's pixel size, and where it was found


def to_grey(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An image as OpenCV decodes it (grey, BGR, BGRA, grey + alpha; any depth) as H x W grey values in
    its own units.  Grey images keep their dtype and values; colour images become the float mean of
    their three colour channels (the order does not matter for a mean); alpha is dropped."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 2):  # grey, or grey + alpha
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3].mean(axis=2)
    if image.ndim == 2:
        return image
    raise DataError(f"{name}: unsupported image shape {image.shape}; expected grey, RGB or RGBA")


def read_grey(path) -> np.ndarray:
    """Read an image file of one plane at its own bit depth as H x W grey values (see ``to_grey``).

    It is decoded the way the prediction decodes it (``unet_model_core.decode_image``), so its size is
    the size of the predicted labels; only the conversion to 8 bits is left out."""
    image = decode_image(path)
    if image.plane_axes or "C" in image.axes:
        raise DataError(
            f"{path}: holds several planes or channels; measure it through "
            f"unet_nuclei.image_files.open_image, which chooses them"
        )
    return to_grey(image.pixels, str(path))


def measure_nuclei(labels: np.ndarray, intensity: np.ndarray, pixel_size: float | None = None) -> dict:
    """One value per nucleus for each of ``NUCLEUS_COLUMNS`` (but "image"), and, with ``pixel_size`` (in
    micrometres per pixel), each of ``NUCLEUS_UM_COLUMNS``: a dict of equal-length arrays in label order.

    ``labels`` is an instance label image (0 = background); ``intensity`` the grey image of the same
    height and width.  A nucleus touches the border when any of its pixels lies in the first or last row
    or column, so its area and shape are those of the part inside the image."""
    pixel_size = check_pixel_size(pixel_size)
    labels = np.asarray(labels)
    intensity = np.asarray(intensity)
    if labels.shape != intensity.shape:
        raise ValueError(
            f"labels are {labels.shape} but the intensity image is {intensity.shape}; "
            f"they must have the same height and width"
        )
    # regionprops wants integer labels; a 16-bit label PNG arrives as uint16 and that is fine as it is.
    table = skmeasure.regionprops_table(labels.astype(np.int64, copy=False), intensity, properties=_PROPERTIES)
    height, width = labels.shape
    touches = (table["bbox-0"] == 0) | (table["bbox-1"] == 0) | (table["bbox-2"] == height) | (table["bbox-3"] == width)
    columns = {
        "label": table["label"],
        "centroid_y": table["centroid-0"],
        "centroid_x": table["centroid-1"],
        "area_px": table["area"],
        "equivalent_diameter_px": table["equivalent_diameter_area"],
        "perimeter_px": table["perimeter"],
        "eccentricity": table["eccentricity"],
        "solidity": table["solidity"],
        "mean_intensity": table["intensity_mean"],
        "max_intensity": table["intensity_max"],
        "touches_border": touches.astype(np.uint8),
    }
    if pixel_size is not None:
        columns["area_um2"] = table["area"] * pixel_size**2
        columns["equivalent_diameter_um"] = table["equivalent_diameter_area"] * pixel_size
        columns["perimeter_um"] = table["perimeter"] * pixel_size
    return columns


def summarize_image(labels: np.ndarray, areas: np.ndarray, pixel_size: float | None = None) -> dict:
    """The per-image summary: size, nucleus count, mean and median area (empty when there are no nuclei),
    and coverage, the fraction of the image's pixels that lie in a nucleus."""
    pixel_size = check_pixel_size(pixel_size)
    height, width = np.shape(labels)
    areas = np.asarray(areas, dtype=np.float64)
    mean, median = (float(areas.mean()), float(np.median(areas))) if areas.size else (None, None)
    row = {
        "width": width,
        "height": height,
        "count": int(areas.size),
        "mean_area_px": mean,
        "median_area_px": median,
        "coverage": float(np.count_nonzero(labels)) / max(height * width, 1),
    }
    if pixel_size is not None:
        row["mean_area_um2"] = None if mean is None else mean * pixel_size**2
        row["median_area_um2"] = None if median is None else median * pixel_size**2
    return row


def _format(value) -> str:
    """A CSV cell: whole numbers without a decimal point, others to 4 decimals, missing values empty."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.4f}"


class Measurements:
    """The measurements of a set of predicted images, collected one image (or plane) at a time, then
    written.

    Each image may have its own pixel size, with where it came from (the file's metadata, or the one
    given to the constructor, which ``Predict_mask.py --pixel-size`` sets); the micrometre columns and
    the pixel size columns appear when any image has one, empty for those without.  A plane column
    appears when any image is a plane of a stack.  Only the rows are kept, never the images, so a large
    folder costs a few numbers per nucleus."""

    def __init__(self, pixel_size: float | None = None):
        self.pixel_size = check_pixel_size(pixel_size)
        self.nuclei: list[dict[str, str]] = []
        self.images: list[dict[str, str]] = []
        self.counts: dict[str, int] = {}
        self.areas_px: list[float] = []  # every nucleus's area in pixels ...
        self.areas_um2: list[float] = []  # ... and in um^2 (NaN without a pixel size)
        self.names: dict[str, None] = {}  # the images measured, in order (a stack once)

    @property
    def has_planes(self) -> bool:
        return any("plane" in row for row in self.images)

    @property
    def has_pixel_size(self) -> bool:
        return any(row["pixel_size_um"] for row in self.images)

    def add(
        self,
        name: str,
        labels: np.ndarray,
        intensity: np.ndarray,
        plane: int | None = None,
        pixel_size: float | None = None,
        source: str = "",
    ) -> int:
        """Measure one image's nuclei (``labels``) on its grey values (``intensity``); returns the count.
        ``plane`` numbers the plane of a stack (from 0, as the pages of its label TIFF); ``pixel_size``
        (micrometres per pixel) is this image's, found in ``source``; None: the constructor's."""
        if pixel_size is None and self.pixel_size is not None:
            pixel_size, source = self.pixel_size, source or "given"
        pixel_size = check_pixel_size(pixel_size)
        columns = measure_nuclei(labels, intensity, pixel_size)
        first = {"image": name, **({"plane": str(plane)} if plane is not None else {})}
        for index in range(len(columns["label"])):
            self.nuclei.append({**first, **{c: _format(v[index]) for c, v in columns.items()}})
        summary = summarize_image(labels, columns["area_px"], pixel_size)
        self.images.append(
            {
                **first,
                **{c: _format(v) for c, v in summary.items()},
                "pixel_size_um": f"{pixel_size:.6g}" if pixel_size else "",
                "pixel_size_from": source if pixel_size else "",
            }
        )
        self.counts[name if plane is None else f"{name} [{plane}]"] = summary["count"]
        self.names[name] = None
        self.areas_px.extend(columns["area_px"].tolist())
        self.areas_um2.extend(columns["area_um2"].tolist() if pixel_size else [math.nan] * summary["count"])
        return summary["count"]

    def add_file(self, name: str, labels: np.ndarray, image_path) -> int:
        """Measure one image's nuclei on the grey values of its file, at the file's own bit depth."""
        intensity = read_grey(image_path)
        if intensity.shape != np.shape(labels):
            raise DataError(
                f"{image_path}: the file is {intensity.shape[1]}x{intensity.shape[0]} but its "
                f"labels are {np.shape(labels)[1]}x{np.shape(labels)[0]}"
            )
        return self.add(name, labels, intensity)

    def columns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The columns of nuclei.csv and of images.csv for what was measured."""
        first = ("image", "plane") if self.has_planes else ("image",)
        nuclei = first + NUCLEUS_COLUMNS[1:] + (NUCLEUS_UM_COLUMNS if self.has_pixel_size else ())
        images = first + IMAGE_COLUMNS[1:] + (IMAGE_UM_COLUMNS + PIXEL_SIZE_COLUMNS if self.has_pixel_size else ())
        return nuclei, images

    def write(self, out_dir, overwrite: bool = False) -> list[Path]:
        """Write ``nuclei.csv``, ``images.csv`` and, for more than one image or plane, ``summary.png``
        into ``out_dir``; returns the paths written.  Raises FileExistsError, before writing anything,
        when one exists and ``overwrite`` is off."""
        from unet_nuclei import plots  # matplotlib only when a figure is drawn

        paths = output_paths(out_dir, len(self.images))
        files.refuse_existing(paths, overwrite)
        nucleus_columns, image_columns = self.columns()
        files.write_csv(
            paths[0], [nucleus_columns, *([r.get(c, "") for c in nucleus_columns] for r in self.nuclei)], overwrite
        )
        files.write_csv(
            paths[1], [image_columns, *([r.get(c, "") for c in image_columns] for r in self.images)], overwrite
        )
        if len(paths) > 2:
            # Areas in um^2 only when every image has a pixel size: one histogram holds one unit.
            in_um = all(row["pixel_size_um"] for row in self.images)
            figure = plots.measurement_summary(
                self.counts, self.areas_um2 if in_um else self.areas_px, area_unit="um^2" if in_um else "px"
            )
            files.write_with(paths[2], lambda temporary: plots.save(figure, temporary, dpi=80), overwrite)
        return paths


def output_paths(out_dir, images: int) -> list[Path]:
    """The measurement files for ``images`` measured images: the figure only when there are several."""
    out_dir = Path(out_dir)
    names = (NUCLEI_FILE, IMAGES_FILE) + ((SUMMARY_FILE,) if images > 1 else ())
    return [out_dir / name for name in names]

"""Per-nucleus measurements, and the files a biologist opens next (Fiji, napari, a spreadsheet).

``Measurements`` collects one row per predicted nucleus (centroid, area, equivalent diameter, perimeter,
eccentricity, solidity, mean and max intensity, whether it touches the image border) and one summary row
per image (count, mean and median area, coverage), and writes them as ``nuclei.csv`` and ``images.csv``,
with ``summary.png`` (counts per image and the area histogram) when more than one image was measured.
The shape and intensity measurements are scikit-image's ``regionprops_table``.  ``write_label_tiff``
writes an instance label image as a TIFF that Fiji and napari open as labels, with its pixel size.

Intensities are grey values in the input file's own units: a 16-bit image is measured in 0-65535 and a
12-bit camera's image in 0-4095, not in the 8-bit copy that the model sees.  A colour image becomes grey
as the unweighted mean of its red, green and blue channels (what Fiji's "8-bit" conversion does by
default), so an 8-bit RGB image is measured in 0-255; an alpha channel is ignored.

Every file is written whole or not at all (a temporary file in the same folder, then a rename), and no
existing file is replaced unless ``overwrite`` is set.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from skimage import measure as skmeasure

from unet_model_core import DataError
from unet_nuclei import files

NUCLEI_FILE = "nuclei.csv"
IMAGES_FILE = "images.csv"
SUMMARY_FILE = "summary.png"

# What regionprops_table computes for each nucleus, and the column each property becomes.  "centroid"
# and "bbox" expand to numbered columns (centroid-0 is the row, y; centroid-1 the column, x).
_PROPERTIES = ("label", "centroid", "bbox", "area", "equivalent_diameter_area", "perimeter", "eccentricity",
               "solidity", "intensity_mean", "intensity_max")
NUCLEUS_COLUMNS = ("image", "label", "centroid_y", "centroid_x", "area_px", "equivalent_diameter_px",
                   "perimeter_px", "eccentricity", "solidity", "mean_intensity", "max_intensity",
                   "touches_border")
NUCLEUS_UM_COLUMNS = ("area_um2", "equivalent_diameter_um", "perimeter_um")
IMAGE_COLUMNS = ("image", "width", "height", "count", "mean_area_px", "median_area_px", "coverage")
IMAGE_UM_COLUMNS = ("mean_area_um2", "median_area_um2")


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
    """Read an image file at its own bit depth as H x W grey values (see ``to_grey``).

    It is decoded the way the prediction decodes it (OpenCV, unchanged), so its size is the size of the
    predicted labels; only the conversion to 8 bits is left out."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise DataError(f"{path}: file not found")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{path}: not an image that OpenCV can decode (corrupt, empty or another format)")
    return to_grey(image, str(path))


def _check_pixel_size(pixel_size) -> float | None:
    if pixel_size is None:
        return None
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel size must be a positive number of micrometres, got {pixel_size}")
    return float(pixel_size)


def measure_nuclei(labels: np.ndarray, intensity: np.ndarray, pixel_size: float | None = None) -> dict:
    """One value per nucleus for each of ``NUCLEUS_COLUMNS`` (but "image"), and, with ``pixel_size`` (in
    micrometres per pixel), each of ``NUCLEUS_UM_COLUMNS``: a dict of equal-length arrays in label order.

    ``labels`` is an instance label image (0 = background); ``intensity`` the grey image of the same
    height and width.  A nucleus touches the border when any of its pixels lies in the first or last row
    or column, so its area and shape are those of the part inside the image."""
    pixel_size = _check_pixel_size(pixel_size)
    labels = np.asarray(labels)
    intensity = np.asarray(intensity)
    if labels.shape != intensity.shape:
        raise ValueError(f"labels are {labels.shape} but the intensity image is {intensity.shape}; "
                         f"they must have the same height and width")
    # regionprops wants integer labels; a 16-bit label PNG arrives as uint16 and that is fine as it is.
    table = skmeasure.regionprops_table(labels.astype(np.int64, copy=False), intensity, properties=_PROPERTIES)
    height, width = labels.shape
    touches = ((table["bbox-0"] == 0) | (table["bbox-1"] == 0) | (table["bbox-2"] == height)
               | (table["bbox-3"] == width))
    columns = {
        "label": table["label"], "centroid_y": table["centroid-0"], "centroid_x": table["centroid-1"],
        "area_px": table["area"], "equivalent_diameter_px": table["equivalent_diameter_area"],
        "perimeter_px": table["perimeter"], "eccentricity": table["eccentricity"],
        "solidity": table["solidity"], "mean_intensity": table["intensity_mean"],
        "max_intensity": table["intensity_max"], "touches_border": touches.astype(np.uint8),
    }
    if pixel_size is not None:
        columns["area_um2"] = table["area"] * pixel_size ** 2
        columns["equivalent_diameter_um"] = table["equivalent_diameter_area"] * pixel_size
        columns["perimeter_um"] = table["perimeter"] * pixel_size
    return columns


def summarize_image(labels: np.ndarray, areas: np.ndarray, pixel_size: float | None = None) -> dict:
    """The per-image summary: size, nucleus count, mean and median area (empty when there are no nuclei),
    and coverage, the fraction of the image's pixels that lie in a nucleus."""
    pixel_size = _check_pixel_size(pixel_size)
    height, width = np.shape(labels)
    areas = np.asarray(areas, dtype=np.float64)
    mean, median = (float(areas.mean()), float(np.median(areas))) if areas.size else (None, None)
    row = {"width": width, "height": height, "count": int(areas.size), "mean_area_px": mean,
           "median_area_px": median, "coverage": float(np.count_nonzero(labels)) / max(height * width, 1)}
    if pixel_size is not None:
        row["mean_area_um2"] = None if mean is None else mean * pixel_size ** 2
        row["median_area_um2"] = None if median is None else median * pixel_size ** 2
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
    """The measurements of a set of predicted images, collected one image at a time, then written.

    Only the rows are kept, never the images, so a large folder costs a few numbers per nucleus."""

    def __init__(self, pixel_size: float | None = None):
        self.pixel_size = _check_pixel_size(pixel_size)
        self.nucleus_columns = NUCLEUS_COLUMNS + (NUCLEUS_UM_COLUMNS if self.pixel_size else ())
        self.image_columns = IMAGE_COLUMNS + (IMAGE_UM_COLUMNS if self.pixel_size else ())
        self.nuclei: list[list[str]] = []
        self.images: list[list[str]] = []
        self.counts: dict[str, int] = {}
        self.areas: list[float] = []  # every nucleus's area, in um^2 with a pixel size, else in pixels

    def add(self, name: str, labels: np.ndarray, intensity: np.ndarray) -> int:
        """Measure one image's nuclei (``labels``) on its grey values (``intensity``); returns the count."""
        columns = measure_nuclei(labels, intensity, self.pixel_size)
        names = self.nucleus_columns[1:]
        for index in range(len(columns["label"])):
            self.nuclei.append([name, *(_format(columns[c][index]) for c in names)])
        summary = summarize_image(labels, columns["area_px"], self.pixel_size)
        self.images.append([name, *(_format(summary[c]) for c in self.image_columns[1:])])
        self.counts[name] = summary["count"]
        self.areas.extend(columns["area_um2" if self.pixel_size else "area_px"].tolist())
        return summary["count"]

    def add_file(self, name: str, labels: np.ndarray, image_path) -> int:
        """Measure one image's nuclei on the grey values of its file, at the file's own bit depth."""
        intensity = read_grey(image_path)
        if intensity.shape != np.shape(labels):
            raise DataError(f"{image_path}: the file is {intensity.shape[1]}x{intensity.shape[0]} but its "
                            f"labels are {np.shape(labels)[1]}x{np.shape(labels)[0]}")
        return self.add(name, labels, intensity)

    def write(self, out_dir, overwrite: bool = False) -> list[Path]:
        """Write ``nuclei.csv``, ``images.csv`` and, for more than one image, ``summary.png`` into
        ``out_dir``; returns the paths written.  Raises FileExistsError, before writing anything, when
        one exists and ``overwrite`` is off."""
        from unet_nuclei import plots  # matplotlib only when a figure is drawn

        paths = output_paths(out_dir, len(self.images))
        files.refuse_existing(paths, overwrite)
        files.write_csv(paths[0], [self.nucleus_columns, *self.nuclei], overwrite)
        files.write_csv(paths[1], [self.image_columns, *self.images], overwrite)
        if len(paths) > 2:
            unit = "um^2" if self.pixel_size else "px"
            figure = plots.measurement_summary(self.counts, self.areas, area_unit=unit)
            files.write_with(paths[2], lambda temporary: plots.save(figure, temporary, dpi=80), overwrite)
        return paths


def output_paths(out_dir, images: int) -> list[Path]:
    """The measurement files for ``images`` measured images: the figure only when there are several."""
    out_dir = Path(out_dir)
    names = (NUCLEI_FILE, IMAGES_FILE) + ((SUMMARY_FILE,) if images > 1 else ())
    return [out_dir / name for name in names]


def write_label_tiff(path, labels: np.ndarray, pixel_size: float | None = None, overwrite: bool = False) -> Path:
    """Write instance labels as a TIFF that Fiji and napari open as they are, written whole.

    Up to 65,535 nuclei it is an ImageJ-flavoured 16-bit TIFF (Fiji reads its pixel size in micrometres);
    beyond that a plain 32-bit TIFF, which ImageJ's own format cannot hold, so that no label wraps
    around.  With ``pixel_size`` the resolution tags carry the micrometres per pixel."""
    import tifffile  # only when a TIFF is asked for

    pixel_size = _check_pixel_size(pixel_size)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("instance labels must not be negative")
    peak = int(labels.max()) if labels.size else 0

    def write(temporary: Path) -> None:
        if peak <= np.iinfo(np.uint16).max:
            options = {"imagej": True}
            if pixel_size is not None:
                options.update(resolution=(1 / pixel_size, 1 / pixel_size), metadata={"unit": "um"})
            tifffile.imwrite(temporary, labels.astype(np.uint16), **options)
        else:
            options = {}
            if pixel_size is not None:  # pixels per centimetre: the finest unit plain TIFF has
                options.update(resolution=(1e4 / pixel_size, 1e4 / pixel_size), resolutionunit="CENTIMETER")
            tifffile.imwrite(temporary, labels.astype(np.uint32), **options)

    return files.write_with(path, write, overwrite)

"""Microscope files as prediction reads them: the planes to segment, and the size of a pixel.

``open_image`` decodes a file (``unet_model_core.decode_image``: every page of a TIFF with its axes,
other formats with OpenCV), keeps the channel asked for (``choose_channel``) and returns an
``ImageFile``: the planes to segment in the file's own values (each plane of a z-stack, time series or
hyperstack, or with ``project="max"`` their maximum-intensity projection), the pixel size, and what was
done, in words.  Each plane becomes the model's 8-bit input as a 2-D image does (``to_rgb_uint8``), so a
plane of a stack and the same plane saved on its own give the same nuclei.

The pixel size comes from the file's metadata: OME-TIFF (``PhysicalSizeX`` and its unit), ImageJ (the
X resolution in the unit ImageJ records), or a plain TIFF's resolution tags in centimetres (or
millimetres or micrometres); a resolution in inches is a screen's or scanner's dots per inch, not a
microscope's, and is ignored.  A size the user gives wins over all of them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from unet_model_core import TIFF_EXTENSIONS, choose_channel, decode_image, describe_axes, to_rgb_uint8

PROJECTIONS = ("max",)
# Micrometres per unit, for the length units microscope software writes (lower case; ImageJ may write
# the micro sign escaped, "\u00B5m", or as the Greek letter mu).
UNITS_IN_UM = {
    "um": 1.0,
    "\u00b5m": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "m": 1e6,
    "\u00e5": 1e-4,
    "angstrom": 1e-4,
}
# TIFF's ResolutionUnit values that measure a microscope's pixel (tifffile's RESUNIT: 3 centimetre, and
# its non-standard 4 millimetre and 5 micrometre), in micrometres; 1 (none) and 2 (inch) are left out.
RESOLUTION_UNITS_IN_UM = {3: 1e4, 4: 1e3, 5: 1.0}
GIVEN = "--pixel-size"  # where a pixel size the user typed comes from


def _micrometres(unit) -> float | None:
    text = str(unit or "").strip().lower().replace("\\u00b5", "\u00b5").replace("\\u03bc", "\u03bc")
    return UNITS_IN_UM.get(text)


def _ome_pixel_size(xml: str) -> float | None:
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.split("}")[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    factor = _micrometres(pixels.get("PhysicalSizeXUnit", "\u00b5m"))  # the OME schema's default unit
    try:
        return float(pixels.get("PhysicalSizeX")) * factor if factor else None
    except ValueError:
        return None


def read_pixel_size(path) -> tuple[float | None, str]:
    """``(micrometres per pixel, where it was found)`` from a TIFF's metadata; ``(None, "")`` when the
    file records none (or is not a TIFF)."""
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        return None, ""
    try:
        with tifffile.TiffFile(path) as tiff:
            if tiff.is_ome and tiff.ome_metadata:
                return _checked(_ome_pixel_size(tiff.ome_metadata), "OME-TIFF metadata")
            tags = tiff.pages[0].tags
            resolution, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            numerator, denominator = resolution.value if resolution is not None else (0, 1)
            if not numerator:
                return None, ""
            per_pixel = denominator / numerator  # the file stores pixels per unit
            if tiff.is_imagej:
                factor = _micrometres((tiff.imagej_metadata or {}).get("unit"))
                return _checked(per_pixel * factor if factor else None, "ImageJ metadata")
            factor = RESOLUTION_UNITS_IN_UM.get(int(unit.value) if unit is not None else 2)
            return _checked(per_pixel * factor if factor else None, "TIFF resolution tags")
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, TypeError):
        return None, ""  # no readable metadata: the pixels may still be readable, by OpenCV


def _checked(size: float | None, source: str) -> tuple[float | None, str]:
    return (size, source) if size is not None and math.isfinite(size) and size > 0 else (None, "")


@dataclasses.dataclass
class ImageFile:
    """A file's planes to segment, in its own values, with its pixel size and what was done to read it."""

    path: Path
    planes: np.ndarray  # P x H x W, or P x H x W x S for colour (OpenCV's order: blue first)
    plane_axes: str = ""  # the axes the planes run along, tifffile's letters ("" for one 2-D image)
    plane_sizes: tuple[int, ...] = ()
    pixel_size: float | None = None  # micrometres per pixel
    pixel_size_source: str = ""  # GIVEN, or the metadata it was read from
    notes: tuple[str, ...] = ()  # what was done beyond reading one 2-D image: channel, planes, projection

    @property
    def is_stack(self) -> bool:
        """Whether the file's planes are segmented one by one (outputs are stacks, one page a plane)."""
        return bool(self.plane_axes)

    @property
    def height(self) -> int:
        return self.planes.shape[1]

    @property
    def width(self) -> int:
        return self.planes.shape[2]

    def __len__(self) -> int:
        return len(self.planes)

    def rgb(self, index: int = 0) -> np.ndarray:
        """Plane ``index`` as the model's H x W x 3 uint8 RGB image (stretched on its own values)."""
        name = f"{self.path}" + (f", plane {index}" if self.is_stack else "")
        return to_rgb_uint8(self.planes[index], name=name)

    def pixel_size_text(self) -> str:
        """ "pixel size 0.325 um (ImageJ metadata)", or "no pixel size" when none is known."""
        if self.pixel_size is None:
            return "no pixel size"
        return f"pixel size {self.pixel_size:.4g} um ({self.pixel_size_source})"


def open_image(
    path, channel: int | None = None, project: str | None = None, pixel_size: float | None = None
) -> ImageFile:
    """Read an image file for prediction: ``channel`` of a multi-channel file (0-based), every plane of
    a stack or, with ``project="max"``, the maximum-intensity projection along z (along all its planes
    when it has no z axis), and the pixel size: ``pixel_size`` when given, else the file's own.
    Raises DataError for a file that cannot be read or needs a channel."""
    if project is not None and project not in PROJECTIONS:
        raise ValueError(f"project must be one of {PROJECTIONS} or None, got {project!r}")
    path = Path(path)
    decoded = decode_image(path)
    chosen = choose_channel(decoded, channel, str(path))
    notes = []
    if decoded.other_series:
        notes.append(f"the file's first image series only ({decoded.other_series} more left out)")
    removed = "".join(a for a in decoded.axes if a not in chosen.axes)
    if removed:  # one channel of several was taken
        count = decoded.pixels.shape[decoded.axes.index(removed)]
        colours = ("grey", "alpha") if count == 2 else ("red", "green", "blue", "alpha")
        names = decoded.channel_names if removed == "C" else colours if removed == "S" else ()
        name = f" ('{names[channel]}')" if channel < len(names) and names[channel] else ""
        pages = "" if removed in "CS" else " (its pages taken as channels)"
        notes.append(f"channel {channel}{name} of {count}{pages}")
    pixels, plane_axes = chosen.pixels, chosen.plane_axes
    sizes = tuple(pixels.shape[: len(plane_axes)])
    if project == "max" and plane_axes:
        along = "Z" if "Z" in plane_axes else plane_axes
        axes = tuple(i for i, a in enumerate(plane_axes) if a in along)
        notes.append(f"maximum-intensity projection of its {describe_axes(along, [sizes[i] for i in axes])}")
        pixels = np.max(pixels, axis=axes)
        sizes = tuple(n for i, n in enumerate(sizes) if i not in axes)
        plane_axes = "".join(a for a in plane_axes if a not in along)
    if plane_axes:
        notes.append(f"{describe_axes(plane_axes, sizes)}, each segmented on its own")
    planes = pixels.reshape(int(np.prod(sizes)), *pixels.shape[len(sizes) :])
    source = GIVEN if pixel_size is not None else ""
    if pixel_size is None:
        pixel_size, source = read_pixel_size(path)
    return ImageFile(path, planes, plane_axes, sizes, pixel_size, source, tuple(notes))

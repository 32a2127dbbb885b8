"""The files a prediction is written as, besides the PNG mask and overlay: instance label images (16-bit
PNG, or a TIFF with its pixel size that Fiji and napari open as labels) and the DSB-2018 run-length rows
of a Kaggle submission.  The outline files for Fiji and QuPath are ``unet_nuclei.outlines``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unet_model_core import DataError
from unet_nuclei import files
from unet_nuclei.metrics import _as_label_image


def check_pixel_size(pixel_size) -> float | None:
    """A pixel size in micrometres as a float (None stays None); ValueError for anything else."""
    if pixel_size is None:
        return None
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel size must be a positive number of micrometres, got {pixel_size}")
    return float(pixel_size)


def write_label_tiff(
    path, labels: np.ndarray, pixel_size: float | None = None, overwrite: bool = False, axes: str | None = None
) -> Path:
    """Write instance labels (H x W, or a stack of planes, P x H x W, each numbered from 1 on its own)
    as a TIFF that Fiji and napari open as labels, written whole.

    Up to 65,535 nuclei in a plane it is an ImageJ-flavoured 16-bit TIFF (Fiji reads its pixel size in
    micrometres, and ``axes``, ImageJ's letters such as "ZYX", for a stack); beyond that a plain 32-bit
    TIFF, which ImageJ's own format cannot hold, so that no label wraps around.  With ``pixel_size`` the
    resolution tags carry the micrometres per pixel."""
    pixel_size = check_pixel_size(pixel_size)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("instance labels must not be negative")
    peak = int(labels.max()) if labels.size else 0
    dtype = np.uint16 if peak <= np.iinfo(np.uint16).max else np.uint32
    return files.write_tiff(path, labels.astype(dtype), overwrite, axes, pixel_size)


def write_label_png(path, labels: np.ndarray, overwrite: bool = False, name: str = "") -> Path:
    """Write instance labels as a 16-bit PNG, whole; DataError (before writing anything) when there are
    more nuclei than 16 bits hold, since label 65,536 would wrap round to 0 and merge nuclei."""
    labels = np.asarray(labels)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise DataError(f"{name or path}: {int(labels.max())} nuclei do not fit a 16-bit label PNG; use --labels tif")
    return files.write_png(path, labels.astype(np.uint16), overwrite)


def rle_rows(image_id: str, labels) -> list[tuple[str, str]]:
    """One ``(ImageId, EncodedPixels)`` row per instance of a label image, in increasing label order.

    EncodedPixels is the DSB-2018 run-length encoding: pixels numbered from 1, top to bottom and then
    left to right (column-major), written as ``"start length start length ..."``.  An image without
    instances gives a single row with empty EncodedPixels, as the Kaggle submission format wants.  All
    instances are encoded in one pass over the image rather than one pass each.
    """
    labels = _as_label_image(labels, "labels")
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    flat = labels.ravel(order="F")
    positions = np.flatnonzero(flat)
    if positions.size == 0:
        return [(image_id, "")]
    # A stable sort by label keeps each instance's pixels in column-major order.
    order = np.argsort(flat[positions], kind="stable")
    positions = positions[order]
    owner = flat[positions]
    # A run starts wherever the instance changes or the next pixel is not the following one.
    starts_run = np.ones(positions.size, bool)
    starts_run[1:] = (owner[1:] != owner[:-1]) | (positions[1:] != positions[:-1] + 1)
    run_first = np.flatnonzero(starts_run)
    run_lengths = np.diff(np.append(run_first, positions.size))
    run_starts = positions[run_first] + 1
    run_owner = owner[run_first]
    # Runs are grouped by instance already; split the run list where the owner changes.
    splits = np.flatnonzero(run_owner[1:] != run_owner[:-1]) + 1
    rows = []
    for starts, lengths in zip(np.split(run_starts, splits), np.split(run_lengths, splits)):
        pairs = np.column_stack((starts, lengths)).ravel()
        rows.append((image_id, " ".join(map(str, pairs.tolist()))))
    return rows

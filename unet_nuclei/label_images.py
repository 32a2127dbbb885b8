"""Label-image steps that stay lean on a large image: they work in place, in int32, and in pieces.

An 8000x8000 image has 64 million pixels, so each int64 or float64 copy of it is half a gigabyte.  The
helpers here give the same results as the plain NumPy and scikit-image calls they replace
(``np.bincount``, ``scipy.ndimage.mean``, ``skimage.segmentation.relabel_sequential``,
``skimage.segmentation.watershed``) without those copies; ``unet_nuclei.postprocess`` builds the nuclei with them.
"""

from __future__ import annotations

import numpy as np
from skimage import segmentation

COUNT_CHUNK = 1 << 20  # pixels per np.bincount call: it copies its input as int64, 8 bytes a pixel


def label_sizes(labels) -> np.ndarray:
    """Pixels per label of a non-negative integer label image: ``np.bincount(labels.ravel())``, counted a
    chunk of pixels at a time so that no int64 copy of the whole image is made."""
    flat = np.asarray(labels).reshape(-1)
    if flat.size and flat.dtype.kind != "u" and flat.min() < 0:  # unsigned labels need no scan for it
        raise ValueError(f"labels must be non-negative, got a minimum of {flat.min()}")
    sizes = np.zeros(int(flat.max(initial=0)) + 1, np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        counts = np.bincount(flat[start : start + COUNT_CHUNK])
        sizes[: counts.size] += counts
    return sizes


def label_means(labels, values, nan: float = 0.0) -> np.ndarray:
    """Mean of ``values`` (an H x W map, NaN read as ``nan``) over each label of an H x W label image,
    indexed by label (NaN for a label with no pixels), summed a band of rows at a time so that no
    float64 copy of the whole map is made."""
    labels, values = np.asarray(labels), np.asarray(values)
    count = int(labels.max(initial=0)) + 1
    sums, sizes = np.zeros(count), np.zeros(count)
    rows = max(1, COUNT_CHUNK // max(1, labels.shape[-1]))
    for top in range(0, labels.shape[0], rows):
        band = labels[top : top + rows].reshape(-1)
        weights = np.nan_to_num(values[top : top + rows].reshape(-1).astype(np.float64), nan=nan)
        sums += np.bincount(band, weights=weights, minlength=count)
        sizes += np.bincount(band, minlength=count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / sizes


def remove_labels(labels, which):
    """Set the instances whose entry in ``which`` (one bool per label, indexed by label) is True to
    background, in place, and return ``labels``; the background's own entry is ignored."""
    which = np.array(which, dtype=bool)
    which[0] = False
    if which.any():
        labels[which[labels]] = 0
    return labels


def remove_small(labels, min_size):
    """Set instances smaller than ``min_size`` pixels to background, in place, and return ``labels``."""
    return remove_labels(labels, label_sizes(labels) < min_size)


def relabel_sequential(labels) -> np.ndarray:
    """Renumber a label image's instances 1..N in label order in place: skimage's, without its sorted copy
    (and a chunk of pixels at a time, so the lookup makes no second image-sized array either)."""
    present = label_sizes(labels) > 0
    present[0] = False
    lookup = np.where(present, np.cumsum(present), 0).astype(labels.dtype)
    flat = labels.reshape(-1)  # a view: label images are made contiguous here
    for start in range(0, flat.size, COUNT_CHUNK):
        flat[start : start + COUNT_CHUNK] = lookup[flat[start : start + COUNT_CHUNK]]
    return labels


WATERSHED_BAND_ROWS = 256  # rows per watershed call: it makes float64 and int32 copies of what it is given
# Rows of context above and below a band that has to cut through nuclei (a dense tissue image, say, where
# no row is free of them): far more than a nucleus is tall, so the flooding inside the band is the
# whole image's unless one basin reaches further than this.
WATERSHED_HALO_ROWS = 256


def watershed_in_bands(
    peaks, markers, mask, band_rows=WATERSHED_BAND_ROWS, halo_rows=WATERSHED_HALO_ROWS
) -> np.ndarray:
    """``segmentation.watershed(-peaks, markers, mask=mask)`` (NaN peaks as 0) written over int32 ``markers``.

    The 4-connected flooding never leaves ``mask`` (which holds the markers), so a band of rows that no
    nucleus crosses floods as in the whole image, while the watershed's copies cover one band.  Bands end
    after about ``band_rows`` rows, at the first row boundary no vertical pair of ``mask`` pixels crosses.
    Where no such boundary comes within another ``band_rows`` rows, the band is cut there and flooded with
    ``halo_rows`` rows of the original markers above and below it, of which only the band's own rows are
    kept; that equals the whole image's flooding wherever no basin is taller than the halo, and keeps the
    memory bounded by the band on any mask."""
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1, got {band_rows}")
    if halo_rows < 0:
        raise ValueError(f"halo_rows must be >= 0, got {halo_rows}")
    mask = np.asarray(mask, dtype=bool)
    height, top = mask.shape[0], 0
    cut_ok = np.ones(height + 1, bool)
    cut_ok[1:height] = ~(mask[:-1] & mask[1:]).any(axis=1)
    above = markers[:0].copy()  # the original markers of the halo rows above the band
    while top < height:
        bottom = min(top + band_rows, height)
        limit = min(bottom + band_rows, height)
        while bottom < limit and not cut_ok[bottom]:
            bottom += 1
        halo_top = top - len(above) if not cut_ok[top] else top
        halo_bottom = bottom if cut_ok[bottom] else min(bottom + halo_rows, height)
        # The next band's halo above: the original markers of the last ``halo_rows`` rows before it.
        next_above = markers[:0]
        if not cut_ok[bottom] and halo_rows:
            next_above = np.concatenate([above, markers[top:bottom]])[-halo_rows:].copy()
        band = np.concatenate([above[len(above) - (top - halo_top) :], markers[top:halo_bottom]])
        # Without markers nothing floods.  The watershed makes its own float64 copy of the surface.
        if band.any():
            surface = np.negative(np.nan_to_num(peaks[halo_top:halo_bottom]))
            flooded = segmentation.watershed(surface, band, mask=mask[halo_top:halo_bottom])
            markers[top:bottom] = flooded[top - halo_top : bottom - halo_top]
        above, top = next_above, bottom
    return markers

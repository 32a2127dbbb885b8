"""Label-image steps that stay lean on a large image: they work in place, in int32, and in pieces.

An 8000x8000 image has 64 million pixels, so each int64 or float64 copy of it is half a gigabyte.  The
helpers here give the same results as the plain NumPy and scikit-image calls they replace
(``np.bincount``, ``skimage.segmentation.relabel_sequential``, ``skimage.segmentation.watershed``) without
those copies; ``unet_nuclei.instances`` builds the nuclei with them.
"""
from __future__ import annotations

import numpy as np
from skimage import segmentation

COUNT_CHUNK = 1 << 20  # pixels per np.bincount call: it copies its input as int64, 8 bytes a pixel


def label_sizes(labels) -> np.ndarray:
    """Pixels per label of a non-negative integer label image: ``np.bincount(labels.ravel())``, counted a
    chunk of pixels at a time so that no int64 copy of the whole image is made."""
    flat = np.asarray(labels).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError(f"labels must be non-negative, got a minimum of {flat.min()}")
    sizes = np.zeros(int(flat.max(initial=0)) + 1, np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        counts = np.bincount(flat[start:start + COUNT_CHUNK])
        sizes[:counts.size] += counts
    return sizes


def remove_small(labels, min_size):
    """Set instances smaller than ``min_size`` pixels to background, in place, and return ``labels``."""
    small = label_sizes(labels) < min_size
    small[0] = False
    if small.any():
        labels[small[labels]] = 0
    return labels


def relabel_sequential(labels) -> np.ndarray:
    """Renumber a label image's instances 1..N in label order in place: skimage's, without its sorted copy."""
    present = label_sizes(labels) > 0
    present[0] = False
    labels[...] = np.where(present, np.cumsum(present), 0).astype(labels.dtype)[labels]
    return labels


WATERSHED_BAND_ROWS = 512  # rows per watershed call: it makes float64 and int32 copies of what it is given


def watershed_in_bands(peaks, markers, mask, band_rows=WATERSHED_BAND_ROWS) -> np.ndarray:
    """``segmentation.watershed(-peaks, markers, mask=mask)`` (NaN peaks as 0) written over int32 ``markers``.

    The 4-connected flooding never leaves ``mask`` (which holds the markers), so a band of rows that no
    nucleus crosses floods as in the whole image, while the watershed's copies cover one band.  Bands end
    after about ``band_rows`` rows, at the first row boundary no vertical pair of ``mask`` pixels crosses."""
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1, got {band_rows}")
    mask = np.asarray(mask, dtype=bool)
    height, top = mask.shape[0], 0
    cut_ok = np.ones(height + 1, bool)
    cut_ok[1:height] = ~(mask[:-1] & mask[1:]).any(axis=1)
    while top < height:
        bottom = min(top + band_rows, height)
        while not cut_ok[bottom]:
            bottom += 1
        # Without markers nothing floods.  The watershed makes its own float64 copy of the surface.
        if markers[top:bottom].any():
            surface = np.negative(np.nan_to_num(peaks[top:bottom]))
            markers[top:bottom] = segmentation.watershed(surface, markers[top:bottom], mask=mask[top:bottom])
        top = bottom
    return markers

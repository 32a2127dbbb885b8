"""The project's figures: training curves, predictions beside their ground truth, and the summary of
the nuclei measured in a set of images; ``draw_outlines``, the nuclei's outlines drawn on an image (the
overlays that ``Predict_mask.py`` writes).

Every figure is a ``matplotlib.figure.Figure`` made without pyplot, so drawing one never touches
pyplot's global state or the backend: a notebook keeps showing its own figures inline after training
has saved these.  ``save`` writes a figure to a PNG; in a notebook, ``display(figure)`` shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import ndimage as ndi
from skimage import segmentation

from unet_nuclei import files

if TYPE_CHECKING:  # the figures read predictions; the segmenter that makes them is not needed to draw
    from unet_nuclei.segmenter import Prediction


def draw_outlines(image_rgb, labels_or_mask, color=(255, 255, 0), thickness=1) -> np.ndarray:
    """Copy of a HxWx3 uint8 RGB image with the outline of every instance drawn in ``color``.

    ``labels_or_mask`` is a label image or a binary mask of the same height and width.  A pixel is on an
    outline when it belongs to an instance and lies within ``thickness`` pixels (8-neighbourhood) of a
    pixel with another label or of the image edge, so touching nuclei get separate outlines and a
    binary mask gets the outlines of its connected components.  A HxW grayscale image is accepted and
    turned into RGB.  The input image is not modified.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_rgb must be HxWx3 (or HxW), got shape {image.shape}")
    labels = np.asarray(labels_or_mask)
    # A float 0/1 mask (or float labels) is common after thresholding; whole numbers are accepted as labels.
    if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.rint(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels_or_mask must be an integer or boolean image (or whole-numbered floats), got dtype {labels.dtype}"
        )
    if labels.shape != image.shape[:2]:
        raise ValueError(
            f"image_rgb has shape {image.shape} but labels_or_mask has shape {labels.shape}; "
            "their height and width must match"
        )
    color = tuple(int(c) for c in color)
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise ValueError(f"color must be three integers in 0..255, got {color!r}")
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"thickness must be a positive integer, got {thickness!r}")

    # A background frame makes instances cut by the image edge get a closed outline there.
    padded = np.pad(labels.astype(np.int64 if labels.dtype.itemsize > 4 else np.int32), 1)  # int32: less memory
    outline = segmentation.find_boundaries(padded, connectivity=2, mode="inner")[1:-1, 1:-1]
    if thickness > 1:
        outline = ndi.binary_dilation(outline, np.ones((3, 3), bool), iterations=int(thickness) - 1) & (labels != 0)
    result = image.copy()
    result[outline] = color
    return result


def save(figure: Figure, path, dpi: int = 100, overwrite: bool = True) -> Path:
    """Write ``figure`` as a PNG to ``path``, whole or not at all, and return the path."""
    return files.write_with(path, lambda temporary: figure.savefig(temporary, dpi=dpi, format="png"), overwrite)


def training_curves(history: dict) -> Figure:
    """Loss and Dice/IoU per epoch, training against validation (``history``: history.csv's columns)."""
    epochs = [e + 1 for e in history.get("epoch", [])]
    figure = Figure(figsize=(11, 4), layout="tight")
    loss_axes, score_axes = figure.subplots(1, 2)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        if key in history:
            loss_axes.plot(epochs, history[key], style, marker="o", label=key)
    for key, style in (("dice", "-"), ("val_dice", "--"), ("iou", "-"), ("val_iou", "--")):
        if key in history:
            score_axes.plot(epochs, history[key], style, marker="o", label=key)
    loss_axes.set(title="Loss", xlabel="epoch")
    score_axes.set(title="Dice and IoU (threshold 0.5)", xlabel="epoch", ylim=(0, 1))
    for axes in (loss_axes, score_axes):
        axes.grid(alpha=0.3)
        axes.legend()
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return figure


def prediction_grid(predictions: Sequence[Prediction], max_images: int = 6) -> Figure:
    """Image, ground truth (or the probability map when there is none) and predicted outlines with
    their scores, one row per prediction.  The predictions must still hold their arrays."""
    shown = list(predictions)[:max_images]
    figure = Figure(figsize=(12, 4 * len(shown)), layout="tight")
    for row, p in zip(figure.subplots(len(shown), 3, squeeze=False), shown):
        row[0].imshow(p.image)
        row[0].set_title(f"{p.name}  {p.width}x{p.height}")
        if p.truth_labels is not None:
            row[1].imshow(draw_outlines(p.image, p.truth_labels, color=(0, 255, 0)))
            row[1].set_title(f"ground truth: {p.scores.nuclei_true} nuclei")
        else:
            row[1].imshow(p.probability, cmap="magma", vmin=0, vmax=1)
            row[1].set_title("probability")
        row[2].imshow(draw_outlines(p.image, p.labels))
        title = f"prediction: {p.count} nuclei"
        if p.scores is not None:
            title += f"  Dice {p.scores.dice:.2f}  IoU {p.scores.iou:.2f}  DSB {p.scores.dsb_score:.2f}"
        row[2].set_title(title)
        for axes in row:
            axes.axis("off")
    return figure


def outline_pairs(predictions: Sequence[Prediction]) -> Figure:
    """Each input beside its predicted outlines and nuclei count, one row per prediction."""
    figure = Figure(figsize=(8, 4 * len(predictions)), layout="tight")
    for row, p in zip(figure.subplots(len(predictions), 2, squeeze=False), predictions):
        row[0].imshow(p.image)
        row[0].set_title(f"input {p.width}x{p.height}")
        row[1].imshow(draw_outlines(p.image, p.labels))
        row[1].set_title(f"predicted outlines: {p.count} nuclei")
        for axes in row:
            axes.axis("off")
    return figure


def measurement_summary(counts: Mapping[str, int], areas: Sequence[float], area_unit: str = "px") -> Figure:
    """The nuclei counted in each image (bars) and the areas of all nuclei together (histogram, with
    their median marked); ``area_unit`` labels the areas ("px" or "um^2")."""
    figure = Figure(figsize=(11, 4), layout="tight")
    count_axes, area_axes = figure.subplots(1, 2)
    names, values = list(counts), list(counts.values())
    count_axes.bar(range(len(names)), values, color="tab:blue")
    count_axes.set(title=f"Nuclei per image ({len(names)} images, {sum(values)} nuclei)", ylabel="nuclei")
    if len(names) <= 30:  # beyond that the names would overprint each other; the bars still show
        count_axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    else:
        count_axes.set_xlabel("image")
    count_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    unit = {"um^2": "µm²"}.get(area_unit, area_unit)
    areas = np.asarray(areas, dtype=np.float64)
    if areas.size:
        # The square root of the count is a common rule for the number of bins, kept between 10 and 60.
        bins = int(np.clip(np.sqrt(areas.size), 10, 60))
        smallest, largest = max(float(areas.min()), 1e-12), float(areas.max())
        if largest > 10 * smallest:
            # A few merged clumps can be many times the typical nucleus; on linear bins they would squeeze
            # every real nucleus into the first bar, so the bins and the axis are logarithmic instead.
            bins = np.geomspace(smallest, largest, bins + 1)
            area_axes.set_xscale("log")
        area_axes.hist(areas, bins=bins, color="tab:gray")
        median = float(np.median(areas))
        area_axes.axvline(median, color="tab:red", linestyle="--", label=f"median {median:.1f} {unit}")
        area_axes.legend()
    area_axes.set(title="Nucleus area", xlabel=f"area ({unit})", ylabel="nuclei")
    for axes in (count_axes, area_axes):
        axes.grid(alpha=0.3)
    return figure

"""Prediction on files: collect the images to predict, segment one input (``segmenter.Segmenter``) and
write its outputs, and the scores table.  This is what ``Predict_mask.py`` and the notebook call.

For each input ``<stem>.<ext>`` the outputs are ``<stem>_mask.png`` (uint8 0/255, the input's exact
height and width), ``<stem>_overlay.png`` (outlines on the image) and, on request, ``<stem>_labels.png``
or ``<stem>_labels.tif`` (16-bit instances).  A file of several planes (a z-stack, a time series; see
``unet_nuclei.image_files``) is segmented plane by plane, and its outputs are stacks with one page per
plane, in the file's order: ``<stem>_mask.tif``, ``<stem>_overlay.tif`` and ``<stem>_labels.tif`` (the
labels numbered from 1 in each plane).  No existing file is replaced unless ``overwrite`` is set, and
every file is written whole or not at all (``unet_nuclei.files``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from unet_model_core import (
    IMAGE_EXTENSIONS,
    DataError,
    Sample,
    find_samples,
    is_image_file,
    is_stray,
    mask_stem,
    read_image,
    read_instance_labels,
)
from unet_nuclei import files
from unet_nuclei.formats import write_label_png, write_label_tiff
from unet_nuclei.image_files import ImageFile, open_image
from unet_nuclei.metrics import SCORE_KEYS, mean_scores
from unet_nuclei.outlines import output_path as outline_path
from unet_nuclei.outlines import write_outlines
from unet_nuclei.plots import draw_outlines
from unet_nuclei.runs import validation_samples
from unet_nuclei.segmenter import Prediction, Segmenter

NOT_AN_IMAGE_REASON = "not an image file (skipped)"  # find_samples' reason for such a file in images/


@dataclasses.dataclass
class PredictionInput:
    """One image to predict, with its ground truth when known (masks files or a truth mask)."""

    name: str  # the output stem
    image_path: Path
    truth: Sample | None = None
    subfolder: str = ""  # where its outputs go under the output folder ("a/b"; "" for the folder itself)

    @property
    def label(self) -> str:
        """The input's name in messages and tables: its subfolder and output stem."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


@dataclasses.dataclass
class Inputs:
    """What ``collect_inputs`` found: the images to predict; problems (paths that do not exist, folders
    without an image); images in subfolders left out (``recursive`` off); and files passed over because
    their extension is not an image's."""

    items: list[PredictionInput] = dataclasses.field(default_factory=list)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left_out: list[Path] = dataclasses.field(default_factory=list)
    passed_over: list[Path] = dataclasses.field(default_factory=list)


def collect_inputs(paths: Sequence, truth_dir=None, recursive: bool = False, exclude: Sequence = ()) -> Inputs:
    """Expand image files and folders into the images to predict.

    A folder may be plain (its image files), in the DSB layout (``<id>/images/<id>.png``, with ``masks/``
    used as ground truth), or hold ``images/`` and ``masks/``; image files beside those layouts are
    predicted too.  Other subfolders are read the same way when ``recursive`` is set, their outputs going
    to the same subfolders of the output folder; otherwise their images are counted in ``left_out``.
    Files whose extension is not an image's are passed over; ``exclude`` (the output folder) is never
    read.  ``truth_dir`` adds ground truth by name: the DSB layout, ``images``/``masks`` pairs, or a flat
    folder of ``<stem>.png`` / ``<stem>_mask.png``.  A path that does not exist is a problem, not an
    exception."""
    found = Inputs()
    excluded = {Path(p).resolve() for p in exclude}
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.items.append(PredictionInput(path.stem, path))
        elif path.is_dir():
            before, left_before = len(found.items), len(found.left_out)
            _collect_folder(path, found, recursive, "", excluded)
            if len(found.items) == before:
                left = len(found.left_out) - left_before
                found.problems.append(
                    (
                        str(path),
                        "folder holds no image"
                        + (
                            f" of its own, and {left} in its subfolders: pass --recursive to predict those"
                            if left
                            else ""
                        ),
                    )
                )
        else:
            found.problems.append((str(path), "no such file or folder"))
    if truth_dir is not None:
        truth = _truth_index(Path(truth_dir))
        found.items = [dataclasses.replace(item, truth=truth.get(item.name, item.truth)) for item in found.items]
    # Two inputs with the same stem in one output folder would write the same files: number the later ones.
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(found.items):
        count = seen.get((item.subfolder, item.name), 0)
        seen[(item.subfolder, item.name)] = count + 1
        if count:
            found.items[index] = dataclasses.replace(item, name=f"{item.name}-{count + 1}")
    return found


def _collect_folder(folder: Path, found: Inputs, recursive: bool, subfolder: str, excluded: set) -> None:
    try:
        samples, skipped = find_samples(folder, require_masks=False)
    except DataError:
        samples, skipped = [], []
    if samples and samples[0].layout == "pairs":
        layout = {folder / "images", folder / "masks"}
    else:  # DSB sample folders: those with an images/ folder
        layout = {child for child in folder.iterdir() if child.is_dir() and (child / "images").is_dir()}
    found.items.extend(
        PredictionInput(s.sample_id, s.image_path, s if s.mask_paths else None, subfolder) for s in samples
    )
    for name, reason in skipped:
        if reason == NOT_AN_IMAGE_REASON:
            found.passed_over.append(folder / "images" / name)
        elif (folder / name) in layout:  # a sample folder whose images/ holds no image
            found.problems.append((str(folder / name), reason))
    for entry in sorted(folder.iterdir()):
        if is_stray(entry) or entry in layout or entry.resolve() in excluded:
            continue
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_EXTENSIONS:
                found.items.append(PredictionInput(entry.stem, entry, None, subfolder))
            else:
                found.passed_over.append(entry)
        elif entry.is_dir():
            inner = f"{subfolder}/{entry.name}" if subfolder else entry.name
            if recursive:
                _collect_folder(entry, found, True, inner, excluded)
            else:
                nested = Inputs()
                _collect_folder(entry, nested, True, inner, excluded)
                found.left_out.extend(item.image_path for item in nested.items)


def _truth_index(folder: Path) -> dict[str, Sample]:
    if not folder.is_dir():
        raise DataError(f"--truth {folder}: no such folder")
    try:
        samples, _ = find_samples(folder, require_masks=True)
        return {s.sample_id: s for s in samples}
    except DataError:
        index = {}
        for path in sorted(folder.iterdir()):
            if is_image_file(path):
                index[mask_stem(path)] = Sample(mask_stem(path), path, (path,), "pairs")
        if not index:
            raise DataError(
                f"--truth {folder}: no masks found (expected the DSB layout, images/ + masks/, "
                f"or files named <image stem>.png or <image stem>_mask.png)"
            ) from None
        return index


def truth_labels(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth instance labels of a PredictionInput's truth, checked against the image size."""
    return read_instance_labels(sample.mask_paths, shape, sample.layout).astype(np.int32)


def unique_path(path) -> Path:
    """``path`` if it is free, else the same name with -2, -3, ... (so nothing is overwritten)."""
    path = Path(path)
    candidate, index = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


def read_ahead(items: Sequence[PredictionInput], depth: int = 2, reader=read_image):
    """Yield ``(item, future)`` in order, ``future.result()`` being ``reader(item.image_path)`` (by
    default the decoded RGB image; ``image_files.open_image`` for every plane) or raising its DataError,
    while the next ``depth`` images decode in background threads: OpenCV and tifffile release the GIL,
    so a folder's decoding overlaps the model and the model does not wait for the disk between images."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        upcoming = iter(items)
        pending = collections.deque(
            (item, pool.submit(reader, item.image_path)) for item in itertools.islice(upcoming, depth + 1)
        )
        while pending:
            item, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(reader, following.image_path)))
            yield item, future


def output_paths(
    item: PredictionInput, out_dir, labels: bool | str = False, stack: bool = False, outlines: Sequence[str] = ()
) -> dict[str, Path]:
    """The files ``predict_input`` writes for ``item``: mask, overlay and, with ``labels`` ("png" or
    "tif"), labels; TIFF stacks for a file of several planes (``stack``), whatever ``labels`` says; and
    the outline files of ``outlines`` ("rois", "geojson")."""
    folder = Path(out_dir) / item.subfolder
    kind = "tif" if stack else "png"
    targets = {"mask": folder / f"{item.name}_mask.{kind}", "overlay": folder / f"{item.name}_overlay.{kind}"}
    if labels:
        targets["labels"] = folder / f"{item.name}_labels.{'tif' if stack else labels}"
    targets.update({kind: outline_path(folder, item.name, kind) for kind in outlines})
    return targets


def imagej_axes(plane_axes: str, plane_sizes: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """The shape and ImageJ axes of a stack's planes: its own time and z axes where ImageJ has them
    (T before Z), else one run of pages that ImageJ shows as slices ("Z")."""
    if plane_axes in ("Z", "T", "TZ"):
        return tuple(plane_sizes), plane_axes
    return (int(np.prod(plane_sizes)),), "Z"


def predict_input(
    segmenter: Segmenter,
    item: PredictionInput,
    out_dir,
    labels: bool | str = False,
    overwrite: bool = False,
    progress: bool = True,
    pixel_size: float | None = None,
    image: np.ndarray | ImageFile | None = None,
    outlines: Sequence[str] = (),
) -> list[Prediction]:
    """Segment one image file (``segmenter.segment``, plane by plane) and write ``<name>_mask.png`` (the
    union of the nuclei) and ``<name>_overlay.png`` into ``out_dir`` (in ``item.subfolder``); with
    ``labels`` (True or "png") also ``<name>_labels.png`` (16-bit), with ``labels="tif"``
    ``<name>_labels.tif`` instead (16-bit, 32-bit beyond 65,535 nuclei, with the pixel size in micrometres
    in its resolution tags: ``pixel_size``, else the file's own); ``outlines`` adds the outline files named
    (``"rois"``: ``<name>_rois.zip`` for Fiji, ``"geojson"``: ``<name>.geojson`` for QuPath;
    ``unet_nuclei.outlines``, one set per plane for a stack).  A file of several planes is predicted plane
    by plane and its outputs are TIFF stacks (``output_paths``); it is not scored.
    Returns one ``Prediction`` per plane (one for a 2-D image), scored when the input has ground truth.
    Raises DataError for an unreadable image or truth, FileExistsError before writing anything when an
    output exists and ``overwrite`` is off.  ``image`` is the file read ahead by the caller
    (``image_files.open_image``), or its decoded RGB image (``read_image``); None: read here."""
    label_format = "png" if labels is True else labels
    if label_format not in (False, None, "png", "tif"):
        raise ValueError(f"labels must be png or tif, got {labels!r}")
    image = open_image(item.image_path) if image is None else image
    planes = [image] if isinstance(image, np.ndarray) else None  # an RGB image decoded by the caller
    stack = planes is None and image.is_stack
    targets = output_paths(item, out_dir, label_format, stack, outlines)
    for path in targets.values():
        if path.resolve() == Path(item.image_path).resolve():
            raise FileExistsError(f"{path} is the input image itself; choose another --out")
        files.refuse_existing([path], overwrite)  # before the prediction, so a refused image costs nothing
    if planes is None and pixel_size is None:
        pixel_size = image.pixel_size
    predictions, overlays = [], []
    for index in range(1 if planes is not None else len(image)):
        rgb = planes[0] if planes is not None else image.rgb(index)
        truth = truth_labels(item.truth, rgb.shape[:2]) if item.truth is not None and not stack else None
        name = f"{item.name} [{index}]" if stack else item.name
        prediction = segmenter.segment(rgb, name, truth, progress)
        if stack:  # keep what the outputs need, not every plane's image and probabilities
            overlays.append(draw_outlines(rgb, prediction.labels))
            prediction = dataclasses.replace(prediction, image=None, probability=None)
        predictions.append(prediction)
    if stack:
        shape, axes = imagej_axes(image.plane_axes, image.plane_sizes)
        found = np.stack([p.labels for p in predictions]).reshape(*shape, image.height, image.width)
        outputs = {
            "mask": lambda path: files.write_tiff(
                path, (found > 0).astype(np.uint8) * 255, overwrite, f"{axes}YX", pixel_size
            ),
            "overlay": lambda path: files.write_tiff(
                path, np.stack(overlays).reshape(*found.shape, 3), overwrite, f"{axes}YXS", pixel_size
            ),
            "labels": lambda path: write_label_tiff(path, found, pixel_size, overwrite, f"{axes}YX"),
        }
    else:
        prediction = predictions[0]
        outputs = {
            "mask": lambda path: files.write_png(path, (prediction.labels > 0).astype(np.uint8) * 255, overwrite),
            "overlay": lambda path: files.write_png(path, draw_outlines(rgb, prediction.labels), overwrite),
            "labels": (lambda path: write_label_png(path, prediction.labels, overwrite, item.name))
            if label_format == "png"
            else (lambda path: write_label_tiff(path, prediction.labels, pixel_size, overwrite)),
        }
    # Outline files take the planes one after another, with their z and time point (a TZ stack too).
    planes_found = np.stack([p.labels for p in predictions]) if stack else predictions[0].labels
    plane_shape, plane_axes = imagej_axes(image.plane_axes, image.plane_sizes) if stack else (None, "Z")
    outputs.update(
        {
            kind: lambda path, kind=kind: write_outlines(
                kind, path, planes_found, pixel_size, overwrite, plane_axes, plane_shape
            )
            for kind in outlines
        }
    )
    written = []
    try:
        for kind, path in targets.items():
            outputs[kind](path)
            written.append(path)
    except BaseException:
        # All of an image's outputs or none: a mask without its overlay would make the next run skip
        # the image as done.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return predictions


def write_scores(predictions: Sequence[Prediction], path, overwrite: bool = True) -> dict:
    """Per-image Dice, IoU and DSB score of scored predictions, and their mean, as a CSV (whole or not at
    all; an existing file is refused unless ``overwrite``); returns the means."""
    means = mean_scores([p.scores for p in predictions])
    rows = [["image", "width", "height", "nuclei_true", "nuclei_pred", *SCORE_KEYS]]
    rows += [
        [p.name, p.width, p.height, p.scores.nuclei_true, p.count, *(f"{getattr(p.scores, k):.4f}" for k in SCORE_KEYS)]
        for p in predictions
    ]
    rows.append(["mean", "", "", "", "", *(f"{means[k]:.4f}" for k in SCORE_KEYS)])
    files.write_csv(path, rows, overwrite)
    return means


def validation_inputs(run_info: dict) -> tuple[list[PredictionInput], list[tuple[str, str]]]:
    """The validation images a run recorded, with their masks as ground truth, and the ids not found."""
    samples, problems = validation_samples(run_info)
    return [PredictionInput(s.sample_id, s.image_path, s) for s in samples], problems

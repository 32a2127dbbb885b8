"""Prediction on files: load a run, collect the images to predict, predict one input and write its
outputs, and the scores table.  This is what ``Predict_mask.py`` and the notebook call.

For each input ``<stem>.<ext>`` the outputs are ``<stem>_mask.png`` (uint8 0/255, the input's exact
height and width), ``<stem>_overlay.png`` (outlines on the image) and, on request, ``<stem>_labels.png``
or ``<stem>_labels.tif`` (16-bit instances).  No existing file is replaced unless ``overwrite`` is set, and
every file is written whole or not at all (``unet_nuclei.files``).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from tqdm.auto import tqdm

from unet_model_core import (NOT_A_SAMPLE_REASON, STRAY_REASON, Config, DataError, Sample, find_samples,
                             is_image_file, is_stray, mask_stem, read_image, read_instance_labels)
from unet_nuclei import files
from unet_nuclei.instances import SCORE_KEYS, PostProcessing, Prediction, draw_outlines, mean_scores
from unet_nuclei.measure import write_label_tiff
from unet_nuclei.outlines import output_path as outline_path
from unet_nuclei.outlines import write_outlines
from unet_nuclei.pretrained import resolve_model
from unet_nuclei.tiling import predict_at_nucleus_scale
from unet_nuclei.training import DEFAULT_RUNS_DIR, MODEL_FILE, read_run_config, validation_samples


class ModelError(ValueError):
    """A model file that cannot be used for prediction (unreadable, or not a U-Net of this project)."""


def load_run(run_or_file=None, runs_root=DEFAULT_RUNS_DIR) -> tuple[keras.Model, Config, dict, Path]:
    """Load a run's model and its config: a run name, folder or model file, or a shipped model's name;
    by default the newest run, else the shipped model (``pretrained.resolve_model``, whose reason for
    the choice is ``run_info["chosen_because"]``).

    Returns ``(model, config, run_info, run_dir)``; ``run_info`` is the whole config.json (threshold,
    validation ids, scores).  Architecture and preprocessing come from the run, never from flags.
    """
    target, why = resolve_model(run_or_file, runs_root)
    run_dir, model_path = (target.parent, target) if target.is_file() else (target, target / MODEL_FILE)
    config, info = read_run_config(run_dir)
    info["chosen_because"] = why
    model = load_unet(model_path)
    return model, config, info, run_dir


def load_unet(path) -> keras.Model:
    """Load a ``.keras`` file and check that it is a U-Net of this project (clear error otherwise)."""
    path = Path(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file; all mean "cannot use this file".
        if path.is_file():
            # Keras says "File not found" for any file that is not a readable .keras archive.
            raise ModelError(f"{path}: the file exists but is damaged or not a .keras model file "
                             f"({type(error).__name__}); train the run again, or pass --model with "
                             f"another run") from error
        raise ModelError(f"{path}: cannot be loaded as a Keras model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    names = {layer.name for layer in getattr(model, "layers", [])}
    if not {"rescale", "enc1_conv1", "probabilities"} <= names:
        raise ModelError(f"{path}: this Keras model is not a U-Net of this project (it lacks the "
                         f"'rescale', 'enc1_conv1' and 'probabilities' layers). Use a model.keras "
                         f"written by Train.py")
    return model


@dataclasses.dataclass
class PredictionInput:
    """One image to predict, with its ground truth when known (masks files or a truth mask)."""

    name: str  # the output stem
    image_path: Path
    truth: Sample | None = None


def collect_inputs(paths: Sequence, truth_dir=None) -> tuple[list[PredictionInput], list[tuple[str, str]]]:
    """Expand image files and folders into the images to predict.

    A folder may be plain (its image files), in the DSB layout (``<id>/images/<id>.png``, with ``masks/``
    used as ground truth), or hold ``images/`` and ``masks/``.  ``truth_dir`` adds ground truth by name:
    the DSB layout, ``images``/``masks`` pairs, or a flat folder of ``<stem>.png`` / ``<stem>_mask.png``.
    Returns ``(inputs, problems)``; paths that do not exist are problems, not exceptions."""
    inputs, problems = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            inputs.append(PredictionInput(path.stem, path))
        elif path.is_dir():
            try:
                samples, skipped = find_samples(path, require_masks=False)
                inputs.extend(PredictionInput(s.sample_id, s.image_path, s if s.mask_paths else None) for s in samples)
                problems.extend(p for p in skipped if p[1] not in (STRAY_REASON, NOT_A_SAMPLE_REASON))
            except DataError:
                files = [p for p in sorted(path.iterdir()) if p.is_file() and not is_stray(p)]
                if not files:
                    problems.append((str(path), "folder holds no image"))
                inputs.extend(PredictionInput(p.stem, p) for p in files)
        else:
            problems.append((str(path), "no such file or folder"))
    if truth_dir is not None:
        truth = _truth_index(Path(truth_dir))
        inputs = [dataclasses.replace(item, truth=truth.get(item.name, item.truth)) for item in inputs]
    # Two inputs with the same stem would write the same output files: number the later ones.
    seen: dict[str, int] = {}
    for index, item in enumerate(inputs):
        count = seen.get(item.name, 0)
        seen[item.name] = count + 1
        if count:
            inputs[index] = dataclasses.replace(item, name=f"{item.name}-{count + 1}")
    return inputs, problems


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
            raise DataError(f"--truth {folder}: no masks found (expected the DSB layout, images/ + masks/, "
                            f"or files named <image stem>.png or <image stem>_mask.png)") from None
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


def predict_image(model: keras.Model, config: Config, image: np.ndarray, name: str = "image",
                  truth: np.ndarray | None = None, tile_size: int | None = None, batch_size: int = 4,
                  tta: bool | None = None, progress: bool = True) -> Prediction:
    """Predict one decoded RGB image at full resolution and find its nuclei with the run's
    post-processing; scored when ``truth`` (instance labels) is given.  ``tta`` None: the run's setting."""
    height, width = image.shape[:2]
    bar = tqdm(desc=f"{name} tiles", unit="tile", leave=False, disable=not progress or height * width < 2**21)

    def on_progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    # Float16 probabilities halve the largest buffer of a large image; the nuclei are the same.
    output = predict_at_nucleus_scale(model, image, config, tile_size=tile_size, batch_size=batch_size,
                                      progress=on_progress, tta=config.tta if tta is None else tta, dtype=np.float16)
    bar.close()
    return Prediction.from_output(name, image, output, PostProcessing.of(config), truth)


def read_ahead(items: Sequence[PredictionInput], depth: int = 2):
    """Yield ``(item, future)`` in order, ``future.result()`` being the decoded image (or raising its
    DataError), while the next ``depth`` images decode in background threads: OpenCV releases the GIL,
    so a folder's decoding overlaps the model and the model does not wait for the disk between images."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        upcoming = iter(items)
        pending = collections.deque((item, pool.submit(read_image, item.image_path))
                                    for item in itertools.islice(upcoming, depth + 1))
        while pending:
            item, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read_image, following.image_path)))
            yield item, future


def predict_input(model: keras.Model, config: Config, item: PredictionInput, out_dir, labels: bool | str = False,
                  overwrite: bool = False, tile_size: int | None = None, batch_size: int = 4,
                  tta: bool | None = None, progress: bool = True, pixel_size: float | None = None,
                  image: np.ndarray | None = None, outlines: Sequence[str] = ()) -> Prediction:
    """Predict one image file and write ``<name>_mask.png`` (the union of the nuclei) and
    ``<name>_overlay.png`` into ``out_dir``; with ``labels`` (True or "png") also ``<name>_labels.png``
    (16-bit), with ``labels="tif"`` ``<name>_labels.tif`` instead (16-bit, 32-bit beyond 65,535 nuclei,
    with ``pixel_size`` in micrometres in its resolution tags); ``outlines`` adds the outline files named
    (``"rois"``: ``<name>_rois.zip`` for Fiji, ``"geojson"``: ``<name>.geojson`` for QuPath; ``unet_nuclei.outlines``).
    Returns the ``Prediction``, scored when the input has ground truth.  Raises DataError for an
    unreadable image or truth, FileExistsError before writing anything when an output exists and
    ``overwrite`` is off.  ``image`` is the decoded image when the caller read it ahead (``read_ahead``)."""
    out_dir = Path(out_dir)
    targets = {"mask": out_dir / f"{item.name}_mask.png", "overlay": out_dir / f"{item.name}_overlay.png"}
    label_format = "png" if labels is True else labels
    if label_format not in (False, None, "png", "tif"):
        raise ValueError(f"labels must be png or tif, got {labels!r}")
    if label_format:
        targets["labels"] = out_dir / f"{item.name}_labels.{label_format}"
    targets.update({kind: outline_path(out_dir, item.name, kind) for kind in outlines})
    for path in targets.values():
        if path.resolve() == Path(item.image_path).resolve():
            raise FileExistsError(f"{path} is the input image itself; choose another --out")
        files.refuse_existing([path], overwrite)  # before the prediction, so a refused image costs nothing
    image = read_image(item.image_path) if image is None else image
    truth = truth_labels(item.truth, image.shape[:2]) if item.truth is not None else None
    prediction = predict_image(model, config, image, item.name, truth, tile_size, batch_size, tta, progress)
    if label_format == "png" and prediction.labels.max(initial=0) > np.iinfo(np.uint16).max:
        # A 16-bit PNG would wrap label 65,536 round to 0 and merge nuclei; say so before writing anything.
        raise DataError(f"{item.name}: {prediction.count} nuclei do not fit a 16-bit label PNG; use --labels tif")
    outputs = {"mask": lambda path: files.write_png(path, (prediction.labels > 0).astype(np.uint8) * 255, overwrite),
               "overlay": lambda path: files.write_png(path, draw_outlines(image, prediction.labels), overwrite),
               "labels": (lambda path: files.write_png(path, prediction.labels.astype(np.uint16), overwrite))
               if label_format == "png" else
               (lambda path: write_label_tiff(path, prediction.labels, pixel_size, overwrite))}
    outputs.update({kind: lambda path, kind=kind: write_outlines(kind, path, prediction.labels, pixel_size, overwrite)
                    for kind in outlines})
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
    return prediction


def write_scores(predictions: Sequence[Prediction], path, overwrite: bool = True) -> dict:
    """Per-image Dice, IoU and DSB score of scored predictions, and their mean, as a CSV (whole or not at
    all; an existing file is refused unless ``overwrite``); returns the means."""
    means = mean_scores([p.scores for p in predictions])
    rows = [["image", "width", "height", "nuclei_true", "nuclei_pred", *SCORE_KEYS]]
    rows += [[p.name, p.width, p.height, p.scores.nuclei_true, p.count,
              *(f"{getattr(p.scores, k):.4f}" for k in SCORE_KEYS)] for p in predictions]
    rows.append(["mean", "", "", "", "", *(f"{means[k]:.4f}" for k in SCORE_KEYS)])
    files.write_csv(path, rows, overwrite)
    return means


def validation_inputs(run_info: dict) -> tuple[list[PredictionInput], list[tuple[str, str]]]:
    """The validation images a run recorded, with their masks as ground truth, and the ids not found."""
    samples, problems = validation_samples(run_info)
    return [PredictionInput(s.sample_id, s.image_path, s) for s in samples], problems

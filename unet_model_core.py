"""Everything reusable for the nucleus-segmentation U-Net: data, hyperparameters, blocks, the U-Net
builder, losses and metrics, training and inference.

The sections mirror the numbered sections of ``unet_model.ipynb`` so that a reader who knows one knows
where to look in the other:

    0. Required imports
    1. Data preprocessing (discovery, decoding, the tf.data pipeline, the built-in sample)
    2. Hyperparameters (the ``Config`` dataclass, the single source of truth)
    4. Convolutional blocks (``conv_block``, ``down_block``, ``bottleneck``, ``up_block``)
    5. The U-Net model (``build_unet``) and its losses and metrics
    6. Training (``train``) and the run directory
    7. Testing and inference (overlap-tile prediction, instances, scores, RLE, figures)

Importing this module does no work: it builds no model, touches no file and prints nothing.
"""

# =====================================================================================================
# 0. Required imports
# =====================================================================================================
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

# TensorFlow's C++ start-up chatter (CPU feature notes, oneDNN) hides what matters to users; keep its
# warnings and errors.  This must be set before TensorFlow is imported, and a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
from tqdm.auto import tqdm

import synthetic_nuclei

# The name under which the losses and metrics are registered with Keras' serialisation framework.
KERAS_PACKAGE = "unet_nuclei"

# Where the real Data Science Bowl 2018 training set is expected, and where the built-in synthetic
# sample is written when the real data is absent.  Both are relative to the working directory, the way
# users run the scripts from the repository root.
DEFAULT_DATA_DIR = os.path.join("dataset", "stage1_train")
DEFAULT_RUNS_DIR = "runs"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Files that operating systems and tools drop into folders.  They are skipped and listed in the report
# (so a user sees why a count is what it is), never read as samples.
STRAY_FILES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep", ".ipynb_checkpoints"}
# Reasons for skipped entries that are not damaged data (callers may leave them out of reports).
STRAY_REASON = "stray system file (skipped)"
NOT_A_SAMPLE_REASON = "not a sample folder (skipped)"


# =====================================================================================================
# 1. Data preprocessing
# =====================================================================================================
# Two layouts are understood:
#   * "dsb"   - the Data Science Bowl 2018 layout: <root>/<id>/images/<id>.png and <root>/<id>/masks/*.png,
#               one binary PNG per nucleus;
#   * "pairs" - <root>/images/<name>.<ext> and <root>/masks/<name>.<ext>, one binary mask per image, the
#               way people often keep their own annotated data.
# Decoding (reading every mask PNG and merging them) is the expensive part; it happens once, in parallel
# threads (OpenCV releases the GIL), and the decoded arrays are kept in memory for every epoch after.


class DataError(ValueError):
    """A dataset folder or file that cannot be used; the message says what and why, for the user."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Where one training sample lives on disk (nothing is read until ``load_samples``)."""

    sample_id: str
    image_path: Path
    mask_paths: tuple[Path, ...] = ()
    layout: str = "dsb"  # "dsb": one mask file per nucleus; "pairs": one binary mask for the image


@dataclasses.dataclass
class LoadedSample:
    """A decoded sample: the RGB image and its nuclei as an instance-label image (0 = background)."""

    sample_id: str
    image: np.ndarray  # H x W x 3 uint8, RGB
    labels: np.ndarray  # H x W uint16, 0 = background, 1..N = nuclei

    @property
    def mask(self) -> np.ndarray:
        """The union of the instance masks, H x W uint8 with values 0 or 1."""
        return (self.labels > 0).astype(np.uint8)


def _is_stray(path: Path) -> bool:
    # Hidden entries (".DS_Store", "._foo" AppleDouble files, ".ipynb_checkpoints") are never samples.
    return path.name.lower() in STRAY_FILES or path.name.startswith(".")


def _mask_stem(path: Path) -> str:
    """The image stem a mask file belongs to: ``a.png`` and ``a_mask.png`` both belong to image ``a``."""
    return path.stem[:-5] if path.stem.endswith("_mask") else path.stem


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not _is_stray(path)


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Bring an array as OpenCV decodes it (grey, BGR, BGRA, 8/16-bit or float) to H x W x 3 uint8 RGB.

    16-bit and float images are stretched by their maximum so that microscopes that use only 12 of
    the 16 bits still give a visible image; 8-bit images are kept exactly as they are.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (2, 3, 4)):
        raise DataError(f"{name}: unsupported image shape {image.shape}; expected grey, RGB or RGBA")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = image.astype(np.float32)
        peak = float(np.nanmax(image)) if image.size else 0.0
        if image.dtype.kind == "f" and peak <= 1.0:
            peak = 1.0  # Float images in [0, 1] are already normalised; keep their brightness.
        image = np.clip(np.nan_to_num(image) * (255.0 / max(peak, 1e-12)), 0, 255).round().astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 2:  # grey + alpha
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode(path: Path) -> np.ndarray:
    # np.fromfile + imdecode instead of imread: it copes with non-ASCII paths on every platform, and it
    # lets us tell "missing" from "not an image".
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{path}: not an image that OpenCV can decode (corrupt, empty or another format)")
    return image


def read_image(path) -> np.ndarray:
    """Read any image file (PNG, JPEG, TIFF, BMP; grey, RGB, RGBA, 16-bit) as H x W x 3 uint8 RGB."""
    return to_rgb_uint8(_decode(path), name=str(path))


def read_mask(path) -> np.ndarray:
    """Read a binary mask file as an H x W bool array.

    Masks saved as 0/1, 0/255, colour or slightly lossy (JPEG) all work: a pixel is foreground when it is
    brighter than half the mask's maximum (for 8-bit) or non-zero (for 16-bit label-like masks).
    """
    mask = _decode(path)
    if mask.ndim == 3:
        mask = mask[:, :, :3].max(axis=2) if mask.shape[2] >= 3 else mask[:, :, 0]
    if mask.dtype == np.uint8:
        return mask > (int(mask.max()) // 2)
    return mask > 0


def read_instance_labels(mask_paths: Sequence, shape: tuple[int, int], layout: str = "dsb") -> np.ndarray:
    """Merge one-mask-per-nucleus files into an H x W uint16 label image (or label a binary mask).

    For the "pairs" layout the single binary mask is split into its connected components, the best
    instance estimate there is without per-nucleus files.
    """
    labels = np.zeros(shape, dtype=np.uint16)
    if layout == "pairs":
        mask = read_mask(mask_paths[0])
        if mask.shape != tuple(shape):
            raise DataError(f"{mask_paths[0]}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{shape[1]}x{shape[0]}")
        count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        return components.astype(np.uint16)
    for index, path in enumerate(mask_paths, start=1):
        mask = read_mask(path)
        if mask.shape != tuple(shape):
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{shape[1]}x{shape[0]}")
        labels[mask] = index
    return labels


def find_samples(data_dir, require_masks: bool = True) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Discover the samples of a dataset folder without reading any image.

    Returns ``(samples, problems)`` where ``problems`` lists ``(id, reason)`` for everything skipped.
    Raises ``DataError`` when the folder does not exist or holds no usable sample.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    images_dir, masks_dir = root / "images", root / "masks"
    is_pairs = images_dir.is_dir() and not any(
        (child / "images").is_dir() for child in root.iterdir() if child.is_dir())
    if is_pairs:
        masks = {}
        if masks_dir.is_dir():
            for path in sorted(masks_dir.iterdir()):
                if _is_image_file(path):
                    masks.setdefault(_mask_stem(path), path)
        for path in sorted(images_dir.iterdir()):
            if _is_stray(path):
                problems.append((path.name, STRAY_REASON))
                continue
            if path.is_dir():
                continue
            if not _is_image_file(path):
                problems.append((path.name, "not an image file (skipped)"))
            elif path.stem in masks:
                samples.append(Sample(path.stem, path, (masks[path.stem],), "pairs"))
            elif require_masks:
                problems.append((path.stem, f"no mask named {path.stem}.* in {masks_dir}"))
            else:
                samples.append(Sample(path.stem, path, (), "pairs"))
    else:
        for child in sorted(root.iterdir()):
            if _is_stray(child):
                problems.append((child.name, STRAY_REASON))
                continue
            if not child.is_dir():
                problems.append((child.name, NOT_A_SAMPLE_REASON))
                continue
            image_dir = child / "images"
            candidates = sorted(p for p in image_dir.iterdir() if _is_image_file(p)) if image_dir.is_dir() else []
            preferred = [p for p in candidates if p.stem == child.name]
            if not candidates:
                problems.append((child.name, f"no image in {image_dir}"))
                continue
            image_path = (preferred or candidates)[0]
            mask_dir = child / "masks"
            mask_paths = tuple(sorted(p for p in mask_dir.iterdir() if _is_image_file(p))) if mask_dir.is_dir() else ()
            if require_masks and not mask_dir.is_dir():
                problems.append((child.name, "no masks/ folder"))
                continue
            if require_masks and not mask_paths:
                problems.append((child.name, "masks/ folder holds no mask image"))
                continue
            samples.append(Sample(child.name, image_path, mask_paths, "dsb"))
    if not samples:
        # Point at a real problem in the hint, not at a .DS_Store that happens to sort first.
        real = [p for p in problems if p[1] != STRAY_REASON] or problems
        raise DataError(
            f"no usable sample in {root}. Expected either the DSB-2018 layout "
            f"(<folder>/<id>/images/<id>.png with one PNG per nucleus in <folder>/<id>/masks/) or "
            f"<folder>/images/<name>.png with a matching binary mask <folder>/masks/<name>.png"
            + (f"; {len(problems)} entries were skipped, first: {real[0][0]}: {real[0][1]}" if problems else ""))
    return samples, problems


def _load_one(sample: Sample) -> LoadedSample:
    image = read_image(sample.image_path)
    if sample.mask_paths:
        labels = read_instance_labels(sample.mask_paths, image.shape[:2], sample.layout)
    else:
        labels = np.zeros(image.shape[:2], np.uint16)
    return LoadedSample(sample.sample_id, image, labels)


def load_samples(samples: Sequence[Sample], progress: bool = True, workers: int | None = None,
                 desc: str = "Decoding images and masks") -> tuple[list[LoadedSample], list[tuple[str, str]]]:
    """Decode images and merge their masks once, in parallel; bad samples are skipped and reported.

    Returns ``(loaded, problems)`` in the order of ``samples``.
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    loaded, problems = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_load_one, s) for s in samples]
        for sample, future in tqdm(zip(samples, futures), total=len(samples), desc=desc,
                                   disable=not progress, unit="img"):
            try:
                loaded.append(future.result())
            except DataError as error:
                problems.append((sample.sample_id, str(error)))
            except (OSError, cv2.error) as error:
                problems.append((sample.sample_id, f"could not be read: {error}"))
    return loaded, problems


def report_problems(problems: Sequence[tuple[str, str]], stream=None, limit: int = 20) -> None:
    """Print skipped samples, one line each (at most ``limit``), and their count."""
    stream = stream or sys.stderr
    if not problems:
        return
    print(f"Skipped {len(problems)} entr{'y' if len(problems) == 1 else 'ies'}:", file=stream)
    for sample_id, reason in problems[:limit]:
        print(f"  - {sample_id}: {reason}", file=stream)
    if len(problems) > limit:
        print(f"  ... and {len(problems) - limit} more", file=stream)


def split_ids(ids: Sequence[str], val_size: float = 0.1, seed: int = 42) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split: the same ids and seed always give the same split.

    ``val_size`` below 1 is a fraction of the samples, 1 or more a count.  Both parts are non-empty.
    """
    ids = sorted(ids)
    if len(ids) < 2:
        raise DataError(f"need at least 2 samples to hold some out for validation, found {len(ids)}")
    if val_size <= 0:
        raise ValueError(f"val_size must be positive (a fraction below 1 or a count), got {val_size}")
    n_val = int(round(val_size * len(ids))) if val_size < 1 else int(val_size)
    n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def pad_to_min_size(array: np.ndarray, size: int) -> np.ndarray:
    """Mirror-pad an image (or mask) at the bottom/right so both sides are at least ``size``."""
    pad_h, pad_w = max(0, size - array.shape[0]), max(0, size - array.shape[1])
    if not pad_h and not pad_w:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    # "symmetric" (edge pixel repeated) rather than "reflect": it also works for 1-pixel-wide inputs, and
    # numpy keeps reflecting when the pad is larger than the image.
    return np.pad(array, widths, mode="symmetric")


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an image to ``size`` (an int for a square, or (height, width)) with area/linear interpolation."""
    height, width = (size, size) if isinstance(size, int) else size
    shrinking = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a mask or label image with nearest-neighbour only, so it stays binary (labels stay labels)."""
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def _patch_arrays(samples: Sequence[LoadedSample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic validation patches: a grid of ``size`` windows covering every image."""
    images, masks = [], []
    for sample in samples:
        image, mask = pad_to_min_size(sample.image, size), pad_to_min_size(sample.mask, size)
        for top in tile_positions(image.shape[0], size, 0):
            for left in tile_positions(image.shape[1], size, 0):
                images.append(image[top:top + size, left:left + size])
                masks.append(mask[top:top + size, left:left + size])
    return np.stack(images), np.stack(masks)[..., None]


def _resized_arrays(samples: Sequence[LoadedSample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole images resized to ``size`` x ``size`` (the original DSB-starter way)."""
    images = np.stack([resize_image(s.image, size) for s in samples])
    masks = np.stack([resize_mask(s.mask, size) for s in samples])[..., None]
    return images, masks


class PatchSampler:
    """Draws random ``size`` x ``size`` patches (image, mask) from decoded images held in memory.

    Images are chosen with probability proportional to their area, so every pixel of the training set
    is about equally likely to be seen, and large images are not under-sampled.  Images smaller than a
    patch are mirror-padded once, up front.  Cropping is a NumPy slice, so drawing a patch costs
    microseconds beside a training step.
    """

    def __init__(self, samples: Sequence[LoadedSample], size: int, seed: int = 0):
        if not samples:
            raise DataError("no training samples to draw patches from")
        self.size = size
        self.images = [pad_to_min_size(s.image, size) for s in samples]
        self.masks = [pad_to_min_size(s.mask, size)[..., None] for s in samples]
        areas = np.array([s.image.shape[0] * s.image.shape[1] for s in samples], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.total_area = float(areas.sum())
        self.seed = seed

    def patches_per_epoch(self) -> int:
        """How many patches make one pass over the training pixels, on average."""
        return max(1, int(math.ceil(self.total_area / (self.size * self.size))))

    def __call__(self):
        # A fresh generator per call, seeded the same way, so a re-created dataset replays the same
        # patches; Keras iterates one endless stream across epochs.
        rng = np.random.default_rng(self.seed)
        size = self.size
        while True:
            index = rng.choice(len(self.images), p=self.weights)
            image, mask = self.images[index], self.masks[index]
            top = int(rng.integers(0, image.shape[0] - size + 1))
            left = int(rng.integers(0, image.shape[1] - size + 1))
            yield image[top:top + size, left:left + size], mask[top:top + size, left:left + size]


def augment_batch(images, masks, seed):
    """Paired random augmentation of a batch: the 8 flips/rotations, applied identically to image and
    mask, and intensity jitter (brightness, contrast, gamma, per-channel gain) on the image only.

    ``images`` are float32 in [0, 255]; ``seed`` is a shape-[2] int tensor, so the whole stream is
    reproducible.  Square patches only (rotation by 90 degrees is a transpose plus a flip).
    """
    batch = tf.shape(images)[0]
    draws = tf.random.stateless_uniform([batch, 8], seed=seed)

    def pick(flag, a, b):
        return tf.where(tf.reshape(flag, [-1, 1, 1, 1]), a, b)

    for column, transform in ((0, lambda t: tf.reverse(t, axis=[2])),  # left-right flip
                              (1, lambda t: tf.reverse(t, axis=[1])),  # up-down flip
                              (2, lambda t: tf.transpose(t, [0, 2, 1, 3]))):  # with flips: rotations
        flag = draws[:, column] < 0.5
        images, masks = pick(flag, transform(images), images), pick(flag, transform(masks), masks)

    # Intensity jitter: microscopes and stains vary, the nuclei's shapes do not.
    shape = [-1, 1, 1, 1]
    brightness = tf.reshape((draws[:, 3] - 0.5) * 0.2 * 255.0, shape)  # +-10% of full scale
    contrast = tf.reshape(0.75 + draws[:, 4] * 0.5, shape)  # 0.75 .. 1.25
    gamma = tf.reshape(tf.exp((draws[:, 5] - 0.5) * 0.6), shape)  # about 0.74 .. 1.35
    gain = 1.0 + (tf.random.stateless_uniform([batch, 1, 1, 3], seed=seed + 1) - 0.5) * 0.2
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * contrast + mean + brightness
    images = 255.0 * tf.pow(tf.clip_by_value(images / 255.0, 0.0, 1.0), gamma) * gain
    return tf.clip_by_value(images, 0.0, 255.0), masks


def _targets(masks, num_classes: int, crop: int):
    """Mask batch (uint8 0/1) -> the model's target: centre-cropped for unpadded models, one-hot for
    more than one class, float32 in every case."""
    if crop:
        masks = masks[:, crop:-crop, crop:-crop, :]
    if num_classes > 1:
        return tf.one_hot(tf.cast(masks[..., 0], tf.int32), num_classes, dtype=tf.float32)
    return tf.cast(masks, tf.float32)


def make_datasets(train_samples: Sequence[LoadedSample], val_samples: Sequence[LoadedSample],
                  config: "Config") -> tuple[tf.data.Dataset, tf.data.Dataset, int]:
    """Build the training and validation ``tf.data`` pipelines from decoded samples.

    Returns ``(train_ds, val_ds, steps_per_epoch)``.  The training set repeats forever (Keras is told
    how many steps make an epoch); patches are random, augmentation follows ``config.augment``.  The
    validation set is fixed: the same patches (or resized images) every epoch, never augmented.
    """
    size, batch = config.image_size, config.batch_size
    out_size = unet_output_size(size, len(config.channels) - 1, config.padding)
    crop = (size - out_size) // 2
    autotune = tf.data.AUTOTUNE
    image_spec = tf.TensorSpec([size, size, 3], tf.uint8)
    mask_spec = tf.TensorSpec([size, size, 1], tf.uint8)

    if config.sampling == "patch":
        sampler = PatchSampler(train_samples, size, seed=config.seed)
        train = tf.data.Dataset.from_generator(sampler, output_signature=(image_spec, mask_spec))
        steps = config.steps_per_epoch or max(1, math.ceil(sampler.patches_per_epoch() / batch))
        val_images, val_masks = _patch_arrays(val_samples, size)
    else:
        images, masks = _resized_arrays(train_samples, size)
        train = (tf.data.Dataset.from_tensor_slices((images, masks))
                 .shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True).repeat())
        steps = config.steps_per_epoch or max(1, math.ceil(len(images) / batch))
        val_images, val_masks = _resized_arrays(val_samples, size)

    def to_float(images, masks):
        # Masks become float here too: oneDNN has no fast uint8 kernels for the flips that follow.
        return tf.cast(images, tf.float32), tf.cast(masks, tf.float32)

    train = train.batch(batch, drop_remainder=True).map(to_float, num_parallel_calls=autotune)
    if config.augment:
        # A counter zipped in gives every batch its own stateless seed: reproducible, and safe with
        # parallel map calls.
        seeds = tf.data.Dataset.counter().map(lambda i: tf.stack([tf.cast(config.seed, tf.int64), i]))
        train = tf.data.Dataset.zip((train, seeds)).map(
            lambda pair, s: augment_batch(pair[0], pair[1], s), num_parallel_calls=autotune)
    classes = config.num_classes
    train = train.map(lambda x, y: (x, _targets(y, classes, crop)), num_parallel_calls=autotune)
    train = train.prefetch(autotune)

    val = (tf.data.Dataset.from_tensor_slices((val_images, val_masks)).batch(batch)
           .map(lambda x, y: (tf.cast(x, tf.float32), _targets(y, classes, crop)), num_parallel_calls=autotune)
           .cache().prefetch(autotune))
    return train, val, steps


def sample_dataset_dir(num_images: int = 64, seed: int = 0, root: str = "dataset") -> Path:
    """Where the built-in synthetic sample of that size and seed lives (one folder per setting, so a
    sample is never overwritten by another)."""
    return Path(root) / f"synthetic_sample_{num_images}img_seed{seed}"


def ensure_sample_dataset(num_images: int = 64, seed: int = 0, root: str = "dataset",
                          progress: bool = True) -> Path:
    """Return the built-in synthetic sample's folder, generating it on first use and reusing it after."""
    folder = sample_dataset_dir(num_images, seed, root)
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    synthetic_nuclei.write_synthetic_dataset(folder, num_images=num_images, seed=seed, progress=progress)
    return folder


def resolve_data_dir(data_dir: str | None, sample_images: int = 64, progress: bool = True) -> tuple[Path, str]:
    """Pick the training data: an explicit path (which must exist), else the real DSB folder when it is
    there, else the built-in synthetic sample.  Returns ``(folder, why)``, ``why`` being a sentence for
    the user."""
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data {data_dir}: no such folder. Give the folder that holds the sample "
                            f"folders (for DSB-2018: dataset/stage1_train), or leave --data out to use "
                            f"the built-in synthetic sample")
        return folder, f"using {folder} (given explicitly)"
    if Path(DEFAULT_DATA_DIR).is_dir():
        return Path(DEFAULT_DATA_DIR), f"using the real DSB-2018 data found in {DEFAULT_DATA_DIR}"
    folder = ensure_sample_dataset(sample_images, progress=progress)
    return folder, (f"using the built-in synthetic sample in {folder} ({DEFAULT_DATA_DIR} not found; "
                    f"see dataset.txt to get the real data)")


# =====================================================================================================
# 2. Hyperparameters
# =====================================================================================================
SAMPLING_MODES = ("patch", "resize")
PADDINGS = ("same", "valid")
LOSSES = ("bce", "dice", "bce+dice")


@dataclasses.dataclass
class Config:
    """Every hyperparameter in one place: the notebook, Train.py and Predict_mask.py start from these
    defaults, and each run saves the resolved values beside its model (``config.json``)."""

    # Data
    data_dir: str | None = None  # None: dataset/stage1_train if present, else the built-in synthetic sample
    sample_images: int = 64  # size of the built-in synthetic sample
    sampling: str = "patch"  # "patch": random crops at native scale; "resize": whole images resized
    image_size: int = 128  # patch side (or resize target), the model's training input size
    val_size: float = 0.1  # fraction (<1) or number (>=1) of images held out for validation
    augment: bool = True  # flips, rotations and intensity jitter on training batches
    # Model
    input_channels: int = 3
    num_classes: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # per level; the last is the bottleneck
    padding: str = "same"  # "same" keeps the size; "valid" is the unpadded original
    batch_norm: bool = False
    dropout: float = 0.0
    # Training
    epochs: int = 20
    batch_size: int = 8
    steps_per_epoch: int | None = None  # None: one pass over the training pixels per epoch
    learning_rate: float = 1e-3
    loss: str = "bce+dice"
    seed: int = 42
    mixed_precision: bool = False
    xla: bool = False
    # Inference
    threshold: float = 0.5  # replaced by the one chosen on validation at the end of training
    tile_overlap: int | None = None  # None: 1/8 of the output tile for padded models, 0 for unpadded
    min_nucleus_size: int = 15  # instances smaller than this many pixels are dropped

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least two positive counts (levels + bottleneck), got {self.channels}")
        for name in ("image_size", "batch_size", "epochs", "num_classes", "input_channels", "sample_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.val_size <= 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ValueError(f"val_size must be a fraction below 1 or a whole number of images, got {self.val_size}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer (or None), got {self.steps_per_epoch}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        # The size check gives the nearest sizes that work, so a user can fix the flag at once.
        check_input_size(self.image_size, len(self.channels) - 1, self.padding)

    @property
    def depth(self) -> int:
        """Number of pooling steps (levels below the input resolution)."""
        return len(self.channels) - 1

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Build a Config from a dict, ignoring keys that are not fields (a run's config.json also holds
        the validation ids and scores)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, path=None, **extra) -> str:
        text = json.dumps({**self.to_dict(), **extra}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text) -> "Config":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


# =====================================================================================================
# 4. Convolutional blocks
# =====================================================================================================
# Pure functions from tensors to tensors.  Every layer is named after its block ("enc1_conv1", ...), so
# the summary reads like the architecture and weights can be located by name.


def conv_block(x, filters: int, name: str, padding: str = "same", batch_norm: bool = False,
               dropout: float = 0.0):
    """Two 3x3 convolutions, each followed by ReLU (with optional batch norm before it), then optional
    dropout.  With ``padding="valid"`` each convolution trims one pixel per side."""
    for i in (1, 2):
        # A bias is redundant just before batch norm, which has its own shift.
        x = layers.Conv2D(filters, 3, padding=padding, use_bias=not batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def down_block(x, filters: int, name: str, padding: str = "same", batch_norm: bool = False,
               dropout: float = 0.0):
    """One contracting level: ``conv_block`` then 2x2 max pooling with stride 2.

    Returns ``(skip, pooled)``: the features kept for the skip connection and the half-size map."""
    skip = conv_block(x, filters, name, padding, batch_norm, dropout)
    pooled = layers.MaxPooling2D(pool_size=2, strides=2, name=f"{name}_pool")(skip)
    return skip, pooled


def bottleneck(x, filters: int, name: str = "bottleneck", padding: str = "same", batch_norm: bool = False,
               dropout: float = 0.0):
    """The lowest level: a ``conv_block`` with the most channels and no pooling."""
    return conv_block(x, filters, name, padding, batch_norm, dropout)


def up_block(x, skip, filters: int, name: str, padding: str = "same", batch_norm: bool = False,
             dropout: float = 0.0):
    """One expanding level: 2x upsampling, a 2x2 "up-convolution" to ``filters`` channels, concatenation
    with the contracting path's skip map (centre-cropped when the convolutions are unpadded), then a
    ``conv_block``."""
    x = layers.UpSampling2D(size=2, name=f"{name}_upsample")(x)
    # The up-convolution always pads ("same"), so upsampling exactly doubles the size, as in the paper.
    x = layers.Conv2D(filters, 2, padding="same", kernel_initializer="he_normal", name=f"{name}_upconv")(x)
    skip_h, skip_w = skip.shape[1], skip.shape[2]
    x_h, x_w = x.shape[1], x.shape[2]
    if padding == "valid" and skip_h is not None and (skip_h != x_h or skip_w != x_w):
        dh, dw = skip_h - x_h, skip_w - x_w
        skip = layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=f"{name}_crop")(skip)
    x = layers.Concatenate(axis=-1, name=f"{name}_concat")([skip, x])
    return conv_block(x, filters, name, padding, batch_norm, dropout)


# =====================================================================================================
# 5. The U-Net model
# =====================================================================================================


def unet_output_size(input_size: int, depth: int = 4, padding: str = "same") -> int | None:
    """The output side for an input side, or None when the input side cannot pass through the net.

    "same": the size must halve cleanly ``depth`` times.  "valid": each 3x3 convolution trims 2 pixels
    and every pooled map must have an even size (572 -> 388 for the paper's depth 4).
    """
    if padding == "same":
        return input_size if input_size % (2 ** depth) == 0 and input_size > 0 else None
    size = input_size
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4
    if size <= 0:
        return None
    for _ in range(depth):
        size = size * 2 - 4
    return size if size > 0 else None


def valid_input_sizes(depth: int = 4, padding: str = "same", low: int = 1, high: int = 1024) -> list[int]:
    """Every input side in ``[low, high]`` that the net accepts."""
    return [s for s in range(max(1, low), high + 1) if unet_output_size(s, depth, padding)]


def check_input_size(size: int | None, depth: int = 4, padding: str = "same") -> None:
    """Raise a ValueError naming the nearest working sizes when ``size`` does not fit the net."""
    if size is None:
        return
    if unet_output_size(size, depth, padding) is None:
        sizes = valid_input_sizes(depth, padding, 1, max(2 * size, 256))
        below = [s for s in sizes if s < size][-1:]
        above = [s for s in sizes if s > size][:1]
        nearest = " or ".join(str(s) for s in below + above) or "none below 1024"
        rule = (f"a multiple of {2 ** depth}" if padding == "same"
                else "a size whose maps stay even after each unpadded level")
        raise ValueError(f"input size {size} does not fit a depth-{depth} U-Net with padding='{padding}' "
                         f"(it needs {rule}); nearest sizes that work: {nearest}")


def build_unet(input_shape: tuple = (128, 128, 3), num_classes: int = 1,
               channels: Sequence[int] = (16, 32, 64, 128, 256), padding: str = "same",
               batch_norm: bool = False, dropout: float = 0.0, name: str = "unet") -> keras.Model:
    """Assemble the U-Net as a functional ``keras.Model``.

    ``input_shape`` is (height, width, channels); ``(None, None, C)`` gives a fully convolutional model for
    padded convolutions.  Inputs are raw pixel values in [0, 255]: the first layer rescales them, so the
    saved model carries its own preprocessing.  The output is a sigmoid for one class, a softmax for more,
    always float32 (also under mixed precision, for a stable loss).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    if len(channels) < 2:
        raise ValueError(f"channels needs at least two entries (levels + bottleneck), got {channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    height, width, _ = input_shape
    depth = len(channels) - 1
    if padding == "valid" and (height is None or width is None):
        raise ValueError("an unpadded (padding='valid') U-Net needs a fixed input size, for example "
                         "(572, 572, 1); it predicts large images tile by tile at that size")
    check_input_size(height, depth, padding)
    check_input_size(width, depth, padding)

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    skips = []
    for level, filters in enumerate(channels[:-1], start=1):
        skip, x = down_block(x, filters, f"enc{level}", padding, batch_norm, dropout)
        skips.append(skip)
    x = bottleneck(x, channels[-1], "bottleneck", padding, batch_norm, dropout)
    for level in range(depth, 0, -1):
        x = up_block(x, skips[level - 1], channels[level - 1], f"dec{level}", padding, batch_norm, dropout)
    x = layers.Conv2D(num_classes, 1, name="logits")(x)
    activation = "sigmoid" if num_classes == 1 else "softmax"
    outputs = layers.Activation(activation, dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def build_unet_from_config(config: Config, input_size: int | None = None) -> keras.Model:
    """The model a Config describes, at ``input_size`` (default: the training size)."""
    size = input_size or config.image_size
    return build_unet((size, size, config.input_channels), config.num_classes, config.channels,
                      config.padding, config.batch_norm, config.dropout)


# --- Losses and metrics -----------------------------------------------------------------------------
# The overlap math is written once (``_overlap``); Dice and IoU, the metrics, and the losses all derive
# from it.  Everything is registered, so a compiled model saved as .keras reloads without custom_objects
# in any program that imports this module.


def _overlap(y_true, y_pred):
    """Per-image intersection and sum of sizes, reduced over height, width and channels."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return intersection, total


def dice_coefficient(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice per image, averaged over the batch: (2|A.B| + s) / (|A| + |B| + s).

    ``smooth`` keeps two empty masks at 1 (not NaN) and steadies the gradient on near-empty images."""
    intersection, total = _overlap(y_true, y_pred)
    return ops.mean((2.0 * intersection + smooth) / (total + smooth))


def iou_coefficient(y_true, y_pred, smooth: float = 1.0):
    """Soft IoU (Jaccard) per image, averaged over the batch: (|A.B| + s) / (|A| + |B| - |A.B| + s)."""
    intersection, total = _overlap(y_true, y_pred)
    return ops.mean((intersection + smooth) / (total - intersection + smooth))


def _foreground(y_true, y_pred):
    """For metrics: binarised predictions; for a softmax output, drop the background channel."""
    y_pred = ops.cast(ops.greater(ops.cast(y_pred, "float32"), 0.5), "float32")
    if y_pred.shape[-1] is not None and y_pred.shape[-1] > 1:
        return y_true[..., 1:], y_pred[..., 1:]
    return y_true, y_pred


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
def dice(y_true, y_pred):
    """Dice of the thresholded (0.5) prediction: the metric shown during training."""
    return dice_coefficient(*_foreground(y_true, y_pred))


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
def iou(y_true, y_pred):
    """IoU of the thresholded (0.5) prediction: the metric shown during training."""
    return iou_coefficient(*_foreground(y_true, y_pred))


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class DiceLoss(keras.losses.Loss):
    """1 - soft Dice.  Trains on its own too (the original exploratory code could not)."""

    def __init__(self, smooth: float = 1.0, name: str = "dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        intersection, total = _overlap(y_true, y_pred)
        # Per image, so Keras' reduction averages over the batch (and across replicas correctly).
        return 1.0 - (2.0 * intersection + self.smooth) / (total + self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class BceDiceLoss(keras.losses.Loss):
    """Binary (or categorical, for a softmax output) cross-entropy plus Dice loss, each weighted.

    Cross-entropy gives well-calibrated pixel probabilities; Dice counters the imbalance between the
    few nucleus pixels and the much larger background."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 name: str = "bce_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        crossentropy = _pixel_crossentropy(y_true, y_pred)
        intersection, total = _overlap(y_true, y_pred)
        dice_loss = 1.0 - (2.0 * intersection + self.smooth) / (total + self.smooth)
        return self.bce_weight * crossentropy + self.dice_weight * dice_loss

    def get_config(self):
        return {**super().get_config(), "bce_weight": self.bce_weight, "dice_weight": self.dice_weight,
                "smooth": self.smooth}


def _pixel_crossentropy(y_true, y_pred):
    """Mean per-image cross-entropy: binary for one channel, categorical for several."""
    axes = tuple(range(1, len(y_pred.shape) - 1))
    if y_pred.shape[-1] == 1:
        return ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=axes)
    return ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred), axis=axes)


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class CrossEntropyLoss(keras.losses.Loss):
    """Plain pixel-wise cross-entropy (binary or categorical by the output's channels), per image."""

    def __init__(self, name: str = "bce_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _pixel_crossentropy(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32"))


def make_loss(name: str) -> keras.losses.Loss:
    """The loss for a Config's ``loss`` name: "bce", "dice" or "bce+dice"."""
    losses = {"bce": CrossEntropyLoss, "dice": DiceLoss, "bce+dice": BceDiceLoss}
    if name not in losses:
        raise ValueError(f"loss must be one of {tuple(losses)}, got {name!r}")
    return losses[name]()


def compile_unet(model: keras.Model, config: Config, jit_compile: bool | None = None) -> keras.Model:
    """Compile with Adam, the Config's loss, and the Dice/IoU metrics."""
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=make_loss(config.loss),
                  metrics=[dice, iou], jit_compile=config.xla if jit_compile is None else jit_compile)
    return model


# =====================================================================================================
# 6. Training the model
# =====================================================================================================
# A run directory holds everything a run produced (see DESIGN.md, "Run directory contract"):
#   model.keras   best checkpoint: float32, uncompiled, built-in layers only, so plain
#                 keras.saving.load_model(path) reads it in any program, with or without this module;
#   last.keras    the latest full training state (model + optimizer), for --resume;
#   state.json    the epoch reached and the best validation loss so far, for --resume;
#   config.json   resolved Config + validation ids + chosen threshold + sampling mode + scores;
#   history.csv, training_curves.png, val_predictions.png.
# runs/latest is a one-line text file naming the newest run's folder (a file, not a symlink, so it also
# works on Windows).

MODEL_FILE, LAST_FILE, STATE_FILE, CONFIG_FILE = "model.keras", "last.keras", "state.json", "config.json"
HISTORY_FILE, CURVES_FILE, VAL_FIGURE_FILE = "history.csv", "training_curves.png", "val_predictions.png"
LATEST_FILE = "latest"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (a NaN loss, a bad resume); the message says so."""


def quick_config(**overrides) -> Config:
    """Settings for smoke runs and tests: a tiny sample, a small model, one short epoch."""
    values = dict(sample_images=8, image_size=64, channels=(8, 16, 32), epochs=1, steps_per_epoch=3,
                  batch_size=4, val_size=2)
    values.update(overrides)
    return Config(**values)


def new_run_dir(runs_root=DEFAULT_RUNS_DIR, name: str | None = None) -> Path:
    """Create and return a fresh run folder; an existing one is never reused or overwritten."""
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    base = name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if base in (LATEST_FILE, ".", "..") or os.sep in base or (os.altsep and os.altsep in base):
        raise ValueError(f"run name {base!r} is not a plain folder name")
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        candidate = root / f"{base}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free run folder name for {base!r} in {root}")


def find_run(run_or_file=None, runs_root=DEFAULT_RUNS_DIR) -> Path:
    """The run folder for a run name, a run folder, a model file inside a run, or (None) the newest run.

    Raises FileNotFoundError with a message that says what to do when nothing is found.
    """
    root = Path(runs_root)
    if run_or_file is None:
        latest = root / LATEST_FILE
        if latest.is_file():
            candidate = root / latest.read_text().strip()
            if (candidate / MODEL_FILE).is_file():
                return candidate
        runs = sorted((p for p in root.glob("*") if (p / MODEL_FILE).is_file()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"no trained model found in {root}/. Run `python Train.py` first "
                                    f"(or pass --model RUN_FOLDER_OR_MODEL_FILE)")
        return runs[-1]
    path = Path(run_or_file)
    for candidate in (path, root / path):
        if candidate.is_file():
            return candidate.parent
        if candidate.is_dir() and ((candidate / MODEL_FILE).is_file() or (candidate / LAST_FILE).is_file()):
            return candidate
    raise FileNotFoundError(f"no run or model at {run_or_file!r} (looked for a model file, a run folder "
                            f"holding {MODEL_FILE}, and {root / path})")


def read_run_config(run_dir) -> tuple[Config, dict]:
    """The Config a run was trained with, and the whole config.json (ids, threshold, scores)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a complete run of this project")
    data = json.loads(path.read_text())
    return Config.from_dict(data), data


def configure_devices(cpu_devices: int = 0) -> None:
    """Split the CPU into ``cpu_devices`` logical devices (to exercise multi-device code without GPUs).

    Must run before TensorFlow creates its devices, i.e. before any op runs in the process."""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def get_strategy(cpu_devices: int = 0) -> tf.distribute.Strategy:
    """TensorFlow's own engine for scaling out.

    * ``TF_CONFIG`` set (several machines): MultiWorkerMirroredStrategy;
    * several GPUs on this machine: MirroredStrategy over all of them;
    * ``cpu_devices`` > 1 logical CPUs (tests, demos): MirroredStrategy over those;
    * otherwise the default (single-device) strategy.
    """
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if cpu_devices > 1 and len(cpus) > 1:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus[:cpu_devices]])
    return tf.distribute.get_strategy()


def set_precision(mixed: bool) -> str:
    """Set Keras' global dtype policy: float16 compute on GPUs, bfloat16 on CPUs (which lack fast
    float16), float32 when ``mixed`` is off.  The U-Net's output layer stays float32 either way."""
    policy = "float32"
    if mixed:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _atomic_save(model: keras.Model, path: Path) -> None:
    # Write next to the target and rename: an interruption mid-save never leaves a half-written model.
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    model.save(tmp)
    os.replace(tmp, path)


def export_inference_model(model: keras.Model, config: Config) -> keras.Model:
    """A float32, uncompiled copy of a trained model, for saving as the run's ``model.keras``.

    Padded models get a ``(None, None, C)`` input, so they predict tiles of any size that fits; unpadded
    models keep their training size.  Only built-in layers are used, so the file loads anywhere."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        size = None if config.padding == "same" else config.image_size
        copy = build_unet((size, size, config.input_channels), config.num_classes, config.channels,
                          config.padding, config.batch_norm, config.dropout)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    return copy


class RunCheckpoint(keras.callbacks.Callback):
    """At every epoch end: the full training state to ``last.keras`` (+ ``state.json``); and, when the
    validation loss improved, the inference model to ``model.keras``.  So an interruption or a crash
    loses at most the epoch under way."""

    def __init__(self, run_dir: Path, config: Config, best: float = math.inf):
        super().__init__()
        self.run_dir, self.config, self.best = Path(run_dir), config, best
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        current = logs.get("val_loss", logs.get("loss"))
        if current is not None and np.isfinite(current) and current < self.best:
            self.best, self.best_epoch = float(current), epoch + 1
            _atomic_save(export_inference_model(self.model, self.config), self.run_dir / MODEL_FILE)
        _atomic_save(self.model, self.run_dir / LAST_FILE)
        state = {"epoch": epoch + 1, "best_val_loss": self.best, "best_epoch": self.best_epoch}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


class StopOnNaN(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss and remember where, so the user gets a message."""

    def __init__(self):
        super().__init__()
        self.where, self.epoch = None, 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.where = f"epoch {self.epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: where the run went and what it scored."""

    run_dir: Path
    config: Config
    threshold: float
    scores: dict
    history: dict
    data_source: str
    seconds: float


def _log(message: str, verbose: int) -> None:
    if verbose:
        print(message, flush=True)


def prepare_data(config: Config, progress: bool = True, verbose: int = 1):
    """Find, split and decode the training data a Config points to (section 1 in one call).

    Returns ``(train_samples, val_samples, data_dir, why)``."""
    data_dir, why = resolve_data_dir(config.data_dir, config.sample_images, progress=progress)
    _log(f"Data: {why}", verbose)
    samples, problems = find_samples(data_dir)
    train_ids, val_ids = split_ids([s.sample_id for s in samples], config.val_size, config.seed)
    loaded, load_problems = load_samples(samples, progress=progress)
    report_problems(problems + load_problems)
    by_id = {s.sample_id: s for s in loaded}
    train = [by_id[i] for i in train_ids if i in by_id]
    val = [by_id[i] for i in val_ids if i in by_id]
    if not train or not val:
        raise DataError(f"{data_dir}: after skipping unreadable samples, {len(train)} remain for training "
                        f"and {len(val)} for validation; both need at least one")
    _log(f"      {len(train)} training and {len(val)} validation images "
         f"({sum(s.image.shape[0] * s.image.shape[1] for s in train) / 1e6:.1f} Mpx of training pixels)", verbose)
    return train, val, data_dir, why


def train(config: Config, runs_root=DEFAULT_RUNS_DIR, run_name: str | None = None, resume=None,
          cpu_devices: int = 0, verbose: int = 1, progress: bool = True) -> TrainResult:
    """Train a U-Net as ``config`` says and save a complete run directory.

    ``resume`` (a run name or folder) continues that run from its last checkpoint, with the epoch count
    carried on, up to ``config.epochs`` in all.  ``cpu_devices`` > 1 splits the CPU into that many
    logical devices and trains data-parallel over them (a way to test the multi-device path).
    Raises ``TrainingError`` on a NaN loss; a KeyboardInterrupt propagates after the last finished epoch
    has been saved.
    """
    started = time.time()
    configure_devices(cpu_devices)
    # The strategy comes before any other TensorFlow op: multi-worker training requires it.
    strategy = get_strategy(cpu_devices)
    keras.utils.set_random_seed(config.seed)
    initial_epoch, best = 0, math.inf
    if resume is not None:
        run_dir = find_run(resume, runs_root)
        if not (run_dir / LAST_FILE).is_file() or not (run_dir / STATE_FILE).is_file():
            raise TrainingError(f"{run_dir} has no {LAST_FILE}/{STATE_FILE} to resume from")
        saved_config, _ = read_run_config(run_dir)
        # Architecture and data come from the run; only the epoch budget may be raised on resume.
        config = dataclasses.replace(saved_config, epochs=max(config.epochs, saved_config.epochs))
        state = json.loads((run_dir / STATE_FILE).read_text())
        initial_epoch, best = int(state["epoch"]), float(state.get("best_val_loss", math.inf))
        _log(f"Resuming {run_dir} after epoch {initial_epoch} of {config.epochs}", verbose)
    else:
        run_dir = new_run_dir(runs_root, run_name)

    train_samples, val_samples, data_dir, why = prepare_data(config, progress, verbose)
    val_ids = [s.sample_id for s in val_samples]
    train_ds, val_ds, steps = make_datasets(train_samples, val_samples, config)
    options = tf.data.Options()
    # Generator-backed data cannot be sharded by file; shard by element across workers instead.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds = train_ds.with_options(options)
    val_ds = val_ds.with_options(options)

    policy = set_precision(config.mixed_precision)
    extra = dict(val_ids=val_ids, data_dir=str(data_dir), data_source=why, steps_per_epoch_used=steps,
                 replicas=strategy.num_replicas_in_sync, precision=policy)
    config.to_json(run_dir / CONFIG_FILE, **extra)  # written now, so even an interrupted run says what it was
    _log(f"Run:  {run_dir}", verbose)
    _log(f"      {config.epochs} epochs x {steps} steps of batch {config.batch_size}, "
         f"{config.image_size}px {config.sampling} sampling, loss {config.loss}, lr {config.learning_rate}, "
         f"{strategy.num_replicas_in_sync} device(s), {policy}" + (", XLA" if config.xla else ""), verbose)

    try:
        with strategy.scope():
            if resume is not None:
                model = keras.saving.load_model(run_dir / LAST_FILE)
            else:
                model = compile_unet(build_unet_from_config(config), config)
        _log(f"Model: {model.count_params():,} parameters, channels {list(config.channels)}, "
             f"padding={config.padding}", verbose)
        checkpoint = RunCheckpoint(run_dir, config, best)
        nan_guard = StopOnNaN()
        callbacks = [checkpoint, nan_guard,
                     keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=resume is not None),
                     keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=4, min_lr=1e-5)]
        fit_verbose = (1 if sys.stdout.isatty() else 2) if verbose else 0
        if initial_epoch < config.epochs:
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=fit_verbose,
                      shuffle=False)  # the pipeline already randomises; Keras cannot shuffle a tf.data stream
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if nan_guard.where:
        raise TrainingError(f"the loss became NaN at {nan_guard.where}; training stopped. The last good "
                            f"epoch is saved in {run_dir}. Try a lower --lr (now {config.learning_rate}) "
                            f"or --loss bce+dice")

    history = read_history(run_dir / HISTORY_FILE)
    plot_training_curves(history, run_dir / CURVES_FILE)
    (Path(runs_root) / LATEST_FILE).write_text(run_dir.name + "\n")

    # Score the best checkpoint the way it will be used: whole validation images at full resolution.
    best_model = keras.saving.load_model(run_dir / MODEL_FILE)
    _log("Choosing the threshold on the validation images (full resolution)...", verbose)
    probabilities = predict_samples(best_model, val_samples, config, progress)  # once, for both uses below
    threshold, scores, per_image = choose_threshold(best_model, val_samples, config, probabilities=probabilities)
    config = dataclasses.replace(config, threshold=threshold)
    extra.update(val_scores=scores, val_scores_per_image=per_image, best_epoch=checkpoint.best_epoch,
                 train_seconds=round(time.time() - started, 1))
    config.to_json(run_dir / CONFIG_FILE, **extra)
    plot_validation_predictions(best_model, val_samples, config, run_dir / VAL_FIGURE_FILE,
                                probabilities=probabilities)
    seconds = time.time() - started
    _log(f"Validation (best epoch {checkpoint.best_epoch}, threshold {threshold:.2f}): "
         f"Dice {scores['dice']:.3f}  IoU {scores['iou']:.3f}  DSB score {scores['dsb_score']:.3f}", verbose)
    _log(f"Done in {seconds / 60:.1f} min. Run saved in {run_dir}", verbose)
    return TrainResult(run_dir, config, threshold, scores, history, why, seconds)


def read_history(path) -> dict:
    """history.csv as {column: [values...]} (floats), the epoch column included."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows if row.get(key) not in (None, "")] for key in (rows[0] if rows else {})}


def plot_training_curves(history: dict, path) -> None:
    """Loss and Dice/IoU per epoch, training against validation, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [e + 1 for e in history.get("epoch", [])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("val_loss", "--")):
        if key in history:
            axes[0].plot(epochs, history[key], style, marker="o", label=key)
    for key, style in (("dice", "-"), ("val_dice", "--"), ("iou", "-"), ("val_iou", "--")):
        if key in history:
            axes[1].plot(epochs, history[key], style, marker="o", label=key)
    axes[0].set(title="Loss", xlabel="epoch")
    axes[1].set(title="Dice and IoU (threshold 0.5)", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =====================================================================================================
# 7. Testing the model: full-resolution inference, instances, scores, run-length encoding, figures
# =====================================================================================================
# Overlap-tile prediction follows the original U-Net paper (Ronneberger et al., 2015): the image is cut
# into tiles, each tile gets mirrored context where it leaves the image, the model predicts the tiles one
# batch at a time, and the tile predictions are blended into a full-size probability map with a smooth
# window.  Memory is bounded by one batch of tiles plus a few image-sized float32 accumulators, never by
# the activations of the whole image.


def tile_positions(length: int, output_size: int, overlap: int) -> list[int]:
    """Start offsets (in output coordinates) of tiles along one axis covering [0, length).

    The first tile starts at 0 and, when ``length >= output_size``, the last
    tile ends exactly at ``length`` so that no tile sticks out of the image.
    The tiles in between are spread evenly, which makes every overlap at least
    ``overlap`` pixels wide and every step at most ``output_size - overlap``.
    When the axis is shorter than one output tile a single tile at 0 is used;
    its surplus output is discarded by the caller.

    Args:
        length: Size of the axis to cover, in pixels (>= 1).
        output_size: Size of one output tile along the axis (>= 1).
        overlap: Minimum overlap between neighbouring tiles,
            ``0 <= overlap < output_size``.

    Returns:
        Sorted list of start offsets.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if not 0 <= overlap < output_size:
        raise ValueError(
            f"overlap must satisfy 0 <= overlap < output_size ({output_size}), got {overlap}"
        )
    if length <= output_size:
        return [0]
    step = output_size - overlap
    last = length - output_size
    n_tiles = -(-last // step) + 1  # Integer ceil(last / step).
    # Even spacing distributes the surplus overlap over all seams instead of
    # piling it onto the last tile.  The real spacing last / (n_tiles - 1) is
    # at most ``step``, and because ``step`` is an integer the differences of
    # the floored positions (floor or ceil of that spacing) never exceed it
    # either.  Integer arithmetic keeps the last position exact.
    return [i * last // (n_tiles - 1) for i in range(n_tiles)]


def blend_window(size) -> np.ndarray:
    """The 2-D float32 blending window (size x size, or height x width for a pair), >0 everywhere.

    The window is the outer product of 1-D Hann (raised cosine) windows
    sampled at pixel centres, so it is symmetric and peaks in the middle of
    the tile where a same-padding network is most reliable.  A floor of 1e-3
    keeps the border pixels strictly positive: where only one tile covers a
    pixel (the image border, or tiles without overlap) its prediction must
    still count after normalisation by the accumulated weights.

    Args:
        size: Side length of a square output tile, or its (height, width).

    Returns:
        Array of shape (size, size) or (height, width), dtype float32, all
        values in (0, 1].
    """
    height, width = (size, size) if np.ndim(size) == 0 else tuple(size)
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"size must be >= 1, got {size}")

    def hann(length):
        # Sampling at (i + 0.5) / length makes the window symmetric without
        # putting an exact zero on either end.
        centres = (np.arange(int(length), dtype=np.float64) + 0.5) / int(length)
        return np.maximum(0.5 - 0.5 * np.cos(2.0 * np.pi * centres), 1e-3)

    return np.outer(hann(height), hann(width)).astype(np.float32)


def _reflect_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Map arbitrary integer coordinates into [0, length) by mirror reflection.

    This is the 'reflect' convention of ``np.pad`` (cv2.BORDER_REFLECT_101:
    the edge pixel is not repeated).  Reflection is applied as often as
    needed, so pads larger than the image are handled the same way as padding
    repeatedly, which matters for tiny images and large valid-model margins.
    """
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.mod(indices, period)
    return np.where(folded >= length, period - folded, folded)


def _axis_index(start: int, size: int, length: int) -> list[tuple[slice, slice]]:
    """How to fill ``size`` pixels from ``start`` along one axis, mirrored where needed (the convention
    of ``_reflect_indices``), as ``(destination, source)`` slice pairs.

    Inside the image that is one pair of plain slices.  Where the window leaves the image, the
    mirrored coordinates come in runs that go up or down by one, and each run is a (reversed) slice,
    so a tile is assembled from a few block copies: much cheaper than gathering it through index
    arrays (about 1 ms instead of 25 ms for a 1424x1424 RGB tile).
    """
    if start >= 0 and start + size <= length:
        return [(slice(0, size), slice(start, start + size))]
    if length == 1:
        return [(slice(0, size), slice(0, 1))]  # the one pixel, broadcast
    period = 2 * (length - 1)
    runs, done = [], 0
    while done < size:
        folded = (start + done) % period
        if folded < length:  # going up: folded, folded + 1, ..., length - 1
            count = min(size - done, length - folded)
            source = slice(folded, folded + count)
        else:  # coming back down: period - folded, ..., 1
            count = min(size - done, period - folded)
            top = period - folded
            source = slice(top, top - count, -1)
        runs.append((slice(done, done + count), source))
        done += count
    return runs


def _extract_tile(image: np.ndarray, top: int, left: int, size, out: np.ndarray | None = None) -> np.ndarray:
    """Cut a tile of ``size`` (an int for a square, or (height, width)) at (top, left) from ``image``
    with mirrored context, into ``out`` when given (converting the dtype on the way).

    The coordinates may lie partly or entirely outside the image; the missing
    pixels are taken from the reflected image on the fly, so no padded copy of
    the whole image is ever created.
    """
    tile_h, tile_w = (size, size) if np.ndim(size) == 0 else size
    height, width = image.shape[:2]
    if out is None:
        out = np.empty((tile_h, tile_w) + image.shape[2:], dtype=image.dtype)
    rows = _axis_index(top, tile_h, height)
    cols = _axis_index(left, tile_w, width)
    for row_out, row_in in rows:
        for col_out, col_in in cols:
            out[row_out, col_out] = image[row_in, col_in]
    return out


def predict_tiled(
    predict_batch,
    image,
    tile_size,
    output_size=None,
    overlap=None,
    batch_size=8,
    progress=None,
) -> np.ndarray:
    """Predict a full-size probability map with overlap-tile inference.

    The image is covered by output tiles of ``output_size`` pixels placed by
    :func:`tile_positions`.  Each output tile is predicted from an input tile
    of ``tile_size`` pixels centred on it; for a "valid" (unpadded) network
    the extra ``margin = (tile_size - output_size) // 2`` pixels on each side
    provide the context the network consumes.  Where an input tile leaves the
    image it is filled with the mirrored image, as in the U-Net paper.
    Overlapping output tiles are blended with :func:`blend_window` so that the
    less reliable tile borders of a same-padding network are down-weighted and
    no seams appear.  When one tile covers the whole image its prediction is
    returned as it is (there is nothing to blend).

    Args:
        predict_batch: Callable mapping a float32 array of shape
            (n, tile_h, tile_w, C) to probabilities of shape
            (n, output_h, output_w, K), e.g. a wrapped ``model.predict``.  The
            array it is given is reused for the next batch: copy it to keep it.
        image: Image of shape (H, W, C), any real dtype (uint8 stays uint8 in
            memory; each tile is converted to float32 as it is cut).
        tile_size: Side length of the network input tiles, or their
            (height, width).
        output_size: Side length (or (height, width)) of the network output
            tiles; ``None`` means ``tile_size`` (same-padding network).
            ``tile_size - output_size`` must be even and non-negative.
        overlap: Overlap in pixels between neighbouring output tiles (an int,
            or one per axis).  ``None`` means ``output_size // 4`` for a
            same-padding network and 0 for a valid network, whose outputs have
            no border effect.
        batch_size: Maximum number of tiles passed to ``predict_batch`` at once.
        progress: Optional callable ``progress(done_tiles, total_tiles)``
            invoked after each batch.

    Returns:
        Float32 array of shape (H, W, K) with the blended probabilities.

    Raises:
        ValueError: On a malformed image, inconsistent sizes, or a
            ``predict_batch`` result of unexpected shape.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(
            f"image must be a 3-D array of shape (H, W, C), got shape {image.shape}"
        )
    if image.dtype.kind not in "biuf":
        image = image.astype(np.float32)
    height, width, channels = image.shape
    if height < 1 or width < 1 or channels < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")

    def pair(value, name):
        if np.ndim(value) == 0:
            return int(value), int(value)
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return int(value[0]), int(value[1])

    tile_h, tile_w = pair(tile_size, "tile_size")
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    out_h, out_w = (tile_h, tile_w) if output_size is None else pair(output_size, "output_size")
    if min(out_h, out_w) < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if out_h > tile_h or out_w > tile_w:
        raise ValueError(
            f"output_size ({output_size}) must not exceed tile_size ({tile_size})"
        )
    if (tile_h - out_h) % 2 or (tile_w - out_w) % 2:
        raise ValueError(
            f"tile_size - output_size must be even so the output is centred, "
            f"got tile_size={tile_size}, output_size={output_size}"
        )
    margin_h, margin_w = (tile_h - out_h) // 2, (tile_w - out_w) // 2

    if overlap is None:
        overlap = (out_h // 4, out_w // 4) if margin_h == margin_w == 0 else 0
    overlap_h, overlap_w = pair(overlap, "overlap")
    if not (0 <= overlap_h < out_h and 0 <= overlap_w < out_w):
        raise ValueError(
            f"overlap must satisfy 0 <= overlap < output_size ({output_size}), got {overlap}"
        )
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    tops = tile_positions(height, out_h, overlap_h)
    lefts = tile_positions(width, out_w, overlap_w)
    tiles = [(top, left) for top in tops for left in lefts]
    total = len(tiles)

    # One float32 batch buffer for the whole image, filled in place; the
    # accumulators are allocated once the number of classes K is known from
    # the first batch.  They are the only image-sized buffers besides the
    # input itself, and a single tile needs none of them.
    buffer = np.empty((min(batch_size, total), tile_h, tile_w, channels), dtype=np.float32)
    accumulator = weights = window = single = None
    classes = None

    for first in range(0, total, batch_size):
        chunk = tiles[first:first + batch_size]
        batch = buffer[:len(chunk)]
        for slot, (top, left) in enumerate(chunk):
            # The input tile starts ``margin`` pixels before its output tile
            # so that the valid network's output lands on the output tile.
            _extract_tile(image, top - margin_h, left - margin_w, (tile_h, tile_w), out=batch[slot])

        result = np.asarray(predict_batch(batch))
        if (
            result.ndim != 4
            or result.shape[:3] != (len(chunk), out_h, out_w)
            or (classes is not None and result.shape[3] != classes)
        ):
            k_text = "K" if classes is None else str(classes)
            raise ValueError(
                f"predict_batch returned shape {result.shape} for an input of shape "
                f"{batch.shape}; expected ({len(chunk)}, {out_h}, {out_w}, {k_text})"
            )
        classes = result.shape[3]

        if total == 1:
            # The tile covers the image: cropping its surplus is all there is to do.
            single = np.array(result[0, :height, :width], dtype=np.float32)
        else:
            if accumulator is None:
                accumulator = np.zeros((height, width, classes), dtype=np.float32)
                weights = np.zeros((height, width), dtype=np.float32)
                window = blend_window((out_h, out_w))
            for slot, (top, left) in enumerate(chunk):
                # Output tiles can only extend past the image when the image is
                # smaller than one tile; that surplus is cropped away here.
                rows = min(out_h, height - top)
                cols = min(out_w, width - left)
                tile_weight = window[:rows, :cols]
                accumulator[top:top + rows, left:left + cols] += (
                    result[slot, :rows, :cols].astype(np.float32, copy=False)
                    * tile_weight[:, :, None]
                )
                weights[top:top + rows, left:left + cols] += tile_weight

        if progress is not None:
            progress(first + len(chunk), total)

    if single is not None:
        return single
    # Every pixel is covered by at least one tile with a strictly positive
    # weight, so the division is safe; doing it in place avoids another
    # image-sized temporary.
    accumulator /= weights[:, :, None]
    return accumulator


# --- Instances, the DSB-2018 score, run-length encoding and outlines -----------------------------------
# These turn a probability map into labelled nuclei, score labelled nuclei with the Data Science Bowl
# 2018 metric, write and read its run-length encoding, and draw instance outlines for figures.

# The IoU thresholds of the DSB-2018 metric: 0.5, 0.55, ..., 0.95.  ``np.arange`` with a float step
# accumulates rounding error (0.5 + 4 * 0.05 is not exactly 0.7), and an IoU that is exactly 0.7 must
# compare equal to the 0.7 threshold, so the values are rounded to two decimals.
DSB_IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)

# Markers for splitting touching nuclei are the "h-maxima" of the smoothed distance transform: peaks that
# rise at least h pixels above the saddle that joins them to a higher peak.  Two discs of radius r whose
# centres are d apart form a saddle of depth r - sqrt(r^2 - d^2 / 4), 0.2 r at d = 1.2 r before
# smoothing, while pixelation leaves ripples on the ridge of a single smoothed ellipse: up to about
# 0.45 px for aspect ratios up to 4, more for longer and thinner shapes (0.7 px at 10:1, which may then
# be split).  h is the larger of an absolute floor above those ripples and a small fraction of the
# component's largest distance, so that big lumpy nuclei are not cut at every bump.  The values were
# tuned on the repository's synthetic nuclei (perfect masks in, DSB score out): lower h splits more
# clumps but starts to cut single irregular nuclei.
_MARKER_H_MIN = 0.5
_MARKER_H_FRACTION = 0.05
# Smoothing of the distance transform before the peaks are searched, in pixels (Gaussian sigma).
_DISTANCE_SIGMA = 1.0
# A value far below any distance, used to keep the morphological reconstruction out of the background.
_FAR_BELOW = np.float32(-1.0e6)
# The flooding level given to the background in the image handed to cv2.watershed (see _watershed).
_WATERSHED_TOP = 255
# The distance, in pixels, over which the watershed relief keeps full resolution (see _watershed).
_RELIEF_MAX_DISTANCE = 64.0


def _as_label_image(labels, name):
    """Return ``labels`` as an int64 array, accepting integer and boolean images only."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _check_same_shape(true, pred, true_name, pred_name):
    if true.shape != pred.shape:
        raise ValueError(f"{true_name} has shape {true.shape} but {pred_name} has shape {pred.shape}; "
                         "they must match")


def binary_dice_iou(true_mask, pred_mask) -> tuple[float, float]:
    """Dice and IoU of two binary masks (any nonzero = foreground).

    Both empty -> (1.0, 1.0), because predicting nothing where there is nothing is perfect; one empty and
    the other not -> (0.0, 0.0).  Never NaN.
    """
    true_mask = np.asarray(true_mask) != 0
    pred_mask = np.asarray(pred_mask) != 0
    _check_same_shape(true_mask, pred_mask, "true_mask", "pred_mask")
    intersection = int(np.count_nonzero(true_mask & pred_mask))
    total = int(np.count_nonzero(true_mask)) + int(np.count_nonzero(pred_mask))
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return 2.0 * intersection / total, intersection / union


def _dense_index(labels):
    """Map the labels of an image to 0 (background) and 1..n (instances in increasing label order)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    # searchsorted gives each nonzero label its rank among the instance ids; background is forced to 0.
    index = np.searchsorted(ids, labels) + 1
    index[labels == 0] = 0
    return index, ids.size


def instance_iou_matrix(true_labels, pred_labels) -> np.ndarray:
    """IoU between every true instance (rows) and every predicted instance (columns).

    Both inputs are integer label images of the same shape (0 = background, labels need not be
    consecutive); rows and columns follow increasing label value.  The intersections of all pairs come
    from one ``np.bincount`` over the pair index ``true_idx * (n_pred + 1) + pred_idx``, so the cost does
    not grow with the number of instances.  Returns a float64 array of shape (n_true, n_pred).
    """
    true_labels = _as_label_image(true_labels, "true_labels")
    pred_labels = _as_label_image(pred_labels, "pred_labels")
    _check_same_shape(true_labels, pred_labels, "true_labels", "pred_labels")
    true_idx, n_true = _dense_index(true_labels.ravel())
    pred_idx, n_pred = _dense_index(pred_labels.ravel())
    # Row 0 and column 0 of the joint histogram count background, which gives the instance areas as
    # marginal sums without a second pass over the image.
    joint = np.bincount(true_idx * (n_pred + 1) + pred_idx, minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    true_area = joint[1:, :].sum(axis=1)
    pred_area = joint[:, 1:].sum(axis=0)
    intersection = joint[1:, 1:].astype(np.float64)
    union = true_area[:, None] + pred_area[None, :] - intersection
    # Every instance has at least one pixel, so the union is never zero.
    return intersection / union


def dsb_score(true_labels, pred_labels, thresholds=DSB_IOU_THRESHOLDS) -> float:
    """DSB-2018 score of one image: the mean over thresholds t of TP / (TP + FP + FN).

    A true and a predicted instance match when their IoU is strictly greater than t.  Instances of one
    label image do not overlap, so for t >= 0.5 an instance can have at most one partner with IoU > t and
    counting the pairs above t counts the matches exactly; thresholds below 0.5 are refused for that
    reason.  Both images empty -> 1.0; one empty and the other not -> 0.0.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0:
        raise ValueError("thresholds must not be empty")
    if np.any(thresholds < 0.5) or np.any(thresholds >= 1.0) or np.any(np.isnan(thresholds)):
        raise ValueError(f"thresholds must lie in [0.5, 1), got {thresholds.tolist()}")
    iou = instance_iou_matrix(true_labels, pred_labels)
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        return 1.0
    if n_true == 0 or n_pred == 0:
        return 0.0
    tp = (iou[None, :, :] > thresholds[:, None, None]).sum(axis=(1, 2))
    # With TP matches, the remaining predictions are false positives and the remaining truths misses.
    fp = n_pred - tp
    fn = n_true - tp
    return float(np.mean(tp / (tp + fp + fn)))


def count_instances(labels) -> int:
    """Number of distinct nonzero labels in a label image."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    return int(np.count_nonzero(ids != 0))


def _relabel_consecutive(labels):
    """Renumber the nonzero labels to 1..N in increasing order of their old value, as int32."""
    index, _ = _dense_index(labels)
    return index.astype(np.int32)


def _component_maxima(components, n_components, values):
    """Largest value of ``values`` inside each connected component (index 0 is the background)."""
    maxima = np.zeros(n_components, dtype=np.float32)
    inside = components > 0
    np.maximum.at(maxima, components[inside], values[inside])
    return maxima


def _reconstruct_by_dilation(marker, mask):
    """Grayscale morphological reconstruction of ``marker`` under ``mask`` (8-connected).

    The marker is dilated and clipped by the mask until nothing changes.  Each pass moves information one
    pixel, so the number of passes is the length of the longest path a value has to travel, which for
    h-maxima is about the length of the flat ridges (a few tens of pixels for nuclei).
    """
    kernel = np.ones((3, 3), np.uint8)
    current = np.minimum(marker, mask)
    while True:
        grown = np.minimum(cv2.dilate(current, kernel), mask)
        if np.array_equal(grown, current):
            return current
        current = grown


def _find_markers(foreground, components, n_components):
    """Label the markers of the watershed: the h-maxima of the smoothed distance transform.

    Returns the int32 marker image (0 = no marker, 1..K markers), K and the smoothed distance.
    """
    fg_u8 = foreground.astype(np.uint8)
    distance = cv2.distanceTransform(fg_u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Smoothing removes the one-pixel steps of the distance of a pixelated outline, which would otherwise
    # create many tiny peaks along the ridge of an elongated nucleus.
    distance = cv2.GaussianBlur(distance, (0, 0), _DISTANCE_SIGMA)
    # h depends on the size of each connected component (see _MARKER_H_FRACTION).
    peak = _component_maxima(components, n_components, distance)
    h_per_component = np.maximum(_MARKER_H_MIN, _MARKER_H_FRACTION * peak)
    h_map = h_per_component[components]
    # The background is set far below every distance so that the reconstruction cannot carry values from
    # one component to another through it.
    mask = np.where(foreground, distance, _FAR_BELOW).astype(np.float32)
    lowered = np.where(foreground, distance - h_map, _FAR_BELOW).astype(np.float32)
    reconstructed = _reconstruct_by_dilation(lowered, mask)
    # A pixel keeps its lowered value exactly when no higher peak can be reached from it without going
    # more than h below it: those pixels are the tops of the domes that are at least h deep.  Every
    # component keeps at least its highest pixel, so every component gets a marker.
    tops = foreground & (reconstructed == lowered)
    # Two equally high peaks less than h apart in depth are both "tops", yet they are one nucleus.  The
    # reconstruction joins them into one flat cap, so the markers are the flat local maxima of the
    # reconstruction (pixels equal to their 3x3 maximum) that hold a top; flat local maxima without a
    # top are shoulders on a slope, not caps, and are dropped.
    flat_max = foreground & (reconstructed == cv2.dilate(reconstructed, np.ones((3, 3), np.uint8)))
    n_caps, caps = cv2.connectedComponents(flat_max.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    has_top = np.zeros(n_caps, bool)
    has_top[caps[tops]] = True
    has_top[0] = False
    new_label = np.cumsum(has_top).astype(np.int32) * has_top
    return new_label[caps], int(has_top.sum()), distance


def _watershed(foreground, markers, n_markers, distance):
    """Flood the foreground from the markers over the relief of the inverted distance transform.

    cv2.watershed does not flood in order of pixel height: it orders pixels by the largest per-channel
    difference between a pixel and the already labelled neighbour it is reached from.  Writing the height
    into channel 0 on the "black" squares of a checkerboard and into channel 1 on the "white" squares
    (0 elsewhere) turns that difference into max(height of the pixel, height of its neighbour), because
    4-neighbours always lie on squares of opposite colour.  That is exactly the priority of a classical
    flooding watershed, so the split lines follow the necks between nuclei instead of lying halfway
    between markers.  Returns labels 1..n_markers over the foreground and 0 elsewhere.
    """
    # Heights: 0 at the largest distance, rising towards the edges; the background gets the top level.
    # The 254 levels are spread over at most _RELIEF_MAX_DISTANCE pixels of distance, so that one huge
    # blob in the image does not flatten the relief of all the small nuclei; deeper cores are flat.
    top_distance = float(distance[foreground].max()) if foreground.any() else 1.0
    span = min(max(top_distance, 1e-6), _RELIEF_MAX_DISTANCE)
    relief = (_WATERSHED_TOP - 1) - np.rint(np.minimum(distance, span) * ((_WATERSHED_TOP - 1) / span))
    relief = np.where(foreground, np.clip(relief, 0, _WATERSHED_TOP - 1), _WATERSHED_TOP).astype(np.uint8)

    # cv2.watershed marks the outermost pixel frame as boundary, so everything is padded by one pixel.
    relief = cv2.copyMakeBorder(relief, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=_WATERSHED_TOP)
    rows, cols = np.indices(relief.shape)
    black = (rows + cols) % 2 == 0
    image = np.zeros(relief.shape + (3,), np.uint8)
    image[..., 0] = np.where(black, relief, 0)
    image[..., 1] = np.where(black, 0, relief)

    # The background gets its own marker so that the flood stays inside the foreground.
    background_label = n_markers + 1
    seeds = np.where(foreground, markers, background_label).astype(np.int32)
    seeds = cv2.copyMakeBorder(seeds, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=background_label)
    cv2.watershed(image, seeds)
    result = seeds[1:-1, 1:-1]
    result[(result == background_label) | (result < 0) | ~foreground] = 0

    # Pixels the watershed left as boundary (-1), and thin foreground bits it could only reach from the
    # background, are given to a neighbouring nucleus so that the instances cover the whole thresholded
    # mask.  Labels up to 2**24 are exact in float32, which cv2.dilate needs.
    kernel = np.ones((3, 3), np.uint8)
    missing = foreground & (result == 0)
    while missing.any():
        neighbour = cv2.dilate(result.astype(np.float32), kernel).astype(np.int32)
        fill = missing & (neighbour > 0)
        if not fill.any():
            break
        result[fill] = neighbour[fill]
        missing &= ~fill
    return result


def label_instances(probability, threshold=0.5, min_size=10, split_touching=True) -> np.ndarray:
    """Turn a HxW probability map into an int32 instance label image (0 = background, 1..N consecutive).

    The map is thresholded (pixels with probability > ``threshold`` are foreground; NaN counts as
    background).  Connected components smaller than ``min_size`` pixels are dropped.  If
    ``split_touching``, touching nuclei are separated by a marker-based watershed: markers are the
    h-maxima of the smoothed distance transform (one per dome of the distance that is deep enough, so a
    convex nucleus keeps one marker while two overlapping discs whose centres are more than about 1.2
    radii apart get two), and the foreground is flooded from them over the inverted distance.  Instances
    that end up smaller than ``min_size`` are removed as well.  Labels are numbered 1..N.
    """
    probability = np.asarray(probability)
    if probability.ndim != 2:
        raise ValueError(f"probability must be a 2-D HxW map, got shape {probability.shape}")
    if not (np.issubdtype(probability.dtype, np.floating) or np.issubdtype(probability.dtype, np.integer)
            or probability.dtype == bool):
        raise ValueError(f"probability must be numeric, got dtype {probability.dtype}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    foreground = probability > threshold

    n_components, components = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=8,
                                                        ltype=cv2.CV_32S)
    # Specks are removed before splitting so that they cost nothing in the watershed.
    areas = np.bincount(components.ravel(), minlength=n_components)
    keep = areas >= min_size
    keep[0] = False
    foreground = keep[components]
    if not foreground.any():
        return np.zeros(probability.shape, np.int32)
    components = np.where(foreground, components, 0)

    if split_touching:
        markers, n_markers, distance = _find_markers(foreground, components, n_components)
        labels = _watershed(foreground, markers, n_markers, distance)
    else:
        labels = components

    # Splitting can leave pieces below min_size; they are removed like the specks.
    areas = np.bincount(labels.ravel())
    small = areas < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return _relabel_consecutive(labels)


def rle_encode(mask) -> str:
    """DSB-2018 run-length encoding of one binary mask (any nonzero = foreground).

    Pixels are numbered from 1, top to bottom and then left to right (column-major, the Fortran order of
    the array), and the output is ``"start length start length ..."``.  An empty mask gives ``""``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    pixels = (mask != 0).ravel(order="F").astype(np.int8)
    # Padding with a background pixel on both sides makes every run start and end with a change.
    changes = np.flatnonzero(np.diff(np.concatenate(([0], pixels, [0])))) + 1
    runs = changes.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]
    return " ".join(map(str, runs.ravel().tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a DSB-2018 run-length string into a uint8 0/1 mask of shape (height, width).

    The inverse of ``rle_encode``.  An empty (or all-whitespace) string gives an empty mask.  Raises
    ValueError if the string holds anything but non-negative integers, an odd number of them, a start
    below 1, a length below 1, a run past the last pixel, or runs that are unsorted or overlap (the
    competition format forbids both).
    """
    if not isinstance(rle, str):
        raise TypeError(f"rle must be a string (use '' for an empty mask), got {type(rle).__name__}")
    try:
        height, width = (int(v) for v in shape)
        exact = all(int(v) == v for v in shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shape must be (height, width), got {shape!r}") from error
    if not exact or height <= 0 or width <= 0:
        raise ValueError(f"shape must be two positive integers (height, width), got {shape!r}")
    n_pixels = height * width
    tokens = rle.split()
    bad = [token for token in tokens if not (token.isascii() and token.isdigit())]
    if bad:
        raise ValueError(f"run-length string must contain only non-negative integers, found {bad[0]!r}")
    if len(tokens) % 2:
        raise ValueError(f"run-length string must hold start/length pairs, got an odd count ({len(tokens)})")
    mask = np.zeros(n_pixels, np.uint8)
    if tokens:
        values = np.array([int(token) for token in tokens], dtype=np.int64).reshape(-1, 2)
        starts, lengths = values[:, 0], values[:, 1]
        ends = starts + lengths - 1   # The last pixel of each run, 1-based.
        if np.any(starts < 1):
            raise ValueError("run starts must be >= 1 (pixels are numbered from 1)")
        if np.any(lengths < 1):
            raise ValueError("run lengths must be >= 1")
        if np.any(ends > n_pixels):
            run = int(np.argmax(ends > n_pixels))
            raise ValueError(f"run {int(starts[run])} {int(lengths[run])} goes past the last pixel "
                             f"({n_pixels} = {height} x {width})")
        if np.any(starts[1:] <= ends[:-1]):
            raise ValueError("runs must be sorted by start and must not overlap")
        # Marking +1 at each start and -1 after each end, then summing, fills the runs without a loop.
        steps = np.zeros(n_pixels + 1, np.int64)
        steps[starts - 1] += 1
        steps[ends] -= 1
        mask = (np.cumsum(steps[:-1]) > 0).astype(np.uint8)
    return mask.reshape((height, width), order="F")


def rle_rows(image_id: str, labels) -> list[tuple[str, str]]:
    """One ``(ImageId, EncodedPixels)`` row per instance of a label image, in increasing label order.

    An image without instances gives a single row with empty EncodedPixels, as the Kaggle submission
    format wants.  All instances are encoded in one pass over the image rather than one pass each.
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
        raise ValueError(f"labels_or_mask must be an integer or boolean image (or whole-numbered floats), "
                         f"got dtype {labels.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"image_rgb has shape {image.shape} but labels_or_mask has shape {labels.shape}; "
                         "their height and width must match")
    color = tuple(int(c) for c in color)
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise ValueError(f"color must be three integers in 0..255, got {color!r}")
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"thickness must be a positive integer, got {thickness!r}")

    # Comparing every pixel with its eight shifted neighbours works for any integer labels (no float
    # conversion), and the zero padding makes instances cut by the image edge get a closed outline.
    padded = np.pad(labels.astype(np.int64), 1)
    height, width = labels.shape
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                edge |= padded[dy:dy + height, dx:dx + width] != centre
    outline = edge & (centre != 0)
    if thickness > 1:
        size = 2 * int(thickness) - 1
        grown = cv2.dilate(outline.astype(np.uint8), np.ones((size, size), np.uint8)) > 0
        outline = grown & (centre != 0)
    result = image.copy()
    result[outline] = color
    return result


# --- Models and runs ---------------------------------------------------------------------------------


class ModelError(ValueError):
    """A model file that cannot be used for prediction (unreadable, or not a U-Net of this project)."""


def load_run(run_or_file=None, runs_root=DEFAULT_RUNS_DIR) -> tuple[keras.Model, Config, dict, Path]:
    """Load a run's model and its config: the newest run by default, or a run name, folder or model file.

    Returns ``(model, config, run_info, run_dir)``; ``run_info`` is the whole config.json (threshold,
    validation ids, scores).  Architecture and preprocessing come from the run, never from flags.
    """
    run_dir = find_run(run_or_file, runs_root)
    model_path = Path(run_or_file) if run_or_file and Path(run_or_file).is_file() else run_dir / MODEL_FILE
    config, info = read_run_config(run_dir)
    model = load_unet(model_path)
    return model, config, info, run_dir


def load_unet(path) -> keras.Model:
    """Load a ``.keras`` file and check that it is a U-Net of this project (clear error otherwise)."""
    path = Path(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file; all mean "cannot use this file".
        raise ModelError(f"{path}: cannot be loaded as a Keras model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    names = {layer.name for layer in getattr(model, "layers", [])}
    if not {"rescale", "enc1_conv1", "probabilities"} <= names:
        raise ModelError(f"{path}: this Keras model is not a U-Net of this project (it lacks the "
                         f"'rescale', 'enc1_conv1' and 'probabilities' layers). Use a model.keras "
                         f"written by Train.py")
    return model


# --- Full-resolution prediction ----------------------------------------------------------------------
# The saved model takes raw pixels (it rescales them itself), so the preprocessing at inference is the
# same code as at training: read_image -> float32 -> model.

PREDICT_TILE = 1536  # largest tile side for padded models: an image up to 1504 px a side is one forward pass;
# with the default channels such a tile takes about 1 GB of activations (wider models get smaller tiles)
CONTEXT_MARGIN = 16  # pixels of (mirrored) context cut from each side of a padded model's tile output


def _foreground_probability(output: np.ndarray) -> np.ndarray:
    """The nucleus probability from a sigmoid (1 channel) or softmax (background first) output."""
    return output[..., 0] if output.shape[-1] == 1 else 1.0 - output[..., 0]


def tile_geometry(model: keras.Model, config: Config, image_shape: tuple[int, int],
                  tile_size: int | None = None) -> tuple:
    """``(tile_size, output_size, margin)`` for predicting an image of ``image_shape`` with ``model``.

    Unpadded models use their fixed input size and give the centre of each tile.  Padded models take any
    multiple of 2**depth on each side, and ``margin`` pixels of each tile's border (where zero padding
    blurs the output) are cut so every kept pixel had real or mirrored context.  With ``tile_size`` the
    tiles are squares of that side (shrunk for small images).  By default they are shaped to the image:
    along each axis the fewest tiles of at most ``PREDICT_TILE`` pixels, each as small as covers the
    image, so that the forward passes spend little on padding (a 520x696 image is one 560x736 tile, not
    a 736x736 square).  Sizes are ints for square tiles and (height, width) pairs otherwise."""
    fixed = model.input_shape[1]
    if config.padding == "valid" or fixed is not None:
        size = fixed or config.image_size
        return size, unet_output_size(size, config.depth, config.padding), 0
    step = 2 ** config.depth
    margin = CONTEXT_MARGIN
    needed = [int(math.ceil((length + 2 * margin) / step)) * step for length in image_shape]
    if tile_size:
        size = max(step, min(tile_size, max(needed)))
        check_input_size(size, config.depth, "same")
        margin = min(margin, (size - step) // 2) if size - 2 * margin < step else margin
        return size, size - 2 * margin, margin
    # Activations grow with the first level's channels: a wider model gets proportionally smaller tiles.
    largest = int(PREDICT_TILE * math.sqrt(min(1.0, 16 / config.channels[0]))) // step * step
    largest = max(largest, 2 * margin + step)
    sides = []
    for length in image_shape:
        # The cheapest side along this axis: fewest input pixels (tiles x side) with the default overlap;
        # one tile as small as covers the axis whenever it fits.
        best = None
        for side in range(largest, 2 * margin, -step):
            out = side - 2 * margin
            cost = len(tile_positions(length, out, out // 8)) * side
            if best is None or cost < best[0]:
                best = (cost, side)
        sides.append(best[1])
    for side in sides:
        check_input_size(side, config.depth, "same")
    if sides[0] == sides[1]:
        return sides[0], sides[0] - 2 * margin, margin
    return tuple(sides), (sides[0] - 2 * margin, sides[1] - 2 * margin), margin


def predict_probabilities(model: keras.Model, image: np.ndarray, config: Config, tile_size: int | None = None,
                          batch_size: int = 4, overlap: int | None = None, progress=None) -> np.ndarray:
    """Nucleus probability (H x W float32) for an H x W x 3 uint8 image of any size.

    Models trained on resized images predict on the image resized the same way (and the result is
    resized back); patch-trained models predict at full resolution by overlap-tile (``tile_geometry``
    says how).  ``batch_size`` tiles go through the model at once, but never more input pixels than one
    largest tile, so memory stays bounded whatever the tile size."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    if config.sampling == "resize":
        # An unpadded model's output covers only the centre of its input: resize the image to the output
        # size and give it mirrored borders, so the output covers the whole image.
        out_size = unet_output_size(config.image_size, config.depth, config.padding)
        margin = (config.image_size - out_size) // 2
        small = resize_image(image, out_size)
        if margin:
            small = cv2.copyMakeBorder(small, margin, margin, margin, margin, cv2.BORDER_REFLECT_101)
        out = _foreground_probability(np.asarray(model.predict_on_batch(small.astype(np.float32)[None]))[0])
        return cv2.resize(out.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    size, out_size, margin = tile_geometry(model, config, (height, width), tile_size)
    tile_h, tile_w = (size, size) if np.ndim(size) == 0 else size
    out_h, out_w = (out_size, out_size) if np.ndim(out_size) == 0 else out_size

    def predict_batch(tiles):
        output = np.asarray(model.predict_on_batch(tiles))
        if margin:
            output = output[:, margin:tile_h - margin, margin:tile_w - margin]
        return output

    if overlap is None:
        overlap = config.tile_overlap if config.tile_overlap is not None else (min(out_h, out_w) // 8 if margin else 0)
    budget = PREDICT_TILE ** 2 * min(1.0, 16 / config.channels[0])
    batch_size = max(1, min(int(batch_size), int(budget // (tile_h * tile_w))))
    # The image goes in as it is (uint8): predict_tiled converts one tile at a time, so no float32 copy
    # of a large image is ever made.
    probabilities = predict_tiled(predict_batch, image, size, out_size, min(overlap, out_h - 1, out_w - 1),
                                  batch_size, progress)
    return _foreground_probability(probabilities)


def predict_mask(model: keras.Model, image: np.ndarray, config: Config, threshold: float | None = None,
                 **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, mask)``: the mask is uint8 0/255 at the image's exact height and width."""
    probability = predict_probabilities(model, image, config, **kwargs)
    mask = (probability > (config.threshold if threshold is None else threshold)).astype(np.uint8) * 255
    return probability, mask


def score_image(true_labels: np.ndarray, probability: np.ndarray, threshold: float, min_size: int,
                pred_labels: np.ndarray | None = None) -> dict:
    """Dice, IoU and DSB score of one prediction against its ground-truth instance labels.

    ``pred_labels`` are the predicted instances when the caller has labelled them already (at the same
    threshold and minimum size); otherwise they are labelled here."""
    if pred_labels is None:
        pred_labels = label_instances(probability, threshold, min_size)
    dice_value, iou_value = binary_dice_iou(true_labels > 0, probability > threshold)
    return {"dice": dice_value, "iou": iou_value, "dsb_score": dsb_score(true_labels, pred_labels),
            "nuclei_true": count_instances(true_labels), "nuclei_pred": count_instances(pred_labels)}


THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.3, 0.71, 0.05))


def predict_samples(model: keras.Model, samples: Sequence[LoadedSample], config: Config,
                    progress: bool = True) -> list[np.ndarray]:
    """Full-resolution probability maps of decoded samples, in order."""
    return [predict_probabilities(model, s.image, config)
            for s in tqdm(samples, desc="Predicting validation images", disable=not progress, unit="img")]


def choose_threshold(model: keras.Model, samples: Sequence[LoadedSample], config: Config,
                     thresholds: Sequence[float] = THRESHOLD_GRID, progress: bool = True,
                     probabilities: Sequence[np.ndarray] | None = None):
    """Pick the probability threshold that maximises the mean DSB score on whole validation images
    (ties broken by Dice).  ``probabilities`` are the samples' maps when already predicted.
    Returns ``(threshold, mean_scores, per_image_scores)``."""
    if probabilities is None:
        probabilities = predict_samples(model, samples, config, progress)
    best = None
    for threshold in thresholds:
        per_image = [score_image(s.labels, p, threshold, config.min_nucleus_size) for s, p in zip(samples, probabilities)]
        mean = {k: float(np.mean([row[k] for row in per_image])) for k in ("dice", "iou", "dsb_score")}
        key = (round(mean["dsb_score"], 6), round(mean["dice"], 6))
        if best is None or key > best[0]:
            best = (key, float(threshold), mean, per_image)
    _, threshold, mean, per_image = best
    rows = [{"id": s.sample_id, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}}
            for s, row in zip(samples, per_image)]
    return threshold, {k: round(v, 4) for k, v in mean.items()}, rows


def plot_validation_predictions(model: keras.Model, samples: Sequence[LoadedSample], config: Config, path,
                                max_images: int = 4, probabilities: Sequence[np.ndarray] | None = None) -> None:
    """The run's ``val_predictions.png``: image, ground truth and prediction of validation images
    (``probabilities``: the samples' maps when already predicted)."""
    shown = list(samples)[:max_images]
    if probabilities is None:
        probabilities = predict_samples(model, shown, config, progress=False)
    results = []
    for sample, probability in zip(shown, probabilities):
        instances = label_instances(probability, config.threshold, config.min_nucleus_size)
        results.append({"name": sample.sample_id, "height": sample.image.shape[0], "width": sample.image.shape[1],
                        "image": sample.image, "probability": probability, "instance_labels": instances,
                        "nuclei": count_instances(instances), "truth_labels": sample.labels,
                        **score_image(sample.labels, probability, config.threshold, config.min_nucleus_size,
                                      instances)})
    plot_prediction_figure(results, path, max_images)


# --- Prediction on files (what Predict_mask.py and the notebook call) ---------------------------------


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
                files = [p for p in sorted(path.iterdir()) if p.is_file() and not _is_stray(p)]
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
            if _is_image_file(path):
                index[_mask_stem(path)] = Sample(_mask_stem(path), path, (path,), "pairs")
        if not index:
            raise DataError(f"--truth {folder}: no masks found (expected the DSB layout, images/ + masks/, "
                            f"or files named <image stem>.png or <image stem>_mask.png)") from None
        return index


def truth_labels(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth instance labels of a PredictionInput's truth, checked against the image size."""
    return read_instance_labels(sample.mask_paths, shape, sample.layout).astype(np.int32)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


def write_png(path: Path, image: np.ndarray, overwrite: bool = False) -> None:
    """Write a PNG (RGB images converted to OpenCV's BGR), refusing to replace a file unless asked."""
    _refuse_existing(path, overwrite)
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise OSError(f"could not encode {path}")
    encoded.tofile(str(path))


def unique_path(path) -> Path:
    """``path`` if it is free, else the same name with -2, -3, ... (so nothing is overwritten)."""
    path = Path(path)
    candidate, index = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


def predict_input(model: keras.Model, config: Config, item: PredictionInput, out_dir, labels: bool = False,
                  overwrite: bool = False, tile_size: int | None = None, batch_size: int = 4,
                  progress: bool = True) -> dict:
    """Predict one image file and write ``<name>_mask.png`` and ``<name>_overlay.png`` (and, with
    ``labels``, ``<name>_labels.png``, 16-bit) into ``out_dir``.  Returns a dict of what was found, with
    scores when ground truth is known.  Raises DataError for an unreadable image, FileExistsError
    before writing anything when an output exists and ``overwrite`` is off."""
    out_dir = Path(out_dir)
    targets = {"mask": out_dir / f"{item.name}_mask.png", "overlay": out_dir / f"{item.name}_overlay.png"}
    if labels:
        targets["labels"] = out_dir / f"{item.name}_labels.png"
    for path in targets.values():
        if path.resolve() == Path(item.image_path).resolve():
            raise FileExistsError(f"{path} is the input image itself; choose another --out")
        _refuse_existing(path, overwrite)  # before the prediction, so a refused image costs nothing
    image = read_image(item.image_path)
    height, width = image.shape[:2]
    bar = tqdm(desc=f"{item.name} tiles", unit="tile", leave=False, disable=not progress or height * width < 2**21)

    def on_progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    probability, mask = predict_mask(model, image, config, tile_size=tile_size, batch_size=batch_size,
                                     progress=on_progress)
    bar.close()
    instances = label_instances(probability, config.threshold, config.min_nucleus_size)
    write_png(targets["mask"], mask, overwrite)
    write_png(targets["overlay"], draw_outlines(image, instances), overwrite)
    if labels:
        write_png(targets["labels"], instances.astype(np.uint16), overwrite)
    result = {"name": item.name, "height": height, "width": width, "nuclei": count_instances(instances),
              "instance_labels": instances, "image": image, "probability": probability}
    if item.truth is not None:
        truth = truth_labels(item.truth, (height, width))
        result.update(score_image(truth, probability, config.threshold, config.min_nucleus_size, instances))
        result["truth_labels"] = truth
    return result


def write_scores(results: Sequence[dict], path) -> dict:
    """Per-image Dice, IoU and DSB score, and their mean, as a CSV; returns the means."""
    keys = ("dice", "iou", "dsb_score")
    means = {k: float(np.mean([r[k] for r in results])) for k in keys}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "width", "height", "nuclei_true", "nuclei_pred", *keys])
        for r in results:
            writer.writerow([r["name"], r["width"], r["height"], r.get("nuclei_true", ""), r["nuclei"],
                             *(f"{r[k]:.4f}" for k in keys)])
        writer.writerow(["mean", "", "", "", "", *(f"{means[k]:.4f}" for k in keys)])
    return means


def validation_inputs(run_info: dict) -> tuple[list[PredictionInput], list[tuple[str, str]]]:
    """The validation images a run recorded (config.json's ``val_ids`` in its ``data_dir``), with their
    masks as ground truth.  A missing built-in sample is regenerated (it is deterministic)."""
    data_dir = Path(run_info.get("data_dir", ""))
    val_ids = set(run_info.get("val_ids", []))
    if not val_ids:
        raise DataError("this run's config.json lists no validation images; give image paths instead")
    if not data_dir.is_dir() and data_dir.name.startswith("synthetic_sample_"):
        ensure_sample_dataset(int(run_info.get("sample_images", 64)), 0, str(data_dir.parent))
    if not data_dir.is_dir():
        raise DataError(f"the run's data folder {data_dir} is gone; give image paths instead")
    samples, _ = find_samples(data_dir)
    inputs = [PredictionInput(s.sample_id, s.image_path, s) for s in samples if s.sample_id in val_ids]
    missing = sorted(val_ids - {i.name for i in inputs})
    return inputs, [(m, f"validation image not found in {data_dir}") for m in missing]


def plot_prediction_figure(results: Sequence[dict], path, max_images: int = 6) -> None:
    """Image, ground truth and prediction side by side (with scores), one row per image."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = list(results)[:max_images]
    fig, axes = plt.subplots(len(shown), 3, figsize=(12, 4 * len(shown)), squeeze=False)
    for row, r in zip(axes, shown):
        row[0].imshow(r["image"])
        row[0].set_title(f"{r['name']}  {r['width']}x{r['height']}")
        if "truth_labels" in r:
            row[1].imshow(draw_outlines(r["image"], r["truth_labels"], color=(0, 255, 0)))
            row[1].set_title(f"ground truth: {r.get('nuclei_true', '?')} nuclei")
        else:
            row[1].imshow(r["probability"], cmap="magma", vmin=0, vmax=1)
            row[1].set_title("probability")
        row[2].imshow(draw_outlines(r["image"], r["instance_labels"]))
        title = f"prediction: {r['nuclei']} nuclei"
        if "dice" in r:
            title += f"  Dice {r['dice']:.2f}  IoU {r['iou']:.2f}  DSB {r['dsb_score']:.2f}"
        row[2].set_title(title)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

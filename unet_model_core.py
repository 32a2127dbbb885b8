"""The nucleus-segmentation U-Net itself: data, hyperparameters, blocks, the U-Net builder, its losses
and metrics.  The sections mirror the numbered sections of ``unet_model.ipynb``:

    0. Required imports
    1. Data preprocessing (discovery, decoding, the split, patches, augmentation, the input pipelines)
    2. Hyperparameters (the ``Config`` dataclass, the single source of truth)
    4. Convolutional blocks (``conv_block``, ``down_block``, ``bottleneck``, ``up_block``)
    5. The U-Net model (``build_unet``) and its losses and metrics

Sections 6 and 7 of the notebook (training, testing) use the ``unet_nuclei`` package beside this file,
which imports this module; this module imports nothing of the project.  Importing it does no work: it
builds no model, touches no file and prints nothing.
"""

# =====================================================================================================
# 0. Required imports
# =====================================================================================================
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from pathlib import Path

# TensorFlow's C++ start-up chatter (CPU feature notes, oneDNN) hides what matters to users; keep its
# warnings and errors.  This must be set before TensorFlow is imported, and a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _choose_onednn() -> str:
    """Turn TensorFlow's oneDNN CPU kernels on where TensorFlow would leave them off, and say who chose.

    TensorFlow enables them by itself only on x86 processors with AVX-512 VNNI/BF16 or AMX; on an
    AVX2-only processor they halved this project's training step (1.0 s -> 0.5 s, bench_step.py).  A
    user's own ``TF_ENABLE_ONEDNN_OPTS`` always wins.  This runs before TensorFlow is first imported:
    every script, test and the notebook import this module before TensorFlow.
    """
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return "user"
    if platform.machine().lower() in ("x86_64", "amd64", "x86", "i686"):
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
        return "project"
    return "tensorflow"  # other processors (ARM): TensorFlow's own choice


ONEDNN_CHOICE = _choose_onednn()

import cv2
import keras
import numpy as np
import tifffile
from keras import layers, ops
from scipy import ndimage
from skimage import segmentation
from tqdm.auto import tqdm

# The name under which the losses and metrics are registered with Keras' serialisation framework.
KERAS_PACKAGE = "unet_nuclei"

# The real DSB-2018 training set, relative to the repository root, where users run the scripts.
DEFAULT_DATA_DIR = os.path.join("dataset", "stage1_train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")  # read with tifffile: every page, the axes and the metadata
# Files that operating systems and tools drop into folders.  They are skipped and listed in the report
# (so a user sees why a count is what it is), never read as samples.
STRAY_FILES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep", ".ipynb_checkpoints"}
# Reasons for skipped entries that are not damaged data (callers may leave them out of reports).
STRAY_REASON = "stray system file (skipped)"
NOT_A_SAMPLE_REASON = "not a sample folder (skipped)"


# =====================================================================================================
# 1. Data preprocessing
# =====================================================================================================
# Two layouts: "dsb" (DSB 2018: <root>/<id>/images/<id>.png, one binary PNG per nucleus in <root>/<id>/masks/)
# and "pairs" (<root>/images/<name>.<ext> with one binary or 16-bit label mask <root>/masks/<name>.<ext>).
# Decoding (every mask PNG read and merged) is the expensive part: done once, in threads, kept in memory.


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


def is_stray(path: Path) -> bool:
    """Whether a folder entry is an operating system's or tool's file (".DS_Store", "._foo" AppleDouble
    files, ".ipynb_checkpoints", any hidden entry), never a sample."""
    return path.name.lower() in STRAY_FILES or path.name.startswith(".")


def mask_stem(path: Path) -> str:
    """The image stem a mask file belongs to: ``a.png``, ``a_mask.png`` and ``a_labels.tif`` (a label image
    that Predict_mask.py wrote, perhaps corrected by hand) all belong to image ``a``."""
    for suffix in ("_mask", "_labels"):
        if path.stem.endswith(suffix):
            return path.stem[: -len(suffix)]
    return path.stem


def is_image_file(path: Path) -> bool:
    """Whether a path is a file with an image extension (and not a stray system file)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not is_stray(path)


def percentile_range(values: np.ndarray, dtype=None, low: float = 0.5, high: float = 99.8) -> tuple[float, float]:
    """The intensities at the ``low`` and ``high`` percentiles of an image's finite values, robust to hot
    pixels, camera offsets and negative values, and never closer together than a flat image's noise.

    ``dtype`` is the type the values were read as (default: theirs).  The floor on the range is 16 grey
    levels for integer images (a flat 8-bit image is not stretched into noise) and 16/255 of the larger
    bound's magnitude for float images, whatever their units.
    """
    values = np.asarray(values)
    integer = np.issubdtype(np.dtype(dtype or values.dtype), np.integer) or np.dtype(dtype or values.dtype) == bool
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (low, high)))
    floor = 16.0 if integer else 16.0 / 255.0 * max(abs(lo), abs(hi), 1e-12)
    return lo, max(hi, lo + floor)


def stretch_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` onto 0..255 (clipped; NaN to 0, +inf to 255), as
    uint8, in bands so that a large image never needs a float64 copy of itself."""
    out = np.empty(values.shape, np.uint8)
    scale = 255.0 / (high - low)
    for band, target in zip(
        np.array_split(values, max(1, -(-len(values) // 512))), np.array_split(out, max(1, -(-len(out) // 512)))
    ):
        band = np.nan_to_num(band.astype(np.float64), nan=low, posinf=high, neginf=low)
        target[...] = np.clip((band - low) * scale, 0, 255).round()
    return out


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Bring an array as OpenCV decodes it (grey, BGR, BGRA; any dtype) to H x W x 3 uint8 RGB.

    8-bit images are kept as they are.  Any other depth (12- and 16-bit cameras, float, signed) is
    stretched between the 0.5th and 99.8th percentiles of its own values, all channels together so
    colours keep their balance: a camera offset, one hot pixel or negative values do not squeeze the
    nuclei into a few grey levels, as dividing by the maximum would.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (2, 3, 4)):
        raise DataError(f"{name}: unsupported image shape {image.shape}; expected grey, RGB or RGBA")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and not np.isfinite(image).any():
            raise DataError(f"{name}: every pixel is NaN or infinite, so there is nothing to segment")
        colour = (
            image[:, :, :3] if image.ndim == 3 and image.shape[2] >= 3 else image[..., :1] if image.ndim == 3 else image
        )
        image = stretch_to_uint8(image, *percentile_range(colour))
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


# --- Microscope files: channels and planes ----------------------------------------------------------
# A decoded file names each axis of its array with tifffile's letters: Y and X span a plane; S holds the
# colour samples of a pixel (in OpenCV's order: blue, green, red, alpha; or grey, alpha); C the channels
# of a multi-channel file (stains recorded one by one); every other letter (Z depth, T time, Q or I for
# pages the file does not name) numbers planes.  Axes of length 1 are dropped.


@dataclasses.dataclass
class DecodedImage:
    """A decoded image file: its values as stored (any dtype), what each axis is, and the names of its
    channels when the file records them (OME-TIFF)."""

    pixels: np.ndarray
    axes: str  # one letter per axis of ``pixels``, in the order: planes, C, Y, X, S
    channel_names: tuple[str, ...] = ()
    other_series: int = 0  # image series of a TIFF after the first, which is the one read

    @property
    def plane_axes(self) -> str:
        """The axes that number planes ("" for a single 2-D image)."""
        return "".join(a for a in self.axes if a not in "CYXS")

    @property
    def plane_count(self) -> int:
        return int(np.prod([self.pixels.shape[i] for i, a in enumerate(self.axes) if a in self.plane_axes]))

    def planes(self) -> np.ndarray:
        """The planes one after another: P x H x W, or P x H x W x S for colour (C must be resolved)."""
        if "C" in self.axes:
            raise ValueError("choose a channel (choose_channel) before taking the planes")
        return self.pixels.reshape(self.plane_count, *self.pixels.shape[len(self.plane_axes) :])


def _tiff_channel_names(tiff: tifffile.TiffFile) -> tuple[str, ...]:
    """The channel names an OME-TIFF records for its first image (ImageJ keeps none that are reliable)."""
    if not tiff.is_ome or not tiff.ome_metadata:
        return ()
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(tiff.ome_metadata)
    except ElementTree.ParseError:
        return ()
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    channels = [] if pixels is None else [c for c in pixels if c.tag.endswith("Channel")]
    return tuple(c.get("Name", "") for c in channels)


def _tiff_pages_by_opencv(path: Path, shape: tuple[int, ...], axes: str, error: Exception) -> np.ndarray:
    """A TIFF series' pixels decoded page by page with OpenCV, for compressions that tifffile decodes only
    with the optional imagecodecs package (LZW, which OpenCV itself writes, JPEG).  Colour samples come
    in OpenCV's order (blue first).  ``error`` is tifffile's, for the message when OpenCV fails too."""
    ok, pages = cv2.imreadmulti(str(path), flags=cv2.IMREAD_UNCHANGED)
    page_shape = tuple(shape[axes.index("Y") :])
    count = int(np.prod(shape[: axes.index("Y")]))
    if not ok or len(pages) < count or any(p.shape != page_shape for p in pages[:count]):
        hint = (
            " (pip install imagecodecs reads it)"
            if "imagecodecs" in str(error)
            else ": the file may be damaged or cut short"
        )
        raise DataError(f"{path}: this TIFF could not be decoded ({error}){hint}")
    return np.stack(pages[:count]).reshape(shape)


def _decode_tiff(path: Path) -> DecodedImage | None:
    """A TIFF's first series, every page of it, with its axes; None for a file that OpenCV reads as before
    (not a TIFF after all; palette, YCbCr, CMYK or inverted grey pixels, which OpenCV converts)."""
    try:
        tiff = tifffile.TiffFile(path)
    except Exception:  # tifffile raises many types for a file it cannot parse; OpenCV then has its say
        return None
    with tiff:
        if not tiff.series:
            return None
        series = tiff.series[0]
        page = series.keyframe
        if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
            return None
        axes, shape = series.axes, tuple(series.shape)
        if "Y" not in axes or "X" not in axes or ("S" in axes and axes.index("S") < axes.index("X")):
            return None  # samples stored plane by plane (planar configuration 2): OpenCV interleaves them
        try:
            pixels, opencv_order = series.asarray(), False
        except Exception as error:  # LZW without imagecodecs, or damage: OpenCV tries, else a DataError
            pixels, opencv_order = _tiff_pages_by_opencv(path, shape, axes, error), True
        names = _tiff_channel_names(tiff)
        extra = tuple(int(e) for e in page.extrasamples)
        others = len(tiff.series) - 1
    pixels = pixels.reshape(shape)
    if "S" in axes:
        samples = shape[axes.index("S")]
        colour = (page.photometric == tifffile.PHOTOMETRIC.RGB and samples in (3, 4)) or (
            samples == 2 and extra[:1] in ((1,), (2,))
        )  # grey + alpha
        if not colour:
            axes = axes.replace("S", "C")  # extra samples that are not colour: channels, chosen by --channel
        elif samples >= 3 and not opencv_order:
            pixels = pixels[..., [2, 1, 0, 3][:samples]]  # RGB(A) -> OpenCV's BGR(A), as for every format
    # Move C right before Y and X, drop the axes of length 1, keep the order of the plane axes.
    order = [i for i, a in enumerate(axes) if a not in "CYXS"] + [
        i for a in "CYXS" for i, b in enumerate(axes) if a == b
    ]
    pixels, axes = np.transpose(pixels, order), "".join(axes[i] for i in order)
    keep = [i for i, a in enumerate(axes) if pixels.shape[i] > 1 or a in "YX"]
    return DecodedImage(
        pixels.reshape([pixels.shape[i] for i in keep]),
        "".join(axes[i] for i in keep),
        names if "C" in axes else (),
        others,
    )


def decode_image(path) -> DecodedImage:
    """Decode an image file with every page and the name of each axis: TIFFs with tifffile (the first
    series: a z-stack, a time series, an ImageJ hyperstack or an OME-TIFF, all pages), other formats and
    TIFFs tifffile leaves to it with OpenCV (one plane, grey or colour)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS and path.is_file():
        decoded = _decode_tiff(path)
        if decoded is not None:
            return decoded
    pixels = _decode(path)
    return DecodedImage(pixels, "YX" if pixels.ndim == 2 else "YXS")


def _channel_list(names: Sequence[str], count: int) -> str:
    return ", ".join(f"{i}" + (f" '{names[i]}'" if i < len(names) and names[i] else "") for i in range(count))


def choose_channel(image: DecodedImage, channel: int | None, name: str = "image") -> DecodedImage:
    """The image with one channel where it has several: ``channel`` (0-based) along its channel axis.

    A file whose metadata names a channel axis (ImageJ, OME) holds one stain per channel, so without
    ``channel`` it is refused, with a message that lists its channels: averaging a nuclear stain with
    the others would segment the wrong thing.  Colour images (RGB, RGBA, grey + alpha) are kept as they
    are, or give one colour (0 red, 1 green, 2 blue) when ``channel`` is given.  A file of unnamed pages
    (plain multi-page TIFF) counts its pages as channels only when ``channel`` is given; otherwise they
    are planes.  A grey image has one channel, 0."""
    axes, pixels = image.axes, image.pixels
    if channel is not None and (int(channel) != channel or channel < 0):
        raise DataError(f"--channel {channel}: give a channel number, 0 for the first")
    if (
        "C" not in axes
        and channel is not None
        and "S" not in axes
        and len(image.plane_axes) == 1
        and image.plane_axes in "QI"
    ):
        axes = axes.replace(image.plane_axes, "C")  # unnamed pages, taken as channels since one is asked for
    if "C" in axes:
        count = pixels.shape[axes.index("C")]
        listing = _channel_list(image.channel_names, count)
        if channel is None:
            raise DataError(
                f"{name} has {count} channels ({listing}); the model segments one nuclear stain "
                f"at a time: choose it with --channel N (0-based, 0 to {count - 1})"
            )
        if channel >= count:
            raise DataError(
                f"{name}: --channel {channel} does not exist; the file has {count} channels "
                f"({listing}), numbered from 0"
            )
        return DecodedImage(
            np.take(pixels, int(channel), axis=axes.index("C")), axes.replace("C", ""), other_series=image.other_series
        )
    if channel is None:
        return image
    if "S" in axes:
        count = pixels.shape[-1]
        colours = ("grey", "alpha") if count == 2 else ("red", "green", "blue", "alpha")[:count]
        if channel >= count:
            raise DataError(
                f"{name}: --channel {channel} does not exist; the colour image has {count} "
                f"channels ({', '.join(f'{i} {c}' for i, c in enumerate(colours))})"
            )
        stored = ([0, 1] if count == 2 else [2, 1, 0, 3])[int(channel)]  # OpenCV's order: blue first
        return DecodedImage(np.ascontiguousarray(pixels[..., stored]), axes[:-1], other_series=image.other_series)
    if channel != 0:
        raise DataError(
            f"{name} is a grey image with one channel, so --channel {channel} does not exist "
            f"(use --channel 0, or leave it out)"
        )
    return image


def describe_axes(axes: str, sizes: Sequence[int]) -> str:
    """Plane axes for a user: "5 z-planes", "3 time points x 5 z-planes", "4 pages"."""
    words = {"Z": "z-plane", "T": "time point"}
    return " x ".join(f"{n} {words.get(a, 'page')}{'s' if n != 1 else ''}" for a, n in zip(axes, sizes))


def read_image(path, channel: int | None = None) -> np.ndarray:
    """Read an image file of one plane (PNG, JPEG, TIFF, BMP; grey, RGB, RGBA, multi-channel; any depth)
    as H x W x 3 uint8 RGB; ``channel`` chooses one channel of a multi-channel file (``choose_channel``).
    A file of several planes is refused here: ``Predict_mask.py`` segments them one by one."""
    image = choose_channel(decode_image(path), channel, str(path))
    if image.plane_axes:
        sizes = [image.pixels.shape[image.axes.index(a)] for a in image.plane_axes]
        raise DataError(
            f"{path} holds {describe_axes(image.plane_axes, sizes)}; one plane per image is read "
            f"here (Predict_mask.py segments each plane, or with --project max their projection): "
            f"save the plane you want as an image of its own"
        )
    return to_rgb_uint8(image.pixels, name=str(path))


def read_mask(path) -> np.ndarray:
    """Read a binary mask file as an H x W bool array.  Masks saved as 0/1, 0/255, colour or slightly lossy
    (JPEG) all work: foreground is brighter than half the maximum (8-bit) or non-zero (16-bit labels)."""
    return _binary(_decode(path))


def _binary(mask: np.ndarray) -> np.ndarray:  # a decoded mask (any depth and channels) -> bool
    if mask.ndim == 3:
        mask = mask[:, :, :3].max(axis=2) if mask.shape[2] >= 3 else mask[:, :, 0]
    if mask.dtype == np.uint8:
        return mask > (int(mask.max()) // 2)
    return mask > 0


def _read_mask_file(path: Path) -> np.ndarray:
    # Label images saved by Fiji, napari or Predict_mask.py --labels tif may be 32-bit, which OpenCV does
    # not read: decode_image reads TIFFs with tifffile (and leaves what it cannot decode to OpenCV).  A
    # file of several pages gives its first, as OpenCV reads it.  Fiji's 32-bit float label images hold
    # whole numbers: they are labels too.
    decoded = decode_image(path)
    if decoded.axes not in ("YX", "YXS"):
        return _decode(path)
    raw = decoded.pixels
    if np.issubdtype(raw.dtype, np.floating) and np.isfinite(raw).all() and np.array_equal(raw, np.round(raw)):
        raw = raw.astype(np.int64)
    return raw


def read_instance_labels(mask_paths: Sequence, shape: tuple[int, int], layout: str = "dsb") -> np.ndarray:
    """Merge one-mask-per-nucleus files into an H x W uint16 label image.  The "pairs" layout's one mask
    is a label image when 16-bit with several values (StarDist's and Cellpose's convention), else a binary
    mask split into its connected components, the best estimate there is without per-nucleus files."""
    labels = np.zeros(shape, dtype=np.uint16)
    if layout == "pairs":
        raw = _read_mask_file(Path(mask_paths[0]))
        if raw.shape[:2] != tuple(shape):
            raise DataError(
                f"{mask_paths[0]}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is {shape[1]}x{shape[0]}"
            )
        if raw.ndim == 2 and raw.dtype != np.uint8 and np.issubdtype(raw.dtype, np.integer) and len(np.unique(raw)) > 2:
            if raw.min() < 0 or raw.max() > np.iinfo(np.uint16).max:
                raise DataError(
                    f"{mask_paths[0]}: a label image needs labels from 0 to 65,535, found {raw.min()} to {raw.max()}"
                )
            return raw.astype(np.uint16)
        return cv2.connectedComponents(_binary(raw).astype(np.uint8), connectivity=8)[1].astype(np.uint16)
    for index, path in enumerate(mask_paths, start=1):
        mask = read_mask(path)
        if mask.shape != tuple(shape):
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
        labels[mask] = index
    return labels


def _pairs_samples(root: Path, require_masks: bool) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples and problems of the "pairs" layout: <root>/images/<name>.<ext>, <root>/masks/<name>.<ext>."""
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    images_dir, masks_dir = root / "images", root / "masks"
    masks, duplicates = {}, {}
    if masks_dir.is_dir():
        for path in sorted(masks_dir.iterdir()):
            if is_image_file(path):
                if mask_stem(path) in masks:
                    duplicates.setdefault(mask_stem(path), [masks[mask_stem(path)].name]).append(path.name)
                masks.setdefault(mask_stem(path), path)
    for path in sorted(images_dir.iterdir()):
        if is_stray(path):
            problems.append((path.name, STRAY_REASON))
            continue
        if path.is_dir():
            continue
        if not is_image_file(path):
            problems.append((path.name, "not an image file (skipped)"))
        elif path.stem in duplicates:
            problems.append(
                (
                    path.stem,
                    f"several masks in {masks_dir} ({', '.join(duplicates[path.stem])}): "
                    f"keep one, so it is clear which is right",
                )
            )
        elif path.stem in masks:
            samples.append(Sample(path.stem, path, (masks[path.stem],), "pairs"))
        elif require_masks:
            problems.append((path.stem, f"no mask named {path.stem}.* in {masks_dir}"))
        else:
            samples.append(Sample(path.stem, path, (), "pairs"))
    return samples, problems


def _dsb_samples(root: Path, require_masks: bool) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples and problems of the DSB layout: <root>/<id>/images/<id>.png, <root>/<id>/masks/*.png."""
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    for child in sorted(root.iterdir()):
        if is_stray(child):
            problems.append((child.name, STRAY_REASON))
            continue
        if not child.is_dir():
            problems.append((child.name, NOT_A_SAMPLE_REASON))
            continue
        image_dir = child / "images"
        candidates = sorted(p for p in image_dir.iterdir() if is_image_file(p)) if image_dir.is_dir() else []
        preferred = [p for p in candidates if p.stem == child.name]
        if not candidates:
            problems.append((child.name, f"no image in {image_dir}"))
            continue
        image_path = (preferred or candidates)[0]
        mask_dir = child / "masks"
        mask_paths = tuple(sorted(p for p in mask_dir.iterdir() if is_image_file(p))) if mask_dir.is_dir() else ()
        if require_masks and not mask_dir.is_dir():
            problems.append((child.name, "no masks/ folder"))
            continue
        if require_masks and not mask_paths:
            problems.append((child.name, "masks/ folder holds no mask image"))
            continue
        samples.append(Sample(child.name, image_path, mask_paths, "dsb"))
    return samples, problems


def find_samples(data_dir, require_masks: bool = True) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Discover the samples of a dataset folder without reading any image: ``(samples, problems)``, the
    latter ``(id, reason)`` for everything skipped; ``DataError`` when there is no usable sample."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    is_pairs = (root / "images").is_dir() and not any(
        (child / "images").is_dir() for child in root.iterdir() if child.is_dir()
    )
    samples, problems = (_pairs_samples if is_pairs else _dsb_samples)(root, require_masks)
    if not samples:
        # Point at a real problem in the hint, not at a .DS_Store that happens to sort first.
        real = [p for p in problems if p[1] != STRAY_REASON] or problems
        raise DataError(
            f"no usable sample in {root}. Expected either the DSB-2018 layout "
            f"(<folder>/<id>/images/<id>.png with one PNG per nucleus in <folder>/<id>/masks/) or "
            f"<folder>/images/<name>.png with a matching binary mask <folder>/masks/<name>.png"
            + (f"; {len(problems)} entries were skipped, first: {real[0][0]}: {real[0][1]}" if problems else "")
        )
    return samples, problems


def _load_one(sample: Sample, channel: int | None = None) -> LoadedSample:
    image = read_image(sample.image_path, channel)
    if sample.mask_paths:
        labels = read_instance_labels(sample.mask_paths, image.shape[:2], sample.layout)
    else:
        labels = np.zeros(image.shape[:2], np.uint16)
    return LoadedSample(sample.sample_id, image, labels)


def load_samples(
    samples: Sequence[Sample],
    progress: bool = True,
    workers: int | None = None,
    desc: str = "Decoding images and masks",
    channel: int | None = None,
) -> tuple[list[LoadedSample], list[tuple[str, str]]]:
    """Decode images and merge their masks once, in parallel: ``(loaded, problems)`` in the order of
    ``samples``; bad samples are skipped and reported.  ``channel``: see ``read_image``."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    loaded, problems = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_load_one, s, channel) for s in samples]
        for sample, future in tqdm(
            zip(samples, futures), total=len(samples), desc=desc, disable=not progress, unit="img"
        ):
            try:
                loaded.append(future.result())
            except DataError as error:
                problems.append((sample.sample_id, str(error)))
            except (OSError, cv2.error) as error:
                problems.append((sample.sample_id, f"could not be read: {error}"))
    return loaded, problems


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
    """Resize a mask or label image by nearest neighbour (labels stay labels), on the pixel grid that
    ``resize_image`` uses: plain INTER_NEAREST samples half a pixel off it."""
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


SCALE_LIMIT = 2.0  # the most an image is rescaled, either way, to bring its nuclei to ``nucleus_diameter``


def nucleus_scale(labels: np.ndarray, diameter: float | None) -> float:
    """The factor that resizes a label image's nuclei to a median diameter (of a disc of the same area) of
    ``diameter`` px, within 1/SCALE_LIMIT .. SCALE_LIMIT; 1 without ``diameter`` or without nuclei."""
    sizes = np.bincount(np.asarray(labels).ravel())[1:] if diameter else np.zeros(0)
    across = np.sqrt(sizes[sizes > 0] * (4 / np.pi))
    return float(np.clip(diameter / np.median(across), 1 / SCALE_LIMIT, SCALE_LIMIT)) if len(across) else 1.0


def rescale_view(image: np.ndarray, labels: np.ndarray | None, factor: float) -> tuple[np.ndarray, np.ndarray | None]:
    """An image (H x W x C) and its labels (or None) resized by ``factor``, the labels by nearest neighbour."""
    size = (max(1, int(round(image.shape[0] * factor))), max(1, int(round(image.shape[1] * factor))))
    return resize_image(image, size).reshape(*size, -1), None if labels is None else resize_mask(labels, size)


def grid_positions(length: int, size: int) -> list[int]:
    """Start offsets of the fewest ``size``-pixel windows that cover ``[0, length)``: the first at 0, the
    last flush with the end, the ones between spread evenly (integer math, so the last one is exact)."""
    if length <= size:
        return [0]
    count = -(-length // size)  # ceil(length / size)
    return [i * (length - size) // (count - 1) for i in range(count)]


# --- The model's view of an image, and what it learns -------------------------------------------------
# The same preprocessing at training and at prediction; targets from instance labels, never a union mask.

PREPROCESSING = ("grey", "rgb")
# The stretched median above which an image counts as bright-background (see has_bright_background).
BRIGHT_BACKGROUND_THRESHOLD = 0.33
TARGETS = ("instance", "binary")  # instance: classes 0 background, 1 nucleus interior, 2 boundary


def has_bright_background(grey: np.ndarray, dtype=None) -> bool:
    """Whether a grey image shows dark nuclei on a bright background (brightfield, stained tissue).

    Judged on the image stretched between its own percentiles, so a fluorescence image with a camera
    offset (a raw background of 180 out of 300, say) is not taken for brightfield: its background stays
    near the bottom of the stretched range.  The median of the stretched image splits DSB-2018 cleanly:
    at most 0.19 for all 541 dark-background images, at least 0.46 for all 123 bright-background ones;
    the threshold sits between the two.
    """
    low, high = percentile_range(grey, dtype)
    return (float(np.median(grey)) - low) / (high - low) > BRIGHT_BACKGROUND_THRESHOLD


def preprocess_image(image: np.ndarray, mode: str = "grey") -> np.ndarray:
    """The model's input for an H x W x 3 RGB image: the same code at training and at prediction.

    "rgb" keeps the image.  "grey" makes every kind of microscopy look alike: the channels are averaged,
    an image with a bright background (brightfield, stained tissue) is inverted so its nuclei are bright
    on dark as in fluorescence, and intensities are stretched between the 0.5th and 99.8th percentiles so
    a dim exposure and a bright one give the same input.  Returns H x W x 1 uint8 for "grey".
    """
    if mode == "rgb":
        return np.asarray(image)
    if mode != "grey":
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {mode!r}")
    image = np.asarray(image)
    grey = image.mean(axis=2, dtype=np.float32)  # no float32 copy of all three channels
    if has_bright_background(grey, image.dtype):
        # Inverted, then stretched between the inverted image's own percentiles.
        ceiling = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 0.0
        np.subtract(ceiling, grey, out=grey)
    return stretch_to_uint8(grey, *percentile_range(grey, image.dtype))[..., None]


def instance_targets(labels: np.ndarray, contact: int = 2) -> np.ndarray:
    """Instance labels -> per-pixel classes: 0 background, 1 nucleus interior, 2 nucleus boundary.

    The boundary is each nucleus's one-pixel inner rim, widened to ``contact`` pixels wherever another
    nucleus is that close.  The pixels where two nuclei meet are what a binary mask cannot express; with
    them as a class of their own, the interiors of touching nuclei come out as separate blobs.
    """
    labels = np.asarray(labels).astype(np.int32)
    nuclei = labels > 0
    classes = nuclei.astype(np.uint8)
    rim = segmentation.find_boundaries(labels, mode="inner") & nuclei
    # A nucleus pixel is near another nucleus when the largest or the smallest label within ``contact``
    # pixels (the background counting as +infinity for the smallest) is a nucleus other than its own.
    window = 2 * contact + 1
    none = np.iinfo(np.int32).max
    largest = ndimage.maximum_filter(labels, window)
    smallest = ndimage.minimum_filter(np.where(nuclei, labels, none), window)
    near_other = ((largest != labels) & (largest > 0)) | ((smallest != labels) & (smallest != none))
    classes[rim | (nuclei & near_other)] = 2
    return classes


def targets_from_labels(labels: np.ndarray, targets: str = "instance") -> np.ndarray:
    """The training target of an instance-label image: ``instance_targets`` or the binary union mask."""
    if targets == "instance":
        return instance_targets(labels)
    if targets == "binary":
        return (np.asarray(labels) > 0).astype(np.uint8)
    raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")


def _patch_arrays(views, size: int, targets: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic validation patches: a grid of ``size`` windows covering every image."""
    images, classes = [], []
    for image, labels in views:
        image = pad_to_min_size(image, size)
        target = pad_to_min_size(targets_from_labels(labels, targets), size)
        for top in grid_positions(image.shape[0], size):
            for left in grid_positions(image.shape[1], size):
                images.append(image[top : top + size, left : left + size])
                classes.append(target[top : top + size, left : left + size])
    return np.stack(images), np.stack(classes)[..., None]


def _resized_arrays(views, size: int, targets: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole images resized to ``size`` x ``size`` (the original DSB-starter way)."""
    images = np.stack([resize_image(image, size).reshape(size, size, -1) for image, _ in views])
    classes = np.stack([targets_from_labels(resize_mask(labels, size), targets) for _, labels in views])
    return images, classes[..., None]


class PatchSampler:
    """Draws random ``size`` x ``size`` patches (image, target classes) from images held in memory.

    Images are drawn with probability proportional to their area ** ``area_power`` (1: every pixel about
    equally likely; 0: every image; 0.5: a few large images do not crowd out many small ones).  With
    ``scale_range`` each patch is cut at a random scale (log-uniform) and resized to ``size`` (labels by
    nearest neighbour), so the model meets nuclei larger and smaller than the training set's; targets
    come from the resized labels, so a boundary is as thin at every scale.  With ``diameter`` that scale
    is relative to each image's ``nucleus_scale``, which brings its nuclei to that median diameter.

    ``batch(index, count)`` draws batch number ``index`` from its own random stream (the seed and the
    index), so any batch can be made in any order, by any worker, and is the same every time.
    """

    def __init__(
        self,
        views,
        size: int,
        seed: int = 0,
        targets: str = "binary",
        scale_range: tuple[float, float] | None = None,
        area_power: float = 1.0,
        diameter: float | None = None,
    ):
        if not views:
            raise DataError("no training samples to draw patches from")
        self.size, self.seed, self.targets = size, seed, targets
        self.scale_range = tuple(scale_range) if scale_range else None
        self.factors = [nucleus_scale(labels, diameter) for _, labels in views]
        largest = int(math.ceil(size / min(self.scale_range or (1.0,)) / min(self.factors)))
        self.images = [pad_to_min_size(image, largest) for image, _ in views]
        self.labels = [pad_to_min_size(labels, largest) for _, labels in views]
        areas = np.array([labels.shape[0] * labels.shape[1] for _, labels in views], dtype=np.float64)
        self.weights = areas**area_power / (areas**area_power).sum()
        self.total_area = float(areas.sum())

    def patches_per_epoch(self) -> int:
        """How many patches make one pass over the training pixels, on average."""
        return max(1, int(math.ceil(self.total_area / (self.size * self.size))))

    def batch(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of the stream: ``count`` images (uint8) and their target classes (uint8, a
        last axis of 1)."""
        rng = np.random.default_rng([self.seed, index])
        pairs = [self._patch(rng) for _ in range(count)]
        return np.stack([image for image, _ in pairs]), np.stack([classes for _, classes in pairs])

    def _patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.size
        index = rng.choice(len(self.images), p=self.weights)
        image, labels = self.images[index], self.labels[index]
        scale = self.factors[index]
        if self.scale_range:
            scale *= math.exp(rng.uniform(*np.log(self.scale_range)))
        crop = max(1, int(round(size / scale)))
        top = int(rng.integers(0, image.shape[0] - crop + 1))
        left = int(rng.integers(0, image.shape[1] - crop + 1))
        image, labels = image[top : top + crop, left : left + crop], labels[top : top + crop, left : left + crop]
        if crop != size:
            image = resize_image(image, size).reshape(size, size, -1)
            labels = resize_mask(labels, size)
        return image, targets_from_labels(labels, self.targets)[..., None]


class ShuffledImages:
    """The ``resize`` sampling's stream: the whole images, resized, in a new random order every pass.
    Like ``PatchSampler`` it makes any batch from its index alone: batch ``index`` holds the stream's
    items ``index * count`` to ``(index + 1) * count``, and the order of pass ``p`` comes from the seed
    and ``p``."""

    def __init__(self, images: np.ndarray, classes: np.ndarray, seed: int = 0):
        self.images, self.classes, self.seed = images, classes, seed

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def batch(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        total = len(self.images)
        positions = range(index * count, (index + 1) * count)
        orders = {p: self.order(p) for p in {position // total for position in positions}}  # each pass once
        chosen = [orders[p // total][p % total] for p in positions]
        return self.images[chosen], self.classes[chosen]


def augmentation_draws(seed: int, index: int, count: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers that augment batch ``index``: six per image (three flips, brightness, contrast,
    gamma) and one gain per image and channel, all uniform in [0, 1).  From the seed and the index
    alone, like the batch's patches, but from a stream of their own."""
    rng = np.random.default_rng([seed, index, 1])
    return rng.random((count, 6), dtype=np.float32), rng.random((count, channels), dtype=np.float32)


def augment_batch(images: np.ndarray, classes: np.ndarray, draws: np.ndarray, gains: np.ndarray):
    """Paired random augmentation of a batch: the 8 flips/rotations, applied identically to image and
    target, and intensity jitter (brightness, contrast, gamma, per-channel gain) on the image only.

    ``images`` are float32 in [0, 255] with any number of channels; ``draws`` and ``gains`` come from
    ``augmentation_draws``.  Square patches only (rotation by 90 degrees is a transpose plus a flip).
    """
    flipped_images, flipped_classes = [], []
    for image, target, (left_right, up_down, transpose) in zip(images, classes, draws[:, :3] < 0.5):
        for flip, transform in (
            (left_right, lambda t: t[:, ::-1]),
            (up_down, lambda t: t[::-1]),
            (transpose, lambda t: t.transpose(1, 0, 2)),
        ):  # with flips: rotations
            if flip:
                image, target = transform(image), transform(target)
        flipped_images.append(image)
        flipped_classes.append(target)
    images, classes = np.stack(flipped_images), np.stack(flipped_classes)

    # Intensity jitter: microscopes and stains vary, the nuclei's shapes do not.
    shape = (-1, 1, 1, 1)
    brightness = ((draws[:, 3] - 0.5) * 0.2 * 255.0).reshape(shape)  # +-10% of full scale
    contrast = (0.75 + draws[:, 4] * 0.5).reshape(shape)  # 0.75 .. 1.25
    gamma = np.exp((draws[:, 5] - 0.5) * 0.6).reshape(shape)  # about 0.74 .. 1.35
    gain = (1.0 + (gains - 0.5) * 0.2)[:, None, None, :]  # +-10% per channel
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    images = (images - mean) * contrast + mean + brightness
    images = 255.0 * np.power(np.clip(images / 255.0, 0.0, 1.0), gamma) * gain
    return np.clip(images, 0.0, 255.0).astype(np.float32), classes


def model_targets(classes: np.ndarray, num_classes: int, crop: int) -> np.ndarray:
    """Batch of target classes (0/1, or 0/1/2 for instance targets) -> the model's target: centre-cropped
    for unpadded models, one-hot for more than one class, float32 in every case."""
    if crop:
        classes = classes[:, crop:-crop, crop:-crop, :]
    if num_classes > 1:
        return np.eye(num_classes, dtype=np.float32)[classes[..., 0]]
    return classes.astype(np.float32)


class TrainingBatches(keras.utils.PyDataset):
    """The endless training stream as numbered batches of (images, targets), float32, made with NumPy and
    OpenCV only: patches (``PatchSampler`` or ``ShuffledImages``), augmentation, model targets.

    Batch ``index`` depends on the seed and the index alone, so Keras's worker threads may make batches
    in any order, and every backend trains on the same batches: the JAX and PyTorch backends read this
    ``PyDataset`` directly, TensorFlow through ``as_tf_dataset``.
    """

    def __init__(self, source, config: Config, crop: int, workers: int = 2):
        super().__init__(workers=workers, max_queue_size=8)
        self.source, self.config, self.crop = source, config, crop

    @property
    def num_batches(self):
        return None  # endless: Keras is told how many steps make an epoch

    def __getitem__(self, index):
        config = self.config
        images, classes = self.source.batch(int(index), config.batch_size)
        images = images.astype(np.float32)
        if config.augment:
            draws = augmentation_draws(config.seed, int(index), len(images), images.shape[-1])
            images, classes = augment_batch(images, classes, *draws)
        return images, model_targets(classes, config.num_classes, self.crop)


class ValidationBatches(keras.utils.PyDataset):
    """Fixed validation batches of (images, targets), float32, never augmented: the same every epoch."""

    def __init__(self, images: np.ndarray, classes: np.ndarray, config: Config, crop: int):
        super().__init__()
        self.images, self.classes, self.config, self.crop = images, classes, config, crop

    @property
    def num_batches(self):
        return max(1, math.ceil(len(self.images) / self.config.batch_size))

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        chunk = slice(index * self.config.batch_size, (index + 1) * self.config.batch_size)
        return self.images[chunk].astype(np.float32), model_targets(
            self.classes[chunk], self.config.num_classes, self.crop
        )


def as_tf_dataset(batches: keras.utils.PyDataset, cache: bool = False):
    """A ``tf.data`` pipeline over a ``PyDataset`` of numbered batches, for the TensorFlow backend (its
    distribution strategies shard and prefetch ``tf.data``): batches are made in parallel threads, kept
    in order, and are exactly those of ``batches``.  ``cache`` keeps a finite dataset's batches after the
    first pass (the validation set).  The only place that builds the input pipeline with TensorFlow."""
    import tensorflow as tf

    images, targets = batches[0]
    length = batches.num_batches
    fixed = length is None  # training batches all have the same size; the last validation one may not
    specs = [tf.TensorSpec((images.shape[0] if fixed else None, *a.shape[1:]), tf.float32) for a in (images, targets)]

    def load(index):
        pair = tf.numpy_function(lambda i: batches[int(i)], [index], (tf.float32, tf.float32), stateful=False)
        return tuple(tf.ensure_shape(a, spec.shape) for a, spec in zip(pair, specs))

    indices = tf.data.Dataset.counter() if fixed else tf.data.Dataset.range(length)
    dataset = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        dataset = dataset.cache()
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_datasets(
    train_samples: Sequence[LoadedSample],
    val_samples: Sequence[LoadedSample],
    config: Config,
    tf_data: bool | None = None,
):
    """The training and validation input pipelines from decoded samples.

    Returns ``(train, val, steps_per_epoch)``: a ``TrainingBatches`` and a ``ValidationBatches`` (Keras
    ``PyDataset``s that need only NumPy and OpenCV), or with ``tf_data`` the very same batches as
    ``tf.data`` datasets (``as_tf_dataset``); by default ``tf_data`` is whether Keras runs on TensorFlow.
    The training set repeats forever (Keras is told how many steps make an epoch); patches are random,
    augmentation follows ``config.augment``.  The validation set is fixed: the same patches (or resized
    images) every epoch, never augmented.
    """
    if tf_data is None:
        tf_data = keras.backend.backend() == "tensorflow"
    size, batch = config.image_size, config.batch_size
    out_size = unet_output_size(size, len(config.channels) - 1, config.padding)
    crop = (size - out_size) // 2
    # (preprocessed image, instance labels) of each sample: preprocessed once, before any random work.
    train_views, val_views = (
        [(preprocess_image(s.image, config.preprocessing), s.labels) for s in samples]
        for samples in (train_samples, val_samples)
    )
    diameter = None if config.nucleus_epochs else config.nucleus_diameter  # of two stages, the first's: native
    if diameter:  # the validation patches at that nucleus size too
        val_views = [rescale_view(image, labels, nucleus_scale(labels, diameter)) for image, labels in val_views]

    if config.sampling == "patch":
        source = PatchSampler(
            train_views, size, config.seed, config.targets, config.scale_range, config.area_power, diameter
        )
        steps = config.steps_per_epoch or max(1, math.ceil(source.patches_per_epoch() / batch))
        val_arrays = _patch_arrays(val_views, size, config.targets)
    else:
        source = ShuffledImages(*_resized_arrays(train_views, size, config.targets), seed=config.seed)
        steps = config.steps_per_epoch or max(1, math.ceil(len(source.images) / batch))
        val_arrays = _resized_arrays(val_views, size, config.targets)
    train, val = TrainingBatches(source, config, crop), ValidationBatches(*val_arrays, config, crop)
    if tf_data:
        return as_tf_dataset(train), as_tf_dataset(val, cache=True), steps
    return train, val, steps


# =====================================================================================================
# 2. Hyperparameters
# =====================================================================================================
SAMPLING_MODES = ("patch", "resize")
PADDINGS = ("same", "valid")
LOSSES = ("bce", "dice", "bce+dice")
LR_SCHEDULES = ("cosine", "plateau")
BLOCKS = ("plain", "residual")
# Runs of earlier versions (their config.json has "num_classes") were binary, RGB, unscaled, plateau LR.
LEGACY_DEFAULTS = {"targets": "binary", "preprocessing": "rgb", "scale_range": None, "lr_schedule": "plateau"}


@dataclasses.dataclass(frozen=True)
class Flag:
    """What a ``Config`` field means, and how ``Train.py`` offers it as a flag (made by ``flag``).

    ``help`` says what the field means, and is the flag's help (``Train.py`` adds the default).  ``group``
    is the flag's section of ``--help`` ("data", "model" or "training"); a field without one is no flag of
    ``Train.py`` (the inference settings, which training chooses on the validation images).  The others
    only where a field needs them: ``name``, the flag when it is not the field's name with dashes;
    ``metavar`` and ``choices``, as in argparse (``choices`` are checked by ``Config`` too); ``parse``,
    which turns the flag's text into the value where the field's type alone cannot (its ValueError,
    after the flag's name, is the message the user sees); ``none``, what a default of None means.
    """

    help: str
    group: str | None = None
    name: str | None = None
    metavar: str | None = None
    choices: Sequence[str] | None = None
    parse: Callable[[str], object] | None = None
    none: str | None = None


def flag(help: str, group: str | None = None, **hints) -> dict:
    """A ``Config`` field's metadata, holding its ``Flag``:
    ``epochs: int = field(default=20, metadata=flag("number of epochs", "training", metavar="N"))``."""
    return {"flag": Flag(help, group, **hints)}


def comma_separated(kind: type, example: str, none: bool = False) -> Callable[[str], tuple | None]:
    """A flag's parser for numbers of ``kind`` separated by commas, such as ``example``; with ``none``,
    the word 'none' gives None."""

    def parse(text: str) -> tuple | None:
        if none and text.strip().lower() == "none":
            return None
        try:
            return tuple(kind(value) for value in text.split(","))
        except ValueError:
            raise ValueError(f"{text!r}: expected comma-separated numbers, for example {example}") from None

    return parse


def pixels_or_none(text: str) -> float | None:
    """``--nucleus-diameter``'s parser: a number of pixels, or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        pixels = float(text)
    except ValueError:
        raise ValueError(f"{text!r}: expected a number of pixels, or 'none'") from None
    if pixels == 0:  # once read as "none": say what each means instead
        raise ValueError(
            "0: give the nuclei's median diameter in pixels (a positive number, such as 20), or "
            "'none' to train at the images' own scale"
        )
    return pixels


@dataclasses.dataclass
class Config:
    """Every hyperparameter in one place: the notebook, Train.py and Predict_mask.py start from these
    defaults, and each run saves the resolved values beside its model (``config.json``).  Each field's
    ``Flag`` (its metadata, made by ``flag``) says what it means; ``Train.py``'s flags and their help come
    from it, so a new hyperparameter is one field here."""

    # Data
    data_dir: str | None = field(
        default=None,
        metadata=flag(
            "dataset folder in the DSB layout (<id>/images, <id>/masks) or with images/ and masks/ subfolders",
            "data",
            name="--data",
            metavar="DIR",
            none="dataset/stage1_train if present, else the built-in synthetic sample",
        ),
    )
    sample_images: int = field(
        default=128, metadata=flag("number of images in the built-in synthetic sample", "data", metavar="N")
    )
    channel: int | None = field(
        default=None,
        metadata=flag(
            "for multi-channel training images (ImageJ or OME-TIFF, one stain per channel): the channel that shows "
            "the nuclei, 0-based; for RGB images 0 red, 1 green, 2 blue",
            "data",
            metavar="N",
            none="none; grey and colour images are read as they are, and a multi-channel image is refused",
        ),
    )
    sampling: str = field(
        default="patch",
        metadata=flag(
            "'patch': random crops at native resolution, prediction at full resolution; 'resize': whole images "
            "resized to --image-size, the original way",
            "data",
            choices=SAMPLING_MODES,
        ),
    )
    image_size: int = field(
        default=128,
        metadata=flag("patch side (or resize target) in pixels: the model's training input size", "data", metavar="PX"),
    )
    val_size: float = field(
        default=0.1, metadata=flag("validation images: a fraction below 1 or a count", "data", metavar="F")
    )
    augment: bool = field(
        default=True, metadata=flag("flips, rotations and intensity jitter of the training batches", "data")
    )
    scale_range: tuple[float, float] | None = field(
        default=(0.6, 1.8),
        metadata=flag(
            "random patch scale, so the model meets smaller and larger nuclei; 'none' keeps the native scale",
            "data",
            metavar="LOW,HIGH",
            parse=comma_separated(float, "0.6,1.8", none=True),
        ),
    )
    preprocessing: str = field(
        default="grey",
        metadata=flag(
            "'grey': grey, bright nuclei on dark, contrast-stretched, the same for every kind of microscopy; "
            "'rgb': the image as it is",
            "data",
            choices=PREPROCESSING,
        ),
    )
    area_power: float = field(
        default=0.5,
        metadata=flag(
            "patches come from images drawn with probability proportional to their area to this power: 1 gives "
            "every pixel the same chance, 0 every image; in between, a few large images do not crowd out many "
            "small ones of another kind",
            "data",
            metavar="P",
        ),
    )
    nucleus_diameter: float | None = field(
        default=20.0,
        metadata=flag(
            "a second stage of training (--nucleus-epochs) with each image rescaled so that its nuclei's median "
            "diameter is PX pixels (training patches from the annotations, jittered 0.8-1.25 times); every "
            "prediction then rescales likewise, from the nuclei of a first pass; 'none': native scale throughout",
            "data",
            metavar="PX",
            parse=pixels_or_none,
        ),
    )
    nucleus_epochs: int = field(
        default=3,
        metadata=flag(
            "epochs of that second stage, after --epochs at native scale, its learning rate starting again at a "
            "fifth of --lr; 0: no first stage, the whole run at --nucleus-diameter, jittered by --scale-range",
            "data",
            metavar="N",
        ),
    )
    # Model
    targets: str = field(
        default="instance",
        metadata=flag(
            "'instance': background / nucleus interior / boundary classes, so touching nuclei separate; "
            "'binary': one nucleus mask, the original U-Net",
            "model",
            choices=TARGETS,
        ),
    )
    channels: tuple[int, ...] = field(
        default=(16, 32, 64, 128, 256),
        metadata=flag(
            "channels per level, the last being the bottleneck; the depth follows",
            "model",
            metavar="C1,C2,...",
            parse=comma_separated(int, "16,32,64,128,256"),
        ),
    )
    padding: str = field(
        default="same",
        metadata=flag("'same' keeps the size; 'valid' is the unpadded original", "model", choices=PADDINGS),
    )
    batch_norm: bool = field(default=True, metadata=flag("batch normalisation after each convolution", "model"))
    dropout: float = field(default=0.0, metadata=flag("dropout after each block", "model", metavar="P"))
    block: str = field(
        default="plain",
        metadata=flag(
            "convolutional block per level: 'plain', two convolutions; 'residual', the same plus a shortcut",
            "model",
            choices=BLOCKS,
        ),
    )
    # Training
    epochs: int = field(
        default=20,
        metadata=flag("number of epochs (at native scale, before --nucleus-epochs)", "training", metavar="N"),
    )
    batch_size: int = field(default=8, metadata=flag("global batch size", "training", metavar="N"))
    steps_per_epoch: int | None = field(
        default=None,
        metadata=flag("batches per epoch", "training", metavar="N", none="one pass over the training pixels"),
    )
    learning_rate: float = field(
        default=1e-3, metadata=flag("Adam learning rate", "training", name="--lr", metavar="LR")
    )
    loss: str = field(
        default="bce+dice",
        metadata=flag(
            "loss; cross-entropy is categorical and Dice per class for instance targets", "training", choices=LOSSES
        ),
    )
    lr_schedule: str = field(
        default="cosine",
        metadata=flag(
            "'cosine': decay to 2% of --lr over the run; 'plateau': halve when the validation loss stalls",
            "training",
            choices=LR_SCHEDULES,
        ),
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata=flag(
            "epochs over which the learning rate first rises linearly from 0 to --lr, before the cosine "
            "decay (cosine schedule only; 0: none)",
            "training",
            metavar="N",
        ),
    )
    seed: int = field(default=42, metadata=flag("random seed for the split, patches and weights", "training"))
    mixed_precision: bool | None = field(
        default=None,
        metadata=flag(
            "float16 compute on GPUs (bfloat16 on CPUs), float32 output",
            "training",
            none="on where the hardware is fast at it: GPUs of compute capability 7+, CPUs with bfloat16 "
            "instructions; --no-mixed-precision forces float32",
        ),
    )
    xla: bool = field(default=False, metadata=flag("compile the training step with XLA", "training"))
    # Inference
    threshold: float = field(
        default=0.5,
        metadata=flag(
            "nucleus probability above which a pixel is nucleus; training replaces it with the one chosen on the "
            "validation images"
        ),
    )
    marker_threshold: float = field(
        default=0.5,
        metadata=flag(
            "interior probability that seeds a nucleus (instance targets); chosen on the validation images too"
        ),
    )
    tile_overlap: int | None = field(
        default=None,
        metadata=flag(
            "pixels by which the tiles of a prediction overlap",
            none="1/8 of the output tile for padded models, 0 for unpadded ones",
        ),
    )
    min_nucleus_size: int = field(default=15, metadata=flag("instances smaller than this many pixels are dropped"))
    min_confidence: float = field(
        default=0.0,
        metadata=flag(
            "nuclei whose mean nucleus probability is below this are dropped; chosen on the validation images too"
        ),
    )
    tta: bool = field(
        default=True,
        metadata=flag(
            "test-time augmentation (the 8 flips and rotations averaged, 8x the time) when the post-processing "
            "is chosen on the validation images, kept as the run's setting for Predict_mask.py",
            "training",
        ),
    )

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        for name, spec in field_flags(type(self)).items():
            if spec.choices is not None and getattr(self, name) not in spec.choices:
                raise ValueError(f"{name} must be one of {spec.choices}, got {getattr(self, name)!r}")
        if self.scale_range is not None:
            self.scale_range = tuple(float(v) for v in self.scale_range)
            if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1] <= 10:
                raise ValueError(
                    f"scale_range must be two scales 0 < low <= high <= 10, or None, got {self.scale_range}"
                )
        if self.sampling == "resize":  # whole images resized to image_size: no nucleus size to bring them to
            self.nucleus_diameter = None
        if (self.nucleus_diameter is not None and not 0 < self.nucleus_diameter < math.inf) or int(
            self.nucleus_epochs
        ) < 0:
            raise ValueError(
                f"nucleus_diameter must be a positive number of pixels (or None) and nucleus_epochs 0 "
                f"or more; got {self.nucleus_diameter} and {self.nucleus_epochs}"
            )
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least two positive counts (levels + bottleneck), got {self.channels}")
        for name in ("image_size", "batch_size", "epochs", "sample_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.val_size < math.inf or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ValueError(f"val_size must be a fraction below 1 or a whole number of images, got {self.val_size}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer (or None), got {self.steps_per_epoch}")
        for name, low, high in (
            ("dropout", "[", ")"),
            ("area_power", "[", "]"),
            ("min_confidence", "[", ")"),
            ("threshold", "(", ")"),
            ("marker_threshold", "(", ")"),
        ):  # [ ]: that end is allowed
            value = getattr(self, name)
            if not ((value >= 0 if low == "[" else value > 0) and (value <= 1 if high == "]" else value < 1)):
                raise ValueError(f"{name} must be in {low}0, 1{high}, got {value}")
        # NaN fails every comparison, so "not positive" is tested as "not (finite and > 0)".
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f"learning_rate (--lr) must be a positive number such as {Config.learning_rate}, "
                f"got {self.learning_rate}"
            )
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs (--warmup-epochs) must be 0 or more, got {self.warmup_epochs}")
        if int(self.min_nucleus_size) != self.min_nucleus_size or self.min_nucleus_size < 0:
            raise ValueError(
                f"min_nucleus_size (Predict_mask.py --min-size) must be a whole number of pixels, 0 "
                f"or more, got {self.min_nucleus_size}"
            )
        if self.channel is not None and (int(self.channel) != self.channel or self.channel < 0):
            raise ValueError(f"channel (--channel) must be a channel number, 0 for the first, got {self.channel}")
        # The size check gives the nearest sizes that work, so a user can fix the flag at once.
        check_input_size(self.image_size, len(self.channels) - 1, self.padding)

    @property
    def depth(self) -> int:
        """Number of pooling steps (levels below the input resolution)."""
        return len(self.channels) - 1

    @property
    def input_channels(self) -> int:
        """Channels of the model's input: 1 for grey preprocessing, 3 for RGB."""
        return 1 if self.preprocessing == "grey" else 3

    @property
    def num_classes(self) -> int:
        """Classes of the output layer: background, interior, boundary; or one sigmoid channel."""
        return 3 if self.targets == "instance" else 1

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        data["scale_range"] = list(self.scale_range) if self.scale_range else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Build a Config from a dict, ignoring keys that are not fields (a run's config.json also holds
        the validation ids and scores).  A config.json of an earlier version of this project keeps its
        meaning: the fields it lacks take their old values (``LEGACY_DEFAULTS``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "num_classes" in data:
            values = {**LEGACY_DEFAULTS, **values}
        if {"targets", "num_classes"} & set(data):  # a run's: later fields keep the way it trained then
            values = {"area_power": 1.0, "nucleus_diameter": None, "nucleus_epochs": 0, "warmup_epochs": 0.0, **values}
        return cls(**values)

    def to_json(self, path=None, **extra) -> str:
        text = json.dumps({**self.to_dict(), **extra}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text) -> Config:
        text = str(path_or_text)
        return cls.from_dict(json.loads(text if text.lstrip().startswith("{") else Path(path_or_text).read_text()))


def field_flags(cls: type | None = None) -> dict[str, Flag]:
    """The ``Flag`` of each field of ``Config`` (or of the dataclass ``cls``), by field name, in the
    fields' order."""
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(cls or Config) if "flag" in f.metadata}


def flag_name(name: str) -> str:
    """The command-line flag of the ``Config`` field ``name``: its ``Flag``'s, or the name with dashes
    (``--lr`` for learning_rate, ``--image-size`` for image_size)."""
    return field_flags()[name].name or "--" + name.replace("_", "-")


def quick_config(**overrides) -> Config:
    """Settings for smoke runs and tests: a tiny sample, a small model, one short epoch."""
    values = dict(
        sample_images=8,
        image_size=64,
        channels=(8, 16, 32),
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        val_size=0.25,
        nucleus_epochs=1,
        tta=False,
    )
    values.update(overrides)
    return Config(**values)


# =====================================================================================================
# 4. Convolutional blocks
# =====================================================================================================
# Pure functions from tensors to tensors.  Every layer is named after its block ("enc1_conv1", ...), so
# the summary reads like the architecture and weights can be located by name.


def conv_block(
    x,
    filters: int,
    name: str,
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    block: str = "plain",
):
    """Two 3x3 convolutions, each followed by ReLU (with optional batch norm before it), then optional
    dropout.  With ``padding="valid"`` each convolution trims one pixel per side.  ``block="residual"``
    adds the block's input before the last ReLU, as in ResNet (through a 1x1 convolution where the
    channels change, centre-cropped when unpadded): the block learns a correction to its input."""
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    shortcut = x
    for i in (1, 2):
        # A bias is redundant just before batch norm, which has its own shift.
        x = layers.Conv2D(
            filters, 3, padding=padding, use_bias=not batch_norm, kernel_initializer="he_normal", name=f"{name}_conv{i}"
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        if i == 2 and block == "residual":
            if shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(
                    filters, 1, use_bias=not batch_norm, kernel_initializer="he_normal", name=f"{name}_shortcut"
                )(shortcut)
                if batch_norm:
                    shortcut = layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
            if padding == "valid":
                shortcut = layers.Cropping2D(2, name=f"{name}_shortcut_crop")(shortcut)
            x = layers.Add(name=f"{name}_add")([x, shortcut])
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def down_block(
    x,
    filters: int,
    name: str,
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    block: str = "plain",
):
    """One contracting level: ``conv_block`` then 2x2 max pooling with stride 2.

    Returns ``(skip, pooled)``: the features kept for the skip connection and the half-size map."""
    skip = conv_block(x, filters, name, padding, batch_norm, dropout, block)
    pooled = layers.MaxPooling2D(pool_size=2, strides=2, name=f"{name}_pool")(skip)
    return skip, pooled


def bottleneck(
    x,
    filters: int,
    name: str = "bottleneck",
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    block: str = "plain",
):
    """The lowest level: a ``conv_block`` with the most channels and no pooling."""
    return conv_block(x, filters, name, padding, batch_norm, dropout, block)


def up_block(
    x,
    skip,
    filters: int,
    name: str,
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    block: str = "plain",
):
    """One expanding level: 2x upsampling, a 2x2 "up-convolution" to ``filters`` channels, concatenation
    with the contracting path's skip map (centre-cropped when the convolutions are unpadded), then a
    ``conv_block``."""
    x = layers.UpSampling2D(size=2, name=f"{name}_upsample")(x)
    # The up-convolution always pads ("same"), so upsampling exactly doubles the size, as in the paper.
    x = layers.Conv2D(filters, 2, padding="same", kernel_initializer="he_normal", name=f"{name}_upconv")(x)
    (skip_h, skip_w), (x_h, x_w) = skip.shape[1:3], x.shape[1:3]
    if padding == "valid" and skip_h is not None and (skip_h != x_h or skip_w != x_w):
        dh, dw = skip_h - x_h, skip_w - x_w
        skip = layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=f"{name}_crop")(skip)
    x = layers.Concatenate(axis=-1, name=f"{name}_concat")([skip, x])
    return conv_block(x, filters, name, padding, batch_norm, dropout, block)


# =====================================================================================================
# 5. The U-Net model
# =====================================================================================================


def unet_output_size(input_size: int, depth: int = 4, padding: str = "same") -> int | None:
    """The output side for an input side, or None when the input side cannot pass through the net.

    "same": the size must halve cleanly ``depth`` times.  "valid": each 3x3 convolution trims 2 pixels
    and every pooled map must have an even size (572 -> 388 for the paper's depth 4).
    """
    if padding == "same":
        return input_size if input_size % (2**depth) == 0 and input_size > 0 else None
    size = input_size
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4  # the bottleneck; a size at or below 0 here stays negative below
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
        rule = (
            f"a multiple of {2**depth}"
            if padding == "same"
            else "a size whose maps stay even after each unpadded level"
        )
        raise ValueError(
            f"input size {size} does not fit a depth-{depth} U-Net with padding='{padding}' "
            f"(it needs {rule}); nearest sizes that work: {nearest}"
        )


def build_unet(
    input_shape: tuple = (128, 128, 3),
    num_classes: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    name: str = "unet",
    block: str = "plain",
) -> keras.Model:
    """Assemble the U-Net as a functional ``keras.Model``; ``block`` is ``conv_block``'s, at every level.
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
        raise ValueError(
            "an unpadded (padding='valid') U-Net needs a fixed input size, for example "
            "(572, 572, 1); it predicts large images tile by tile at that size"
        )
    check_input_size(height, depth, padding)
    check_input_size(width, depth, padding)

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    skips = []
    for level, filters in enumerate(channels[:-1], start=1):
        skip, x = down_block(x, filters, f"enc{level}", padding, batch_norm, dropout, block)
        skips.append(skip)
    x = bottleneck(x, channels[-1], "bottleneck", padding, batch_norm, dropout, block)
    for level in range(depth, 0, -1):
        x = up_block(x, skips[level - 1], channels[level - 1], f"dec{level}", padding, batch_norm, dropout, block)
    x = layers.Conv2D(num_classes, 1, name="logits")(x)
    activation = "sigmoid" if num_classes == 1 else "softmax"
    outputs = layers.Activation(activation, dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def build_unet_from_config(config: Config, input_size: int | None = None, any_size: bool = False) -> keras.Model:
    """The model a Config describes, at ``input_size`` (default: the training size).  ``any_size`` gives a
    padded model a ``(None, None, C)`` input, for tiles of any size; an unpadded one keeps its size."""
    size = None if any_size and config.padding == "same" else input_size or config.image_size
    return build_unet(
        (size, size, config.input_channels),
        config.num_classes,
        config.channels,
        config.padding,
        config.batch_norm,
        config.dropout,
        block=config.block,
    )


# --- Losses and metrics -----------------------------------------------------------------------------
# Dice, IoU and the losses all derive from ``_overlap``.  Everything is registered, so a compiled model
# saved as .keras reloads without custom_objects in any program that imports this module.


def _overlap(y_true, y_pred, per_class: bool = False):
    """Per-image intersection and sum of sizes, reduced over height, width and (unless ``per_class``)
    channels."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(y_pred.shape) - int(per_class)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return intersection, total


def dice_coefficient(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice per image, averaged over the batch: (2|A.B| + s) / (|A| + |B| + s).  ``smooth`` keeps two
    empty masks at 1 (not NaN) and steadies the gradient on near-empty images."""
    intersection, total = _overlap(y_true, y_pred)
    return ops.mean((2.0 * intersection + smooth) / (total + smooth))


def iou_coefficient(y_true, y_pred, smooth: float = 1.0):
    """Soft IoU (Jaccard) per image, averaged over the batch: (|A.B| + s) / (|A| + |B| - |A.B| + s)."""
    intersection, total = _overlap(y_true, y_pred)
    return ops.mean((intersection + smooth) / (total - intersection + smooth))


def _soft_dice_per_image(y_true, y_pred, smooth: float):
    """Soft Dice of each image of a batch.  For a softmax output it is the mean of the per-class Dice of
    the classes after the background: each class counts the same however few pixels it has, so the thin
    boundary class weighs as much as the nucleus interiors."""
    per_class = y_pred.shape[-1] is not None and y_pred.shape[-1] > 1
    intersection, total = _overlap(y_true[..., 1:], y_pred[..., 1:], True) if per_class else _overlap(y_true, y_pred)
    dice_value = (2.0 * intersection + smooth) / (total + smooth)
    return ops.mean(dice_value, axis=-1) if per_class else dice_value


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
        # Per image, so Keras' reduction averages over the batch (and across replicas correctly).
        return 1.0 - _soft_dice_per_image(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class BceDiceLoss(keras.losses.Loss):
    """Binary (or categorical, for a softmax output) cross-entropy plus Dice loss, each weighted.

    Cross-entropy gives well-calibrated pixel probabilities; Dice counters the imbalance between the
    few nucleus pixels and the much larger background."""

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        name: str = "bce_dice_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def call(self, y_true, y_pred):
        y_true, y_pred = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
        dice_loss = 1.0 - _soft_dice_per_image(y_true, y_pred, self.smooth)
        return self.bce_weight * _pixel_crossentropy(y_true, y_pred) + self.dice_weight * dice_loss

    def get_config(self):
        return {
            **super().get_config(),
            "bce_weight": self.bce_weight,
            "dice_weight": self.dice_weight,
            "smooth": self.smooth,
        }


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


def compile_unet(
    model: keras.Model,
    config: Config,
    jit_compile: bool | None = None,
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> keras.Model:
    """Compile with Adam, the Config's loss, and the Dice/IoU metrics.  With the cosine schedule and
    ``total_steps`` (epochs x steps per epoch), the learning rate rises linearly from 0 to
    ``config.learning_rate`` over the first ``warmup_steps`` of them, then decays to 2% of it over the
    rest; otherwise it stays constant (a plateau callback may lower it)."""
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine" and total_steps:
        warmup_steps = min(max(0, int(warmup_steps)), int(total_steps) - 1)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else config.learning_rate,
            int(total_steps) - warmup_steps,
            alpha=0.02,
            warmup_target=config.learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=make_loss(config.loss),
        metrics=[dice, iou],
        jit_compile=config.xla if jit_compile is None else jit_compile,
    )
    return model

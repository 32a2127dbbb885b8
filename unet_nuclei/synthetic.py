"""Built-in synthetic nuclei dataset in the DSB-2018 ``stage1_train`` layout.

The generator lets the project train and test on a fresh machine without any
download.  It imitates the three image families of the Kaggle Data Science
Bowl 2018 data (BBBC038v1): fluorescence (bright nuclei on a dark background),
H&E histology (violet nuclei on pink tissue) and brightfield (grey nuclei on a
light background).  Every image gets one binary mask per nucleus::

    <out_dir>/<id>/images/<id>.png
    <out_dir>/<id>/masks/<id>_<k>.png

Nuclei are irregular ellipses drawn in their own small bounding box, placed by
rejection sampling against a label image so that masks never overlap while
nuclei may touch.  What varies between real datasets is drawn per image (domain
randomisation): the scale (median diameters matched to the real data's, see
``benchmarks/synthetic_vs_real.py``), how much sizes vary, how lumpy the outlines
are, clustering, brightness spread, large, dim nuclei with coarse chromatin
texture, and pale stained nuclei whose chromatin gathers in clumps.
``synthetic_render`` turns the nuclei into pixels.  No real pixels are used.
``ensure_sample_dataset`` writes the project's built-in sample once and reuses
it after.  Importing this module does no work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from unet_nuclei.synthetic_render import RENDERERS, texture

# Stained and brightfield images are rarer in real data than fluorescence but score worst, so the sample
# gives them more than their real share (81%, 16% and 3% of DSB-2018's stage-1 training set).
MODALITY_WEIGHTS = {"fluorescence": 0.55, "histology": 0.37, "brightfield": 0.08}

# Bumped whenever the generator's output changes, so a sample made by an older generator is never reused.
GENERATOR_VERSION = 7

# Median nucleus diameters per image, log-uniform between these bounds (px).  Real DSB-2018 nuclei have a
# median equivalent diameter of 18-21 px (10th-90th percentile 8-35), stained ones up to ~44 px.
# Crowded fields of small nuclei hold the most nuclei, so per-image bounds somewhat above the real
# per-nucleus figures give a per-nucleus median like the real one (benchmarks/synthetic_vs_real.py).
DIAMETER_RANGE = {"fluorescence": (13.0, 48.0), "histology": (14.0, 64.0), "brightfield": (10.0, 30.0)}

# A small-size mix suited to a quick CPU training; repeated entries act as
# weights (mostly 256x256, like the real data, plus a few larger fields).
DEFAULT_SIZES = [(256, 256)] * 10 + [(256, 320)] * 2 + [(260, 347)] * 2 + [(360, 360)] * 2 + [(520, 696)]


class OutputExistsError(FileExistsError, ValueError):
    """Raised when the output folder already exists and is not empty."""


def _validate_size(height, width):
    """Return (height, width) as ints, or raise ValueError for non-positive or fractional sizes."""
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"image size must be two positive integers, got ({height!r}, {width!r})")
    return int(height), int(width)


def _position_sampler(rng, h, w, d_mean, n, modality):
    """Return a function drawing nucleus centres: uniform, clustered or a mix."""
    # Real nuclei touch in a median of 18% (fluorescence) to 38% (stained tissue) per image.
    weights = [0.45, 0.35, 0.2]
    p_cluster = rng.choice([0.0, 0.4, 0.85], p=weights)
    k = int(rng.integers(1, 6))
    centres = rng.uniform((0, 0), (h, w), size=(k, 2))
    # A cluster of m nuclei of diameter d fills a disc of radius ~ d*sqrt(m)/2,
    # so the spread grows with the square root of the cluster population.
    spread = d_mean * np.sqrt(max(n, 1) / k) * rng.uniform(0.35, 0.8, size=k)

    def sample():
        if rng.random() < p_cluster:
            c = int(rng.integers(k))
            return centres[c] + rng.normal(0.0, spread[c], size=2)
        # Allow centres slightly outside so that border nuclei are cut like in real crops.
        return rng.uniform((-0.03 * h, -0.03 * w), (1.03 * h, 1.03 * w))

    return sample


def _nucleus_shape(rng, radius, aspect, pad, irregularity=1.0):
    """Irregular ellipse in a local box: coordinates, normalised radius and alpha."""
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    angle = rng.uniform(0.0, np.pi)
    harmonics = [
        (k, rng.normal(0.0, 0.06 * irregularity / np.sqrt(k - 1)), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)
    ]
    half = int(np.ceil(a * 1.3 + pad))
    ys, xs = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    theta = np.arctan2(v / b, u / a)
    # Low-frequency radial noise turns the ellipse into a plausible, lumpy outline.
    wobble = 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in harmonics)
    d = np.hypot(u / a, v / b) / np.maximum(wobble, 0.6)
    # A one-pixel linear ramp anti-aliases the edge; the optical blur comes later.
    alpha = np.clip((1.0 - d) * np.sqrt(a * b) + 0.5, 0.0, 1.0)
    return half, u, v, d, alpha


def _place_nuclei(rng, h, w, modality):
    """Draw nuclei into a label image and a nuclear-signal image.

    Returns labels (int32), signal (float32, per-nucleus stain or brightness with
    texture) and coverage (float32 alpha of nuclear material), plus the mean diameter.
    """
    # Magnification, drawn per image: the scale is what varies most between real datasets.
    low, high = DIAMETER_RANGE[modality]
    d_mean = float(np.clip(np.exp(rng.uniform(np.log(low), np.log(high))), 6, max(6, min(h, w) / 4)))
    # Fraction of the field covered by nuclei: sparse, typical or crowded fields (stained tissue is denser).
    choices = [rng.uniform(0.02, 0.06), rng.uniform(0.06, 0.15), rng.uniform(0.15, 0.35)]
    weights = {"fluorescence": [0.3, 0.45, 0.25], "histology": [0.15, 0.4, 0.45], "brightfield": [0.8, 0.2, 0.0]}
    density = rng.choice(choices, p=weights[modality])
    n_target = int(np.clip(density * h * w / (np.pi * d_mean**2 / 4), 3, 600))
    sample_centre = _position_sampler(rng, h, w, d_mean, n_target, modality)
    # Per-image variety: how much sizes vary, how lumpy the outlines are, and whether the nuclei are the
    # large, dim, coarsely textured kind that a model trained on smooth blobs cuts into pieces.
    size_sigma = rng.uniform(0.1, 0.3)
    irregularity = rng.uniform(0.3, 1.8)
    textured = rng.random() < {"fluorescence": 0.35, "histology": 0.3, "brightfield": 0.0}[modality]

    fine = texture(rng, h, w, 0.8)
    coarse = texture(rng, h, w, max(1.5, d_mean / (rng.uniform(3, 6) if textured else 6)))
    labels = np.zeros((h, w), np.int32)
    signal = np.zeros((h, w), np.float32)
    coverage = np.zeros((h, w), np.float32)

    # Per-image brightness model: fluorescence shows a ~tenfold range of intensity.
    base = np.exp(rng.uniform(np.log(0.3), np.log(0.95)))
    # Brightness varies within an image, up to about sixfold; a few images hold saturated (mitotic-like)
    # nuclei that take the top of the contrast stretch and leave the others dim, as real ones do.
    spread = rng.uniform(0.05, 0.8)
    p_bright = 0.08 if rng.random() < 0.4 else 0.0
    max_aspect = 1.8 if modality == "fluorescence" else 2.8
    texture_amp = rng.uniform(0.08, 0.25) if modality == "fluorescence" else rng.uniform(0.05, 0.3)
    if textured:
        texture_amp = rng.uniform(0.25, 0.5)
    # Open (vesicular) stained nuclei: pale, the stain gathered in clumps of chromatin and along the
    # membrane.  A model that has only met evenly dark nuclei cuts these at their pale gaps.
    vesicular = modality == "histology" and rng.random() < 0.4
    clump_cut = rng.uniform(0.0, 0.8)

    count, failures = 0, 0
    for _ in range(n_target):
        radius = 0.5 * d_mean * np.exp(rng.normal(0.0, size_sigma))
        if modality == "fluorescence":
            level = base * 10 ** (-rng.uniform(0.0, spread))
            if rng.random() < p_bright:  # Small condensed (mitotic-like) nuclei are often saturated.
                radius, level = radius * 0.7, rng.uniform(1.0, 2.0)
        elif modality == "histology":
            level = rng.uniform(0.35, 1.0)  # Hematoxylin optical density.
        else:
            level = rng.uniform(0.25, 0.6)  # Fractional light absorbed in brightfield.
        radius = max(radius, 3.0)
        defocus = rng.uniform(1.0, 2.5) if rng.random() < 0.12 else 0.0
        half, u, v, d, alpha = _nucleus_shape(rng, radius, rng.uniform(1.0, max_aspect), 2 + 2 * defocus, irregularity)
        shape = d < 1.0
        full_area = int(shape.sum())

        # Intensity profile: granular chromatin, slightly brighter centre, optional nucleoli
        # and, for H&E, a darker nuclear membrane rim.
        value = level * (1.0 - 0.25 * d**2)
        rim = np.exp(-(((1.0 - d) / 0.12) ** 2))
        if vesicular:
            fill = rng.uniform(0.15, 0.5)
            value = level * (fill + (1.0 - fill) * rng.uniform(0.2, 0.8) * rim)
        elif modality == "histology":
            value += level * rng.uniform(0.0, 0.5) * rim
        n_nucleoli = int(rng.integers(1, 4)) if rng.random() < (0.6 if textured else 0.3) else 0
        for _ in range(n_nucleoli):
            cu, cv_ = rng.uniform(-0.5, 0.5, 2) * radius
            s = radius * rng.uniform(0.1, 0.2)
            value *= 1.0 - rng.uniform(0.3, 0.6) * np.exp(-((u - cu) ** 2 + (v - cv_) ** 2) / (2 * s * s))

        for attempt in range(12):
            # The last try of a still-empty image uses the centre, so every image has a nucleus.
            centre = (h / 2, w / 2) if count == 0 and attempt == 11 else sample_centre()
            cy, cx = np.round(centre).astype(int)
            y0, x0 = cy - half, cx - half
            ya, xa = max(y0, 0), max(x0, 0)
            yb, xb = min(y0 + 2 * half + 1, h), min(x0 + 2 * half + 1, w)
            if ya >= yb or xa >= xb:
                continue
            local = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            inside = shape[local]
            n_inside = int(inside.sum())
            if n_inside < max(8, 0.3 * full_area):
                continue
            free = labels[ya:yb, xa:xb] == 0
            visible = inside & free
            if visible.sum() < n_inside:
                # An occluded nucleus keeps only its largest connected visible part.
                n_cc, cc, stats, _ = cv2.connectedComponentsWithStats(visible.astype(np.uint8), connectivity=4)
                if n_cc > 2:
                    visible = cc == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if visible.sum() < 0.6 * n_inside:
                continue
            break
        else:
            failures += 1
            if failures > 40:
                break  # The field is full; further attempts would only waste time.
            continue

        count += 1
        labels[ya:yb, xa:xb][visible] = count
        # Paint only where this nucleus owns the pixel or where nothing was labelled yet,
        # so an earlier neighbour stays on top, exactly as the label image says.
        a = alpha[local] * (free & ~(inside & ~visible))
        tex = 1.0 + texture_amp * (fine[ya:yb, xa:xb] + 0.8 * coarse[ya:yb, xa:xb])
        if vesicular:  # clumps of chromatin as dark as a compact nucleus, over the pale fill
            clumps = np.clip((coarse[ya:yb, xa:xb] - clump_cut) * 1.5, 0.0, 1.0)
            tex = 1.0 + 0.15 * fine[ya:yb, xa:xb] + clumps * (1.0 / fill - 1.0)
        va = a * np.maximum(value[local] * tex, 0.0)
        if defocus:
            a = cv2.GaussianBlur(a, (0, 0), defocus)
            va = cv2.GaussianBlur(va, (0, 0), defocus)
        signal[ya:yb, xa:xb] = signal[ya:yb, xa:xb] * (1.0 - a) + va
        coverage[ya:yb, xa:xb] = coverage[ya:yb, xa:xb] * (1.0 - a) + a
    return labels, signal, coverage, d_mean


def generate_sample(rng: np.random.Generator, height: int, width: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, labels): image HxWx3 uint8 RGB; labels HxW int32, 0 = background, 1..N = nuclei.

    ``modality`` is one of MODALITY_WEIGHTS.  All randomness comes from ``rng``, so
    the same generator state gives the same sample.  Every image has at least one
    nucleus; label values are consecutive here although callers must not rely on it.
    """
    if modality not in RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(RENDERERS)}")
    height, width = _validate_size(height, width)
    labels, signal, coverage, d_mean = _place_nuclei(rng, height, width, modality)
    img = RENDERERS[modality](rng, signal, coverage, d_mean)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), labels


def _modality_sequence(num_images, seed):
    """Modalities in proportion to MODALITY_WEIGHTS, shuffled deterministically by the seed.

    Largest-remainder rounding keeps small samples close to the target mix, and
    every modality appears at least once when there are enough images.
    """
    names = list(MODALITY_WEIGHTS)
    quotas = np.array([MODALITY_WEIGHTS[m] for m in names]) * num_images
    counts = np.floor(quotas).astype(int)
    if num_images >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() > num_images:
        counts[int(np.argmax(counts))] -= 1
    for i in np.argsort(-(quotas - np.floor(quotas)), kind="stable")[: num_images - counts.sum()]:
        counts[i] += 1
    sequence = [m for m, c in zip(names, counts) for _ in range(c)]
    np.random.default_rng([seed, 2018]).shuffle(sequence)
    return sequence


def _sample_id(seed, index):
    return hashlib.sha1(f"synthetic-{seed}-{index}".encode()).hexdigest()[:16]


def _write_png(path, array):
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def write_synthetic_dataset(
    out_dir, num_images: int = 64, seed: int = 0, sizes=None, progress: bool = True
) -> list[str]:
    """Write the DSB-layout folder, return the list of sample ids written (sorted).

    The data are written into ``<out_dir>.tmp-<pid>`` and moved into place when
    complete, so an interrupted run never leaves a half-written dataset behind.
    An existing non-empty ``out_dir`` is never touched: OutputExistsError (both a
    FileExistsError and a ValueError) is raised instead.
    """
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images <= 0:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    try:
        sizes = [_validate_size(*size) for size in (DEFAULT_SIZES if sizes is None else sizes)]
    except TypeError as error:
        raise ValueError(f"sizes must be a list of (height, width) pairs, got {sizes!r}") from error
    if not sizes:
        raise ValueError("sizes must contain at least one (height, width) pair")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise OutputExistsError(
                f"{out_dir} already exists and is not an empty folder; refusing to overwrite it. "
                "Reuse it as the dataset, or choose another output folder."
            )
        os.rmdir(out_dir)  # An empty folder holds nothing to lose and would block os.replace.

    from tqdm.auto import tqdm  # Imported lazily so that importing this module stays cheap.

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # Only a crashed run of this process makes this name.
    ids = []
    try:
        modalities = _modality_sequence(int(num_images), seed)
        for index in tqdm(range(int(num_images)), desc="Generating synthetic nuclei sample", disable=not progress):
            rng = np.random.default_rng([seed, index])
            height, width = sizes[int(rng.integers(len(sizes)))]
            image, labels = generate_sample(rng, height, width, modalities[index])
            sample_id = _sample_id(seed, index)
            os.makedirs(os.path.join(tmp_dir, sample_id, "images"))
            os.makedirs(os.path.join(tmp_dir, sample_id, "masks"))
            # OpenCV writes BGR, so the RGB image is converted before it is saved.
            image_path = os.path.join(tmp_dir, sample_id, "images", f"{sample_id}.png")
            _write_png(image_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            # Group pixels by label once instead of scanning the whole image per nucleus.
            flat = np.flatnonzero(labels)
            values = labels.ravel()[flat]
            order = np.argsort(values, kind="stable")
            bounds = np.flatnonzero(np.diff(values[order])) + 1
            for k, pixels in enumerate(np.split(flat[order], bounds), start=1):
                mask = np.zeros(labels.size, np.uint8)
                mask[pixels] = 255
                mask_path = os.path.join(tmp_dir, sample_id, "masks", f"{sample_id}_{k:03d}.png")
                _write_png(mask_path, mask.reshape(labels.shape))
            ids.append(sample_id)
        try:
            os.replace(tmp_dir, out_dir)
        except OSError:
            if not (os.path.isdir(out_dir) and os.listdir(out_dir)):
                raise
            # Another process finished the same folder first (two first runs at once): keep theirs.
            raise OutputExistsError(
                f"{out_dir} was written by another process meanwhile; this copy was discarded"
            ) from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return sorted(ids)


def sample_dataset_dir(num_images: int = 64, seed: int = 0, root="dataset") -> Path:
    """Where the built-in synthetic sample of that size, seed and generator version lives (one folder per
    setting, so a sample is never overwritten by another, and one made by an older generator is not reused)."""
    return Path(root) / f"synthetic_sample_{num_images}img_seed{seed}_v{GENERATOR_VERSION}"


def ensure_sample_dataset(num_images: int = 64, seed: int = 0, root="dataset", progress: bool = True) -> Path:
    """Return the built-in synthetic sample's folder, generating it on first use and reusing it after."""
    folder = sample_dataset_dir(num_images, seed, root)
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_synthetic_dataset(folder, num_images=num_images, seed=seed, progress=progress)
    except OutputExistsError:
        # Another process generated it at the same time.  The folder appears whole (renamed into place)
        # and holds the same sample (same size, seed and generator), so it is used as it is.
        if not (folder.is_dir() and any(folder.iterdir())):
            raise
    return folder

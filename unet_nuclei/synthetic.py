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
nuclei may touch.  ``ensure_sample_dataset`` writes the project's built-in sample
once and reuses it after.  Importing this module does no work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

MODALITY_WEIGHTS = {"fluorescence": 0.80, "histology": 0.16, "brightfield": 0.04}

# A small-size mix suited to a quick CPU training; repeated entries act as
# weights (mostly 256x256, like the real data, plus a few larger fields).
DEFAULT_SIZES = (
    [(256, 256)] * 10 + [(256, 320)] * 2 + [(260, 347)] * 2 + [(360, 360)] * 2 + [(520, 696)]
)


class OutputExistsError(FileExistsError, ValueError):
    """Raised when the output folder already exists and is not empty."""


def _validate_size(height, width):
    """Return (height, width) as ints, or raise ValueError for non-positive or fractional sizes."""
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"image size must be two positive integers, got ({height!r}, {width!r})")
    return int(height), int(width)


def _smooth_field(rng, h, w, cells):
    """Low-frequency random field with zero mean and unit std (illumination, tissue)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _texture(rng, h, w, sigma):
    """Blurred white noise with unit std: chromatin granularity and tissue grain."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _position_sampler(rng, h, w, d_mean, n):
    """Return a function drawing nucleus centres: uniform, clustered or a mix."""
    p_cluster = rng.choice([0.0, 0.5, 0.9], p=[0.3, 0.35, 0.35])
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


def _nucleus_shape(rng, radius, aspect, pad):
    """Irregular ellipse in a local box: coordinates, normalised radius and alpha."""
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    angle = rng.uniform(0.0, np.pi)
    harmonics = [(k, rng.normal(0.0, 0.06 / np.sqrt(k - 1)), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
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
    # Magnification: larger fields usually come from higher-magnification images.
    d_mean = np.exp(rng.uniform(np.log(8), np.log(28))) * (min(h, w) / 256) ** 0.5
    if modality != "fluorescence":
        d_mean *= 1.25
    d_mean = float(np.clip(d_mean, 6, max(6, min(70, min(h, w) / 3))))
    # Fraction of the field covered by nuclei: sparse, typical or crowded fields.
    choices = [rng.uniform(0.02, 0.06), rng.uniform(0.06, 0.15), rng.uniform(0.15, 0.3)]
    density = rng.choice(choices, p=[0.35, 0.45, 0.2])
    n_target = int(np.clip(density * h * w / (np.pi * d_mean**2 / 4), 3, 600))
    sample_centre = _position_sampler(rng, h, w, d_mean, n_target)

    fine = _texture(rng, h, w, 0.8)
    coarse = _texture(rng, h, w, max(1.5, d_mean / 6))
    labels = np.zeros((h, w), np.int32)
    signal = np.zeros((h, w), np.float32)
    coverage = np.zeros((h, w), np.float32)

    # Per-image brightness model: fluorescence shows a ~tenfold range of intensity.
    base = np.exp(rng.uniform(np.log(0.3), np.log(0.95)))
    spread = rng.uniform(0.5, 1.0)
    max_aspect = 1.8 if modality == "fluorescence" else 2.8
    texture_amp = rng.uniform(0.08, 0.25) if modality == "fluorescence" else rng.uniform(0.2, 0.45)

    count, failures = 0, 0
    for _ in range(n_target):
        radius = 0.5 * d_mean * np.exp(rng.normal(0.0, 0.2))
        if modality == "fluorescence":
            level = base * 10 ** (-rng.uniform(0.0, spread))
            if rng.random() < 0.05:  # Small condensed (mitotic-like) nuclei are often saturated.
                radius, level = radius * 0.7, rng.uniform(1.0, 2.0)
        elif modality == "histology":
            level = rng.uniform(0.35, 1.0)  # Hematoxylin optical density.
        else:
            level = rng.uniform(0.12, 0.4)  # Fractional light absorbed in brightfield.
        radius = max(radius, 3.0)
        defocus = rng.uniform(1.0, 2.5) if rng.random() < 0.12 else 0.0
        half, u, v, d, alpha = _nucleus_shape(rng, radius, rng.uniform(1.0, max_aspect), 2 + 2 * defocus)
        shape = d < 1.0
        full_area = int(shape.sum())

        # Intensity profile: granular chromatin, slightly brighter centre, optional nucleoli
        # and, for H&E, a darker nuclear membrane rim.
        value = level * (1.0 - 0.25 * d**2)
        if modality == "histology":
            value += level * rng.uniform(0.0, 0.5) * np.exp(-(((1.0 - d) / 0.12) ** 2))
        n_nucleoli = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
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
        va = a * np.maximum(value[local] * tex, 0.0)
        if defocus:
            a = cv2.GaussianBlur(a, (0, 0), defocus)
            va = cv2.GaussianBlur(va, (0, 0), defocus)
        signal[ya:yb, xa:xb] = signal[ya:yb, xa:xb] * (1.0 - a) + va
        coverage[ya:yb, xa:xb] = coverage[ya:yb, xa:xb] * (1.0 - a) + a
    return labels, signal, coverage, d_mean


def _add_noise(rng, img, photons, read_sigma):
    """Shot noise (variance proportional to the signal) plus Gaussian read noise."""
    noisy = img + np.sqrt(np.maximum(img, 0.0) / photons) * rng.standard_normal(img.shape).astype(np.float32)
    return noisy + read_sigma * rng.standard_normal(img.shape).astype(np.float32)


def _render_fluorescence(rng, signal, coverage, d_mean):
    """DAPI/Hoechst-like image: emitted light adds to a dark, unevenly lit background."""
    h, w = signal.shape
    background = rng.uniform(0.0, 0.05) * (1.0 + 0.3 * _smooth_field(rng, h, w, 3))
    illumination = np.clip(1.0 + rng.uniform(0.0, 0.25) * _smooth_field(rng, h, w, 2), 0.4, None)
    img = (np.maximum(background, 0.0) + signal) * illumination
    sigma = rng.uniform(1.5, 3.0) if rng.random() < 0.15 else rng.uniform(0.5, 1.1)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigma)
    img = _add_noise(rng, img, np.exp(rng.uniform(np.log(40), np.log(3000))), rng.uniform(0.002, 0.01))
    if rng.random() < 0.75:
        colour = np.ones(3, np.float32)  # Grey images stored as three equal channels.
    else:
        palette = [(0.3, 0.5, 1.0), (0.6, 0.35, 1.0), (0.25, 1.0, 0.35), (1.0, 0.3, 0.25), (0.0, 0.0, 1.0)]
        colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
    return img[..., None] * colour


def _render_histology(rng, signal, coverage, d_mean):
    """H&E-like image: hematoxylin (nuclei) and eosin (tissue) absorb white light."""
    h, w = signal.shape
    # Tissue: grainy eosin at two scales, fibre-like streaks, and a few empty (white) gaps.
    line = np.zeros((15, 15), np.float32)
    angle = rng.uniform(0, np.pi)
    cv2.line(line, (int(7 - 7 * np.cos(angle)), int(7 - 7 * np.sin(angle))),
             (int(7 + 7 * np.cos(angle)), int(7 + 7 * np.sin(angle))), 1.0, 1)
    fibres = cv2.filter2D(rng.standard_normal((h, w)).astype(np.float32), -1, line / line.sum())
    fibres /= fibres.std() + 1e-6
    tissue = 0.6 + 0.25 * _texture(rng, h, w, 4.0) + 0.1 * fibres + 0.12 * _texture(rng, h, w, 1.0)
    gaps = _smooth_field(rng, h, w, int(rng.integers(2, 6)))
    tissue *= np.clip((gaps + rng.uniform(0.8, 2.5)) * 2.0, 0.1, 1.0)
    eosin = rng.uniform(0.08, 0.3) * np.clip(tissue, 0.05, None)
    # Cell bodies around nuclei are denser pink; inside nuclei the blue stain dominates.
    eosin += rng.uniform(0.05, 0.25) * cv2.GaussianBlur(coverage, (0, 0), 0.5 * d_mean)
    eosin *= 1.0 - 0.4 * coverage
    hema = rng.uniform(0.02, 0.08) * np.clip(tissue, 0.0, None) + signal
    # Beer-Lambert mixing of the two stains with jittered stain vectors (RGB optical density).
    h_vec = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.05, 3)
    e_vec = np.array([0.10, 0.85, 0.35]) + rng.normal(0, 0.04, 3)
    density = hema[..., None] * h_vec + eosin[..., None] * e_vec
    white = rng.uniform(0.88, 0.98) * (1.0 + rng.normal(0, 0.02, 3))
    img = (white * 10.0 ** (-np.clip(density, 0.0, None))).astype(np.float32)
    img *= np.clip(1.0 + rng.uniform(0.0, 0.06) * _smooth_field(rng, h, w, 2), 0.5, None)[..., None]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    return _add_noise(rng, img, 2000.0, rng.uniform(0.003, 0.012))


def _render_brightfield(rng, signal, coverage, d_mean):
    """Unstained or lightly stained transmitted light: low-contrast grey nuclei on light grey."""
    h, w = signal.shape
    level = rng.uniform(0.6, 0.85)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - rng.uniform(0.0, 0.25) * (((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) / 0.5)
    background = level * vignette * (1.0 + 0.04 * _smooth_field(rng, h, w, 3) + 0.02 * _texture(rng, h, w, 2.0))
    img = background * (1.0 - signal)
    # A faint bright halo around nuclei, as produced by slight defocus in transmitted light.
    halo = np.clip(cv2.GaussianBlur(coverage, (0, 0), 2.0) - coverage, 0.0, None)
    img += rng.uniform(0.0, 0.4) * level * halo
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    img = _add_noise(rng, img, 3000.0, rng.uniform(0.004, 0.012))
    tint = np.ones(3) if rng.random() < 0.6 else 1.0 + rng.normal(0, 0.05, 3)
    return img[..., None] * tint.astype(np.float32)


_RENDERERS = {
    "fluorescence": _render_fluorescence,
    "histology": _render_histology,
    "brightfield": _render_brightfield,
}


def generate_sample(
    rng: np.random.Generator, height: int, width: int, modality: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, labels): image HxWx3 uint8 RGB; labels HxW int32, 0 = background, 1..N = nuclei.

    ``modality`` is one of MODALITY_WEIGHTS.  All randomness comes from ``rng``, so
    the same generator state gives the same sample.  Every image has at least one
    nucleus; label values are consecutive here although callers must not rely on it.
    """
    if modality not in _RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(_RENDERERS)}")
    height, width = _validate_size(height, width)
    labels, signal, coverage, d_mean = _place_nuclei(rng, height, width, modality)
    img = _RENDERERS[modality](rng, signal, coverage, d_mean)
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
                "Reuse it as the dataset, or choose another output folder.")
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
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return sorted(ids)


def sample_dataset_dir(num_images: int = 64, seed: int = 0, root="dataset") -> Path:
    """Where the built-in synthetic sample of that size and seed lives (one folder per setting, so a
    sample is never overwritten by another)."""
    return Path(root) / f"synthetic_sample_{num_images}img_seed{seed}"


def ensure_sample_dataset(num_images: int = 64, seed: int = 0, root="dataset", progress: bool = True) -> Path:
    """Return the built-in synthetic sample's folder, generating it on first use and reusing it after."""
    folder = sample_dataset_dir(num_images, seed, root)
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_dataset(folder, num_images=num_images, seed=seed, progress=progress)
    return folder

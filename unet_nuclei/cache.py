"""Decode once, across runs: a disk cache of a dataset folder's decoded images and instance labels.

Decoding the real DSB-2018 training set (664 images, about 29,000 mask PNGs) takes close to a minute;
every training run, ``finalize`` and benchmark used to pay it again.  ``load_folder`` decodes a folder
once, stores the arrays in the cache and, from then on, memory-maps them: a second run reaches its first
training step after a fraction of a second of loading, and the images need not fit in memory.

One cache entry per data folder, in its own directory:
    ``<cache root>/<folder name>-<key>/images.npy``  every image's RGB bytes, end to end (uint8)
    ``<cache root>/<folder name>-<key>/labels.npy``  every instance-label image, end to end (uint16)
    ``<cache root>/<folder name>-<key>/index.json``  ids, shapes and offsets, and the samples skipped
The key hashes what the arrays were made from: every image and mask path with its size and modification
time, so adding, removing or editing any file gives a new key and a rebuild.  An entry is written into a
temporary directory and renamed into place, so a crash never leaves a half-written cache that looks
whole; older entries of the same folder are removed once the new one is in place.

The cache lives outside the user's data folder: ``$UNET_NUCLEI_CACHE`` when set (``off`` disables it),
else ``$XDG_CACHE_HOME/unet_nuclei``, else ``~/.cache/unet_nuclei``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unet_model_core import LoadedSample, Sample, find_samples, load_samples

log = logging.getLogger(__name__)

# Bump when the stored arrays change meaning, so entries of an older version are never read.
# 2: images of other depths than 8 bits stretched between percentiles (not by their maximum), TIFFs read
#    with tifffile (so a multi-page file is seen whole, and refused for training).
FORMAT_VERSION = 2
CACHE_ENV = "UNET_NUCLEI_CACHE"
OFF_VALUES = ("off", "none", "0", "false", "no")


def cache_root() -> Path | None:
    """Where cache entries go, or None when caching is switched off (``UNET_NUCLEI_CACHE=off``)."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in OFF_VALUES:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unet_nuclei"


def dataset_key(samples: Sequence[Sample], channel: int | None = None) -> str:
    """A short hash of every file the samples are made from (path, size and modification time) and of
    the channel read from multi-channel images."""
    digest = hashlib.sha256(f"unet_nuclei cache v{FORMAT_VERSION}".encode())
    if channel is not None:  # (None leaves the keys of earlier versions as they were)
        digest.update(f"\0channel {int(channel)}".encode())
    for sample in sorted(samples, key=lambda s: s.sample_id):
        digest.update(f"\0{sample.sample_id}\0{sample.layout}".encode())
        for path in (sample.image_path, *sample.mask_paths):
            stat = Path(path).stat()
            digest.update(f"\0{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _entry_prefix(data_dir: Path) -> str:
    # The folder's name keeps entries readable; a hash of its full path keeps two folders of the same
    # name (two copies of stage1_train, say) apart.
    where = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return f"{Path(data_dir).resolve().name}-{where}-"


def _write_entry(entry: Path, loaded: Sequence[LoadedSample], problems) -> None:
    """Write an entry whole or not at all: build it in a temporary sibling, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        image_sizes = [s.image.size for s in loaded]
        label_sizes = [s.labels.size for s in loaded]
        # open_memmap writes the .npy header and lets each array be copied in place: no second copy of
        # the whole dataset in memory.
        images = np.lib.format.open_memmap(staging / "images.npy", "w+", np.uint8, (sum(image_sizes),))
        labels = np.lib.format.open_memmap(staging / "labels.npy", "w+", np.uint16, (sum(label_sizes),))
        index, image_at, label_at = [], 0, 0
        for sample, image_size, label_size in zip(loaded, image_sizes, label_sizes):
            images[image_at : image_at + image_size] = sample.image.reshape(-1)
            labels[label_at : label_at + label_size] = sample.labels.reshape(-1)
            index.append(
                {"id": sample.sample_id, "shape": list(sample.image.shape), "image_at": image_at, "label_at": label_at}
            )
            image_at, label_at = image_at + image_size, label_at + label_size
        images.flush()
        labels.flush()
        del images, labels
        text = json.dumps({"version": FORMAT_VERSION, "samples": index, "problems": [list(p) for p in problems]})
        (staging / "index.json").write_text(text)
        try:
            staging.rename(entry)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if not (entry / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_entry(entry: Path) -> tuple[list[LoadedSample], list[tuple[str, str]]]:
    """Memory-map an entry: the returned arrays are read-only views into the cache files."""
    index = json.loads((entry / "index.json").read_text())
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{entry}: cache format {index.get('version')}, expected {FORMAT_VERSION}")
    images = np.load(entry / "images.npy", mmap_mode="r")
    labels = np.load(entry / "labels.npy", mmap_mode="r")
    loaded = []
    for item in index["samples"]:
        shape = tuple(item["shape"])
        height, width = shape[:2]
        image = images[item["image_at"] : item["image_at"] + int(np.prod(shape))].reshape(shape)
        label = labels[item["label_at"] : item["label_at"] + height * width].reshape(height, width)
        loaded.append(LoadedSample(item["id"], image, label))
    return loaded, [tuple(p) for p in index["problems"]]


def load_folder(
    data_dir,
    progress: bool = True,
    root: Path | str | None = "default",
    desc: str = "Decoding images and masks",
    channel: int | None = None,
) -> tuple[list[LoadedSample], list[tuple[str, str]], str]:
    """Every sample of a dataset folder, decoded: from the cache when it holds this exact folder, else
    decoded now (in parallel) and stored for the next run.

    Returns ``(loaded, problems, how)``: the samples in ``find_samples`` order, the entries skipped and
    why (found and decoding problems together), and a sentence saying where the arrays came from.
    ``root`` is the cache folder ("default": ``cache_root()``; None: no cache, decode every time);
    ``channel`` the channel of multi-channel images (``unet_model_core.read_image``).
    """
    data_dir = Path(data_dir)
    root = cache_root() if root == "default" else (Path(root) if root is not None else None)
    samples, problems = find_samples(data_dir)
    log.debug(f"{data_dir}: {len(samples)} samples found, {len(problems)} skipped; cache {root or 'off'}")
    if root is None:
        loaded, load_problems = load_samples(samples, progress=progress, desc=desc, channel=channel)
        return loaded, problems + load_problems, "decoded (cache off)"
    entry = root / f"{_entry_prefix(data_dir)}{dataset_key(samples, channel)}"
    if (entry / "index.json").is_file():
        try:
            loaded, load_problems = _read_entry(entry)
            return loaded, problems + load_problems, f"memory-mapped from the cache {entry}"
        except (OSError, ValueError, KeyError) as error:
            # A damaged entry is rebuilt rather than trusted; the user's data is the source of truth.
            how = f"rebuilt the damaged cache {entry} ({error})"
            shutil.rmtree(entry, ignore_errors=True)
    else:
        how = f"decoded and cached in {entry}"
    loaded, load_problems = load_samples(samples, progress=progress, desc=desc, channel=channel)
    if not loaded:  # nothing readable: nothing worth caching (and an empty file cannot be memory-mapped)
        return loaded, problems + load_problems, "decoded; nothing readable to cache"
    try:
        _write_entry(entry, loaded, load_problems)
        for old in root.glob(f"{_entry_prefix(data_dir)}*"):
            if old != entry and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        # A full or read-only cache folder costs time on the next run, never this run's data.
        how = f"decoded; not cached ({root}: {error.strerror or error})"
    return loaded, problems + load_problems, how


def load_ids(data_dir, ids: Sequence[str], progress: bool = True, root="default", channel: int | None = None):
    """The samples of ``data_dir`` with the given ids, in that order, through the cache; ids that could
    not be read are returned as problems.  Returns ``(loaded, problems)``."""
    loaded, problems, _ = load_folder(data_dir, progress=progress, root=root, channel=channel)
    by_id = {s.sample_id: s for s in loaded}
    found = [by_id[i] for i in ids if i in by_id]
    skipped = {p[0] for p in problems}
    missing = [(i, "not found or unreadable") for i in ids if i not in by_id and i not in skipped]
    return found, [p for p in problems if p[0] in set(ids)] + missing


def report_problems(problems: Sequence[tuple[str, str]], limit: int = 20) -> None:
    """Report the skipped samples on the log, as one warning: their count, then one line each (at most
    ``limit``)."""
    if not problems:
        return
    lines = [f"Skipped {len(problems)} entr{'y' if len(problems) == 1 else 'ies'}:"]
    lines += [f"  - {sample_id}: {reason}" for sample_id, reason in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    log.warning("\n".join(lines))

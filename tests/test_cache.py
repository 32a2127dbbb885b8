"""The decoded-dataset cache: decode once, memory-map after, rebuild on any change, never trust a damaged
entry, work without a writable cache folder; and the compact packed copy of a dataset."""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import unet_model_core as core
from unet_nuclei import cache, synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import pack_dataset


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    synthetic.write_synthetic_dataset(folder, num_images=3, seed=5, sizes=[(64, 80)], progress=False)
    return folder


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_second_load_is_memory_mapped_and_identical(dataset, tmp_path):
    root = tmp_path / "cache"
    first, problems, how = cache.load_folder(dataset, progress=False, root=root)
    assert how.startswith("decoded and cached") and not problems
    second, _, how = cache.load_folder(dataset, progress=False, root=root)
    assert how.startswith("memory-mapped")
    assert [s.sample_id for s in second] == [s.sample_id for s in first]
    for a, b in zip(first, second):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
        assert a.image.dtype == b.image.dtype == np.uint8 and b.labels.dtype == np.uint16
        # Views into the cache files, read-only: nothing can change the cache through them.
        assert isinstance(b.image.base, np.memmap) or isinstance(b.image, np.memmap)
        assert not b.image.flags.writeable
    assert len(entries(root)) == 1


def test_a_changed_file_rebuilds_the_entry_and_drops_the_old_one(dataset, tmp_path):
    root = tmp_path / "cache"
    first, _, _ = cache.load_folder(dataset, progress=False, root=root)
    old = entries(root)
    sample = core.find_samples(dataset)[0][0]
    mask_path = sample.mask_paths[0]
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    mask[:] = 0  # the first nucleus of the first sample disappears
    cv2.imwrite(str(mask_path), mask)
    os.utime(mask_path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    loaded, _, how = cache.load_folder(dataset, progress=False, root=root)
    assert how.startswith("decoded and cached")
    assert entries(root) != old and len(entries(root)) == 1
    assert not np.array_equal(loaded[0].labels > 0, first[0].labels > 0)


def test_a_damaged_entry_is_rebuilt_not_trusted(dataset, tmp_path):
    root = tmp_path / "cache"
    first, _, _ = cache.load_folder(dataset, progress=False, root=root)
    entry = entries(root)[0]
    index = json.loads((entry / "index.json").read_text())
    (entry / "images.npy").write_bytes(b"not an array")
    loaded, _, how = cache.load_folder(dataset, progress=False, root=root)
    assert how.startswith("rebuilt the damaged cache")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, loaded))
    assert json.loads((entries(root)[0] / "index.json").read_text()) == index


def test_cache_off_and_unwritable_cache_still_load(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_root() is None
    loaded, _, how = cache.load_folder(dataset, progress=False)
    assert how == "decoded (cache off)" and len(loaded) == 3
    # A cache folder that cannot be created (its parent is a file): the data still loads, uncached.
    blocker = tmp_path / "file"
    blocker.write_text("")
    loaded, _, how = cache.load_folder(dataset, progress=False, root=blocker / "cache")
    assert "not cached" in how and len(loaded) == 3


def test_load_ids_returns_the_asked_samples_in_order_and_names_missing_ones(dataset, tmp_path):
    ids = [s.sample_id for s in core.find_samples(dataset)[0]]
    loaded, problems = cache.load_ids(dataset, [ids[2], ids[0], "nope"], progress=False, root=tmp_path / "c")
    assert [s.sample_id for s in loaded] == [ids[2], ids[0]]
    assert problems == [("nope", "not found or unreadable")]


def test_packed_copy_decodes_identically(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "packed"
    assert pack_dataset.main([str(dataset), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images", "masks"]
    original, _ = core.load_samples(core.find_samples(dataset)[0], progress=False)
    packed = {s.sample_id: s for s in core.load_samples(core.find_samples(out)[0], progress=False)[0]}
    for sample in original:
        assert np.array_equal(packed[sample.sample_id].image, sample.image)
        assert np.array_equal(packed[sample.sample_id].labels, sample.labels)
    assert pack_dataset.main([str(dataset), str(out)]) == 2  # never into an existing folder


def test_a_folder_with_nothing_readable_is_reported_not_cached(tmp_path):
    folder = tmp_path / "data" / "a"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "images" / "a.png").write_bytes(b"not a png")
    (folder / "masks" / "m.png").write_bytes(b"not a png either")
    loaded, problems, how = cache.load_folder(tmp_path / "data", progress=False, root=tmp_path / "cache")
    assert loaded == [] and problems and problems[0][0] == "a"
    assert "nothing readable" in how and not (tmp_path / "cache").exists()

"""The data steps of a training run (unet_nuclei/training.py): the train/validation split and the choice of
the data folder.  Reading the data itself is tested in test_data.py, the built-in sample in test_synthetic.py."""

from pathlib import Path

import pytest

import unet_model_core as core
from unet_nuclei import synthetic, training


# --------------------------------------------------------------------------------------------------
# 1. Train/validation split
# --------------------------------------------------------------------------------------------------
def test_split_ids_is_deterministic_disjoint_and_complete():
    ids = [f"id{i:02d}" for i in range(40)]
    train, val = training.split_ids(ids, 0.25, seed=1)
    assert (train, val) == training.split_ids(ids, 0.25, seed=1)
    assert (train, val) == training.split_ids(list(reversed(ids)), 0.25, seed=1), "input order must not matter"
    assert set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert len(val) == 10 and len(train) == 30
    assert training.split_ids(ids, 0.25, seed=2) != (train, val)
    t7, v7 = training.split_ids(ids, 7, seed=1)  # a count
    assert len(v7) == 7 and len(t7) == 33 and set(t7) | set(v7) == set(ids)
    assert len(training.split_ids(ids, 1, seed=1)[1]) == 1
    assert training.split_ids(ids, 0.001)[1] and training.split_ids(ids, 0.999)[0], "both parts stay non-empty"
    with pytest.raises(core.DataError, match="40 images"):
        training.split_ids(ids, 40)  # a count that leaves no training image is refused, not clamped
    assert training.split_ids(["a", "b"], 0.5) in ((["a"], ["b"]), (["b"], ["a"]))


@pytest.mark.parametrize("ids", [[], ["only"]])
def test_split_ids_needs_two_samples(ids):
    with pytest.raises(core.DataError, match="at least 2"):
        training.split_ids(ids)


def test_split_ids_rejects_non_positive_val_size():
    with pytest.raises(ValueError):
        training.split_ids(["a", "b", "c"], 0)


# --------------------------------------------------------------------------------------------------
# 2. Choosing the data folder
# --------------------------------------------------------------------------------------------------
def test_resolve_data_dir_explicit_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(core.DataError) as info:
        training.resolve_data_dir(str(missing))
    message = str(info.value)
    assert str(missing) in message and "stage1_train" in message
    assert not missing.exists()
    folder, why = training.resolve_data_dir(str(tmp_path))
    assert folder == tmp_path and "explicit" in why


def test_resolve_data_dir_default_prefers_real_data_then_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_sample(num_images, progress=True, **kwargs):
        calls.append(num_images)
        return Path("dataset") / "fake_sample"

    monkeypatch.setattr(synthetic, "ensure_sample_dataset", fake_sample)
    folder, why = training.resolve_data_dir(None, sample_images=4, progress=False)
    assert calls == [4] and folder == Path("dataset") / "fake_sample" and "synthetic" in why
    (tmp_path / core.DEFAULT_DATA_DIR).mkdir(parents=True)
    folder, why = training.resolve_data_dir(None, sample_images=4, progress=False)
    assert folder == Path(core.DEFAULT_DATA_DIR) and calls == [4] and "DSB" in why

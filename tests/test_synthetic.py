"""Tests of the built-in synthetic nuclei dataset generator (unet_nuclei/synthetic.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

# The tests import the module from the repository root, whichever way pytest is started.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import unet_model_core as core  # noqa: E402
from conftest import snapshot  # noqa: E402
from unet_nuclei import synthetic  # noqa: E402
from unet_nuclei.synthetic import MODALITY_WEIGHTS, generate_sample, write_synthetic_dataset  # noqa: E402

SMALL_SIZES = [(64, 64), (48, 80), (96, 96)]
MODALITIES = sorted(MODALITY_WEIGHTS)


def _tree(root):
    """Map each file's path relative to root to its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "stage1_train"
    ids = write_synthetic_dataset(out, num_images=6, seed=0, sizes=SMALL_SIZES, progress=False)
    return out, ids


def test_same_seed_gives_identical_bytes_and_other_seed_differs(dataset, tmp_path):
    out, ids = dataset
    ids_again = write_synthetic_dataset(tmp_path / "again", num_images=6, seed=0, sizes=SMALL_SIZES, progress=False)
    assert ids_again == ids
    first, again = _tree(out), _tree(tmp_path / "again")
    assert sorted(first) == sorted(again)
    assert first == again

    ids_other = write_synthetic_dataset(tmp_path / "other", num_images=6, seed=1, sizes=SMALL_SIZES, progress=False)
    assert set(ids_other).isdisjoint(ids)
    other_images = sorted(v for k, v in _tree(tmp_path / "other").items() if "images" in k)
    first_images = sorted(v for k, v in first.items() if "images" in k)
    assert other_images != first_images


def test_layout_matches_dsb_stage1_train(dataset):
    out, ids = dataset
    assert ids == sorted(ids) and len(ids) == 6 and len(set(ids)) == 6
    assert sorted(os.listdir(out)) == ids
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p], "temporary folder left behind"
    for sample_id in ids:
        assert os.listdir(out / sample_id / "images") == [f"{sample_id}.png"]
        image = cv2.imread(str(out / sample_id / "images" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[:2] in SMALL_SIZES
        mask_names = sorted(os.listdir(out / sample_id / "masks"))
        assert mask_names, f"{sample_id} has no masks"
        owner = np.zeros(image.shape[:2], np.int32)
        for name in mask_names:
            mask = cv2.imread(str(out / sample_id / "masks" / name), cv2.IMREAD_UNCHANGED)
            assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
            assert set(np.unique(mask)) == {0, 255}, f"{name} is empty or not binary"
            owner += mask > 0
        assert owner.max() == 1, f"masks of {sample_id} overlap"


def test_modality_mix_follows_weights_and_covers_all():
    mix = synthetic._modality_sequence(64, 0)
    counts = {m: mix.count(m) for m in MODALITIES}
    assert counts == {"fluorescence": 35, "histology": 24, "brightfield": 5}
    assert synthetic._modality_sequence(64, 0) == mix
    assert synthetic._modality_sequence(64, 1) != mix
    assert set(synthetic._modality_sequence(6, 0)) == set(MODALITIES)


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_sample_contract_and_appearance(modality):
    for seed in range(4):
        image, labels = generate_sample(np.random.default_rng(seed), 96, 128, modality)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert labels.shape == (96, 128) and labels.dtype == np.int32
        assert labels.min() == 0 and labels.max() >= 1
        grey = image.mean(axis=2)
        background, nuclei = np.median(grey[labels == 0]), np.median(grey[labels > 0])
        if modality == "fluorescence":
            # Bright nuclei on a dark background.
            assert background < 40, background
            assert nuclei > background + 5, (nuclei, background)
        else:
            # Dark nuclei on a light background (eosin-pink or grey).
            assert background > 120, background
            assert nuclei < background - 10, (nuclei, background)
        if modality == "histology":
            # Hematoxylin is blue-violet: the nuclei are bluer than they are green.
            assert image[labels > 0][:, 2].mean() > image[labels > 0][:, 1].mean()


def test_fluorescence_has_no_bright_object_without_a_mask():
    for seed in range(6):
        image, labels = generate_sample(np.random.default_rng(seed), 128, 128, "fluorescence")
        grey = image.mean(axis=2)
        # Far from every mask only background is allowed; near a mask blur may spill a little.
        far = cv2.dilate((labels > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
        assert np.percentile(grey[far], 99) < np.percentile(grey[labels > 0], 75), seed


def test_refuses_non_empty_folder_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(out, num_images=2, sizes=[(32, 32)], progress=False)
    with pytest.raises(ValueError):
        write_synthetic_dataset(out, num_images=2, sizes=[(32, 32)], progress=False)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    ids = write_synthetic_dataset(tmp_path / "empty", num_images=2, sizes=[(40, 40)], progress=False)
    assert sorted(os.listdir(tmp_path / "empty")) == ids


def test_a_sample_finished_meanwhile_by_another_process_is_used_not_a_raw_error(tmp_path, monkeypatch):
    # Two first runs at once: the other process renames its complete copy into place while this one is
    # still writing.  Staged deterministically: the other's copy lands before this one's first file.
    other = tmp_path / "other"
    write_synthetic_dataset(other, num_images=2, seed=0, sizes=[(40, 40)], progress=False)
    folder = synthetic.sample_dataset_dir(2, 0, tmp_path / "dataset")
    original = synthetic._write_png

    def the_other_process_finishes_first(path, array):
        if not folder.exists():
            shutil.copytree(other, folder)
        original(path, array)

    monkeypatch.setattr(synthetic, "_write_png", the_other_process_finishes_first)
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", [(40, 40)])
    assert synthetic.ensure_sample_dataset(2, 0, root=tmp_path / "dataset", progress=False) == folder
    assert _tree(folder) == _tree(other)  # theirs, whole; and no temporary folder left behind
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


@pytest.mark.slow
def test_two_processes_generating_the_sample_at_once_both_succeed(tmp_path):
    code = (
        "import sys; from unet_nuclei import synthetic; "
        "print(synthetic.ensure_sample_dataset(6, 0, root=sys.argv[1], progress=False))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(*run.communicate(timeout=300), run.returncode) for run in runs]
    assert all(status == 0 for _, _, status in results), results
    folder = synthetic.sample_dataset_dir(6, 0, tmp_path)
    assert {out.strip() for out, _, _ in results} == {str(folder)}
    assert len(os.listdir(folder)) == 6 and sorted(os.listdir(tmp_path)) == [folder.name]


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_sample(np.random.default_rng(0), 64, 64, "confocal"),
        lambda: generate_sample(np.random.default_rng(0), 0, 64, "fluorescence"),
        lambda: generate_sample(np.random.default_rng(0), 64, -5, "histology"),
        lambda: write_synthetic_dataset("/nonexistent/never", num_images=0, progress=False),
        lambda: write_synthetic_dataset("/nonexistent/never", num_images=2, sizes=[(64, 0)], progress=False),
        lambda: write_synthetic_dataset("/nonexistent/never", num_images=2, sizes=[], progress=False),
        lambda: write_synthetic_dataset("/nonexistent/never", num_images=2, sizes=[64], progress=False),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_import_is_silent_and_does_not_load_keras():
    code = (
        "import sys, unet_nuclei.synthetic; "
        "print(sorted(m for m in sys.modules if m.startswith(('tensorflow', 'keras'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]" and result.stderr == ""


def _median_diameter(labels):
    """The median equivalent diameter of the nuclei that the image border does not cut."""
    from skimage.measure import regionprops_table
    from skimage.segmentation import clear_border

    props = regionprops_table(clear_border(labels), properties=("equivalent_diameter_area",))
    return float(np.median(props["equivalent_diameter_area"])) if len(props["equivalent_diameter_area"]) else None


@pytest.mark.parametrize("modality", MODALITIES)
def test_nucleus_diameters_follow_the_requested_range_and_vary_between_images(modality):
    low, high = synthetic.DIAMETER_RANGE[modality]
    medians = []
    for seed in range(10):
        _, labels = generate_sample(np.random.default_rng([seed, 13]), 256, 256, modality)
        median = _median_diameter(labels)
        if median is not None:
            medians.append(median)
    assert len(medians) >= 8
    # Occlusion trims a little off crowded nuclei and the outlines are lumpy, hence the margins.
    assert 0.6 * low <= min(medians) and max(medians) <= 1.3 * high, medians
    # Domain randomisation: the scale is drawn per image, so the images do not share one size.
    assert max(medians) > 1.6 * min(medians), medians


def test_a_sample_from_another_generator_version_is_not_reused(tmp_path, monkeypatch):
    stale = tmp_path / "synthetic_sample_2img_seed0"  # the folder name before versions were added
    stale.mkdir()
    (stale / "old").mkdir()
    folder = synthetic.sample_dataset_dir(2, 0, tmp_path)
    assert folder != stale and f"v{synthetic.GENERATOR_VERSION}" in folder.name
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert synthetic.sample_dataset_dir(2, 0, tmp_path) != folder


def test_stained_images_have_unlabelled_structures_in_the_background():
    # Busy tissue is what a model must learn to leave out: the background is not flat around the nuclei.
    textured = 0
    for seed in range(6):
        image, labels = generate_sample(np.random.default_rng([seed, 7]), 128, 128, "histology")
        grey = image.mean(axis=2)
        far = cv2.dilate((labels > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
        textured += bool(far.sum() > 500 and cv2.GaussianBlur(grey, (0, 0), 1.0)[far].std() > 6)
    assert textured >= 3


def _pale_share(labels, signal):
    """Median over the nuclei of an image of the share of a nucleus's pixels below half its 95th
    percentile of stain: high for pale nuclei whose chromatin gathers in dark clumps."""
    shares = []
    for k in range(1, int(labels.max()) + 1):
        stain = signal[labels == k]
        if stain.size >= 30:
            shares.append(np.mean(stain < 0.5 * np.percentile(stain, 95)))
    return float(np.median(shares)) if shares else 0.0


def test_some_stained_images_hold_pale_nuclei_with_dark_chromatin_clumps():
    # Real stained nuclei are often open: pale, with the stain in clumps. A model that met only evenly
    # dark nuclei cuts them at their pale gaps, so a good share of the sample's stained images have them.
    shares = [
        _pale_share(*synthetic._place_nuclei(np.random.default_rng(seed), 128, 160, "histology")[:2])
        for seed in range(20)
    ]
    assert sum(share >= 0.5 for share in shares) >= 5, np.round(sorted(shares), 2)


def test_ensure_sample_dataset_generates_once_in_the_given_root(tmp_path, monkeypatch):
    assert synthetic.sample_dataset_dir(4, 0, tmp_path) != synthetic.sample_dataset_dir(4, 1, tmp_path)
    folder = synthetic.ensure_sample_dataset(num_images=4, seed=0, root=tmp_path, progress=False)
    assert folder == synthetic.sample_dataset_dir(4, 0, tmp_path) and folder.parent == tmp_path
    samples, problems = core.find_samples(folder)
    assert len(samples) == 4 and problems == []
    before = snapshot(folder)

    def must_not_run(*args, **kwargs):
        raise AssertionError("an existing sample must be reused, not regenerated")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", must_not_run)
    assert synthetic.ensure_sample_dataset(num_images=4, seed=0, root=tmp_path, progress=False) == folder
    assert snapshot(folder) == before

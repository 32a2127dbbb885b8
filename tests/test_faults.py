"""Faults and bad input: nothing lost, nothing silently wrong (issue 11).

Each test stages one fault (a diverging loss, an interrupt, a full or read-only disk, a damaged file, a
bad flag) and checks the three promises: a message that names the file, flag or folder and what to do;
exit status 1 or 2 without a traceback; and no lost or partial file.  Fixtures are written by the tests
in temporary folders.  The real full and read-only disks are small tmpfs and read-only bind mounts, which
need root; where they cannot be staged the test skips and says why, and a simulated full disk (a write
that raises ENOSPC) still runs everywhere."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import cv2
import numpy as np
import pytest

import Predict_mask
import Train
import unet_model_core as core
from conftest import ROOT, run_main
from unet_nuclei import checkpoints, files, synthetic, tiling


def digest(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


def leftovers(folder):
    """Temporary or partial files that a failed write might leave behind."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def no_traceback(*texts):
    return all("Traceback" not in text for text in texts)


def train(tmp_path, data, *flags):
    # One stage at native scale: these tests are about faults, not stages (test_stages.py).
    return run_main(
        Train,
        "--quick",
        "--data",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--nucleus-diameter",
        "none",
        *flags,
    )


@pytest.fixture()
def copied_run(quick_run, tmp_path):
    """A private copy of the shared quick run, for tests that damage it."""
    work, run, _ = quick_run
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run, copy)
    return copy


@pytest.fixture()
def images(tiny_dataset, tmp_path):
    """Three plain image files to predict."""
    folder = tmp_path / "in"
    folder.mkdir()
    for sample in sorted(tiny_dataset.iterdir())[:3]:
        shutil.copy(sample / "images" / f"{sample.name}.png", folder / f"{sample.name}.png")
    return folder


@pytest.fixture()
def mounted(tmp_path):
    """``mount(options)``: a fresh folder with a filesystem mounted on it (unmounted afterwards); skips
    where mounting is not allowed."""
    mounts = []

    def mount(*args):
        target = tmp_path / f"mount{len(mounts)}"
        target.mkdir()
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot stage the disk fault here (mount needs root): {result.stderr.strip()}")
        mounts.append(target)
        return target

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("staging a full or read-only disk needs root and mount; the simulated faults still run")
    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# 1. A NaN stop never saves non-finite weights --------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_first_epoch_saves_nothing_and_says_so(tmp_path, tiny_dataset):
    status, out, err = train(tmp_path, tiny_dataset, "--lr", "1e9", "--epochs", "2", "--name", "nan")
    assert status == 1 and no_traceback(err), err
    assert "diverged" in err and "--lr 0.001" in err
    assert "bce+dice" not in err and "last good epoch is saved" not in err
    assert "nothing was saved" in err and not (tmp_path / "runs" / "nan").exists()


@pytest.mark.slow
def test_a_diverging_resume_keeps_the_last_good_checkpoint_and_a_new_lr_recovers(tmp_path, tiny_dataset):
    status, out, err = train(tmp_path, tiny_dataset, "--name", "r")
    assert status == 0, err
    run = tmp_path / "runs" / "r"
    kept = {name: digest(run / name) for name in ("last.keras", "state.json", "model.keras", "history.csv")}
    status, out, err = run_main(Train, "--resume", str(run), "--epochs", "2", "--lr", "1e9")
    assert status == 1 and no_traceback(err), err
    assert "diverged" in err and f"--resume {run}" in err and "1 of 2" in err
    assert {name: digest(run / name) for name in kept} == kept  # the NaN epoch touched nothing
    status, out, err = run_main(Train, "--resume", str(run), "--epochs", "2", "--lr", "1e-4")
    assert status == 0, err
    assert "optimizer" in out and "0.0001" in out
    import keras

    assert checkpoints.weights_are_finite(keras.saving.load_model(run / "last.keras"))
    assert json.loads((run / "state.json").read_text())["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 1e-4


def test_the_checkpoint_skips_an_epoch_with_non_finite_weights(tmp_path):
    config = core.Config(image_size=32, channels=(4, 8))
    model = core.compile_unet(core.build_unet_from_config(config), config)
    callback = checkpoints.RunCheckpoint(tmp_path, config)
    callback.set_model(model)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    callback.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.4})  # a finite loss does not hide NaN weights
    assert callback.bad_epoch == 1 and model.stop_training and not any(tmp_path.iterdir())


# 2, 3. Every output path is checked before the first image ----------------------------------------


def test_rle_into_a_missing_folder_fails_before_any_image(quick_run, images, tmp_path):
    work, run, _ = quick_run
    out = tmp_path / "out"
    status, stdout, err = run_main(
        Predict_mask, str(images), "--model", str(run), "--out", str(out), "--rle", str(tmp_path / "nodir" / "sub.csv")
    )
    assert status == 2 and no_traceback(err), err
    assert "--rle" in err and "nodir" in err and "does not exist" in err
    assert not list(out.glob("*.png"))  # refused before the work, not after it


def test_scores_csv_is_never_replaced_without_overwrite(quick_run, tiny_dataset, tmp_path):
    work, run, _ = quick_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("an earlier experiment\n")
    status, stdout, err = run_main(Predict_mask, str(tiny_dataset), "--model", str(run), "--out", str(out))
    assert status == 2 and no_traceback(err), err
    assert "scores.csv" in err and "--overwrite" in err
    assert (out / "scores.csv").read_text() == "an earlier experiment\n" and not list(out.glob("*.png"))
    status, stdout, err = run_main(
        Predict_mask, str(tiny_dataset), "--model", str(run), "--out", str(out), "--overwrite"
    )
    assert status == 0, err
    assert (out / "scores.csv").read_text().startswith("image,")


# 4, 7. Interrupts and resume -----------------------------------------------------------------------


def interrupt_at(monkeypatch, epoch):
    """Ctrl-C at the start of ``epoch`` (0-based), as a user would press it mid-run."""
    original = checkpoints.StopOnNaN.on_epoch_begin

    def on_epoch_begin(self, index, logs=None):
        if index == epoch:
            raise KeyboardInterrupt
        original(self, index, logs)

    monkeypatch.setattr(checkpoints.StopOnNaN, "on_epoch_begin", on_epoch_begin)


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_leaves_no_folder_and_says_nothing_was_saved(tmp_path, tiny_dataset, monkeypatch):
    interrupt_at(monkeypatch, 0)
    status, out, err = train(tmp_path, tiny_dataset, "--name", "x")
    assert status == 1 and no_traceback(err), err
    assert "nothing was saved" in err and "last finished epoch is saved" not in err
    assert not (tmp_path / "runs" / "x").exists()
    monkeypatch.undo()
    status, out, err = train(tmp_path, tiny_dataset, "--name", "x")  # a retry gets the same name
    assert status == 0, err
    assert (tmp_path / "runs" / "x" / "model.keras").is_file() and not (tmp_path / "runs" / "x-2").exists()


@pytest.mark.slow
def test_a_plain_resume_keeps_the_runs_own_epoch_count(tmp_path, tiny_dataset, monkeypatch):
    interrupt_at(monkeypatch, 1)
    status, out, err = train(tmp_path, tiny_dataset, "--epochs", "3", "--name", "three")
    run = tmp_path / "runs" / "three"
    assert status == 1 and no_traceback(err), err
    assert "1 of 3" in err and f"--resume {run}" in err
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
    monkeypatch.undo()
    status, out, err = run_main(Train, "--resume", str(run))
    assert status == 0, err
    assert "1 of 3" in out
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert json.loads((run / "state.json").read_text())["epoch"] == 3
    rows = (run / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]


def test_resume_refuses_fewer_epochs_than_it_has(copied_run):
    status, out, err = run_main(Train, "--resume", str(copied_run), "--epochs", "0")
    assert status == 2 and "epochs" in err and no_traceback(err)


# 5. Filesystem errors: whole files or none, and a message naming the folder ---------------------------


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.keras"
    target.write_bytes(b"the good checkpoint")

    def half_then_full(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.OutputError, match="disk is full") as caught:
        files.write_with(target, half_then_full)
    assert str(tmp_path) in str(caught.value) and "last.keras" in str(caught.value)
    assert target.read_bytes() == b"the good checkpoint" and leftovers(tmp_path) == []


def full_disk_after(monkeypatch, allowed_writes):
    """Simulate a disk that fills up: after ``allowed_writes`` writes, each write stores half its bytes
    and fails with ENOSPC."""
    calls = []
    original = files._write

    def write(handle, data):
        calls.append(len(data))
        if len(calls) > allowed_writes:
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(handle, data)

    monkeypatch.setattr(files, "_write", write)


def test_a_full_disk_during_prediction_stops_cleanly_and_a_rerun_finishes(quick_run, images, tmp_path, monkeypatch):
    work, run, _ = quick_run
    out = tmp_path / "out"
    full_disk_after(monkeypatch, 3)  # the first image's two files, then the second image's mask
    status, stdout, err = run_main(Predict_mask, str(images), "--model", str(run), "--out", str(out))
    assert status == 1 and no_traceback(err), err
    assert "disk is full" in err and str(out) in err and "1 of 3" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}_{kind}.png" for p in sorted(images.iterdir())[:1] for kind in ("mask", "overlay")
    )
    monkeypatch.undo()
    status, stdout, err = run_main(Predict_mask, str(images), "--model", str(run), "--out", str(out))
    assert status == 1 and "exists" in err  # the first image is kept, not replaced
    for path in sorted(images.iterdir())[1:]:  # the others were not left half-done, so they are written now
        assert cv2.imread(str(out / f"{path.stem}_overlay.png")) is not None


def test_a_full_disk_during_training_names_the_folder_and_leaves_no_partial_file(tmp_path, tiny_dataset, monkeypatch):
    import keras

    def save(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", save)
    status, out, err = train(tmp_path, tiny_dataset, "--name", "full")
    assert status == 1 and no_traceback(err), err
    assert "disk is full" in err and str(tmp_path / "runs" / "full") in err
    assert leftovers(tmp_path / "runs") == [] and not (tmp_path / "runs" / "full").exists()


def test_a_real_full_disk_during_prediction(quick_run, images, mounted):
    work, run, _ = quick_run
    out = mounted("-t", "tmpfs", "-o", "size=12k", "tmpfs")
    status, stdout, err = run_main(Predict_mask, str(images), "--model", str(run), "--out", str(out))
    assert status == 1 and no_traceback(err), err
    assert "disk is full" in err and str(out) in err
    assert leftovers(out) == []
    for path in out.iterdir():  # every file there is whole, and every image has both files or none
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path.name
        partner = (
            path.name.replace("_mask", "_overlay") if "_mask" in path.name else path.name.replace("_overlay", "_mask")
        )
        assert (out / partner).is_file(), partner


def test_a_read_only_runs_folder_is_refused_before_the_data(tmp_path, tiny_dataset, mounted):
    runs = mounted("--bind", str(tmp_path))  # any folder; remounted read-only below
    result = subprocess.run(["mount", "-o", "remount,ro,bind", str(runs)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {result.stderr.strip()}")
    status, out, err = run_main(Train, "--quick", "--data", str(tiny_dataset), "--runs-dir", str(runs))
    assert status == 1 and no_traceback(err), err
    assert "--runs-dir" in err and str(runs) in err and "read-only" in err
    assert "Data:" not in out  # refused before any work


def test_a_read_only_output_folder_as_an_unprivileged_user(quick_run, images):
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run as an unprivileged user")
    user = [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if subprocess.run([*user, sys.executable, "-c", "import keras"], capture_output=True).returncode != 0:
        pytest.skip(f"the unprivileged user cannot run {sys.executable} (its folder is private to root)")
    work, run, _ = quick_run
    shared = tempfile.mkdtemp()
    try:
        os.chmod(shared, 0o755)  # readable by everyone, writable only by root
        shutil.copytree(run, f"{shared}/run")
        shutil.copytree(images, f"{shared}/in")
        result = subprocess.run(
            [
                *user,
                sys.executable,
                str(ROOT / "Predict_mask.py"),
                f"{shared}/in",
                "--model",
                f"{shared}/run",
                "--out",
                shared,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": shared},
        )
        assert result.returncode == 2 and no_traceback(result.stderr), result.stderr
        assert "--out" in result.stderr and "no permission" in result.stderr
    finally:
        shutil.rmtree(shared)


# 6. Tile sizes the model cannot use ------------------------------------------------------------------


@pytest.mark.parametrize("size", ["16", "-5", "0", "66"])
def test_tile_sizes_below_the_models_context_are_refused(quick_run, images, tmp_path, size):
    work, run, _ = quick_run
    status, stdout, err = run_main(
        Predict_mask, str(images), "--model", str(run), "--out", str(tmp_path / "o"), "--tile-size", size
    )
    assert status == 2 and no_traceback(err), err
    assert f"--tile-size {size}" in err and "--tile-size 64" in err  # the smallest that works
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_the_smallest_tile_is_the_training_patch():
    assert tiling.smallest_tile(core.Config()) == 128
    tiling.check_tile_size(core.Config(), 128)
    with pytest.raises(ValueError, match="--tile-size 112"):
        tiling.check_tile_size(core.Config(), 112)


# 8. Messages that name the flag or file --------------------------------------------------------------


def test_a_malformed_channels_flag_is_named():
    status, out, err = run_main(Train, "--quick", "--channels", "abc")
    assert status == 2 and "--channels" in err and "invalid literal" not in err and no_traceback(err)


def test_a_validation_count_that_leaves_no_training_image_is_refused(tmp_path):
    data = tmp_path / "two"
    synthetic.write_synthetic_dataset(data, num_images=2, seed=1, sizes=[(64, 64)], progress=False)
    status, out, err = train(tmp_path, data, "--val-size", "2.0", "--name", "v")
    assert status == 2 and "--val-size" in err and "2 images" in err and no_traceback(err)
    assert not (tmp_path / "runs" / "v").exists()


def test_a_damaged_model_file_is_called_damaged_not_missing(copied_run, images, tmp_path):
    (copied_run / "model.keras").write_bytes(b"PK\x03\x04 not a whole zip")
    status, out, err = run_main(Predict_mask, str(images), "--model", str(copied_run), "--out", str(tmp_path / "o"))
    assert status == 2 and no_traceback(err)
    assert "model.keras" in err and "damaged" in err and "not found" not in err.lower()


def test_a_damaged_resume_checkpoint_is_named_and_the_run_kept(copied_run):
    (copied_run / "last.keras").write_bytes(b"")
    before = sorted(p.name for p in copied_run.iterdir())
    status, out, err = run_main(Train, "--resume", str(copied_run))
    assert status == 1 and no_traceback(err), err
    assert "last.keras" in err and "damaged" in err and "new run" in err
    assert sorted(p.name for p in copied_run.iterdir()) == before


@pytest.mark.parametrize("text", ["", '{"epoch": '])
def test_an_empty_or_damaged_state_file_is_named(copied_run, text):
    (copied_run / "state.json").write_text(text)
    status, out, err = run_main(Train, "--resume", str(copied_run))
    assert status == 2 and no_traceback(err), err
    assert "state.json" in err and ("empty" if not text else "damaged") in err and "new run" in err


def test_an_empty_config_file_is_named(copied_run, images, tmp_path):
    (copied_run / "config.json").write_text("")
    status, out, err = run_main(Predict_mask, str(images), "--model", str(copied_run), "--out", str(tmp_path / "o"))
    assert status == 2 and "config.json" in err and "empty" in err and no_traceback(err)


def test_non_finite_pixels_do_not_blacken_or_warn(tmp_path):
    image = np.zeros((40, 40), np.float32)
    image[10:20, 10:20] = 0.8
    image[30:35, 5:10] = 3.0
    plain = core.to_rgb_uint8(image)
    image[0, 0], image[39, 39] = np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarnings would fail here
        spoiled = core.to_rgb_uint8(image)
        assert plain.max() == 255 and np.array_equal(spoiled[1:39, 1:39], plain[1:39, 1:39])
        with pytest.raises(core.DataError, match="NaN"):
            core.to_rgb_uint8(np.full((8, 8), np.nan, np.float32), "blank.tif")


def test_an_all_nan_image_is_skipped_with_a_message(quick_run, images, tmp_path):
    work, run, _ = quick_run
    assert cv2.imwrite(str(images / "blank.tif"), np.full((48, 48), np.nan, np.float32))
    status, out, err = run_main(Predict_mask, str(images), "--model", str(run), "--out", str(tmp_path / "o"))
    assert status == 1 and "blank" in err and "NaN" in err
    assert "RuntimeWarning" not in err and no_traceback(err)
    assert not list((tmp_path / "o").glob("blank*"))


def test_one_pixel_images_do_not_train(tmp_path):
    data = tmp_path / "dots"
    for name in ("a", "b"):
        (data / name / "images").mkdir(parents=True)
        (data / name / "masks").mkdir()
        cv2.imwrite(str(data / name / "images" / f"{name}.png"), np.full((1, 1, 3), 200, np.uint8))
        cv2.imwrite(str(data / name / "masks" / "m.png"), np.full((1, 1), 255, np.uint8))
    status, out, err = train(tmp_path, data, "--name", "dots")
    assert status == 2 and no_traceback(err), err
    assert "too small" in err and "Dice" not in out
    assert not (tmp_path / "runs" / "dots").exists()


def test_training_images_without_nuclei_are_refused(tmp_path):
    data = tmp_path / "empty"
    synthetic.write_synthetic_dataset(data, num_images=3, seed=1, sizes=[(64, 64)], progress=False)
    for mask in data.glob("*/masks/*.png"):
        cv2.imwrite(str(mask), np.zeros((64, 64), np.uint8))
    status, out, err = train(tmp_path, data, "--name", "e")
    assert status == 2 and "nucleus" in err and "masks" in err and no_traceback(err)

"""Train.py run as a user runs it, on a tiny generated dataset in quick mode."""
import hashlib
import json
import math
import subprocess
import sys


from conftest import run_script

RUN_FILES = ("model.keras", "config.json", "history.csv", "training_curves.png", "val_predictions.png")


def digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_directory_has_every_file_and_a_report(quick_run):
    work, run, result = quick_run
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (work / "runs" / "latest").read_text().strip() == "first"
    config = json.loads((run / "config.json").read_text())
    assert config["val_ids"] and 0 < config["threshold"] < 1 and config["sampling"] == "patch"
    assert set(config["val_scores"]) == {"dice", "iou", "dsb_score"}
    out = result.stdout
    assert "Configuration:" in out and "Data: using" in out  # resolved config and data source are shown
    assert "Dice" in out and "IoU" in out and "DSB score" in out and str(run.relative_to(work)) in out


def test_the_saved_model_loads_with_plain_keras_in_a_fresh_process(quick_run):
    _, run, _ = quick_run
    # No import of the project here at all: the model file alone must be enough.
    code = ("import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1]); "
            "print(m.predict(np.zeros((1, 64, 96, 3), 'float32'), verbose=0).shape)")
    result = subprocess.run([sys.executable, "-c", code, str(run / "model.keras")], capture_output=True,
                            text=True, timeout=300, cwd=run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(1, 64, 96, 1)")


def test_a_second_run_never_touches_the_first(quick_run, tiny_dataset):
    work, first, _ = quick_run
    before = digest(first)
    result = run_script("Train.py", "--quick", "--data", str(tiny_dataset), "--name", "first", cwd=work)
    assert result.returncode == 0, result.stderr
    assert digest(first) == before
    second = work / "runs" / "first-2"  # same name asked for: a suffix, not an overwrite
    assert (second / "model.keras").is_file()
    assert (work / "runs" / "latest").read_text().strip() == "first-2"


def test_resume_continues_from_the_saved_epoch(tmp_path, tiny_dataset):
    result = run_script("Train.py", "--quick", "--data", str(tiny_dataset), "--name", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
    result = run_script("Train.py", "--resume", "r", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "after epoch 1 of 3" in result.stdout
    assert json.loads((run / "state.json").read_text())["epoch"] == 3
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and [row.split(",")[0] for row in history[1:]] == ["0", "1", "2"]


def test_a_missing_data_path_is_an_error_not_a_fallback(tmp_path):
    result = run_script("Train.py", "--quick", "--data", "no/such/folder", cwd=tmp_path)
    assert result.returncode != 0
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dataset").exists()  # it did not quietly generate the sample instead


def test_bad_flag_values_get_a_clear_message(tmp_path):
    result = run_script("Train.py", "--quick", "--image-size", "90", cwd=tmp_path)  # quick: depth 2, multiples of 4
    assert result.returncode == 2 and "nearest sizes that work" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_logical_cpu_devices_train_data_parallel(tmp_path, tiny_dataset):
    result = run_script("Train.py", "--quick", "--data", str(tiny_dataset), "--cpu-devices", "2", "--name", "dp",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads((tmp_path / "runs" / "dp" / "config.json").read_text())
    assert config["replicas"] == 2
    assert "2 device(s)" in result.stdout


def test_help_documents_every_flag(tmp_path):
    result = run_script("Train.py", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--data", "--epochs", "--batch-size", "--image-size", "--sampling", "--val-size", "--lr", "--loss",
                 "--channels", "--padding", "--no-augment", "--seed", "--runs-dir", "--name", "--resume", "--quick",
                 "--mixed-precision", "--xla", "--cpu-devices"):
        assert flag in result.stdout, flag


def test_nan_loss_stops_training_with_a_message():
    import keras
    import unet_model_core as core

    guard = core.StopOnNaN()
    guard.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    guard.model.stop_training = False  # as model.fit sets it before the first batch
    guard.on_epoch_begin(2)
    guard.on_train_batch_end(0, {"loss": 0.5})
    assert guard.where is None and not guard.model.stop_training
    guard.on_train_batch_end(6, {"loss": math.nan})
    assert guard.where == "epoch 3, batch 7" and guard.model.stop_training


def test_mixed_precision_model_keeps_a_float32_output():
    import keras
    import unet_model_core as core

    try:
        core.set_precision(True)
        model = core.build_unet((32, 32, 3), channels=(4, 8))
        assert model.get_layer("enc1_conv1").compute_dtype in ("bfloat16", "float16")
        assert model.output.dtype == "float32"
        exported = core.export_inference_model(model, core.Config(image_size=32, channels=(4, 8)))
        assert exported.get_layer("enc1_conv1").compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_xla_flag_reaches_the_compiled_model():
    import unet_model_core as core

    config = core.Config(image_size=32, channels=(4, 8), xla=True)
    assert core.compile_unet(core.build_unet_from_config(config), config).jit_compile is True
    config = core.Config(image_size=32, channels=(4, 8))
    assert core.compile_unet(core.build_unet_from_config(config), config).jit_compile is False

"""Train.py and the training steps behind it, on a tiny generated dataset in quick mode.

The flags and errors go through ``Train.main(argv)`` in this process; one real subprocess run (on two
logical CPU devices, which only a fresh process can set up) checks the script as a user runs it."""

import hashlib
import json
import math
import re
import subprocess
import sys

import pytest

import Train
from conftest import run_main, run_script

RUN_FILES = (
    "model.keras",
    "config.json",
    "postprocessing.json",
    "scores.json",
    "history.csv",
    "training_curves.png",
    "val_predictions.png",
)


def digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_directory_has_every_file_and_a_report(quick_run, tiny_dataset):
    work, run, out = quick_run
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (work / "runs" / "latest").read_text().strip() == "first"
    config = json.loads((run / "config.json").read_text())  # what was asked
    learned = json.loads((run / "postprocessing.json").read_text())  # what the end of training chose
    scores = json.loads((run / "scores.json").read_text())  # and measured
    assert config["val_ids"] and config["sampling"] == "patch" and config["targets"] == "instance"
    assert 0 < learned["threshold"] < 1 and 0 < learned["marker_threshold"] < 1 and learned["min_size"] > 0
    assert "val_scores" not in config and set(scores["val_scores"]) == {"dice", "iou", "dsb_score", "ap50"}
    assert [row["id"] for row in scores["val_scores_per_image"]] == config["val_ids"]
    # --quick keeps the default's two stages, an epoch each: the best is the second stage's own.
    assert config["best_epoch"] == 2 and config["train_seconds"] > 0 and config["nucleus_diameter"] == 20.0
    assert re.search(r"\b2 epochs\b.*\b20-px", out) and re.search(r"Second stage\b.*\bepoch 2\b", out)
    assert "Configuration" in out and re.search(r"Data\b.*" + re.escape(str(tiny_dataset)), out)  # config, data source
    assert "Dice" in out and "IoU" in out and "DSB score" in out and str(run) in out
    # Where the time went: every part timed, and together no more than the whole fit.
    parts = config["seconds"]
    assert set(parts) == {"opening", "model_setup", "training_steps", "validation", "epoch_end", "stage_switch"}
    assert all(value >= 0 for value in parts.values()) and parts["training_steps"] > 0 and parts["validation"] > 0
    assert sum(parts.values()) <= config["train_seconds"] + 0.5  # each part is rounded to 0.1 s
    assert set(scores["seconds"]) == {"choice_outputs", "choice_search"}
    assert re.search(r"Minutes: data and folder [0-9.]+, model [0-9.]+, training steps [0-9.]+, validation", out)


def test_new_run_dir_never_reuses_an_existing_folder(tmp_path):
    from unet_nuclei import runs

    first = runs.new_run_dir(tmp_path, "first")
    (first / "model.keras").write_bytes(b"the first run's model")
    before = digest(first)
    second = runs.new_run_dir(tmp_path, "first")  # same name asked for: a suffix, not an overwrite
    assert second == tmp_path / "first-2" and second.is_dir() and not any(second.iterdir())
    assert runs.new_run_dir(tmp_path, "first") == tmp_path / "first-3"
    assert digest(first) == before
    dated = runs.new_run_dir(tmp_path)
    assert dated.parent == tmp_path and dated.name[:8].isdigit()
    for bad in ("latest", "..", "a/b"):
        with pytest.raises(ValueError, match="plain folder name"):
            runs.new_run_dir(tmp_path, bad)


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(tmp_path, tiny_dataset):
    runs = str(tmp_path / "runs")
    status, out, err = run_main(
        Train, "--quick", "--data", str(tiny_dataset), "--name", "r", "--runs-dir", runs, "--nucleus-diameter", "none"
    )  # one stage; test_stages.py resumes two
    assert status == 0, out + err
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
    status, out, err = run_main(Train, "--resume", "r", "--epochs", "3", "--runs-dir", runs)
    assert status == 0, out + err
    assert "Resuming" in out and "1 of 3" in out
    assert json.loads((run / "state.json").read_text())["epoch"] == 3
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and [row.split(",")[0] for row in history[1:]] == ["0", "1", "2"]


def test_finalize_chooses_post_processing_again_without_training(quick_run, tmp_path):
    import shutil

    from unet_nuclei import runs, training

    _, run, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = json.loads((copy / "config.json").read_text())
    model_before = digest(copy)["model.keras"]
    result = training.finalize(copy, thresholds=[0.35], marker_thresholds=[0.45], min_sizes=[3], progress=False)
    after = runs.read_run_config(copy)[1]  # config.json with what finalize learned and measured
    assert json.loads((copy / "config.json").read_text()) == before  # what was asked is kept as it was
    assert result.threshold == after["threshold"] == 0.35 and after["min_nucleus_size"] == 3
    assert after["marker_threshold"] == 0.45
    assert after["val_ids"] == before["val_ids"] and after["best_epoch"] == before["best_epoch"]
    assert set(after["val_scores"]) == {"dice", "iou", "dsb_score", "ap50"} and result.scores == after["val_scores"]
    assert digest(copy)["model.keras"] == model_before  # the model is untouched


def test_a_missing_data_path_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(Train, "--quick", "--data", "no/such/folder")
    assert status == 2 and "no/such/folder" in err
    assert not (tmp_path / "dataset").exists()  # it did not quietly generate the sample instead


def test_bad_flag_values_get_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(Train, "--quick", "--image-size", "90")  # quick: depth 2, multiples of 4
    assert status == 2 and "88" in err and "92" in err  # the nearest sizes that work
    status, out, err = run_main(Train, "--epochs", "many")
    assert status == 2 and "invalid int value" in err
    status, out, err = run_main(Train, "--quick", "--scale-range", "0.5,big")
    assert status == 2 and "--scale-range" in err and "0.5,big" in err and "0.6,1.8" in err
    status, out, err = run_main(Train, "--quick", "--channels", "abc")
    assert status == 2 and "--channels" in err and "abc" in err
    status, out, err = run_main(Train, "--quick", "--nucleus-diameter", "big")
    assert status == 2 and "--nucleus-diameter" in err and "big" in err
    status, out, err = run_main(Train, "--quick", "--nucleus-diameter", "-3")
    assert status == 2 and "nucleus_diameter" in err and "positive" in err
    # Once silently read as 'none'; now each value says what it means (issue 33).
    status, out, err = run_main(Train, "--quick", "--nucleus-diameter", "0")
    assert status == 2 and "--nucleus-diameter 0" in err and "none" in err and "Traceback" not in err
    for rate in ("nan", "inf", "-1"):  # NaN passed every check and diverged
        status, out, err = run_main(Train, "--quick", "--lr", rate)
        assert status == 2 and "--lr" in err and "positive" in err, rate
    status, out, err = run_main(Train, "--quick", "--val-size", "nan")
    assert status == 2 and "val_size" in err
    status, out, err = run_main(Train, "--quick", "--channel", "-2")
    assert status == 2 and "--channel" in err


def test_flags_reach_the_config():
    import unet_model_core as core

    parser = Train.build_parser(core.Config())
    args = parser.parse_args(
        [
            "--targets",
            "binary",
            "--preprocessing",
            "rgb",
            "--scale-range",
            "none",
            "--no-batch-norm",
            "--lr-schedule",
            "plateau",
            "--channels",
            "8,16,32",
        ]
    )
    config = Train.config_from_args(args, core)
    assert (config.targets, config.preprocessing, config.scale_range, config.batch_norm, config.lr_schedule) == (
        "binary",
        "rgb",
        None,
        False,
        "plateau",
    )
    assert config.channels == (8, 16, 32) and config.num_classes == 1 and config.input_channels == 3
    config = Train.config_from_args(parser.parse_args(["--scale-range", "0.5,2"]), core)
    assert config.scale_range == (0.5, 2.0) and config.targets == "instance" and config.batch_norm
    assert Train.config_from_args(parser.parse_args(["--nucleus-diameter", "22"]), core).nucleus_diameter == 22.0
    assert Train.config_from_args(parser.parse_args(["--nucleus-diameter", "none"]), core).nucleus_diameter is None
    assert Train.config_from_args(parser.parse_args(["--channel", "1"]), core).channel == 1
    assert Train.config_from_args(parser.parse_args([]), core).channel is None
    # TTA is on by default (the choice of post-processing and the run's setting); one flag turns it off.
    assert Train.config_from_args(parser.parse_args([]), core).tta is True
    assert Train.config_from_args(parser.parse_args(["--no-tta"]), core).tta is False


def test_help_documents_every_flag():
    status, out, _ = run_main(Train, "--help")
    assert status == 0
    for flag in (
        "--data",
        "--epochs",
        "--batch-size",
        "--image-size",
        "--sampling",
        "--val-size",
        "--lr",
        "--loss",
        "--channels",
        "--padding",
        "--no-augment",
        "--seed",
        "--runs-dir",
        "--name",
        "--resume",
        "--quick",
        "--mixed-precision",
        "--xla",
        "--cpu-devices",
        "--targets",
        "--preprocessing",
        "--scale-range",
        "--no-batch-norm",
        "--lr-schedule",
        "--nucleus-diameter",
        "--nucleus-epochs",
        "--tta",
    ):
        assert flag in out, flag


def test_every_config_field_says_what_it_means_and_its_flag_shows_its_default():
    import dataclasses

    import unet_model_core as core

    status, out, _ = run_main(Train, "--help")
    assert status == 0
    text = " ".join(out.split())  # argparse wraps the help
    specs = core.field_flags()
    assert list(specs) == [field.name for field in dataclasses.fields(core.Config)]  # every field has one
    for name, spec in specs.items():
        assert spec.help and spec.group in (None, "data", "model", "training"), name
    flags = Train.config_flags()
    for name, spec in flags.items():
        default = Train.shown(getattr(core.Config(), name), spec.none)
        assert core.flag_name(name) in out and f"(default: {default})" in text, name
    assert set(flags) >= {"data_dir", "learning_rate", "tta", "augment", "mixed_precision"}
    assert [core.flag_name(name) for name in ("data_dir", "learning_rate", "image_size")] == [
        "--data",
        "--lr",
        "--image-size",
    ]  # the flags that Train.py and the fine-tuning's messages name
    # The inference settings are chosen on the validation images, not given to Train.py.
    assert "--threshold" not in out and "--min-confidence" not in out
    # The help of another Config shows its values (the fine-tuning defaults, say).
    shown = " ".join(Train.build_parser(core.quick_config()).format_help().split())
    assert (
        "--image-size PX patch side (or resize target) in pixels: the model's training input size (default: 64)"
        in shown
    )
    assert "(default: 8,16,32)" in shown


def test_a_new_config_field_is_a_flag_with_no_other_edit(monkeypatch):
    import dataclasses

    import unet_model_core as core

    @dataclasses.dataclass
    class Extended(core.Config):
        warmup_epochs: int = dataclasses.field(
            default=0, metadata=core.flag("epochs of warm-up", "training", metavar="N")
        )
        colour_jitter: bool = dataclasses.field(default=False, metadata=core.flag("jitter the hues", "data"))

    monkeypatch.setattr(core, "Config", Extended)
    parser = Train.build_parser()
    assert "--warmup-epochs N epochs of warm-up (default: 0)" in " ".join(parser.format_help().split())
    args = parser.parse_args(["--warmup-epochs", "2", "--colour-jitter", "--epochs", "3"])
    assert Train.overrides_from_args(args) == {"warmup_epochs": 2, "colour_jitter": True, "epochs": 3}
    config = Train.config_from_args(args, core)
    assert (config.warmup_epochs, config.colour_jitter, config.epochs) == (2, True, 3)


def test_each_kind_of_flag_reads_its_values():
    import unet_model_core as core

    parser = Train.build_parser()

    def overrides(*argv):
        return Train.overrides_from_args(parser.parse_args(argv))

    assert overrides() == {}  # flags left out leave the Config's (or a resumed run's) values
    # Three states: unset (auto, by the hardware), on, off.
    assert core.Config().mixed_precision is None and "mixed_precision" not in overrides()
    assert overrides("--mixed-precision") == {"mixed_precision": True}
    assert overrides("--no-mixed-precision") == {"mixed_precision": False}
    assert overrides("--no-augment", "--xla", "--no-batch-norm") == {"augment": False, "xla": True, "batch_norm": False}
    assert overrides("--data", "d", "--lr", "0.01", "--val-size", "5") == {
        "data_dir": "d",
        "learning_rate": 0.01,
        "val_size": 5.0,
    }
    assert overrides("--channels", "8,16,32", "--scale-range", "NONE") == {"channels": (8, 16, 32), "scale_range": None}
    assert overrides("--nucleus-diameter", "none", "--steps-per-epoch", "7") == {
        "nucleus_diameter": None,
        "steps_per_epoch": 7,
    }
    for flag, choices in (
        ("--sampling", core.SAMPLING_MODES),
        ("--preprocessing", core.PREPROCESSING),
        ("--targets", core.TARGETS),
        ("--padding", core.PADDINGS),
        ("--block", core.BLOCKS),
        ("--loss", core.LOSSES),
        ("--lr-schedule", core.LR_SCHEDULES),
    ):
        for choice in choices:
            assert list(overrides(flag, choice).values()) == [choice]
        with pytest.raises(SystemExit):
            parser.parse_args([flag, "other"])


def test_predict_help_answers_without_importing_tensorflow(tmp_path):
    # A fresh process: this one imported TensorFlow long ago.  Predict_mask.py --help, run as __main__.
    # (Train.py's flags come from the Config, so its --help imports the core, and with it TensorFlow.)
    code = (
        "import runpy, sys\n"
        "sys.argv = ['Predict_mask.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('Predict_mask.py', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules, file=sys.stderr)\n"
    )
    from conftest import ROOT

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "False False"
    assert "--channel" in result.stdout and "--recursive" in result.stdout and "--project" in result.stdout


@pytest.mark.slow
def test_the_script_trains_data_parallel_and_its_model_loads_with_plain_keras(tmp_path, tiny_dataset):
    # The one real run of the script: a fresh process, so it can split the CPU into two logical devices.
    result = run_script(
        "Train.py", "--quick", "--data", str(tiny_dataset), "--cpu-devices", "2", "--name", "dp", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "dp"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (tmp_path / "runs" / "latest").read_text().strip() == "dp"
    assert json.loads((run / "config.json").read_text())["replicas"] == 2
    assert "2 device" in result.stdout and "python Predict_mask.py" in result.stdout
    # No import of the project here at all: the model file alone must be enough.
    code = (
        "import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1]); "
        "print(m.predict(np.zeros((1, 64, 96, 1), 'float32'), verbose=0).shape)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(run / "model.keras")], capture_output=True, text=True, timeout=300, cwd=run
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().endswith("(1, 64, 96, 3)")  # grey in; background, interior, boundary out


def test_nan_loss_stops_training_with_a_message():
    import keras

    from unet_nuclei import training

    guard = training.StopOnNaN()
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
    from unet_nuclei import checkpoints, training

    try:
        training.set_precision(True)
        config = core.Config(image_size=32, channels=(4, 8))
        model = core.build_unet_from_config(config)
        assert model.get_layer("enc1_conv1").compute_dtype in ("bfloat16", "float16")
        assert model.output.dtype == "float32"
        exported = checkpoints.export_inference_model(model, config)
        assert exported.get_layer("enc1_conv1").compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_xla_flag_reaches_the_compiled_model():
    import unet_model_core as core

    config = core.Config(image_size=32, channels=(4, 8), xla=True)
    assert core.compile_unet(core.build_unet_from_config(config), config).jit_compile is True
    config = core.Config(image_size=32, channels=(4, 8))
    assert core.compile_unet(core.build_unet_from_config(config), config).jit_compile is False


def test_mixed_precision_by_default_only_where_the_hardware_is_fast(tmp_path, monkeypatch):
    import keras

    import unet_model_core as core
    from unet_nuclei import devices

    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert devices.cpu_has_bfloat16(with_bf16) and not devices.cpu_has_bfloat16(without)
    assert not devices.cpu_has_bfloat16(tmp_path / "missing")  # not Linux: float32
    assert core.Config().mixed_precision is None  # "auto" is the default
    try:
        for fast, expected in ((True, "mixed_bfloat16"), (False, "float32")):
            monkeypatch.setattr(devices, "mixed_precision_is_fast", lambda fast=fast: fast)
            assert devices.set_precision(None) == expected
            assert devices.set_precision(False) == "float32"  # --no-mixed-precision always wins
            assert devices.set_precision(True) == "mixed_bfloat16"  # no GPU here
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_other_backends_train_on_one_device_and_refuse_several(monkeypatch):
    """On JAX or PyTorch there is no tf.distribute: one device, and a clear error for several."""
    import keras

    from unet_nuclei import devices

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    strategy = devices.get_strategy()
    assert isinstance(strategy, devices.OneDevice) and strategy.num_replicas_in_sync == 1
    assert not devices.is_multi_worker(strategy)
    with strategy.scope():
        pass
    devices.configure_devices(0)  # nothing to configure
    with pytest.raises(ValueError, match=r"--cpu-devices.*KERAS_BACKEND=tensorflow"):
        devices.configure_devices(2)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(ValueError, match="TF_CONFIG"):
        devices.configure_devices(0)
    assert devices.cpu_kernels()["backend"] == "jax" and devices.onednn_enabled() is None
    assert "TensorFlow is not used" in devices.describe_cpu_kernels(devices.cpu_kernels())

"""Messages go through ``logging``: the library only logs, the scripts choose what is shown (-q, -v)."""

import logging
import os
import subprocess
import sys

import pytest

import Train
from conftest import ROOT, run_main
from unet_nuclei import logs


@pytest.fixture(autouse=True)
def package_logger_restored():
    """Each test leaves the loggers it configures as it found them."""
    loggers = [logging.getLogger(name) for name in (logs.PACKAGE, "Train")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_importing_the_library_configures_no_logging(tmp_path):
    # A fresh process: every module of the package imported, and no handler or level set anywhere (the root
    # logger keeps Python's WARNING).
    code = (
        "import logging, pkgutil, importlib, unet_nuclei\n"
        "for module in pkgutil.iter_modules(unet_nuclei.__path__):\n"
        "    importlib.import_module('unet_nuclei.' + module.name)\n"
        "import Train, Predict_mask\n"
        "loggers = [logging.getLogger()] + [logging.getLogger(n) for n in logging.root.manager.loggerDict\n"
        "    if n.split('.')[0] in ('unet_nuclei', 'Train', 'Predict_mask')]\n"
        "print(' '.join(l.name for l in loggers))\n"
        "print([(l.name, l.handlers, l.level) for l in loggers if l.handlers or l.level != (l is loggers[0]) * 30])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    names, configured = result.stdout.splitlines()
    assert {"root", "unet_nuclei.training", "unet_nuclei.cache", "Train", "Predict_mask"} <= set(names.split())
    assert configured == "[]"  # the root logger included: Python's last-resort handler still shows warnings


def test_the_library_logs_its_progress_lines(tiny_dataset, caplog):
    import unet_model_core as core
    from unet_nuclei import training

    caplog.set_level(logging.INFO, logger=logs.PACKAGE)
    training.prepare_data(core.quick_config(data_dir=str(tiny_dataset)), progress=False)
    assert caplog.messages[0] == f"Data: using {tiny_dataset} (given explicitly)"  # the text of the print it was
    assert any("validation images" in message for message in caplog.messages)
    assert {record.name for record in caplog.records} == {"unet_nuclei.training"}
    assert training.keras_verbosity() == 2  # INFO on, not a terminal: Keras's one line per epoch
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=logs.PACKAGE)
    training.prepare_data(core.quick_config(data_dir=str(tiny_dataset)), progress=False)
    assert caplog.messages == [] and training.keras_verbosity() == 0  # and Keras silent


def test_the_console_shows_info_on_stdout_and_warnings_on_stderr_as_they_were_printed(capsys):
    from unet_nuclei import cache

    logs.to_console(logging.INFO)
    logs.to_console(logging.INFO)  # again: still one handler
    assert sum(isinstance(h, logs.ConsoleHandler) for h in logging.getLogger(logs.PACKAGE).handlers) == 1
    logging.getLogger("unet_nuclei.training").info("Run:  runs/x")
    logging.getLogger("unet_nuclei.training").debug("not shown")
    cache.report_problems([("a", "no masks")])
    out, err = capsys.readouterr()
    assert out == "Run:  runs/x\n" and err == "Skipped 1 entry:\n  - a: no masks\n"
    logs.to_console(logging.WARNING)
    logging.getLogger("unet_nuclei.training").info("Run:  runs/x")
    cache.report_problems([("a", "no masks")])
    out, err = capsys.readouterr()
    assert out == "" and "Skipped 1 entry" in err


@pytest.mark.parametrize("flag", [None, "-q", "-v"])
def test_train_quiet_and_verbose(flag, tiny_dataset, tmp_path):
    # A run refused once its data is read (more validation images than images): the lines before the
    # error, without training anything.
    argv = ["--quick", "--data", str(tiny_dataset), "--val-size", "100", "--runs-dir", str(tmp_path / "runs")]
    status, out, err = run_main(Train, *argv, *([flag] if flag else []))
    assert status == 2 and err.startswith("error: val_size (--val-size) 100") and "Traceback" not in err
    lines = out.splitlines()
    if flag == "-q":
        assert out == ""  # warnings and errors only
    else:
        assert lines[0].startswith("Configuration: ") and lines[1] == f"Data: using {tiny_dataset} (given explicitly)"
        assert any(line.startswith("      images and masks ") for line in lines[2:])
        assert ("samples found" in out) == (flag == "-v")  # a debug line of the cache


def test_quiet_and_verbose_are_one_or_the_other():
    status, _, err = run_main(Train, "-q", "-v")
    assert status == 2 and "not allowed with" in err
    import Predict_mask

    status, out, _ = run_main(Predict_mask, "--help")
    assert status == 0 and "--quiet" in out and "--verbose" in out


def test_predict_quiet_keeps_the_warnings_only(tiny_dataset, tmp_path):
    import shutil

    import Predict_mask

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(sorted(tiny_dataset.glob("*/images/*.png"))[0], images)
    (images / "bad.png").write_text("not an image")
    for flag in ("-q", None):
        out_dir = tmp_path / f"out{flag}"
        argv = [str(images), "--model", "dsb2018", "--out", str(out_dir), "--no-tta", *([flag] if flag else [])]
        status, out, err = run_main(Predict_mask, *argv)
        assert status == 1 and "bad: skipped" in err and "Skipped 1 entry:\n  - bad: " in err
        assert len(list(out_dir.glob("*_mask.png"))) == 1
        if flag:
            assert out == ""
        else:
            assert out.startswith("Model: ") and "nuclei" in out.splitlines()[1]

"""Keras's other backends: the library, a quick training and predictions on JAX, in processes where
TensorFlow cannot be imported, and their nuclei against TensorFlow's on the same weights.

JAX stands for both other backends here (PyTorch's CPU wheel is not on PyPI for every platform, and the
two share every line of the project's code); ``benchmarks/bench_step.py --settings float32,jax,torch``
times all three.  Skipped where JAX is not installed (``requirements-dev.txt`` installs it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_script

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed"),
]
BACKEND = "jax"


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory) -> dict:
    """The environment of a process on JAX in which ``import tensorflow`` fails, as where it is not installed."""
    blocker = tmp_path_factory.mktemp("no_tensorflow")
    (blocker / "tensorflow").mkdir()
    (blocker / "tensorflow" / "__init__.py").write_text('raise ImportError("TensorFlow is made unimportable here")\n')
    return {"KERAS_BACKEND": BACKEND, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory, without_tensorflow):
    """A quick run trained on JAX (the built-in sample, written into the working folder)."""
    work = tmp_path_factory.mktemp("jax_work")
    result = run_script("Train.py", "--quick", "--runs-dir", "runs", cwd=work, env=without_tensorflow)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = [path for path in (work / "runs").iterdir() if path.is_dir()]
    assert len(runs) == 1
    return work, runs[0], result.stdout


def _sample_image(work):
    """The first image of the built-in sample that the quick training wrote."""
    return sorted((work / "dataset").glob("synthetic_sample_*/*/images/*.png"))[0]


def test_tensorflow_is_really_blocked_and_the_library_imports_without_it(without_tensorflow):
    env = {**os.environ, **without_tensorflow}
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "unimportable" in blocked.stderr
    code = (
        "import importlib, pkgutil, sys\n"
        "import unet_model_core, unet_nuclei, keras\n"
        "for module in pkgutil.iter_modules(unet_nuclei.__path__):\n"
        "    importlib.import_module('unet_nuclei.' + module.name)\n"
        "print(keras.backend.backend(), 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == [BACKEND, "False"]


def test_a_quick_training_on_jax_writes_a_whole_run(jax_run):
    _, run_dir, stdout = jax_run
    assert "Keras backend jax" in stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cpu_kernels"]["backend"] == BACKEND and config["best_epoch"] >= 1
    for name in ("model.keras", "history.csv", "postprocessing.json", "scores.json"):
        assert (run_dir / name).is_file(), name


def _labels_on(env, model, image, out, cwd):
    result = run_script(
        "Predict_mask.py", str(image), "--model", str(model), "--out", str(out), "--labels", "tif", cwd=cwd, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    import tifffile

    return tifffile.imread(out / f"{image.stem}_labels.tif")


def _compare(theirs: np.ndarray, ours: np.ndarray) -> None:
    """The same nuclei: the same count, and the nucleus pixels differ by at most 0.5 % (round-off at
    thresholds moves a few boundary pixels)."""
    assert theirs.max() == ours.max(), f"{theirs.max()} nuclei against {ours.max()}"
    differing = int(((theirs > 0) != (ours > 0)).sum())
    assert differing <= 0.005 * max(1, int((ours > 0).sum())), f"{differing} nucleus pixels differ"


@pytest.mark.parametrize("model", ["jax-trained run", "shipped model (trained on TensorFlow)"])
def test_jax_and_tensorflow_find_the_same_nuclei_with_the_same_weights(jax_run, without_tensorflow, model, tmp_path):
    from unet_model_core import read_image
    from unet_nuclei.segmenter import Segmenter

    work, run_dir, _ = jax_run
    source = run_dir if model.startswith("jax") else "dsb2018"
    image = _sample_image(work)
    theirs = _labels_on(without_tensorflow, source, image, tmp_path / "jax", work)
    ours = Segmenter.load(source).segment(read_image(image), progress=False).labels  # here, on TensorFlow
    if model.startswith("shipped"):
        assert ours.max() >= 5, "the shipped model should find the sample's nuclei"
    _compare(theirs, ours)

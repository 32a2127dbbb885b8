"""Shared test set-up: CPU only, quiet TensorFlow, the repository root importable."""

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is CPU-only by design, even on a GPU box
# Decoded-dataset caches of the tests' fixture folders go to a scratch folder, never the user's ~/.cache.
os.environ["UNET_NUCLEI_CACHE"] = tempfile.mkdtemp(prefix="unet_nuclei_test_cache_")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import subprocess

import pytest


def run_script(script: str, *args: str, cwd, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would: a fresh Python process, in ``cwd``, with the
    environment variables of ``env`` added."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def snapshot(root) -> dict:
    """Every path under root with its bytes and mtime: proves a reader modified nothing."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.stat()
            state[str(path.relative_to(root))] = (stat.st_mtime_ns, path.read_bytes() if path.is_file() else None)
    return state


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small DSB-layout folder written by the project's own generator (small images, fast)."""
    from unet_nuclei import synthetic

    folder = tmp_path_factory.mktemp("data") / "tiny"
    synthetic.write_synthetic_dataset(folder, num_images=6, seed=3, sizes=[(96, 96), (128, 160)], progress=False)
    return folder


def run_main(module, *argv: str) -> tuple[int, str, str]:
    """Call a script's ``main(argv)`` in this process; returns ``(status, stdout, stderr)``.  A usage
    error (argparse's SystemExit) counts as its exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = module.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, tiny_dataset):
    """One quick training run (``Train.py --quick``, in this process), shared by the tests that only read
    it.  Returns ``(work folder, run folder, stdout)``."""
    import Train

    work = tmp_path_factory.mktemp("work")
    status, out, err = run_main(
        Train, "--quick", "--data", str(tiny_dataset), "--name", "first", "--runs-dir", str(work / "runs")
    )
    assert status == 0, out + err
    return work, work / "runs" / "first", out


def squares(shape, *boxes):
    """Label image with one rectangle per box (row0, row1, col0, col1, label), ends exclusive."""
    labels = np.zeros(shape, np.int32)
    for r0, r1, c0, c1, value in boxes:
        labels[r0:r1, c0:c1] = value
    return labels

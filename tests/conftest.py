"""Shared test set-up: CPU only, quiet TensorFlow, the repository root importable."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is CPU-only by design, even on a GPU box

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import subprocess

import pytest


def run_script(script: str, *args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would: a fresh Python process, in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small DSB-layout folder written by the project's own generator (small images, fast)."""
    import synthetic_nuclei

    folder = tmp_path_factory.mktemp("data") / "tiny"
    synthetic_nuclei.write_synthetic_dataset(folder, num_images=6, seed=3, sizes=[(96, 96), (128, 160)],
                                             progress=False)
    return folder


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, tiny_dataset):
    """One quick training run (Train.py --quick), shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("work")
    result = run_script("Train.py", "--quick", "--data", str(tiny_dataset), "--name", "first", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work, work / "runs" / "first", result

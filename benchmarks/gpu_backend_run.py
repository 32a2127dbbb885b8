"""The default real-data training and a folder prediction on a GPU machine that has PyTorch or JAX but no
TensorFlow, timed: seconds per epoch, the whole run, images per second of prediction, peak GPU memory and
the held-out score per image kind.

Such a machine (the project's lent GPU machine is one) cannot download anything, so everything it lacks
travels with the working tree, under 64 MiB in all: Keras's wheel and the few small ones it needs, and the
real data packed by ``pack_dataset.py`` (about 47 MiB).  Two steps:

    python benchmarks/gpu_backend_run.py prepare            # here, with dataset/stage1_train: fills .gpu-carry/
    python3 benchmarks/gpu_backend_run.py run --backend torch --out OUT   # there (carry .gpu-carry)

``run`` installs the carried wheels where Keras is missing, trains with ``evaluate_real.py`` (the default
recipe on four fifths of the images, then the held-out fifth scored per kind), predicts the packed images
with the new run through ``Predict_mask.py``, samples ``nvidia-smi`` for the GPU memory in use, and ends
with one JSON line of the figures.  ``--train-args`` passes other flags to the training, for example to
try the script on a CPU in a minute first:

    python benchmarks/gpu_backend_run.py run --backend jax --out /tmp/gpu-try \\
        --train-args "--epochs 1 --nucleus-epochs 0 --steps-per-epoch 3" --predict-images 4

``.gpu-carry/`` is made from the data: it is listed in ``.git/info/exclude`` by ``prepare`` and never
committed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu-carry"
WHEELS = CARRY / "wheels"
DATA = CARRY / "stage1_train_packed"
# What the GPU machine's image lacks of the project's requirements (it has NumPy, OpenCV, scikit-image,
# SciPy, tifffile, matplotlib, tqdm, h5py, ml-dtypes, rich, absl-py, PyTorch and JAX).
MISSING = ("keras", "namex", "optree", "roifile")
TARGET_PYTHON = "3.12"  # the GPU machine's python3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(args) -> int:
    """Download the missing wheels for the GPU machine's Python and pack the real data into .gpu-carry/."""
    import keras

    source = Path(args.data)
    if not source.is_dir():
        log(f"{source} not found: see dataset.txt to get the real data")
        return 1
    WHEELS.mkdir(parents=True, exist_ok=True)
    pins = [f"keras=={keras.__version__}", *MISSING[1:]]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(WHEELS)]
    command += ["--python-version", args.python, "--implementation", "cp", "--platform", "manylinux2014_x86_64"]
    command += ["--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", *pins]
    subprocess.run(command, check=True)
    if not DATA.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "pack_dataset.py"), str(source), str(DATA)], check=True
        )
    exclude = ROOT / ".git" / "info" / "exclude"  # made from the data: never to be committed
    if exclude.parent.is_dir() and "/.gpu-carry/" not in (exclude.read_text() if exclude.exists() else ""):
        with open(exclude, "a") as handle:
            handle.write("/.gpu-carry/\n")
    size = sum(path.stat().st_size for path in CARRY.rglob("*") if path.is_file())
    log(f"{CARRY}: {size / 2**20:.1f} MiB to carry (with the working tree, at most 64 MiB travel)")
    return 0


class GpuMemory:
    """The largest GPU memory in use while it runs, read from ``nvidia-smi`` every half second (MiB;
    None without nvidia-smi).  It counts every process on the GPU, the backend's reserved pool included."""

    def __init__(self):
        self.peak, self.stop = None, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self.stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                used = max(int(line) for line in text.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(0.5)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def timed(command: list[str], env: dict, log_file: Path) -> tuple[float, str]:
    """Run ``command``, its output to the screen and to ``log_file``; returns (seconds, output)."""
    started = time.perf_counter()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        lines = []
        for line in process.stdout:
            sys.stderr.write(line)
            lines.append(line)
    output = "".join(lines)
    log_file.write_text(output)
    if process.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({process.returncode}); see {log_file}")
    return time.perf_counter() - started, output


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("keras") is None:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            log(f"Keras is not installed and {WHEELS} holds no wheels: run `prepare` first and carry .gpu-carry")
            return 1
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, wheels)], check=True
        )
    data = Path(args.data) if args.data else DATA
    env = {**os.environ, "KERAS_BACKEND": args.backend, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "0"}
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX: the memory it uses, not 75% of the GPU
    name = f"gpu-{args.backend}"
    train = [sys.executable, str(ROOT / "benchmarks" / "evaluate_real.py"), "--data", str(data)]
    train += ["--runs-dir", str(out / "runs"), "--name", name, *shlex.split(args.train_args)]
    with GpuMemory() as memory:
        train_seconds, output = timed(train, env, out / "train.log")
    train_peak = memory.peak
    epochs = [int(s) for s in re.findall(r"^\d+/\d+ - (\d+)s - ", output, flags=re.MULTILINE)]

    # The packed layout (images/ID.png) or DSB-2018's (ID/images/ID.png).
    images = sorted((data / "images").glob("*.png")) or sorted(data.glob("*/images/*.png"))
    images = images[: args.predict_images or None]
    folder = Path(tempfile.mkdtemp(prefix="gpu_predict_", dir=out))
    for path in images:
        (folder / path.name).symlink_to(path.resolve())
    predict = [sys.executable, str(ROOT / "Predict_mask.py"), str(folder), "--model", str(out / "runs" / name)]
    predict += ["--out", str(out / "predictions"), "-q"]
    with GpuMemory() as memory:
        predict_seconds, _ = timed(predict, env, out / "predict.log")
    run_config = json.loads((out / "runs" / name / "config.json").read_text())
    held_out = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))
    figures = {
        "backend": args.backend,
        "gpu_memory_peak_mib": {"training": train_peak, "prediction": memory.peak},
        "epoch_seconds": epochs,
        "train_seconds_whole_run": round(train_seconds, 1),
        "train_seconds_in_run": run_config.get("train_seconds"),
        "predict_images": len(images),
        "predict_seconds_with_start": round(predict_seconds, 1),
        "predict_images_per_s": round(len(images) / predict_seconds, 2),
        "held_out": {key: held_out[key] for key in ("n", "dsb_score", "ap50", "dice", "per_kind", "per_size")},
    }
    print(json.dumps(figures))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    ready = steps.add_parser("prepare", help="here: the wheels and the packed data into .gpu-carry/")
    ready.add_argument("--data", default="dataset/stage1_train", help="the DSB-2018 training folder")
    ready.add_argument("--python", default=TARGET_PYTHON, help=f"the GPU machine's Python version ({TARGET_PYTHON})")
    there = steps.add_parser("run", help="there: train, score and predict, timed")
    there.add_argument("--backend", choices=("torch", "jax"), default="torch", help="Keras backend (torch)")
    there.add_argument("--out", required=True, metavar="DIR", help="where the run, logs and predictions go")
    there.add_argument("--data", help="the training folder (default: .gpu-carry/stage1_train_packed)")
    there.add_argument("--train-args", default="", help="more flags for the training (Train.py's)")
    there.add_argument("--predict-images", type=int, default=0, help="images to predict (0: all)")
    args = parser.parse_args(argv)
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())

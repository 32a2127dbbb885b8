"""Several machines: two worker processes on this machine, joined by ``TF_CONFIG``.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so the
project trains there with its own loop (``unet_nuclei.multiworker``).  The first test trains a quick run
on two workers and checks that both finish, that only the chief writes the run folder, and that the
model it saved is the one both trained.  The last test runs the upstream failure itself on a toy model,
as strictly expected to fail: the day a Keras release fixes it, that test passes, fails the suite as
XPASS(strict), and says ``model.fit`` could be used there again."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT
from unet_nuclei.runs import read_run_config

TOY = """
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
data = tf.data.Dataset.from_tensor_slices((np.ones((16, 4), "float32"), np.ones((16, 1), "float32"))).batch(4)
model.fit(data, epochs=1, verbose=0)
print("trained")
"""


# Why not bind port 0, read the port and close the socket: until a worker binds that port, the kernel may
# hand it to any other process (to its bind(0) or an outgoing connection); the worker's gRPC server then
# fails ("Could not start gRPC server") and its peer waits for it until the timeout.  Nor can the workers
# pick their own ports: every worker's TF_CONFIG must name every worker's address before any starts.
# So the test keeps each port bound, with SO_REUSEADDR and not listening, for as long as the workers run:
# Linux never gives a bound port to another bind(0) or connection, while the worker's gRPC server (which
# sets SO_REUSEADDR itself, on all interfaces) may still bind it and listen.  Where a system refuses that
# second bind (checked for each port), the ports are released just before the launch.  What is left (a
# process binding that very port number on purpose, or that short gap) is covered by launching the
# cluster again, on new ports, when a worker could not bind: at most LAUNCHES times.
BIND_FAILED = "Could not start gRPC server"  # TensorFlow's words when a worker cannot bind its port
LAUNCHES = 3


def _shareable(port: int) -> bool:
    """Whether a server socket (SO_REUSEADDR, listening) can bind ``port`` while the test's socket holds it."""
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("", port))
        probe.listen()
        return True
    except OSError:
        return False
    finally:
        probe.close()


@contextlib.contextmanager
def reserved_ports(count: int):
    """``count`` free ports, held (see above) until the block ends."""
    holders = []
    try:
        for _ in range(count):
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("", 0))  # all interfaces: the gRPC server binds 0.0.0.0:<port>
            holders.append(holder)
        ports = [holder.getsockname()[1] for holder in holders]
        if not all(_shareable(port) for port in ports):
            for holder in holders:
                holder.close()
        yield ports
    finally:
        for holder in holders:
            holder.close()


def _launch(args: list[str], cwd, ports: list[int], timeout: int) -> list[subprocess.CompletedProcess]:
    """Start one worker per port, each with its own TF_CONFIG, and wait for all of them; once one fails,
    the others are stopped (they would wait for it until the timeout)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers, logs = [], []
    try:
        for index in range(len(ports)):
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            }
            logs.append(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (closed when the workers are done, below)
            workers.append(
                subprocess.Popen(
                    [sys.executable, *args], cwd=cwd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, text=True
                )
            )
        deadline = time.monotonic() + timeout
        while any(worker.poll() is None for worker in workers):
            if any(worker.returncode not in (None, 0) for worker in workers):
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(workers[0].args, timeout)
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    results = []
    for worker, log in zip(workers, logs):
        log.seek(0)
        results.append(subprocess.CompletedProcess(worker.args, worker.returncode, log.read()))
        log.close()
    return results


def run_workers(args: list[str], cwd, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start two workers of one cluster and wait for both; a launch in which a worker could not bind its
    port is tried again on new ports."""
    for launch in range(1, LAUNCHES + 1):
        with reserved_ports(2) as ports:
            results = _launch(args, cwd, ports, timeout)
        if launch == LAUNCHES or not any(r.returncode != 0 and BIND_FAILED in r.stdout for r in results):
            return results


@pytest.mark.slow
def test_two_workers_train_one_run_and_only_the_chief_writes_it(tmp_path, tiny_dataset):
    runs = tmp_path / "runs"
    args = [
        str(ROOT / "Train.py"),
        "--quick",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--data",
        str(tiny_dataset),
        "--runs-dir",
        str(runs),
        "--name",
        "together",
    ]
    chief, worker = run_workers(args, cwd=tmp_path)
    for result in (chief, worker):
        assert result.returncode == 0, result.stdout[-3000:]
        assert "Traceback" not in result.stdout
    # Both ran the same epochs in step, each naming itself.
    assert re.search(r"Epoch 2/2\b.*\bworker 0 of 2\b.*\b3 steps", chief.stdout)
    assert re.search(r"Epoch 2/2\b.*\bworker 1 of 2\b.*\b3 steps", worker.stdout)
    # ... and the default's second stage, at one nucleus size, after them (--quick: one epoch).
    assert re.search(r"Second stage\b.*\bepoch 3\b.*\b20-px", chief.stdout)
    assert re.search(r"Epoch 3/3\b.*\bworker 1 of 2\b.*\b3 steps", worker.stdout)
    assert "chief" in worker.stdout and "Predict with:" not in worker.stdout
    # The chief wrote one complete run; the other worker wrote nothing a user sees.
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "together"]
    run = runs / "together"
    for name in ("model.keras", "last.keras", "config.json", "history.csv", "val_predictions.png"):
        assert (run / name).is_file(), name
    info = read_run_config(run)[1]
    assert info["replicas"] == 2 and info["val_scores"]["dice"] >= 0
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "dice", "iou", "loss"] and len(rows) == 1 + 3
    assert not list(tmp_path.glob("unet_worker_*"))
    # Both workers logged the same validation loss: they hold the same weights.
    last_val = [
        line.split("val_loss: ")[1].split()[0]
        for line in (chief.stdout, worker.stdout)
        for line in line.splitlines()
        if line.startswith("Epoch 3/3")
    ]
    assert len(last_val) == 2 and last_val[0] == last_val[1]


def test_a_malformed_tf_config_is_named(monkeypatch):
    from unet_nuclei import multiworker

    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        multiworker.is_chief()
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})
    )
    assert not multiworker.is_chief() and multiworker.worker_name() == "worker 1 of 2"
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}),
    )
    assert not multiworker.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert multiworker.is_chief()


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Keras 3 model.fit under MultiWorkerMirroredStrategy: keras-team/keras#20585")
def test_keras_fit_under_multi_worker_strategy(tmp_path):
    results = run_workers(["-c", TOY], cwd=tmp_path)
    assert all(r.returncode == 0 and "trained" in r.stdout for r in results), results[0].stdout[-2000:]

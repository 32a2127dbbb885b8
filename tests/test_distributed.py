"""Several machines: two worker processes on this machine, joined by ``TF_CONFIG``.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so the
project trains there with its own loop (``unet_nuclei.multiworker``).  The first test trains a quick run
on two workers and checks that both finish, that only the chief writes the run folder, and that the
model it saved is the one both trained.  The last test runs the upstream failure itself on a toy model,
as strictly expected to fail: the day a Keras release fixes it, that test passes, fails the suite as
XPASS(strict), and says ``model.fit`` could be used there again."""
import json
import os
import socket
import subprocess
import sys

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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(args: list[str], cwd, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start two workers of one cluster, each with its own TF_CONFIG, and wait for both."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for worker in workers:
            output = worker.communicate(timeout=timeout)[0]
            results.append(subprocess.CompletedProcess(worker.args, worker.returncode, output))
    finally:
        for worker in workers:
            worker.kill()
    return results


@pytest.mark.slow
def test_two_workers_train_one_run_and_only_the_chief_writes_it(tmp_path, tiny_dataset):
    runs = tmp_path / "runs"
    args = [str(ROOT / "Train.py"), "--quick", "--epochs", "2", "--steps-per-epoch", "3", "--data",
            str(tiny_dataset), "--runs-dir", str(runs), "--name", "together"]
    chief, worker = run_workers(args, cwd=tmp_path)
    for result in (chief, worker):
        assert result.returncode == 0, result.stdout[-3000:]
        assert "Traceback" not in result.stdout
    # Both ran the same epochs in step, each naming itself.
    assert "Epoch 2/2 (worker 0 of 2): 3 steps" in chief.stdout
    assert "Epoch 2/2 (worker 1 of 2): 3 steps" in worker.stdout
    # ... and the default's second stage, at one nucleus size, after them (--quick: one epoch).
    assert "Second stage: epoch 3 with every image at 20-px nuclei" in chief.stdout
    assert "Epoch 3/3 (worker 1 of 2): 3 steps" in worker.stdout
    assert "trained in step with the chief" in worker.stdout and "Predict with:" not in worker.stdout
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
    last_val = [line.split("val_loss: ")[1].split()[0] for line in (chief.stdout, worker.stdout)
                for line in line.splitlines() if line.startswith("Epoch 3/3")]
    assert len(last_val) == 2 and last_val[0] == last_val[1]


def test_a_malformed_tf_config_is_named(monkeypatch):
    from unet_nuclei import multiworker

    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is set but is not a cluster description"):
        multiworker.is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}))
    assert not multiworker.is_chief() and multiworker.worker_name() == "worker 1 of 2"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}))
    assert not multiworker.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert multiworker.is_chief()


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Keras 3 model.fit under MultiWorkerMirroredStrategy: keras-team/keras#20585")
def test_keras_fit_under_multi_worker_strategy(tmp_path):
    results = run_workers(["-c", TOY], cwd=tmp_path)
    assert all(r.returncode == 0 and "trained" in r.stdout for r in results), results[0].stdout[-2000:]

"""What a run keeps while it trains: the callbacks that write its checkpoints and history, the NaN guard,
and the readers of what they wrote.

Every file goes through ``unet_nuclei.files`` (whole or not at all), and nothing is written for an epoch
whose loss or weights are not finite, so a run folder always holds the last good epoch and nothing
after it: ``--resume`` continues from weights that can still learn.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from unet_model_core import Config, build_unet_from_config
from unet_nuclei import files

MODEL_FILE, LAST_FILE, STATE_FILE, CONFIG_FILE = "model.keras", "last.keras", "state.json", "config.json"
HISTORY_FILE, CURVES_FILE, VAL_FIGURE_FILE = "history.csv", "training_curves.png", "val_predictions.png"


def read_json(path, what: str = "") -> dict:
    """A run's JSON file as a dict; a missing, empty or damaged file is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing{what}") from None
    except (ValueError, UnicodeDecodeError) as error:
        kind = "empty" if not path.read_bytes().strip() else f"damaged ({error})"
        raise ValueError(f"{path} is {kind}{what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged (not a JSON object){what}")
    return data


def saved_epoch(run_dir) -> int | None:
    """The last epoch a run saved for --resume (state.json beside last.keras), or None when it has none."""
    run_dir = Path(run_dir)
    if not (run_dir / LAST_FILE).is_file():
        return None
    try:
        return int(read_json(run_dir / STATE_FILE)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weights_are_finite(model: keras.Model) -> bool:
    """True when every weight of ``model`` is a finite number (a NaN step poisons them all)."""
    return all(np.isfinite(np.asarray(w, dtype=np.float32)).all() for w in model.get_weights())


def export_inference_model(model: keras.Model, config: Config) -> keras.Model:
    """A float32, uncompiled copy of a trained model, for saving as the run's ``model.keras``.

    Padded models get a ``(None, None, C)`` input, so they predict tiles of any size that fits; unpadded
    models keep their training size.  Only built-in layers are used, so the file loads anywhere."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = build_unet_from_config(config, any_size=True)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    return copy


def _good_epoch(model: keras.Model, logs: dict) -> bool:
    # Keras still runs the epoch end after a NaN stop: the mean loss then is NaN, and so are the weights.
    loss = logs.get("loss")
    return (loss is None or bool(np.isfinite(loss))) and weights_are_finite(model)


class RunCheckpoint(keras.callbacks.Callback):
    """At every good epoch end: the full training state to ``last.keras`` (+ ``state.json``); and, when
    the validation loss improved, the inference model to ``model.keras``.  So an interruption or a crash
    loses at most the epoch under way.  An epoch with a non-finite loss or weights saves nothing."""

    def __init__(self, run_dir: Path, config: Config, best: float = math.inf):
        super().__init__()
        self.run_dir, self.config, self.best = Path(run_dir), config, best
        self.best_epoch = self.bad_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _good_epoch(self.model, logs):
            # The loss may stay finite while a weight (a batch-norm variance) overflows: stop here too.
            self.bad_epoch, self.model.stop_training = epoch + 1, True
            return
        current = logs.get("val_loss", logs.get("loss"))
        if current is not None and np.isfinite(current) and current < self.best:
            self.best, self.best_epoch = float(current), epoch + 1
            inference = export_inference_model(self.model, self.config)
            files.write_with(self.run_dir / MODEL_FILE, inference.save)
        files.write_with(self.run_dir / LAST_FILE, self.model.save)
        state = {"epoch": epoch + 1, "best_val_loss": self.best, "best_epoch": self.best_epoch}
        files.write_text(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


class HistoryLog(keras.callbacks.Callback):
    """history.csv, rewritten whole at every good epoch end (one row per epoch, ``epoch`` first, counted
    from 0 as Keras does).  On resume it starts from the rows of the epochs that were saved, so an epoch
    that was logged but never checkpointed is not kept twice."""

    def __init__(self, path: Path, keep_epochs: int = 0):
        super().__init__()
        self.path = Path(path)
        self.rows = read_history_rows(self.path)[:keep_epochs]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _good_epoch(self.model, logs):
            return
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        keys = ["epoch", *sorted({k for row in self.rows for k in row} - {"epoch"})]
        files.write_csv(
            self.path, [keys] + [[int(row["epoch"])] + [row.get(k, "") for k in keys[1:]] for row in self.rows]
        )


class TimeProfile(keras.callbacks.Callback):
    """Where the epochs' time goes, summed over a run, in seconds: ``training_steps`` (the batches,
    the first epoch's graph tracing included), ``validation`` (the validation pass) and ``epoch_end``
    (checkpoints and history.csv).  It has to be the last callback, so that its epoch end comes after
    theirs.  Other parts of a run (loading data, switching stages, choosing the post-processing) are
    added to ``seconds`` by whoever times them."""

    def __init__(self):
        super().__init__()
        self.seconds = {"training_steps": 0.0, "validation": 0.0, "epoch_end": 0.0}
        self._mark, self._validated = time.perf_counter(), False

    def _lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self._mark
        self._mark = now

    def on_epoch_begin(self, epoch, logs=None):
        self._mark, self._validated = time.perf_counter(), False

    def on_test_begin(self, logs=None):
        self._lap("training_steps")

    def on_test_end(self, logs=None):
        self._lap("validation")
        self._validated = True

    def on_epoch_end(self, epoch, logs=None):
        # Without a validation pass (a loop that does not report one) the steps are timed until here.
        self._lap("epoch_end" if self._validated else "training_steps")


def read_history_rows(path) -> list[dict]:
    """history.csv's rows as dicts of floats (empty cells left out); no file gives no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(handle)]


def read_history(path) -> dict:
    """history.csv as {column: [values...]} (floats), the epoch column included."""
    rows = read_history_rows(path)
    return {key: [row[key] for row in rows if key in row] for key in (rows[0] if rows else {})}


class StopOnNaN(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss and remember where, so the user gets a message."""

    def __init__(self):
        super().__init__()
        self.where, self.epoch = None, 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.where = f"epoch {self.epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

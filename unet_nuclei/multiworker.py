"""Training on several machines: ``MultiWorkerMirroredStrategy``, with the training loop written out.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: it converts a
per-replica batch to a tensor), while the same model trains there in a loop of ``strategy.run`` steps.
``fit_distributed`` is that loop: the same compiled loss, optimizer (and its learning-rate schedule),
metrics and callbacks as ``model.fit``, one line per epoch.  Every worker runs the same number of steps
on its share of each batch (the pipeline is sharded by element, so the global batch is split across the
workers), the gradients are summed across workers, and every worker holds the same weights after each
step.  Validation is computed by each worker on the whole validation set with those same weights, so no
worker waits for another outside the training steps.

Only the chief writes what the user sees: ``is_chief`` says which worker that is (the ``chief`` task, or
worker 0 when the cluster has none); the other workers write their copies into a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import numpy as np

from unet_model_core import dice, iou

log = logging.getLogger(__name__)

FIGURES = ("loss", "dice", "iou")  # what each step reports, under these names in the callbacks' logs


def cluster_spec() -> dict | None:
    """``TF_CONFIG`` as a dict, or None when it is not set; ValueError naming it when it is malformed."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        spec = json.loads(text)
        # The fields a cluster description needs, of the types this module reads them as.
        if not isinstance(spec["cluster"], dict) or not isinstance(spec["task"]["type"], str):
            raise TypeError("'cluster' must map task types to addresses and 'task' must name its 'type'")
        int(spec["task"].get("index", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"TF_CONFIG is set but is not a cluster description ({error!r}); expected JSON "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    return spec


def is_chief() -> bool:
    """Whether this process writes the run: always without ``TF_CONFIG``; with it, the ``chief`` task, or
    worker 0 of a cluster that names no chief."""
    spec = cluster_spec()
    if spec is None:
        return True
    task = spec["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and int(task.get("index", 0)) == 0 and "chief" not in spec["cluster"]


def worker_name() -> str:
    spec = cluster_spec()
    if spec is None:
        return "the only worker"
    count = sum(len(v) for k, v in spec["cluster"].items() if k in ("chief", "worker"))
    return f"{spec['task']['type']} {spec['task'].get('index', 0)} of {count}"


def _mean_of_batches(values: list[tuple[int, dict]]) -> dict:
    """Mean of per-batch figures weighted by the batch size, as ``model.evaluate`` reports them."""
    total = sum(n for n, _ in values)
    return {k: float(sum(n * v[k] for n, v in values) / total) for k in values[0][1]}


def fit_distributed(
    model: keras.Model,
    strategy,
    train_ds,
    val_ds,
    epochs: int,
    initial_epoch: int,
    steps: int,
    callbacks: list,
) -> None:
    """``model.fit(train_ds, validation_data=val_ds, epochs, initial_epoch, steps_per_epoch=steps,
    callbacks)`` for a model compiled under ``strategy.scope()``, written as a loop of ``strategy.run``
    steps (see the module's docstring).  The logs the callbacks get hold ``loss``, ``dice``, ``iou`` and
    their ``val_`` counterparts, as with ``model.fit``.  Each epoch ends with a line on the log (INFO).
    ``strategy`` is a ``tf.distribute.MultiWorkerMirroredStrategy``; the datasets are ``tf.data``."""
    import tensorflow as tf  # here, not above: the module's other functions serve every backend

    loss_fn, optimizer = model.loss, model.optimizer
    replicas = strategy.num_replicas_in_sync
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(images, targets):
        with tf.GradientTape() as tape:
            output = model(images, training=True)
            loss = loss_fn(targets, tf.cast(output, tf.float32))
            # Gradients are summed across replicas: each contributes its share of the global mean.
            objective = loss / replicas
            if scaled:
                objective = optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss, dice(targets, output), iou(targets, output)

    @tf.function
    def train_step(iterator):
        images, targets = next(iterator)
        figures = strategy.run(replica_step, (images, targets))
        return [strategy.reduce(tf.distribute.ReduceOp.MEAN, f, axis=None) for f in figures]

    statistics = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def average_statistics():
        # Batch normalisation's moving means and variances follow each worker's own share of the
        # batches: averaged across workers at each epoch end, every worker validates and saves the same
        # model.
        def local():
            context = tf.distribute.get_replica_context()
            return [context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value)) for v in statistics]

        means = strategy.run(local)
        for variable, mean in zip(statistics, means):
            variable.value.assign(strategy.experimental_local_results(mean)[0])

    @tf.function
    def val_step(images, targets):
        output = model(images, training=False)
        return loss_fn(targets, tf.cast(output, tf.float32)), dice(targets, output), iou(targets, output)

    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        started = time.time()
        callback_list.on_epoch_begin(epoch)
        sums = np.zeros(3)
        for step in range(steps):
            callback_list.on_train_batch_begin(step)
            figures = [float(v) for v in train_step(iterator)]
            sums += figures
            callback_list.on_train_batch_end(step, {"loss": figures[0]})
            if model.stop_training:
                break
        done = step + 1
        if statistics:
            average_statistics()
        logs = dict(zip(FIGURES, (float(v) for v in sums / done)))
        batches = [(int(x.shape[0]), dict(zip(FIGURES, (float(v) for v in val_step(x, y))))) for x, y in val_ds]
        logs.update({f"val_{k}": v for k, v in _mean_of_batches(batches).items()})
        if log.isEnabledFor(logging.INFO):
            shown = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            log.info(
                f"Epoch {epoch + 1}/{epochs} ({worker_name()}): {done} steps, {time.time() - started:.0f}s - {shown}"
            )
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()

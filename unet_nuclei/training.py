"""Training runs: the data and its split, the pipelines, devices and precision, callbacks, and ``train``.

``train`` is three public steps, each usable on its own:

    open_run   a new run folder (or an interrupted one, to resume), the data and the input pipelines
    fit        model.fit (on several machines, the loop of ``multiworker``) with checkpoints at every
               epoch end; history.csv and training_curves.png
    finalize   the post-processing chosen on the validation images at full resolution (through the
               ``Segmenter``, as Predict_mask.py predicts), with their scores and val_predictions.png

``finalize(run_dir)`` also works on a finished run, to choose its post-processing again without
retraining.  What a run folder holds, and how it is read, is ``unet_nuclei.runs``.

Progress goes to ``logging`` (INFO lines on this module's logger), which the caller configures: Train.py
does, and the notebook calls ``unet_nuclei.logs.show_progress()``; Keras's own output during ``fit``
follows the same setting (``keras_verbosity``).  With nothing configured, neither is shown.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from unet_model_core import (
    DEFAULT_DATA_DIR,
    Config,
    DataError,
    LoadedSample,
    build_unet_from_config,
    compile_unet,
    make_datasets,
)
from unet_nuclei import cache, devices, files, plots, synthetic
from unet_nuclei.cache import report_problems
from unet_nuclei.checkpoints import (
    CONFIG_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    LAST_FILE,
    MODEL_FILE,
    STATE_FILE,
    VAL_FIGURE_FILE,
    HistoryLog,
    RunCheckpoint,
    StopOnNaN,
    TimeProfile,
    read_history,
    read_json,
    saved_epoch,
)
from unet_nuclei.devices import configure_devices, get_strategy, set_precision
from unet_nuclei.finetune import copy_weights
from unet_nuclei.multiworker import fit_distributed, is_chief
from unet_nuclei.postprocess import CONFIDENCE_GRID, MARKER_GRID, MIN_SIZE_GRID, THRESHOLD_GRID, choose_post_processing
from unet_nuclei.pretrained import sha256
from unet_nuclei.runs import (
    DEFAULT_RUNS_DIR,
    LATEST_FILE,
    find_run,
    new_run_dir,
    read_run_config,
    validation_samples,
    write_config,
    write_learned,
)
from unet_nuclei.segmenter import Prediction, Segmenter
from unet_nuclei.stages import check_resume, describe, describe_stage, total_epochs, training_stages

log = logging.getLogger(__name__)

# Threads that score the validation images side by side while the post-processing is chosen (at most).
CHOICE_THREADS = 4
RESUME_CHANGES = ("epochs", "learning_rate")  # the settings a resumed run may take from new flags


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (a NaN loss, a bad resume); the message says so."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what the run folder holds and how to continue."""


@dataclasses.dataclass
class OpenRun:
    """A run ready for ``fit``: its folder, resolved config, data and pipelines, and where it resumes."""

    run_dir: Path
    runs_root: Path
    config: Config
    strategy: object  # a tf.distribute.Strategy on TensorFlow, else devices.OneDevice
    train_samples: list[LoadedSample]
    val_samples: list[LoadedSample]
    train_ds: object  # tf.data.Dataset on TensorFlow, else a keras.utils.PyDataset (make_datasets)
    val_ds: object
    steps: int
    extra: dict  # what config.json holds besides the Config: data, ids, devices, later the scores
    resumed: bool = False
    initial_epoch: int = 0
    best_val_loss: float = math.inf
    started: float = dataclasses.field(default_factory=time.time)
    restart_optimizer: bool = False  # a resume with a new learning rate
    init_model: Path | None = None  # a new run's starting weights (fine-tuning), else random ones


@dataclasses.dataclass
class TrainResult:
    """What ``train`` and ``finalize`` return: where the run is and what it scored."""

    run_dir: Path | None  # None on a worker other than the chief of several machines: it saves nothing
    config: Config
    threshold: float
    scores: dict
    history: dict
    data_source: str
    seconds: float


def keras_verbosity() -> int:
    """Keras's own ``fit`` output, following this package's logger (``unet_nuclei.logs``): none when it
    does not let INFO through (``-q``, or no logging configured), else a progress bar on a terminal and
    one line per epoch elsewhere (a log file, a notebook)."""
    if not log.isEnabledFor(logging.INFO):
        return 0
    return 1 if sys.stdout.isatty() else 2


def resolve_data_dir(
    data_dir: str | None, sample_images: int = Config.sample_images, progress: bool = True
) -> tuple[Path, str]:
    """Pick the training data: an explicit path (which must exist), else the real DSB folder when it is
    there, else the built-in synthetic sample.  Returns ``(folder, why)``, ``why`` being a sentence for
    the user."""
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(
                f"--data {data_dir}: no such folder. Give the folder that holds the sample "
                f"folders (for DSB-2018: dataset/stage1_train), or leave --data out to use "
                f"the built-in synthetic sample"
            )
        return folder, f"using {folder} (given explicitly)"
    if Path(DEFAULT_DATA_DIR).is_dir():
        return Path(DEFAULT_DATA_DIR), f"using the real DSB-2018 data found in {DEFAULT_DATA_DIR}"
    folder = synthetic.ensure_sample_dataset(sample_images, progress=progress)
    return folder, (
        f"using the built-in synthetic sample in {folder} ({DEFAULT_DATA_DIR} not found; "
        f"see dataset.txt to get the real data)"
    )


def split_ids(ids: Sequence[str], val_size: float = 0.1, seed: int = 42) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split: the same ids and seed always give the same split.
    ``val_size`` below 1 is a fraction of the samples, 1 or more a count.  Both parts are non-empty."""
    ids = sorted(ids)
    if len(ids) < 2:
        raise DataError(f"need at least 2 samples to hold some out for validation, found {len(ids)}")
    if val_size <= 0:
        raise ValueError(f"val_size must be positive (a fraction below 1 or a count), got {val_size}")
    if val_size >= len(ids):  # a count that leaves no training image is a mistake, not a request to clamp
        raise DataError(
            f"val_size (--val-size) {val_size:g}: a count of validation images, but there are only "
            f"{len(ids)} images; give fewer, or a fraction below 1"
        )
    n_val = min(max(int(round(val_size * len(ids))) if val_size < 1 else int(val_size), 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[n_val:]), sorted(ids[i] for i in order[:n_val])  # train, validation


def prepare_data(config: Config, progress: bool = True, exclude_ids=()):
    """Find, split and decode the training data a Config points to (section 1 in one call).
    ``exclude_ids`` are left out altogether (a test set that must stay unseen).

    Returns ``(train_samples, val_samples, data_dir, why)``."""
    data_dir, why = resolve_data_dir(config.data_dir, config.sample_images, progress=progress)
    log.info(f"Data: {why}")
    loaded, problems, how = cache.load_folder(data_dir, progress=progress, channel=config.channel)
    log.info(f"      images and masks {how}")
    if exclude_ids:
        excluded = set(exclude_ids)
        loaded = [s for s in loaded if s.sample_id not in excluded]
        log.info(f"      {len(excluded)} images held out as a test set, never trained or tuned on")
    # An image smaller than one pooling window has nothing a U-Net can learn from (a 1x1 image and its
    # empty mask would even score a perfect Dice): skip it like an unreadable one.
    smallest = 2**config.depth
    tiny = [s for s in loaded if min(s.image.shape[:2]) < smallest]
    loaded = [s for s in loaded if min(s.image.shape[:2]) >= smallest]
    problems += [
        (
            s.sample_id,
            f"{s.image.shape[1]}x{s.image.shape[0]} px: smaller than {smallest} px "
            f"a side, too small for a {config.depth}-level U-Net",
        )
        for s in tiny
    ]
    report_problems(problems)
    train_ids, val_ids = split_ids([s.sample_id for s in loaded], config.val_size, config.seed)
    by_id = {s.sample_id: s for s in loaded}
    train = [by_id[i] for i in train_ids if i in by_id]
    val = [by_id[i] for i in val_ids if i in by_id]
    if not train or not val:
        raise DataError(
            f"{data_dir}: after skipping unreadable or too small samples, {len(train)} remain for "
            f"training and {len(val)} for validation; both need at least one"
        )
    if not any(s.labels.any() for s in train):
        raise DataError(
            f"{data_dir}: none of the {len(train)} training images has a nucleus in its masks, "
            f"so there is nothing to learn; check the masks"
        )
    log.info(
        f"      {len(train)} training and {len(val)} validation images "
        f"({sum(s.image.shape[0] * s.image.shape[1] for s in train) / 1e6:.1f} Mpx of training pixels)"
    )
    return train, val, data_dir, why


def _resume_point(run_dir: Path, config: Config, changes: dict):
    """The saved Config of a run to resume, with the ``changes`` it may take (``RESUME_CHANGES``), and
    the epoch and best validation loss it reached."""
    if not (run_dir / LAST_FILE).is_file() or not (run_dir / STATE_FILE).is_file():
        raise TrainingError(
            f"{run_dir} has no {LAST_FILE}/{STATE_FILE} to resume from: no epoch of it "
            f"finished. Start a new run instead"
        )
    saved_config, saved_info = read_run_config(run_dir, learned=False)
    state = read_json(run_dir / STATE_FILE, f": {run_dir} cannot be resumed; start a new run")
    try:
        initial_epoch, best = int(state["epoch"]), float(state.get("best_val_loss", math.inf))
    except (KeyError, TypeError, ValueError):
        raise TrainingError(
            f"{run_dir / STATE_FILE} is damaged (no epoch number): {run_dir} cannot be resumed; start a new run"
        ) from None
    ignored = sorted(set(changes) - set(RESUME_CHANGES))
    if ignored:
        log.info(
            f"Note: {', '.join(ignored)} kept from the run: a resumed run changes only {' and '.join(RESUME_CHANGES)}"
        )
    config = dataclasses.replace(saved_config, **{k: changes[k] for k in RESUME_CHANGES if k in changes})
    check_resume(saved_config, config, initial_epoch, run_dir)
    return config, saved_config, saved_info.get("held_out_ids", []), initial_epoch, best


def open_run(
    config: Config,
    runs_root=DEFAULT_RUNS_DIR,
    run_name: str | None = None,
    resume=None,
    cpu_devices: int = 0,
    progress: bool = True,
    exclude_ids=(),
    changes: dict | None = None,
    init_model=None,
) -> OpenRun:
    """Step 1 of ``train``: a new run folder (or, with ``resume``, an interrupted run), the data decoded
    and split, the input pipelines, and config.json written, so even an interrupted run says what it
    was.  On resume, architecture and data come from the run; ``changes`` (the settings given again,
    for example from flags) may set its ``epochs`` and ``learning_rate``; without them the run keeps its
    own.  ``exclude_ids`` (a held-out test set) are never loaded; config.json lists them as
    ``held_out_ids``.  A new run's folder is made only once its data is ready, so a failure before that
    leaves no empty folder behind.  ``init_model`` (a model file of the same architecture) gives a new
    run its starting weights (fine-tuning; ``unet_nuclei.finetune``)."""
    started = time.time()
    if init_model is not None and resume is not None:
        raise ValueError("--init starts a new run from a model's weights and --resume continues a run: give one")
    configure_devices(cpu_devices)
    # The strategy comes before any other TensorFlow op: multi-worker training requires it.
    strategy = get_strategy(cpu_devices)
    if resume is not None and devices.is_multi_worker(strategy):
        raise ValueError("--resume is not supported on several machines (TF_CONFIG is set): resume on one machine")
    if not is_chief():
        # Another machine of a TF_CONFIG cluster: it trains in step with the chief, which writes the run;
        # its own copies go to a temporary folder that train() removes.
        runs_root = tempfile.mkdtemp(prefix="unet_worker_")
    keras.utils.set_random_seed(config.seed)
    initial_epoch, best, restart_optimizer = 0, math.inf, False
    if resume is not None:
        run_dir = find_run(resume, runs_root)
        runs_root = run_dir.parent  # where runs/latest goes, wherever the run was found
        config, saved, exclude_ids, initial_epoch, best = _resume_point(run_dir, config, changes or {})
        restart_optimizer = config.learning_rate != saved.learning_rate
        files.check_writable(run_dir, f"--resume {resume}", create=False)
        log.info(
            f"Resuming {run_dir} after epoch {initial_epoch} of {total_epochs(config)}"
            + (f", with a new optimizer at lr {config.learning_rate}" if restart_optimizer else "")
        )
    else:
        files.check_writable(runs_root, "--runs-dir")  # before the data, so a bad folder fails at once

    train_samples, val_samples, data_dir, why = prepare_data(config, progress, exclude_ids)
    # The first stage's pipelines (``fit`` makes the second's); its pixels set the steps of every epoch.
    train_ds, val_ds, steps = _datasets(
        train_samples, val_samples, training_stages(config)[0].config, strategy.num_replicas_in_sync
    )
    policy = set_precision(config.mixed_precision)
    extra = dict(
        val_ids=[s.sample_id for s in val_samples],
        data_dir=str(data_dir),
        data_source=why,
        steps_per_epoch_used=steps,
        replicas=strategy.num_replicas_in_sync,
        precision=policy,
        cpu_kernels=devices.cpu_kernels(),
    )
    if exclude_ids:
        extra["held_out_ids"] = sorted(exclude_ids)
    if init_model is not None:
        extra["init_model"] = {"path": str(init_model), "sha256": sha256(init_model)}
    elif resume is not None:
        started_from = read_run_config(run_dir)[1].get("init_model")
        if started_from is not None:
            extra["init_model"] = started_from  # a fine-tuning run stays one
    if resume is None:
        # A resumed run's config.json keeps describing its checkpoint until fit has saved a new epoch.
        run_dir = new_run_dir(runs_root, run_name)
        try:
            write_config(config, run_dir / CONFIG_FILE, **extra)
        except OSError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    log.info(f"Run:  {run_dir}")
    warmup = (
        f" ({config.warmup_epochs:g} epoch(s) of warm-up)"
        if config.warmup_epochs and config.lr_schedule == "cosine"
        else ""
    )
    log.info(
        f"      {describe(config)} x {steps} steps of batch {config.batch_size}, "
        f"{config.image_size}px {config.sampling} sampling, loss {config.loss}, lr {config.learning_rate}{warmup}, "
        f"{strategy.num_replicas_in_sync} device(s), {policy}" + (", XLA" if config.xla else "")
    )
    log.info(f"      {devices.describe_cpu_kernels(extra['cpu_kernels'])}")
    if init_model is not None:
        log.info(f"      starting from the weights of {init_model} (fine-tuning, fresh optimizer)")
    log.debug(f"      validation images: {', '.join(extra['val_ids'])}")
    return OpenRun(
        run_dir,
        Path(runs_root),
        config,
        strategy,
        train_samples,
        val_samples,
        train_ds,
        val_ds,
        steps,
        extra,
        init_model=None if init_model is None else Path(init_model),
        resumed=resume is not None,
        initial_epoch=initial_epoch,
        best_val_loss=best,
        started=started,
        restart_optimizer=restart_optimizer,
    )


def _datasets(train_samples, val_samples, config: Config, replicas: int = 1):
    """``make_datasets``, sharded by element across machines (generator-backed data cannot be sharded by
    file), less a last validation batch too small for a patch on each device (an empty one fails)."""
    train_ds, val_ds, steps = make_datasets(train_samples, val_samples, config)
    if not devices.on_tensorflow():
        return train_ds, val_ds, steps  # PyDatasets, for one device
    import tensorflow as tf

    batches = int(val_ds.cardinality())
    if replicas > 1 and batches > 1 and len(next(iter(val_ds.skip(batches - 1)))[0]) < replicas:
        val_ds = val_ds.take(batches - 1)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return train_ds.with_options(options), val_ds.with_options(options), steps


def what_is_kept(run: OpenRun) -> str:
    """After a stop: what the run folder holds and how to go on.  A new run that saved no epoch is removed
    (so a retry with the same --name gets the same folder)."""
    epoch = saved_epoch(run.run_dir)
    if epoch is None and not run.resumed:
        shutil.rmtree(run.run_dir, ignore_errors=True)
        return f"no epoch had finished, so nothing was saved and {run.run_dir} was removed"
    return (
        f"{run.run_dir} holds the last good epoch ({epoch} of {total_epochs(run.config)}); continue with "
        f"`python Train.py --resume {run.run_dir}`"
    )


def _load_checkpoint(path: Path) -> keras.Model:
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad file; all mean "cannot resume from it".
        raise TrainingError(
            f"{path} exists but cannot be loaded ({type(error).__name__}); it is damaged, "
            f"so this run cannot be resumed: start a new run (its model.keras, if any, "
            f"is still usable for prediction)"
        ) from error


def fit(run: OpenRun) -> int | None:
    """Step 2 of ``train``: train the run's stages (``stages.training_stages``), checkpointing at every
    good epoch end; then history.csv, training_curves.png and ``runs/latest``.  Returns the last stage's
    best epoch (None when no epoch improved the validation loss in this call).  Raises ``TrainingError``
    on a NaN loss (the NaN epoch is never saved); a KeyboardInterrupt propagates after the last finished
    epoch has been saved."""
    config, run_dir = run.config, run.run_dir
    checkpoint, nan_guard, profile = RunCheckpoint(run_dir, config, run.best_val_loss), StopOnNaN(), TimeProfile()
    profile.seconds["opening"] = time.time() - run.started  # the data, the pipelines, the run folder
    stage_started = time.perf_counter()  # the model built or loaded, then each stage's optimizer and data
    try:
        with run.strategy.scope():
            model = _load_checkpoint(run_dir / LAST_FILE) if run.resumed else build_unet_from_config(config)
            if run.init_model is not None and not run.resumed:
                start = keras.saving.load_model(run.init_model, compile=False)
                copy_weights(start, model, str(run.init_model))
        log.info(
            f"Model: {model.count_params():,} parameters, channels {list(config.channels)}, padding={config.padding}"
        )
        callbacks = [checkpoint, nan_guard, HistoryLog(run_dir / HISTORY_FILE, run.initial_epoch)]
        if config.lr_schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=4, min_lr=1e-5))
        callbacks.append(profile)  # the last, so that it times the others' epoch ends
        restart = run.restart_optimizer or not run.resumed
        for stage in training_stages(config):
            start = max(run.initial_epoch, stage.first)
            if start >= stage.last:
                continue  # done before a resume (a resumed run may have all its epochs)
            if start == stage.first or restart:
                # A new stage, or a resume with a new learning rate: a fresh optimizer, its schedule
                # spread over the stage's epochs left.
                with run.strategy.scope():
                    warmup = 0 if start > stage.first else round(stage.config.warmup_epochs * run.steps)
                    compile_unet(model, stage.config, total_steps=(stage.last - start) * run.steps, warmup_steps=warmup)
            train_ds, val_ds = run.train_ds, run.val_ds
            if stage.first:
                if start == stage.first:  # it validates at its own scale: the first's losses do not compare
                    checkpoint.best = math.inf
                train_ds, val_ds, _ = _datasets(
                    run.train_samples,
                    run.val_samples,
                    dataclasses.replace(stage.config, steps_per_epoch=run.steps),
                    run.strategy.num_replicas_in_sync,
                )
                log.info(describe_stage(stage))
            part = "stage_switch" if start > 0 and start == stage.first else "model_setup"
            profile.seconds[part] = profile.seconds.get(part, 0.0) + time.perf_counter() - stage_started
            if devices.is_multi_worker(run.strategy):
                fit_distributed(model, run.strategy, train_ds, val_ds, stage.last, start, run.steps, callbacks)
            else:
                model.fit(
                    train_ds,
                    validation_data=val_ds,
                    epochs=stage.last,
                    initial_epoch=start,
                    steps_per_epoch=run.steps,
                    callbacks=callbacks,
                    verbose=keras_verbosity(),
                    shuffle=False,
                )  # the pipeline already randomises; Keras cannot shuffle an endless stream
            stage_started = time.perf_counter()
            if nan_guard.where or checkpoint.bad_epoch:
                break
    finally:
        keras.mixed_precision.set_global_policy("float32")
    where = nan_guard.where or (f"the end of epoch {checkpoint.bad_epoch}" if checkpoint.bad_epoch else None)
    if where:
        hint = f"--lr {min(config.learning_rate / 10, Config().learning_rate):g}"
        hint += " --no-mixed-precision" if run.extra.get("precision", "float32") != "float32" else ""
        raise TrainingError(
            f"training diverged at {where}: the loss or the weights became NaN or infinite "
            f"(learning rate {config.learning_rate:g}), so training stopped and that epoch "
            f"was not saved; {what_is_kept(run)}. Use a lower learning rate, for example "
            f"{hint}"
        )
    plots.save(plots.training_curves(read_history(run_dir / HISTORY_FILE)), run_dir / CURVES_FILE, dpi=100)
    files.write_text(run.runs_root / LATEST_FILE, run_dir.name + "\n")
    run.extra.update(
        best_epoch=checkpoint.best_epoch,
        train_seconds=round(time.time() - run.started, 1),
        seconds={part: round(value, 1) for part, value in profile.seconds.items()},
    )
    write_config(config, run_dir / CONFIG_FILE, **run.extra)
    return checkpoint.best_epoch


def finalize(
    run_dir,
    val_samples: list[LoadedSample] | None = None,
    thresholds=THRESHOLD_GRID,
    marker_thresholds=MARKER_GRID,
    min_sizes=MIN_SIZE_GRID,
    confidences=CONFIDENCE_GRID,
    progress: bool = True,
) -> TrainResult:
    """Step 3 of ``train``: choose the post-processing (nucleus and marker thresholds, smallest nucleus
    size, smallest mean nucleus probability) that gives the best DSB-2018 score on the run's validation
    images, predicted whole at full resolution by the best checkpoint; store it and the scores beside
    config.json (``runs.write_learned``) and draw val_predictions.png.

    On a finished run this chooses the post-processing again without retraining: ``thresholds``,
    ``marker_thresholds``, ``min_sizes`` (smallest nucleus sizes) and ``confidences`` are the
    candidates.  ``val_samples`` are the decoded validation images when the caller has them (``train``
    does); otherwise they are read from the run's data."""
    started = time.time()
    run_dir = Path(run_dir)
    config, info = read_run_config(run_dir)
    if val_samples is None:
        samples, problems = validation_samples(info)
        val_samples, load_problems = cache.load_ids(
            info["data_dir"], [s.sample_id for s in samples], progress, channel=config.channel
        )
        report_problems(problems + load_problems)
        if not val_samples:
            raise DataError(f"none of the validation images of {run_dir} could be read")
    segmenter = Segmenter(keras.saving.load_model(run_dir / MODEL_FILE), config)
    log.info("Choosing the post-processing on the validation images (full resolution)...")
    outputs_started = time.perf_counter()
    outputs = segmenter.outputs(val_samples, progress)  # once, for both uses below
    search_started = time.perf_counter()
    post, scores, per_image = choose_post_processing(
        [s.labels for s in val_samples],
        outputs,
        thresholds,
        marker_thresholds,
        min_sizes,
        confidences,
        workers=min(CHOICE_THREADS, os.cpu_count() or 1),
    )
    seconds = {
        "choice_outputs": round(search_started - outputs_started, 1),
        "choice_search": round(time.perf_counter() - search_started, 1),
    }
    config = dataclasses.replace(
        config,
        threshold=post.threshold,
        marker_threshold=post.marker_threshold,
        min_nucleus_size=post.min_size,
        min_confidence=post.min_confidence,
    )
    write_learned(
        run_dir,
        post,
        {
            "val_scores": scores,
            "val_scores_per_image": [{"id": s.sample_id, **row.rounded()} for s, row in zip(val_samples, per_image)],
            "seconds": seconds,
        },
    )
    shown = [
        Prediction.from_output(s.sample_id, s.image, o, post, s.labels) for s, o in list(zip(val_samples, outputs))[:4]
    ]
    plots.save(plots.prediction_grid(shown), run_dir / VAL_FIGURE_FILE, dpi=80)
    markers = f", markers {post.marker_threshold:.2f}" if config.targets == "instance" else ""
    log.info(
        f"Validation (best epoch {info.get('best_epoch')}, threshold {post.threshold:.2f}{markers}, "
        f"nuclei of {post.min_size}+ px, confidence {post.min_confidence:.2f}+): "
        f"Dice {scores['dice']:.3f}  IoU {scores['iou']:.3f}  DSB score {scores['dsb_score']:.3f}"
    )
    return TrainResult(
        run_dir,
        config,
        post.threshold,
        scores,
        read_history(run_dir / HISTORY_FILE),
        info.get("data_source", ""),
        time.time() - started,
    )


def train(
    config: Config,
    runs_root=DEFAULT_RUNS_DIR,
    run_name: str | None = None,
    resume=None,
    cpu_devices: int = 0,
    progress: bool = True,
    exclude_ids=(),
    changes: dict | None = None,
    init_model=None,
) -> TrainResult:
    """Train a U-Net as ``config`` says and save a complete run folder: ``open_run``, ``fit``, ``finalize``.

    ``resume`` (a run name or folder) continues that run from its last checkpoint, with the epoch count
    carried on, up to its own epochs or ``changes["epochs"]`` in all (``changes``: see ``open_run``).
    ``cpu_devices`` > 1 splits the CPU into that many logical devices and trains data-parallel over them
    (a way to test the multi-device path).  Ctrl-C raises ``TrainingInterrupted``, whose message says
    what was kept; a new run that fails or is stopped before its first epoch leaves no folder behind.
    ``init_model``: a model file whose weights the run starts from (fine-tuning).
    """
    run = open_run(config, runs_root, run_name, resume, cpu_devices, progress, exclude_ids, changes, init_model)
    if not is_chief():
        try:
            fit(run)
        finally:
            shutil.rmtree(run.runs_root, ignore_errors=True)
        log.info("Done: this worker trained in step with the chief, which saved the run")
        return TrainResult(
            None, run.config, run.config.threshold, {}, {}, run.extra["data_source"], time.time() - run.started
        )
    try:
        fit(run)
        result = finalize(run.run_dir, run.val_samples, progress=progress)
    except KeyboardInterrupt:
        raise TrainingInterrupted(what_is_kept(run)) from None
    except Exception:
        what_is_kept(run)  # only to remove a new run's folder that holds no epoch
        raise
    seconds = time.time() - run.started
    log.info(f"Done in {seconds / 60:.1f} min. Run saved in {run.run_dir}")
    log.info(f"      {describe_time({**run.extra['seconds'], 'choice': result.seconds})}")
    return dataclasses.replace(result, seconds=seconds)


TIME_PARTS = {
    "opening": "data and folder",
    "model_setup": "model",
    "training_steps": "training steps",
    "validation": "validation",
    "epoch_end": "checkpoints",
    "stage_switch": "second stage's data",
    "choice": "post-processing choice",
}


def describe_time(seconds: dict) -> str:
    """A run's time by part (``TimeProfile``'s and the others'), in minutes, for the log's last lines."""
    parts = [f"{words} {seconds[part] / 60:.1f}" for part, words in TIME_PARTS.items() if part in seconds]
    return "Minutes: " + ", ".join(parts)

"""Run folders: create one, find one, read and write what it records.

A run folder holds everything a run produced (``training`` writes it, ``segmenter`` reads it):
  model.keras          best checkpoint: float32, uncompiled, built-in layers only, so plain
                       keras.saving.load_model(path) reads it in any program, with or without this project;
  last.keras           the latest full training state (model + optimizer), for --resume;
  state.json           the epoch reached and the best validation loss so far, for --resume;
  config.json          what was asked: the resolved Config, the data, the validation ids, devices, times;
  postprocessing.json  what was learned: the post-processing chosen on the validation images;
  scores.json          what was measured: the validation scores, mean and per image;
  history.csv, training_curves.png, val_predictions.png.
``runs/latest`` is a one-line text file naming the newest run's folder (a file, not a symlink, so it also
works on Windows).  A shipped model (``models/<name>/``) is a run folder without the training state.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from unet_model_core import Config, DataError, Sample, find_samples
from unet_nuclei import files, synthetic
from unet_nuclei.checkpoints import CONFIG_FILE, LAST_FILE, MODEL_FILE, STATE_FILE, read_json
from unet_nuclei.pretrained import resolve_model, run_and_model_file
from unet_nuclei.stages import total_epochs

DEFAULT_RUNS_DIR = "runs"
LATEST_FILE = "latest"
POST_PROCESSING_FILE = "postprocessing.json"
SCORES_FILE = "scores.json"
# The keys of POST_PROCESSING_FILE (``PostProcessing``'s fields) and the Config fields they set.
LEARNED_FIELDS = {
    "threshold": "threshold",
    "marker_threshold": "marker_threshold",
    "min_size": "min_nucleus_size",
    "min_confidence": "min_confidence",
}


def new_run_dir(runs_root=DEFAULT_RUNS_DIR, name: str | None = None) -> Path:
    """Create and return a fresh run folder; an existing one is never reused or overwritten."""
    base = name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if base in (LATEST_FILE, ".", "..") or os.sep in base or (os.altsep and os.altsep in base):
        raise ValueError(f"run name {base!r} is not a plain folder name")
    root = files.check_writable(runs_root, "--runs-dir")
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        candidate = root / f"{base}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise files.OutputError(
                error.errno, f"--runs-dir: cannot create {candidate}/ ({error.strerror or error})"
            ) from error
    raise FileExistsError(f"could not find a free run folder name for {base!r} in {root}")


def find_run(run_or_file=None, runs_root=DEFAULT_RUNS_DIR) -> Path:
    """The run folder for a run name, a run folder, a model file inside a run, or (None) the newest run.

    Raises FileNotFoundError with a message that says what to do when nothing is found.
    """
    root = Path(runs_root)
    if run_or_file is None:
        latest = root / LATEST_FILE
        if latest.is_file():
            candidate = root / latest.read_text().strip()
            if (candidate / MODEL_FILE).is_file():
                return candidate
        runs = sorted((p for p in root.glob("*") if (p / MODEL_FILE).is_file()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(
                f"no trained model found in {root}/. Run `python Train.py` first "
                f"(or pass --model RUN_FOLDER_OR_MODEL_FILE)"
            )
        return runs[-1]
    path = Path(run_or_file)
    for candidate in (path, root / path):
        if candidate.is_file():
            return candidate.parent
        if candidate.is_dir() and ((candidate / MODEL_FILE).is_file() or (candidate / LAST_FILE).is_file()):
            return candidate
    raise FileNotFoundError(
        f"no run or model at {run_or_file!r} (looked for a model file, a run folder "
        f"holding {MODEL_FILE}, and {root / path})"
    )


def read_run_config(run_dir, learned: bool = True) -> tuple[Config, dict]:
    """The Config a run was trained with, and its whole record: config.json (what was asked, the data,
    the validation ids) with, when ``learned``, the post-processing chosen on the validation images
    (``POST_PROCESSING_FILE``, in the Config's threshold fields) and what it scored there
    (``SCORES_FILE``, in the record).  A run from before those files had both written into config.json,
    which reads the same way."""
    run_dir = Path(run_dir)
    data = read_json(run_dir / CONFIG_FILE, f": {run_dir} is not a complete run of this project")
    if learned:
        if (run_dir / POST_PROCESSING_FILE).is_file():
            chosen = read_json(run_dir / POST_PROCESSING_FILE)
            data.update({field: chosen[key] for key, field in LEARNED_FIELDS.items() if key in chosen})
        if (run_dir / SCORES_FILE).is_file():
            data.update(read_json(run_dir / SCORES_FILE))
    return Config.from_dict(data), data


def write_config(config: Config, path, **extra) -> None:
    """config.json (the resolved Config and ``extra``), written whole or not at all."""
    files.write_text(path, config.to_json(**extra) + "\n")


def write_learned(run_dir, post, scores: dict) -> None:
    """What ``training.finalize`` learned and measured on the validation images, each in its own file:
    the post-processing (``post``, a ``postprocess.PostProcessing``) and the ``scores``."""
    run_dir = Path(run_dir)
    chosen = {key: getattr(post, key) for key in LEARNED_FIELDS}
    files.write_text(run_dir / POST_PROCESSING_FILE, json.dumps(chosen, indent=2) + "\n")
    files.write_text(run_dir / SCORES_FILE, json.dumps(scores, indent=2) + "\n")


def validation_samples(run_info: dict) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The validation samples a run recorded (config.json's ``val_ids`` in its ``data_dir``) and the
    ids not found.  A missing built-in sample is regenerated (it is deterministic)."""
    data_dir = Path(run_info.get("data_dir", ""))
    val_ids = set(run_info.get("val_ids", []))
    if not val_ids:
        raise DataError("this run's config.json lists no validation images; give image paths instead")
    if not data_dir.is_dir() and data_dir.name.startswith("synthetic_sample_"):
        synthetic.ensure_sample_dataset(int(run_info.get("sample_images", 64)), 0, str(data_dir.parent))
    if not data_dir.is_dir():
        raise DataError(f"the run's data folder {data_dir} is gone; give image paths instead")
    samples, _ = find_samples(data_dir)
    found = [s for s in samples if s.sample_id in val_ids]
    missing = sorted(val_ids - {s.sample_id for s in found})
    return found, [(m, f"validation image not found in {data_dir}") for m in missing]


def open_run(run_or_file=None, runs_root=DEFAULT_RUNS_DIR) -> tuple[Config, dict, Path, Path]:
    """A run's config without its model (quick: no Keras file is read): a run name, folder or model
    file, or a shipped model's name; by default the newest run, else the shipped model
    (``pretrained.resolve_model``, whose reason for the choice is ``run_info["chosen_because"]``).
    Returns ``(config, run_info, run_dir, model_path)``; ``run_info`` is the whole config.json
    (threshold, validation ids, scores)."""
    target, why = resolve_model(run_or_file, runs_root)
    run_dir, model_path = run_and_model_file(target)
    config, info = read_run_config(run_dir)
    info["chosen_because"] = why
    return config, info, run_dir, model_path


def unfinished_warning(run_dir, config: Config, run_info: dict) -> str | None:
    """A warning when a run's post-processing was not chosen on its validation images yet (it is still
    training, or stopped before the end), so its thresholds are the untuned defaults; None otherwise."""
    if "val_scores" in run_info:
        return None
    run_dir = Path(run_dir)
    try:
        epoch = int(read_json(run_dir / STATE_FILE)["epoch"])
        last = f"its last saved epoch is {epoch} of {total_epochs(config)}"
    except (OSError, ValueError, KeyError, TypeError):
        last = "no epoch of it is recorded"
    return (
        f"{run_dir} has not finished: its post-processing was never chosen on the validation images "
        f"({last}), so the thresholds are untuned defaults. Wait for the run to finish, or finish it "
        f"with `python Train.py --resume {run_dir}`"
    )

"""The pretrained models shipped in the repository's ``models/`` folder, and which model a command uses.

A shipped model is a run folder cut down to what prediction and fine-tuning need: ``model.keras``
(float32, no optimizer state), the run's ``config.json`` (architecture, preprocessing and the
post-processing chosen on its validation images) and a model card, ``README.md``, that records the
sha256 of ``model.keras``.  ``models/dsb2018`` is trained on the DSB-2018 ``stage1_train`` images.

Which model a command uses (``resolve_model``): ``--model`` when given, as a run name, run folder or
model file, or the name of a shipped model; else the newest run in ``runs/``; else the shipped
``dsb2018``.  Every choice comes with the reason, which the scripts print first.

Packaging a finished run as a shipped model (the command the model card records):

    python -m unet_nuclei.pretrained RUN --name dsb2018
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from unet_nuclei.checkpoints import CONFIG_FILE, MODEL_FILE

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "dsb2018"
CARD_FILE = "README.md"
# The model card states the checksum on a line of its own: "sha256: <64 hex digits>".
SHA256_LINE = re.compile(r"sha256[^0-9a-f]*([0-9a-f]{64})", re.IGNORECASE)
# What a shipped config.json keeps of a run's: the Config and what was learned and measured, not the
# machine's paths and the validation ids' run-time details (kept: they name the images it never trained on).
DROPPED_KEYS = ("steps_per_epoch_used", "replicas")


def shipped_names(root=SHIPPED_DIR) -> list[str]:
    """The names of the shipped models (folders of ``root`` that hold a model file)."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / MODEL_FILE).is_file()) if root.is_dir() else []


def shipped_model_dir(name: str, root=SHIPPED_DIR) -> Path | None:
    """The folder of the shipped model ``name`` (relative to the working folder when inside it, as users
    read it), or None when there is no such model."""
    folder = Path(root) / str(name)
    if str(name) not in shipped_names(root):
        return None
    try:
        relative = Path(os.path.relpath(folder))
    except ValueError:  # another drive (Windows): no relative path
        return folder
    return folder if relative.parts[:1] == ("..",) else relative


def resolve_model(model=None, runs_root="runs", shipped_root=None) -> tuple[Path, str]:
    """``(the run folder or model file to load, why it was chosen)``.

    ``model`` given: an existing path (run folder or model file) or a run of ``runs_root`` by that name,
    else a shipped model by that name.  ``model`` None: the newest run of ``runs_root``, else the shipped
    ``DEFAULT_MODEL``.  FileNotFoundError, saying what to do, when there is nothing to use."""
    from unet_nuclei.runs import find_run  # run folders (runs imports this module)

    runs_root, shipped_root = Path(runs_root), Path(shipped_root or SHIPPED_DIR)
    if model is None:
        try:
            run = find_run(None, runs_root)
        except FileNotFoundError:
            shipped = shipped_model_dir(DEFAULT_MODEL, shipped_root)
            if shipped is None:
                raise FileNotFoundError(
                    f"no trained model found in {runs_root}/ and no shipped model in "
                    f"{shipped_root}/. Run `python Train.py` first (or pass --model "
                    f"RUN_FOLDER_OR_MODEL_FILE)"
                ) from None
            return shipped, f"the shipped model, since {runs_root}/ holds no run of your own"
        return run, f"the newest run in {runs_root}/; --model {DEFAULT_MODEL} uses the shipped model"
    path = Path(model)
    if path.exists() or (runs_root / path).exists():
        return (path if path.is_file() else find_run(model, runs_root)), "as given with --model"
    shipped = shipped_model_dir(str(model), shipped_root)
    if shipped is not None:
        return shipped, "the shipped model named with --model"
    names = ", ".join(shipped_names(shipped_root)) or "none"
    raise FileNotFoundError(
        f"no run or model at {model!r}: looked for a model file, a run folder holding "
        f"{MODEL_FILE}, {runs_root / path}, and a shipped model of that name (shipped: {names})"
    )


def run_and_model_file(target) -> tuple[Path, Path]:
    """``(run folder, model file)`` of what ``resolve_model`` returned: a model file or a folder holding one."""
    target = Path(target)
    return (target.parent, target) if target.is_file() else (target, target / MODEL_FILE)


def sha256(path) -> str:
    """The sha256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_sha256(folder) -> str | None:
    """The sha256 that a shipped model's card states for its ``model.keras`` (None if it states none)."""
    card = Path(folder) / CARD_FILE
    match = SHA256_LINE.search(card.read_text()) if card.is_file() else None
    return match.group(1).lower() if match else None


def package_run(run_dir, name: str, root=SHIPPED_DIR) -> Path:
    """Copy a finished run into ``root/name`` as a shipped model: its ``model.keras`` (already float32,
    without optimizer state), its ``config.json`` with the data folder made relative and the run-time
    details dropped, and its learned post-processing and scores (``runs.read_run_config``).  Refuses to
    replace an existing shipped model's files and a run whose post-processing was never chosen.  The model
    card is written by hand; its sha256 is printed."""
    from unet_nuclei.runs import POST_PROCESSING_FILE, SCORES_FILE, read_run_config  # runs imports this module

    run_dir, folder = Path(run_dir), Path(root) / name
    if "val_scores" not in read_run_config(run_dir)[1]:
        raise ValueError(
            f"{run_dir} has no chosen post-processing (no validation scores): let its training finish first"
        )
    learned = [n for n in (POST_PROCESSING_FILE, SCORES_FILE) if (run_dir / n).is_file()]
    for target in [folder / n for n in (MODEL_FILE, CONFIG_FILE, *learned)]:
        if target.exists():
            raise FileExistsError(f"{target} exists; remove it first to ship another model as {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    for copied in (MODEL_FILE, *learned):
        shutil.copyfile(run_dir / copied, folder / copied)
    info = json.loads((run_dir / CONFIG_FILE).read_text())
    data_dir = Path(info.get("data_dir", ""))
    info["data_dir"] = str(Path("dataset") / data_dir.name) if data_dir.name else ""
    info["shipped_from_run"] = run_dir.name
    for key in DROPPED_KEYS:
        info.pop(key, None)
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unet_nuclei.pretrained",
        description="Package a finished run as a shipped model in models/NAME (model.keras, config.json and "
        "what training learned); "
        "prints the sha256 that the model card must state.",
    )
    parser.add_argument("run", metavar="RUN", help="a finished run folder")
    parser.add_argument("--name", default=DEFAULT_MODEL, help=f"the shipped model's name (default: {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    try:
        folder = package_run(args.run, args.name)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{folder}: sha256 of {MODEL_FILE}: {sha256(folder / MODEL_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

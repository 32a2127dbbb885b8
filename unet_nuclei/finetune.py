"""Fine-tuning: a new run that starts from a trained model (a shipped one or a run) instead of from
random weights.

The starting model fixes the architecture, preprocessing and targets: the fine-tuned model must read
images as it did and have the same layers, so flags that would change them are refused unless they
repeat the model's own values.  How it samples its training data (patch size, nucleus scale, scale
jitter) and its loss are taken from the model too, and flags may change them.  The schedule is shorter
and gentler than a training from scratch (``FINE_TUNE_EPOCHS``, ``FINE_TUNE_NUCLEUS_EPOCHS``,
``FINE_TUNE_LR``), so a few corrected images adapt the model without washing out what it learned from
many; flags override them.  The optimizer starts afresh, and the post-processing is chosen again on
the new validation images, as in every run.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from unet_model_core import Config, flag_name, quick_config

# Fields that define the network and what it sees: taken from the starting model, never changed.
ARCHITECTURE_FIELDS = ("channels", "padding", "batch_norm", "dropout", "block", "targets", "preprocessing")
# Fields taken from the starting model as defaults; flags may change them.
INHERITED_FIELDS = ("sampling", "image_size", "nucleus_diameter", "scale_range", "area_power", "loss", "tta")
FINE_TUNE_EPOCHS = 10  # epochs at native scale (an epoch is one pass over the training pixels)
FINE_TUNE_NUCLEUS_EPOCHS = 2  # ...then at the model's nucleus size, for a model trained in two stages
FINE_TUNE_LR = 2e-4  # a fifth of a training from scratch's 1e-3
SCHEDULE_FIELDS = ("epochs", "nucleus_epochs", "learning_rate")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def fine_tune_config(base: Config, overrides: dict, init_name: str, quick: bool = False) -> Config:
    """The Config of a fine-tuning run from a model trained with ``base``: its architecture, its data
    settings as defaults, the fine-tuning schedule, then ``overrides`` (the flags given).  ValueError,
    naming the flags, when an override would change the architecture."""
    conflicts = []
    for field in ARCHITECTURE_FIELDS:
        if field in overrides:
            wanted = dataclasses.replace(base, **{field: overrides[field]})  # normalised as Config does
            if getattr(wanted, field) != getattr(base, field):
                conflicts.append(
                    f"{flag_name(field)} {_shown(overrides[field])} (the model has {_shown(getattr(base, field))})"
                )
    if conflicts:
        raise ValueError(
            f"--init {init_name} fixes the architecture, preprocessing and targets of the fine-tuned "
            f"model, but {'; '.join(conflicts)}: leave these flags out, or train a new model without --init"
        )
    values = {field: getattr(base, field) for field in ARCHITECTURE_FIELDS + INHERITED_FIELDS}
    two_stages = bool(base.nucleus_diameter) and base.nucleus_epochs > 0
    schedule = {
        "epochs": FINE_TUNE_EPOCHS,
        "learning_rate": FINE_TUNE_LR,
        "nucleus_epochs": FINE_TUNE_NUCLEUS_EPOCHS if two_stages else base.nucleus_epochs,
    }
    if quick:
        values["tta"] = False  # a smoke run chooses its post-processing quickly, as --quick does
    else:
        values.update(schedule)
    values.update(overrides)
    return quick_config(**values) if quick else Config(**values)


def copy_weights(source: keras.Model, target: keras.Model, name: str) -> None:
    """Give ``target`` the weights of ``source``, a model of the same architecture; ValueError when their
    layers do not match (a file that is not the model its config.json describes)."""
    weights = source.get_weights()
    shapes = [tuple(w.shape) for w in target.get_weights()]
    if [tuple(w.shape) for w in weights] != shapes:
        raise ValueError(
            f"--init {name}: its model.keras does not have the layers its config.json describes "
            f"({len(weights)} weight arrays against {len(shapes)} expected)"
        )
    target.set_weights([np.asarray(w, dtype=np.float32) for w in weights])

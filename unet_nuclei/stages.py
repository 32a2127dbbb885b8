"""The stages of a training run: what each trains with, and over which epochs.

With the defaults a run has two:

    1. ``Config.epochs`` epochs at the images' own scale, patches jittered by ``Config.scale_range``;
    2. ``Config.nucleus_epochs`` more with every image rescaled so that its nuclei's median diameter is
       ``Config.nucleus_diameter`` px, patches jittered by ``SECOND_STAGE_JITTER`` around that scale, and
       a fresh optimizer whose learning rate starts at ``SECOND_STAGE_LR`` times ``Config.learning_rate``
       and decays along its own cosine.

The model learns every size first, then specialises at one; predictions then take two passes
(``segmenter.Segmenter.probabilities``).  On the real DSB-2018 data this scored higher than either stage
alone (README, "Accuracy on real images").  Without ``nucleus_diameter`` a run is one stage at native
scale; with ``nucleus_epochs = 0`` it is one stage at that diameter throughout.
"""

from __future__ import annotations

import dataclasses

from unet_model_core import Config

SECOND_STAGE_JITTER = (0.8, 1.25)  # the patch scales around the one nucleus size (None stays None)
SECOND_STAGE_LR = 0.2  # the second stage's starting learning rate, as a fraction of Config.learning_rate


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: the Config it trains with (data and optimizer), from epoch ``first`` (the count of
    epochs before it) to epoch ``last`` (counted from the run's start)."""

    config: Config
    first: int
    last: int


def two_stages(config: Config) -> bool:
    """True when ``config`` trains at native scale first, then at one nucleus size."""
    return bool(config.nucleus_diameter) and config.nucleus_epochs > 0


def total_epochs(config: Config) -> int:
    """Every epoch of the run, both stages."""
    return config.epochs + (config.nucleus_epochs if two_stages(config) else 0)


def training_stages(config: Config) -> list[Stage]:
    """The stages of a run with ``config``, in order (see the module's docstring)."""
    if not two_stages(config):
        return [Stage(config, 0, config.epochs)]
    jitter = SECOND_STAGE_JITTER if config.scale_range else None
    second = dataclasses.replace(
        config,
        scale_range=jitter,
        learning_rate=config.learning_rate * SECOND_STAGE_LR,
        nucleus_epochs=0,
        warmup_epochs=0.0,
    )  # a stage is one stage: at that diameter throughout; it starts low, without a warm-up
    return [
        Stage(dataclasses.replace(config, nucleus_diameter=None), 0, config.epochs),
        Stage(second, config.epochs, total_epochs(config)),
    ]


def describe(config: Config) -> str:
    """The epochs of a run in words, for logs: '20 epochs', or '23 epochs (20 + 3 at 20-px nuclei)'."""
    if two_stages(config):
        return (
            f"{total_epochs(config)} epochs ({config.epochs} + {config.nucleus_epochs} at "
            f"{config.nucleus_diameter:g}-px nuclei)"
        )
    at = f" at {config.nucleus_diameter:g}-px nuclei" if config.nucleus_diameter else ""
    return f"{config.epochs} epochs{at}"


def describe_stage(stage: Stage) -> str:
    """A second stage in words, for the log as it starts."""
    span = f"s {stage.first + 1}-{stage.last}" if stage.last > stage.first + 1 else f" {stage.last}"
    return (
        f"Second stage: epoch{span} with every image at {stage.config.nucleus_diameter:g}-px nuclei, "
        f"lr {stage.config.learning_rate:g}"
    )


def check_resume(saved: Config, config: Config, initial_epoch: int, run_dir) -> None:
    """ValueError, for the user, when a run saved with ``saved`` after ``initial_epoch`` epochs cannot
    go on as ``config`` says (new epoch counts)."""
    if initial_epoch > saved.epochs:  # in its second stage, whose epochs follow the first's
        if config.epochs != saved.epochs:
            raise ValueError(
                f"--epochs {config.epochs}: {run_dir} is in its second stage (epoch {initial_epoch} "
                f"of {total_epochs(saved)}), after its {saved.epochs} epochs at native scale; "
                f"resume it without --epochs"
            )
    elif config.epochs < initial_epoch:
        raise ValueError(
            f"--epochs {config.epochs}: {run_dir} has already trained {initial_epoch} epochs; "
            f"give --epochs {initial_epoch} or more"
        )

"""The two stages of a run: native scale, then every image at one nucleus size (``unet_nuclei.stages``),
and how training, resuming and the flags follow them."""

import json
import re

import pytest

import Train
import unet_model_core as core
from conftest import run_main
from unet_nuclei import stages


def test_the_default_run_learns_every_size_then_one():
    config = core.Config()
    first, second = stages.training_stages(config)
    assert (first.first, first.last, second.first, second.last) == (0, 20, 20, 23)
    assert stages.total_epochs(config) == 23
    # The first stage is the native-scale recipe: no rescaling, the wide jitter, the full learning rate.
    assert first.config.nucleus_diameter is None and first.config.scale_range == (0.6, 1.8)
    assert first.config.learning_rate == config.learning_rate
    # The second brings every image to 20-px nuclei, jitters a little around that, and starts slower.
    assert second.config.nucleus_diameter == 20.0 and second.config.scale_range == stages.SECOND_STAGE_JITTER
    assert second.config.nucleus_epochs == 0  # each stage's Config is a one-stage one: what make_datasets needs
    assert second.config.learning_rate == pytest.approx(config.learning_rate * stages.SECOND_STAGE_LR)
    # Everything else (the model, the data, the seed) is the run's own in both.
    for stage in (first, second):
        assert (stage.config.channels, stage.config.seed, stage.config.targets) == (
            config.channels,
            config.seed,
            config.targets,
        )
    assert stages.describe(config) == "23 epochs (20 + 3 at 20-px nuclei)"


@pytest.mark.parametrize(
    "changes, epochs, diameter, words",
    [
        ({"nucleus_diameter": None}, 20, None, "20 epochs"),  # native scale throughout
        ({"nucleus_epochs": 0}, 20, 20.0, "20 epochs at 20-px nuclei"),  # one size throughout
    ],
)
def test_one_stage_runs(changes, epochs, diameter, words):
    config = core.Config(**changes)
    (only,) = stages.training_stages(config)
    assert (only.first, only.last, only.config) == (0, epochs, config)
    assert only.config.nucleus_diameter == diameter and stages.total_epochs(config) == epochs
    assert stages.describe(config) == words


def test_a_run_without_scale_jitter_gets_none_in_its_second_stage_either():
    _, second = stages.training_stages(core.Config(scale_range=None))
    assert second.config.scale_range is None and second.config.nucleus_diameter == 20.0


def test_resuming_may_not_move_the_stage_boundary_under_a_run():
    saved = core.Config(epochs=4, nucleus_epochs=2)
    stages.check_resume(saved, saved, 5, "runs/r")  # in the second stage, same epochs: fine
    stages.check_resume(saved, core.Config(epochs=6, nucleus_epochs=2), 3, "runs/r")  # first stage, more
    with pytest.raises(ValueError, match=r"second stage.*--epochs"):
        stages.check_resume(saved, core.Config(epochs=8, nucleus_epochs=2), 5, "runs/r")
    with pytest.raises(ValueError, match=r"3 epochs.*--epochs 3"):
        stages.check_resume(saved, core.Config(epochs=2, nucleus_epochs=2), 3, "runs/r")


def test_a_run_saved_before_the_stages_keeps_training_as_it_did():
    saved = core.Config().to_dict()
    for name in ("nucleus_diameter", "nucleus_epochs", "area_power", "warmup_epochs"):
        del saved[name]
    old = core.Config.from_dict(saved)
    assert old.nucleus_diameter is None and old.nucleus_epochs == 0 and len(stages.training_stages(old)) == 1
    assert old.warmup_epochs == 0  # nor a warm-up it never had
    # A partial dict (not a run's config.json) takes today's defaults.
    assert core.Config.from_dict({"epochs": 5}).nucleus_diameter == 20.0
    # A run of the one-size flag before the stages: the whole run at that size, as it trained.
    saved["nucleus_diameter"] = 22.0
    (only,) = stages.training_stages(core.Config.from_dict(saved))
    assert only.config.nucleus_diameter == 22.0


def test_only_the_first_stage_warms_up():
    first, second = stages.training_stages(core.Config(warmup_epochs=1.5))
    assert first.config.warmup_epochs == 1.5 and second.config.warmup_epochs == 0
    with pytest.raises(ValueError, match=r"warmup_epochs.*-1"):
        core.Config(warmup_epochs=-1)


def test_the_flags_set_the_second_stage():
    parser = Train.build_parser(core.Config())
    config = Train.config_from_args(parser.parse_args(["--nucleus-epochs", "5", "--nucleus-diameter", "24"]), core)
    assert (config.nucleus_epochs, config.nucleus_diameter, stages.total_epochs(config)) == (5, 24.0, 25)
    status, out, _ = run_main(Train, "--help")
    assert status == 0 and "--nucleus-epochs" in out and "a fifth of --lr" in " ".join(out.split())
    status, _, err = run_main(Train, "--quick", "--nucleus-epochs", "-2")
    assert status == 2 and "nucleus_epochs" in err and "-2" in err


def _optimizer_steps(run):
    import keras

    return int(keras.saving.load_model(run / "last.keras").optimizer.iterations.numpy())


@pytest.mark.slow
def test_a_run_stopped_between_its_stages_starts_the_second_with_a_fresh_optimizer(tmp_path, tiny_dataset):
    runs = str(tmp_path / "runs")
    common = ("--quick", "--data", str(tiny_dataset), "--runs-dir", runs)
    # Stopped after its first stage: a one-stage run of 1 epoch, then told it has a second stage.
    status, out, err = run_main(Train, *common, "--name", "r", "--nucleus-epochs", "0", "--nucleus-diameter", "none")
    assert status == 0, out + err
    run = tmp_path / "runs" / "r"
    assert _optimizer_steps(run) == 3  # --quick: 3 steps an epoch
    saved = json.loads((run / "config.json").read_text())
    saved.update(nucleus_diameter=20.0, nucleus_epochs=2)
    (run / "config.json").write_text(json.dumps(saved))
    status, out, err = run_main(Train, "--resume", "r", "--runs-dir", runs)
    assert status == 0, out + err
    assert "1 of 3" in out and re.search(r"Second stage\b.*\bepochs 2-3\b.*\b20-px", out)
    assert "lr 0.0002" in out
    # The second stage's own optimizer: 2 epochs x 3 steps since it began, not 9 steps since the run did.
    assert _optimizer_steps(run) == 6
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 3 and state["best_epoch"] in (2, 3)  # its best is among its own epochs
    final = json.loads((run / "config.json").read_text())
    assert final["nucleus_diameter"] == 20.0 and final["best_epoch"] == state["best_epoch"]
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 3
    # Now in its second stage, it cannot be given another first stage.
    status, _, err = run_main(Train, "--resume", "r", "--runs-dir", runs, "--epochs", "4")
    assert status == 2 and "second stage" in err

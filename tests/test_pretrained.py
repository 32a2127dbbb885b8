"""The shipped DSB-2018 model (models/dsb2018), which model a command uses, and fine-tuning from a model
(``Train.py --init``), including the round trip a biologist makes: predict label TIFFs, correct them,
train on them."""

import csv
import json
import re
import shutil

import cv2
import keras
import numpy as np
import pytest

import Predict_mask
import Train
from conftest import run_main
from unet_nuclei import metrics, pretrained, synthetic
from unet_nuclei.runs import read_run_config

SHIPPED = pretrained.SHIPPED_DIR / pretrained.DEFAULT_MODEL


def test_the_shipped_model_loads_in_safe_mode_and_matches_its_card():
    assert pretrained.shipped_names() == [pretrained.DEFAULT_MODEL]
    model = keras.saving.load_model(SHIPPED / "model.keras", safe_mode=True)  # no custom objects
    assert model.count_params() > 100_000 and all(w.dtype == "float32" for w in model.weights)
    assert getattr(model, "optimizer", None) is None  # saved uncompiled, without the training state
    assert pretrained.card_sha256(SHIPPED) == pretrained.sha256(SHIPPED / "model.keras")
    config, info = read_run_config(SHIPPED)  # config.json with the learned postprocessing.json and scores.json
    assert "val_scores" in info and 0 < config.threshold < 1  # its chosen post-processing
    assert info["held_out_ids"] and not set(info["held_out_ids"]) & set(info["val_ids"])


def test_the_shipped_model_finds_the_nuclei_of_a_synthetic_image(tmp_path):
    from unet_nuclei.segmenter import Segmenter

    image, labels = synthetic.generate_sample(np.random.default_rng(11), 192, 256, "fluorescence")
    segmenter = Segmenter.load(pretrained.DEFAULT_MODEL, tmp_path / "runs")
    assert segmenter.run_dir.resolve() == SHIPPED.resolve() and "shipped" in segmenter.run_info["chosen_because"]
    found = segmenter.segment(image)
    scores = metrics.score_image(labels, found.labels)
    assert found.count > 0.5 * scores.nuclei_true and scores.ap50 > 0.5, scores


def fake_shipped(root, run):
    """A models/ folder holding a copy of ``run`` as its shipped model."""
    folder = root / pretrained.DEFAULT_MODEL
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("last.keras", "state.json"))
    return root


def test_which_model_a_command_uses(quick_run, tmp_path):
    work, run, _ = quick_run
    shipped = fake_shipped(tmp_path / "models", run)
    empty = tmp_path / "runs"
    where, why = pretrained.resolve_model(None, empty, shipped)  # a fresh clone: no run yet
    assert where == shipped / "dsb2018" and "shipped" in why and "no run" in why
    where, why = pretrained.resolve_model(None, work / "runs", shipped)  # the user's newest run wins
    assert where == run and "newest run" in why and "--model dsb2018" in why
    where, why = pretrained.resolve_model("dsb2018", work / "runs", shipped)  # named, from anywhere
    assert where == shipped / "dsb2018" and "shipped" in why
    where, _ = pretrained.resolve_model(str(run / "model.keras"), empty, shipped)
    assert where == run / "model.keras"
    with pytest.raises(FileNotFoundError, match="dsb2018"):  # the shipped names
        pretrained.resolve_model("dsb2019", empty, shipped)
    with pytest.raises(FileNotFoundError, match=r"python Train\.py"):
        pretrained.resolve_model(None, empty, tmp_path / "nothing")


def test_a_fresh_clone_predicts_with_the_shipped_model(tmp_path, monkeypatch):
    image, _ = synthetic.generate_sample(np.random.default_rng(5), 96, 128, "fluorescence")
    cv2.imwrite(str(tmp_path / "cells.png"), image[..., ::-1])
    monkeypatch.chdir(tmp_path)  # no runs/ here
    status, out, err = run_main(Predict_mask, "cells.png", "--no-tta")
    assert status == 0, err
    first = out.splitlines()[0]
    assert str(SHIPPED) in first and "shipped" in first
    mask = cv2.imread(str(tmp_path / "predictions" / "cells_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 128) and mask.max() == 255


def first_epoch_loss(run_dir):
    with open(run_dir / "history.csv") as handle:
        return float(next(csv.DictReader(handle))["loss"])


@pytest.mark.slow
def test_init_starts_from_the_shipped_weights(tiny_dataset, tmp_path):
    runs = str(tmp_path / "runs")
    channels = ",".join(map(str, json.loads((SHIPPED / "config.json").read_text())["channels"]))
    common = ("--quick", "--data", str(tiny_dataset), "--runs-dir", runs, "--nucleus-epochs", "0", "--lr", "1e-5")
    status, out, err = run_main(Train, *common, "--name", "tuned", "--init", "dsb2018")
    assert status == 0, out + err
    status, out, err = run_main(Train, *common, "--name", "fresh", "--channels", channels, "--image-size", "128")
    assert status == 0, out + err
    tuned, fresh = first_epoch_loss(tmp_path / "runs" / "tuned"), first_epoch_loss(tmp_path / "runs" / "fresh")
    assert tuned < 0.6 * fresh, (tuned, fresh)
    info = read_run_config(tmp_path / "runs" / "tuned")[1]
    assert info["init_model"]["sha256"] == pretrained.sha256(SHIPPED / "model.keras")
    assert info["channels"] == [int(c) for c in channels.split(",")] and "val_scores" in info


def test_init_refuses_flags_that_change_the_architecture(tiny_dataset, tmp_path):
    status, _, err = run_main(
        Train,
        "--quick",
        "--data",
        str(tiny_dataset),
        "--runs-dir",
        str(tmp_path),
        "--init",
        "dsb2018",
        "--channels",
        "8,16,32",
        "--targets",
        "binary",
    )
    assert status == 2 and "--channels 8,16,32" in err and "--targets binary" in err
    assert not list(tmp_path.iterdir())  # nothing was started
    status, _, err = run_main(Train, "--init", "no-such-model", "--runs-dir", str(tmp_path))
    assert status == 2 and "no-such-model" in err
    status, _, err = run_main(Train, "--init", "dsb2018", "--resume", "x", "--runs-dir", str(tmp_path))
    assert status == 2 and "--resume" in err


def test_fine_tuning_defaults_and_overrides():
    from unet_model_core import Config
    from unet_nuclei import finetune

    base = Config(channels=(8, 16, 32), image_size=96, nucleus_diameter=18.0, loss="dice")
    tuned = finetune.fine_tune_config(base, {}, "m")
    assert tuned.channels == (8, 16, 32) and tuned.image_size == 96 and tuned.nucleus_diameter == 18.0
    assert tuned.loss == "dice" and tuned.epochs == finetune.FINE_TUNE_EPOCHS
    assert tuned.learning_rate == finetune.FINE_TUNE_LR and tuned.nucleus_epochs == finetune.FINE_TUNE_NUCLEUS_EPOCHS
    mine = finetune.fine_tune_config(base, {"epochs": 3, "learning_rate": 1e-5, "channels": [8, 16, 32]}, "m")
    assert mine.epochs == 3 and mine.learning_rate == 1e-5  # the same architecture, repeated, is fine
    one_size = finetune.fine_tune_config(Config(nucleus_epochs=0), {}, "m")
    assert one_size.nucleus_epochs == 0  # a model trained at one size throughout is fine-tuned likewise


@pytest.mark.slow
def test_round_trip_predicted_label_tiffs_corrected_then_fine_tuned(quick_run, tmp_path):
    work, run, _ = quick_run
    images = tmp_path / "mine" / "images"
    images.mkdir(parents=True)
    truths = {}
    for index in range(4):
        image, labels = synthetic.generate_sample(np.random.default_rng(100 + index), 96, 112, "fluorescence")
        cv2.imwrite(str(images / f"cell{index}.png"), image[..., ::-1])
        truths[f"cell{index}"] = labels
    status, out, err = run_main(
        Predict_mask, str(images), "--model", str(run), "--labels", "tif", "--out", str(tmp_path / "predicted")
    )
    assert status == 0, err
    # The biologist's correction: the predicted label image replaced by the right nuclei, saved as the
    # same kind of TIFF under the same name, moved beside the images as masks/.
    masks = tmp_path / "mine" / "masks"
    masks.mkdir()
    import unet_model_core as core
    from unet_nuclei import formats

    for stem, labels in truths.items():
        predicted = tmp_path / "predicted" / f"{stem}_labels.tif"
        assert predicted.is_file()
        formats.write_label_tiff(masks / predicted.name, labels)
        # Read back as the training labels, touching nuclei still apart: one value per nucleus.
        read = core.read_instance_labels([masks / predicted.name], labels.shape, "pairs")
        np.testing.assert_array_equal(read, labels)
    status, out, err = run_main(
        Train,
        "--quick",
        "--data",
        str(tmp_path / "mine"),
        "--init",
        str(run),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--name",
        "corrected",
        "--val-size",
        "1",
    )
    assert status == 0, out + err
    assert re.search(r"\b3 training\b.*\b1 validation", out)
    tuned = tmp_path / "runs" / "corrected"
    info = read_run_config(tuned)[1]
    assert info["init_model"]["path"] == str(run / "model.keras") and "val_scores" in info
    assert (tuned / "model.keras").is_file()


def test_label_images_as_users_save_them_are_read_as_labels(tmp_path):
    import tifffile

    import unet_model_core as core

    labels = np.zeros((20, 30), np.int32)
    labels[2:10, 2:10], labels[2:10, 10:18], labels[12:18, 20:28] = 1, 2, 3  # 1 and 2 touch
    tifffile.imwrite(tmp_path / "a_labels.tif", labels.astype(np.uint32))  # 32-bit, which OpenCV cannot read
    tifffile.imwrite(tmp_path / "b.tif", labels.astype(np.float32))  # Fiji's "32-bit" label image
    for name in ("a_labels.tif", "b.tif"):
        read = core.read_instance_labels([tmp_path / name], labels.shape, "pairs")
        np.testing.assert_array_equal(read, labels)
    # Two masks for one image: refused for that image, naming both, rather than one chosen silently.
    for folder in ("images", "masks"):
        (tmp_path / "set" / folder).mkdir(parents=True)
    for stem in ("a", "c"):
        cv2.imwrite(str(tmp_path / "set" / "images" / f"{stem}.png"), np.zeros((20, 30), np.uint8))
    for name in ("a.tif", "a_labels.tif", "c_labels.tif"):
        tifffile.imwrite(tmp_path / "set" / "masks" / name, labels.astype(np.uint16))
    samples, problems = core.find_samples(tmp_path / "set")
    assert [s.sample_id for s in samples] == ["c"]
    assert problems[0][0] == "a" and "a.tif" in problems[0][1] and "a_labels.tif" in problems[0][1]

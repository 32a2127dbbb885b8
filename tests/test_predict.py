"""Predict_mask.py, and the full-resolution inference it rests on.

The flags and errors go through ``Predict_mask.main(argv)`` in this process; one real subprocess run
checks the script as a user runs it."""

import csv
import json
import re

import cv2
import numpy as np
import pytest

import Predict_mask
import unet_model_core as core
from conftest import run_main, run_script
from rle import rle_decode
from unet_nuclei import checkpoints, predict, tiling
from unet_nuclei.segmenter import Segmenter


def write_kinds(folder):
    """One image of every kind a user may have, each at an odd size; returns {stem: (height, width)}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "grey.png"), rng.integers(0, 255, (67, 91), dtype=np.uint8))
    cv2.imwrite(str(folder / "rgba.png"), rng.integers(0, 255, (101, 77, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "deep.tif"), rng.integers(0, 4095, (129, 65), dtype=np.uint16))
    cv2.imwrite(str(folder / "photo.jpg"), rng.integers(0, 255, (75, 203, 3), dtype=np.uint8))
    return {"grey": (67, 91), "rgba": (101, 77), "deep": (129, 65), "photo": (75, 203)}


@pytest.mark.slow
def test_masks_match_every_input_size_and_kind_and_bad_files_are_skipped(quick_run, tmp_path):
    work, run, _ = quick_run
    sizes = write_kinds(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "in" / "notes.txt").write_text("hello")
    result = run_script(
        "Predict_mask.py", str(tmp_path / "in"), "--model", str(run), "--out", str(tmp_path / "out"), cwd=work
    )
    assert result.returncode == 1, result.stderr  # some inputs were bad: non-zero, but the rest written
    assert "broken" in result.stderr and "Traceback" not in result.stderr
    # A file that is not an image by its extension is passed over quietly, counted once (issue 33).
    assert "notes" not in result.stderr and "notes.txt" in result.stdout
    for stem, (height, width) in sizes.items():
        mask = cv2.imread(str(tmp_path / "out" / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        overlay = cv2.imread(str(tmp_path / "out" / f"{stem}_overlay.png"))
        assert overlay.shape == (height, width, 3)
        assert re.search(rf"{stem}\b.*\b{width}x{height}\b", result.stdout)  # one line per image: size, nuclei, time


def test_labels_rle_and_scores_on_a_dsb_folder(quick_run, tiny_dataset, tmp_path):
    work, run, _ = quick_run
    out = tmp_path / "out"
    status, stdout, stderr = run_main(
        Predict_mask,
        str(tiny_dataset),
        "--model",
        "first",
        "--out",
        str(out),
        "--labels",
        "--rle",
        str(tmp_path / "sub.csv"),
        "--runs-dir",
        str(work / "runs"),
    )
    assert status == 0, stderr
    ids = sorted(p.name for p in tiny_dataset.iterdir())
    with open(tmp_path / "sub.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    for image_id in ids:
        labels = cv2.imread(str(out / f"{image_id}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16
        encoded = [r[1] for r in rows[1:] if r[0] == image_id]
        count = np.count_nonzero(np.unique(labels))  # a smoke-run model may leave no background
        assert len(encoded) == max(count, 1)
        # Decoding the CSV gives back exactly the labelled nuclei.
        decoded = sum((rle_decode(e, labels.shape) for e in encoded if e), np.zeros(labels.shape, np.uint8))
        assert np.array_equal(decoded > 0, labels > 0) and decoded.max() <= 1
    with open(out / "scores.csv") as handle:
        scores = list(csv.reader(handle))
    assert (
        scores[0][-4:] == ["dice", "iou", "dsb_score", "ap50"]
        and scores[-1][0] == "mean"
        and len(scores) == len(ids) + 2
    )
    assert "6 scored images" in stdout


def test_no_argument_mode_predicts_the_validation_images(quick_run, tmp_path):
    work, run, _ = quick_run
    status, stdout, stderr = run_main(Predict_mask, "--model", str(run), "--out", str(tmp_path / "val"))
    assert status == 0, stderr
    val_ids = json.loads((run / "config.json").read_text())["val_ids"]
    assert f"{len(val_ids)} validation images" in stdout
    assert (tmp_path / "val" / "validation_predictions.png").is_file()
    assert all((tmp_path / "val" / f"{i}_mask.png").is_file() for i in val_ids)


def test_min_confidence_flag_overrides_the_run_and_is_checked(quick_run, tmp_path):
    work, run, _ = quick_run
    write_kinds(tmp_path / "in")
    image = str(tmp_path / "in" / "grey.png")
    status, stdout, stderr = run_main(
        Predict_mask, image, "--model", str(run), "--out", str(tmp_path / "a"), "--min-confidence", "0.99"
    )
    assert status == 0, stderr
    assert "confidence" in stdout and "0.99" in stdout  # the override reached the post-processing
    status, _, stderr = run_main(
        Predict_mask, image, "--model", str(run), "--out", str(tmp_path / "b"), "--min-confidence", "1.5"
    )
    assert status == 2 and "min_confidence" in stderr and "[0, 1)" in stderr


def test_existing_outputs_are_not_overwritten(quick_run, tmp_path):
    work, run, _ = quick_run
    write_kinds(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "grey_mask.png").write_bytes(b"the user's own file")
    status, _, stderr = run_main(
        Predict_mask, str(tmp_path / "in" / "grey.png"), "--model", str(run), "--out", str(out)
    )
    assert status == 1 and "--overwrite" in stderr
    assert (out / "grey_mask.png").read_bytes() == b"the user's own file"


def test_no_run_and_foreign_models_get_clear_errors(tmp_path, monkeypatch):
    from unet_nuclei import pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrained, "SHIPPED_DIR", tmp_path / "no_models")  # a checkout without models/
    status, _, stderr = run_main(Predict_mask, "x.png")
    assert status == 2 and "python Train.py" in stderr
    import keras

    fake = tmp_path / "runs" / "fake"
    fake.mkdir(parents=True)
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]).save(fake / "model.keras")
    core.Config().to_json(fake / "config.json")
    status, _, stderr = run_main(Predict_mask, "x.png", "--model", "fake")
    assert status == 2 and "U-Net" in stderr


def test_help_and_bad_flags():
    status, stdout, _ = run_main(Predict_mask, "--help")
    assert status == 0 and "--model" in stdout and "--rle" in stdout and "--truth" in stdout
    assert "--tta" in stdout and "--marker-threshold" in stdout and "--min-confidence" in stdout
    status, _, stderr = run_main(Predict_mask, "--batch-size", "four")
    assert status == 2 and "invalid int value" in stderr


# --- Inference functions with a real (quickly trained) model -------------------------------------------


@pytest.fixture(scope="module")
def model_and_config(quick_run):
    _, run, _ = quick_run
    segmenter = Segmenter.load(run)
    return segmenter.model, segmenter.config


def probabilities(model, image, config, tile_size=None, tta=False):
    """The model's probabilities at the image's own scale, as the segmenter's passes compute them."""
    return Segmenter(model, config, tile_size=tile_size).native_probabilities(image, tta=tta)


def test_tiled_prediction_equals_one_forward_pass_on_an_image_that_fits_one_tile(model_and_config):
    model, config = model_and_config
    image = np.random.default_rng(1).integers(0, 255, (70, 90, 3)).astype(np.uint8)
    tiled = probabilities(model, image, config)
    size, out_size, margin = tiling.tile_geometry(model, config, image.shape[:2])
    tile_h, tile_w = (size, size) if np.ndim(size) == 0 else size  # tiles are shaped to the image
    assert tile_h - 2 * margin >= 70 and tile_w - 2 * margin >= 90  # one tile covers the image
    # The same thing done by hand: preprocess, mirror the image out to one tile, one forward pass, crop.
    view = core.preprocess_image(image, config.preprocessing)
    padded = np.pad(view, ((margin, tile_h - margin - 70), (margin, tile_w - margin - 90), (0, 0)), mode="reflect")
    direct = model.predict(padded[None].astype(np.float32), verbose=0)[0, margin : margin + 70, margin : margin + 90]
    assert tiled.shape == (70, 90, config.num_classes)
    np.testing.assert_allclose(tiled, direct, atol=1e-5)


def test_test_time_augmentation_averages_the_eight_orientations(model_and_config):
    model, config = model_and_config
    image = np.random.default_rng(3).integers(0, 255, (40, 56, 3)).astype(np.uint8)
    averaged = probabilities(model, image, config, tta=True)
    by_hand = []
    for turns in range(4):
        for flip in (False, True):
            view = np.rot90(image, turns)
            view = np.ascontiguousarray(view[:, ::-1] if flip else view)
            output = probabilities(model, view, config)
            by_hand.append(np.rot90(output[:, ::-1] if flip else output, -turns))
    assert averaged.shape == (40, 56, config.num_classes)
    np.testing.assert_allclose(averaged, np.mean(by_hand, axis=0), atol=1e-5)


def test_tiled_prediction_has_no_visible_seams(model_and_config):
    model, config = model_and_config
    rng = np.random.default_rng(2)
    image = cv2.GaussianBlur(rng.integers(0, 255, (300, 300, 3)).astype(np.uint8), (0, 0), 3)
    small_tiles = probabilities(model, image, config, tile_size=96)
    one_tile = probabilities(model, image, config, tile_size=352)
    size, out_size, margin = tiling.tile_geometry(model, config, image.shape[:2], 96)
    assert size == 96 and tiling.tile_geometry(model, config, image.shape[:2], 352)[1] >= 300  # one tile covers all
    # Differences come only from the context each pixel sees; they must be small, and no larger on the
    # tile borders than in the tile interiors (no seams).
    difference = np.abs(small_tiles - one_tile).max(axis=-1)
    assert np.median(difference) < 0.05
    starts = tiling.tile_positions(300, out_size, 0 if config.tile_overlap == 0 else out_size // 8)
    borders = sorted({p for s in starts[1:] for p in (s, s + 1)})
    interior = [p for p in range(300) if all(abs(p - b) > 8 for b in borders)]
    column_difference = difference.mean(axis=0)
    assert column_difference[borders].mean() < 3 * column_difference[interior].mean() + 1e-3


def test_resize_mode_predicts_at_the_input_size():
    for targets, preprocessing in (("instance", "grey"), ("binary", "rgb")):
        config = core.Config(
            sampling="resize", image_size=32, channels=(4, 8), targets=targets, preprocessing=preprocessing
        )
        model = checkpoints.export_inference_model(core.build_unet_from_config(config), config)
        output = probabilities(model, np.zeros((45, 71, 3), np.uint8), config)
        assert output.shape == (45, 71, config.num_classes)


def test_read_ahead_keeps_the_order_and_delivers_each_image_or_its_error(tmp_path):
    items = []
    for index in range(5):
        path = tmp_path / f"img{index}.png"
        if index != 2:  # the third file is missing: its error arrives with it, the others still come
            cv2.imwrite(str(path), np.full((8 + index, 10, 3), 40 * index, np.uint8))
        items.append(predict.PredictionInput(f"img{index}", path))
    seen = []
    for item, decoded in predict.read_ahead(items, depth=2):
        if item.name == "img2":
            with pytest.raises(core.DataError, match="not found"):
                decoded.result()
            continue
        image = decoded.result()
        assert image.shape == (8 + int(item.name[-1]), 10, 3) and image[0, 0, 0] == 40 * int(item.name[-1])
        seen.append(item.name)
    assert seen == ["img0", "img1", "img3", "img4"]
    assert [i.name for i, _ in predict.read_ahead(items[:1], depth=3)] == ["img0"]  # fewer than the depth

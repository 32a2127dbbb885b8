"""Tests for unet_nuclei/segmenter.py (the one way from an image to its nuclei) and unet_nuclei/runs.py
(what a run folder records), and for the import graph they stand on.

The model is replaced by a stand-in of ``Segmenter.native_probabilities`` whose output is known, so the
nucleus-scale and TTA passes can be checked without TensorFlow doing any work.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from unet_nuclei import runs, segmenter
from unet_nuclei.postprocess import PostProcessing
from unet_nuclei.segmenter import Segmenter


def _disc_image(radius: int, size: int = 96):
    """An RGB image of bright discs of ``radius`` on black, 4 by 4."""
    image = np.zeros((size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for cy in range(size // 8, size, size // 4):
        for cx in range(size // 8, size, size // 4):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 255
    return image


def _bright_is_nucleus(calls):
    """A stand-in for ``Segmenter.native_probabilities``: bright pixels are nucleus interior, the rest
    background; it records the size and TTA flag of every image it is given."""

    def predict(self, image, tta=False, progress=None, dtype=np.float32):
        calls.append((image.shape[:2], tta))
        interior = (np.asarray(image)[..., 0] > 127).astype(np.float32)
        return np.stack([1 - interior, interior, np.zeros_like(interior)], axis=-1).astype(dtype)

    return predict


def test_validation_images_are_predicted_as_the_run_predicts_with_or_without_tta(monkeypatch):
    # finalize chooses the post-processing on these outputs, so they follow the run's TTA setting.
    from unet_model_core import Config, LoadedSample

    calls = []
    monkeypatch.setattr(Segmenter, "native_probabilities", _bright_is_nucleus(calls))
    image = _disc_image(radius=4)
    sample = LoadedSample("discs", image, np.zeros(image.shape[:2], np.uint16))
    for tta in (True, False):
        calls.clear()
        Segmenter(None, Config(nucleus_diameter=None, tta=tta)).outputs([sample], progress=False)
        assert calls == [((96, 96), tta)]


def test_prediction_at_a_nucleus_diameter_rescales_the_image_and_the_result_back(monkeypatch):
    from unet_model_core import Config

    calls = []
    monkeypatch.setattr(Segmenter, "native_probabilities", _bright_is_nucleus(calls))
    image = _disc_image(radius=4)  # discs about 9 px across
    config = Config(nucleus_diameter=18.0)
    output = Segmenter(None, config, tta=False).probabilities(image, dtype=np.float16)
    assert [shape for shape, _ in calls] == [(96, 96), (192, 192)], "a first pass, then twice the size"
    assert output.shape == (96, 96, 3) and output.dtype == np.float16
    labels = PostProcessing().nuclei(output)
    assert labels.max() == 16 and abs((labels > 0).mean() - (image[..., 0] > 127).mean()) < 0.01

    calls.clear()  # nuclei already near the diameter: the first pass is the result
    native = Segmenter(None, Config(nucleus_diameter=8.5), tta=False).probabilities(image)
    assert [shape for shape, _ in calls] == [(96, 96)]
    np.testing.assert_array_equal(native[..., 1], image[..., 0] > 127)
    calls.clear()  # ... and with TTA it is predicted again, in its 8 orientations
    Segmenter(None, Config(nucleus_diameter=8.5), tta=True).probabilities(image)
    assert calls == [((96, 96), False), ((96, 96), True)]

    calls.clear()  # a model trained at the native scale predicts once, as before
    Segmenter(None, Config(nucleus_diameter=None), tta=True).probabilities(image)
    assert calls == [((96, 96), True)]

    calls.clear()  # a large image is rescaled less, so the second pass fits the pixel budget
    monkeypatch.setattr(segmenter, "MAX_RESCALED_PIXELS", 144 * 144)
    Segmenter(None, config, tta=False).probabilities(image)
    assert [shape for shape, _ in calls] == [(96, 96), (144, 144)]


def test_prediction_does_not_load_training_and_tiling_loads_nothing_of_the_package():
    # One fresh interpreter: what importing tiling loads, then what importing the prediction modules adds.
    code = (
        "import sys\n"
        "def ours(): return {m for m in sys.modules if m.startswith('unet_nuclei.') or m == 'unet_model_core'}\n"
        "import unet_nuclei.tiling\n"
        "print(' '.join(ours()))\n"
        "import unet_nuclei.predict, unet_nuclei.segmenter\n"
        "print(' '.join(ours()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    by_tiling, by_prediction = (set(line.split()) for line in done.stdout.splitlines())
    assert by_tiling == {"unet_nuclei.tiling", "unet_model_core"}
    assert "unet_nuclei.segmenter" in by_prediction and "unet_nuclei.training" not in by_prediction


def _write(path, data):
    path.write_text(json.dumps(data))


def test_a_run_reads_its_learned_post_processing_and_scores_from_their_own_files(tmp_path):
    from unet_model_core import Config

    asked = Config(threshold=0.6, marker_threshold=0.7, min_nucleus_size=30, min_confidence=0.85)
    runs.write_config(asked, tmp_path / "config.json", val_ids=["a"])
    config, record = runs.read_run_config(tmp_path)
    assert PostProcessing.of(config) == PostProcessing(0.6, 0.7, 30, 0.85) and "val_scores" not in record

    runs.write_learned(tmp_path, PostProcessing(0.45, 0.5, 8, 0.0), {"val_scores": {"dsb_score": 0.5}})
    config, record = runs.read_run_config(tmp_path)
    assert PostProcessing.of(config) == PostProcessing(0.45, 0.5, 8, 0.0)
    assert record["val_scores"] == {"dsb_score": 0.5} and record["val_ids"] == ["a"]
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] == 0.6  # what was asked stays
    # A resumed run starts from what was asked, not from what an earlier end of training learned.
    assert PostProcessing.of(runs.read_run_config(tmp_path, learned=False)[0]) == PostProcessing(0.6, 0.7, 30, 0.85)


def test_a_run_from_before_the_learned_files_reads_as_it_did(tmp_path):
    from unet_model_core import Config

    runs.write_config(
        Config(threshold=0.55, min_nucleus_size=8), tmp_path / "config.json", val_scores={"dsb_score": 0.4}
    )
    config, record = runs.read_run_config(tmp_path)
    assert (config.threshold, config.min_nucleus_size) == (0.55, 8) and record["val_scores"] == {"dsb_score": 0.4}
    assert Segmenter(None, config).post == PostProcessing.of(config)


def test_the_segmenter_takes_tta_and_post_processing_from_the_run_unless_told(tmp_path):
    from unet_model_core import Config

    config = Config(tta=False, threshold=0.4)
    assert Segmenter(None, config).tta is False and Segmenter(None, config, tta=True).tta is True
    assert Segmenter(None, config).post.threshold == 0.4
    assert Segmenter(None, config, post=PostProcessing(0.9)).post.threshold == 0.9


def test_a_file_that_is_not_a_model_is_refused_clearly(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(segmenter.ModelError, match="damaged"):
        segmenter.load_unet(bad)

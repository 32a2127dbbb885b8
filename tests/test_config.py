"""The Config dataclass: one source of truth, JSON round trip, clear errors."""
import json

import pytest

import unet_model_core as core


def test_defaults_describe_the_default_model():
    config = core.Config()
    assert config.channels == (16, 32, 64, 128, 256) and config.padding == "same"
    assert (config.image_size, config.num_classes, config.batch_norm, config.dropout) == (128, 1, False, 0.0)
    assert core.build_unet_from_config(config).count_params() == 1_941_105


def test_json_round_trip_keeps_every_field(tmp_path):
    config = core.Config(channels=(8, 16, 32), image_size=64, loss="dice", sampling="resize", threshold=0.4)
    path = tmp_path / "config.json"
    config.to_json(path, val_ids=["a", "b"])  # extra keys are stored beside the fields...
    data = json.loads(path.read_text())
    assert data["val_ids"] == ["a", "b"] and data["channels"] == [8, 16, 32]
    assert core.Config.from_json(path) == config  # ...and ignored when reading a Config back


@pytest.mark.parametrize("field, value, message", [
    ("sampling", "crop", "sampling must be one of"),
    ("padding", "full", "padding must be one of"),
    ("loss", "mse", "loss must be one of"),
    ("image_size", 100, "nearest sizes that work: 96 or 112"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("dropout", 1.5, "dropout must be in"),
    ("channels", (16,), "at least two"),
])
def test_bad_values_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        core.Config(**{field: value})

"""The Config dataclass: one source of truth, JSON round trip, clear errors."""

import json

import pytest

import unet_model_core as core


def test_defaults_describe_the_default_model():
    config = core.Config()
    assert config.channels == (16, 32, 64, 128, 256) and config.padding == "same"
    assert (config.image_size, config.num_classes, config.input_channels) == (128, 3, 1)
    assert (config.targets, config.preprocessing, config.batch_norm, config.dropout) == ("instance", "grey", True, 0.0)
    # The seed's binary RGB model, without batch norm, is the same network with its own first and last layer.
    binary = core.Config(targets="binary", preprocessing="rgb", batch_norm=False)
    assert core.build_unet_from_config(binary).count_params() == 1_941_105
    # 3 -> 1 input channels: 16 * 9 * 2 fewer weights; 1 -> 3 classes: 2 * (16 + 1) more; batch norm after
    # each of the 18 3x3 convolutions: 4 numbers per channel, less the convolution's now redundant bias.
    batch_norm = 3 * 2 * (2 * (16 + 32 + 64 + 128) + 256)
    assert core.build_unet_from_config(config).count_params() == 1_941_105 - 288 + 34 + batch_norm


def test_a_run_of_an_earlier_version_keeps_its_meaning():
    old = {
        "image_size": 128,
        "input_channels": 3,
        "num_classes": 1,
        "channels": [16, 32, 64, 128, 256],
        "batch_norm": False,
        "threshold": 0.65,
    }
    config = core.Config.from_dict(old)
    assert (config.targets, config.preprocessing, config.scale_range, config.lr_schedule) == (
        "binary",
        "rgb",
        None,
        "plateau",
    )
    assert (config.num_classes, config.input_channels, config.threshold) == (1, 3, 0.65)
    # A dict of today's fields only takes today's defaults.
    assert core.Config.from_dict({"image_size": 64}).targets == "instance"
    assert core.Config.from_dict({"image_size": 64}).area_power == core.Config().area_power == 0.5
    assert config.area_power == 1.0  # sampled per pixel, as every run did before area_power
    saved = {**core.Config().to_dict(), "threshold": 0.7}
    del saved["area_power"]
    assert core.Config.from_dict(saved).area_power == 1.0
    assert core.Config.from_dict(core.Config(area_power=0.0).to_dict()).area_power == 0.0


def test_json_round_trip_keeps_every_field(tmp_path):
    config = core.Config(channels=(8, 16, 32), image_size=64, loss="dice", sampling="resize", threshold=0.4)
    path = tmp_path / "config.json"
    config.to_json(path, val_ids=["a", "b"])  # extra keys are stored beside the fields...
    data = json.loads(path.read_text())
    assert data["val_ids"] == ["a", "b"] and data["channels"] == [8, 16, 32]
    assert core.Config.from_json(path) == config  # ...and ignored when reading a Config back


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sampling", "crop", r"sampling\b.*\bpatch\b"),  # the field and a value that works
        ("padding", "full", r"padding\b.*\bsame\b"),
        ("loss", "mse", r"loss\b.*\bbce\b"),
        ("image_size", 100, r"\b96\b.*\b112\b"),  # the nearest sizes that work
        ("batch_size", 0, r"batch_size\b.*\bpositive"),
        ("dropout", 1.5, "dropout"),
        ("channels", (16,), r"channels\b.*\btwo\b"),
        ("targets", "contour", r"targets\b.*\binstance\b"),
        ("preprocessing", "hsv", r"preprocessing\b.*\bgrey\b"),
        ("scale_range", (2.0, 1.0), "scale_range"),
        ("lr_schedule", "step", r"lr_schedule\b.*\bcosine\b"),
        ("marker_threshold", 1.0, r"marker_threshold\b.*\(0, 1\).*\b1\.0\b"),
        ("threshold", 0.0, r"threshold\b.*\(0, 1\)"),
        ("area_power", 1.5, r"area_power\b.*\[0, 1\].*\b1\.5\b"),
        ("min_confidence", 1.0, r"min_confidence\b.*\[0, 1\)"),
        ("min_confidence", -0.1, "min_confidence"),
        ("nucleus_diameter", 0.0, r"nucleus_diameter\b.*\bpositive"),
        ("nucleus_epochs", -1, r"nucleus_epochs\b.*-1\b"),
    ],
)
def test_bad_values_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        core.Config(**{field: value})


def test_a_nucleus_diameter_is_for_patches_and_survives_the_round_trip():
    # Whole images resized to the input size have no nucleus size of their own: the original way stays
    # one flag away (--sampling resize), its one stage at that size.
    assert core.Config(sampling="resize").nucleus_diameter is None
    assert core.Config(nucleus_diameter=20, sampling="resize").nucleus_diameter is None
    config = core.Config(nucleus_diameter=22.5, nucleus_epochs=5)
    assert core.Config.from_dict(json.loads(config.to_json())) == config

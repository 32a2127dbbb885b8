"""The U-Net builder: shapes, parameter counts, size validation, blocks and a save/load round trip."""

import keras
import numpy as np
import pytest

import unet_model_core as core


def test_default_model_matches_the_described_architecture():
    model = core.build_unet()
    assert model.count_params() == 1_941_105
    assert model.output_shape == (None, 128, 128, 1)
    assert model.get_layer("probabilities").get_config()["activation"] == "sigmoid"


def test_original_paper_setting_gives_388_output_and_31m_parameters():
    model = core.build_unet((572, 572, 1), num_classes=2, channels=(64, 128, 256, 512, 1024), padding="valid")
    assert model.output_shape == (None, 388, 388, 2)
    assert model.count_params() == 31_030_658
    assert model.get_layer("probabilities").get_config()["activation"] == "softmax"


def test_fully_convolutional_model_accepts_any_multiple_of_16():
    model = core.build_unet((None, None, 3), channels=(4, 8, 16))
    for height, width in ((32, 48), (64, 16)):
        out = model.predict(np.zeros((1, height, width, 3), np.float32), verbose=0)
        assert out.shape == (1, height, width, 1)


@pytest.mark.parametrize("size, padding, nearest", [(100, "same", "96 or 112"), (570, "valid", "556 or 572")])
def test_bad_input_size_names_the_nearest_sizes(size, padding, nearest):
    with pytest.raises(ValueError, match=nearest):
        core.build_unet((size, size, 1), padding=padding)


def test_valid_model_needs_a_fixed_size():
    with pytest.raises(ValueError, match="fixed input size"):
        core.build_unet((None, None, 1), padding="valid")


def test_output_size_helpers():
    assert core.unet_output_size(572, 4, "valid") == 388
    assert core.unet_output_size(128, 4, "same") == 128
    assert core.unet_output_size(100, 4, "same") is None
    sizes = core.valid_input_sizes(4, "valid", 150, 300)
    assert sizes == [188, 204, 220, 236, 252, 268, 284, 300]
    # Every listed size really builds and gives the predicted output.
    model = core.build_unet((188, 188, 1), channels=(2, 2, 2, 2, 2), padding="valid")
    assert model.output_shape[1] == core.unet_output_size(188, 4, "valid") == 4


def test_blocks_are_pure_functions_with_named_layers():
    inputs = keras.Input((32, 32, 3))
    skip, pooled = core.down_block(inputs, 8, "enc1")
    assert tuple(skip.shape) == (None, 32, 32, 8) and tuple(pooled.shape) == (None, 16, 16, 8)
    mid = core.bottleneck(pooled, 16, "bottleneck")
    up = core.up_block(mid, skip, 8, "dec1")
    assert tuple(up.shape) == (None, 32, 32, 8)
    model = keras.Model(inputs, up)
    names = {layer.name for layer in model.layers}
    assert {"enc1_conv1", "enc1_conv2", "enc1_pool", "bottleneck_conv1", "dec1_upconv", "dec1_concat"} <= names


def test_unpadded_up_block_centre_crops_the_skip_map():
    inputs = keras.Input((36, 36, 1))
    skip, pooled = core.down_block(inputs, 4, "enc1", padding="valid")  # 32x32 skip, 16x16 pooled
    mid = core.bottleneck(pooled, 8, "bottleneck", padding="valid")  # 12x12
    up = core.up_block(mid, skip, 4, "dec1", padding="valid")  # 24x24 after upsampling, then 20x20
    assert tuple(up.shape) == (None, 20, 20, 4)
    assert "dec1_crop" in {layer.name for layer in keras.Model(inputs, up).layers}


def test_batch_norm_and_dropout_are_off_by_default_and_can_be_switched_on():
    plain = core.build_unet((32, 32, 3), channels=(4, 8))
    assert not any(isinstance(c, (keras.layers.BatchNormalization, keras.layers.Dropout)) for c in plain.layers)
    extra = core.build_unet((32, 32, 3), channels=(4, 8), batch_norm=True, dropout=0.2)
    kinds = {type(c) for c in extra.layers}
    assert keras.layers.BatchNormalization in kinds and keras.layers.Dropout in kinds


def test_compiled_model_round_trips_through_keras_file(tmp_path):
    # The default instance-aware model, with its cosine learning-rate schedule, as last.keras holds it.
    config = core.Config(image_size=32, channels=(4, 8, 16), loss="bce+dice")
    model = core.compile_unet(core.build_unet_from_config(config), config, total_steps=10)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    y = keras.utils.to_categorical((x[..., 0] > 85).astype(int) + (x[..., 0] > 170), 3).astype(np.float32)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.loss, core.BceDiceLoss)
    schedule = loaded.optimizer.learning_rate
    assert float(loaded.optimizer.iterations) == 1 and float(schedule) < config.learning_rate


@pytest.mark.parametrize("warmup", [0, 10])
def test_the_learning_rate_warms_up_linearly_then_decays_along_the_cosine(warmup):
    config = core.Config(image_size=32, channels=(4, 8), learning_rate=2e-3)
    model = core.compile_unet(core.build_unet_from_config(config), config, total_steps=110, warmup_steps=warmup)
    schedule = keras.optimizers.schedules.deserialize(model.optimizer.get_config()["learning_rate"])
    lr = [float(schedule(step)) for step in (0, 5, warmup, warmup + (110 - warmup) // 2, 110)]
    top = 2e-3
    if warmup:  # 0 at the first step, half way up after half the warm-up, the top at its end
        assert lr[:3] == pytest.approx([0.0, top / 2, top])
    else:
        assert lr[0] == pytest.approx(top)
    # Then the cosine over the steps left: half way between the top and its 2% floor at their middle.
    assert lr[3] == pytest.approx(top * (0.02 + 0.98 / 2), rel=1e-3) and lr[4] == pytest.approx(top * 0.02)


def test_residual_block_adds_its_input_to_the_convolutions():
    # With every kernel zero the convolutions give 0, so a residual block passes relu(input) through
    # its shortcut (same channel count: the identity), where a plain block gives 0.
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
    for block, expected in (("residual", np.maximum(x, 0)), ("plain", np.zeros_like(x))):
        inputs = keras.Input((8, 8, 4))
        model = keras.Model(inputs, core.conv_block(inputs, 4, "b", block=block))
        model.set_weights([np.zeros_like(w) for w in model.get_weights()])
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)


def test_residual_blocks_project_and_crop_the_shortcut_where_needed():
    model = core.build_unet((188, 188, 1), 3, (4, 8, 16), padding="valid", batch_norm=True, block="residual")
    plain = core.build_unet((188, 188, 1), 3, (4, 8, 16), padding="valid", batch_norm=True)
    assert model.output_shape == plain.output_shape
    names = {layer.name for layer in model.layers}
    assert {"enc1_shortcut", "enc1_shortcut_crop", "enc1_add", "bottleneck_add", "dec1_add"} <= names
    assert not any(name.endswith("_add") for name in (layer.name for layer in plain.layers))
    with pytest.raises(ValueError, match=r"block\b.*\bresidual\b"):  # the setting and a block that works
        core.Config(block="dense")


def test_a_residual_run_exports_the_same_model_for_prediction():
    from unet_nuclei import checkpoints

    config = core.Config(image_size=32, channels=(4, 8, 16), block="residual")
    model = core.build_unet_from_config(config)
    exported = checkpoints.export_inference_model(model, config)
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(exported.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert exported.input_shape == (None, None, None, 1) and exported.get_layer("enc1_add")

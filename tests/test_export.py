"""python -m unet_nuclei.export: the ONNX file reproduces Keras, and the BioImage Model Zoo package
validates with bioimageio.spec and reproduces its own test tensors (and passes bioimageio.core's test).

These need the export tools (requirements-export.txt, which requirements-dev.txt includes); without them
the tests are skipped, saying so."""

import json
import os
import tempfile
import zipfile

import cv2
import numpy as np
import pytest

# bioimageio keeps a download cache; the tests' goes to a scratch folder, never the user's ~/.cache.
os.environ.setdefault("BIOIMAGEIO_CACHE_PATH", tempfile.mkdtemp(prefix="unet_nuclei_test_bioimageio_"))

import unet_model_core as core
from conftest import run_main
from unet_nuclei import export, zoo
from unet_nuclei.segmenter import Segmenter

MISSING = "the export tools are missing: pip install -r requirements-export.txt"
for _module in ("onnx", "onnxruntime", "tf2onnx", "bioimageio.spec"):
    pytest.importorskip(_module, reason=MISSING)


@pytest.fixture(scope="module")
def exported(quick_run, tmp_path_factory):
    """The quick run exported once: ``(out folder, package path, stdout)``."""
    _, run, _ = quick_run
    out = tmp_path_factory.mktemp("exported")
    status, stdout, stderr = run_main(export, str(run), "--out", str(out), "--author", "Test Author")
    assert status == 0, stderr
    return out, out / "unet-nuclei-first.zip", stdout


def test_onnx_matches_keras_on_a_test_image_of_another_size(quick_run, exported):
    import onnx

    _, run, _ = quick_run
    out, _, stdout = exported
    assert "onnxruntime" in stdout
    segmenter = Segmenter.load(str(run))
    model, config = segmenter.model, segmenter.config
    image = export.test_image(config, 128, seed=5)[:96, :]  # 96 x 128: not the size it was exported with
    expected = model.predict_on_batch(image[None].astype(np.float32))
    got = export.onnx_predict(out / "model.onnx", image[None])
    assert got.shape == expected.shape == (1, 96, 128, 3)
    assert np.abs(got - expected).max() <= 1e-3
    proto = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == [
        "probabilities"
    ]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 1]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in proto.metadata_props}
    assert "divides by 255" in props["input_scaling"] and props["classes"] == "background,interior,boundary"


def test_zoo_package_validates_and_its_test_tensors_reproduce(exported, tmp_path):
    from bioimageio.spec import load_description

    _, package, _ = exported
    description = load_description(package)
    assert description.validation_summary.status == "valid-format", description.validation_summary.format()
    assert str(description.format_version).startswith("0.5")
    assert {c.doi for c in description.cite} == {"10.1007/978-3-319-24574-4_28", "10.1038/s41592-019-0612-7"}
    assert [a.name for a in description.authors] == ["Test Author"] and description.license == "MIT"
    steps = [step.id for step in description.inputs[0].preprocessing]
    assert steps[:4] == ["ensure_dtype", "scale_range", "clip", "scale_linear"]
    scale = description.inputs[0].preprocessing[1].kwargs
    assert (scale.min_percentile, scale.max_percentile) == (0.5, 99.8)
    assert [str(a.id) for a in description.inputs[0].axes] == ["batch", "y", "x", "channel"]
    assert description.weights.onnx is not None and description.weights.tensorflow_saved_model_bundle is not None
    with zipfile.ZipFile(package) as bundle:
        bundle.extractall(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "## Validation" in readme and "marker" in readme.lower() and "Edit > Invert" in readme
    cover = cv2.imread(str(tmp_path / "cover.png"))
    assert cover.shape[1] == 2 * cover.shape[0]  # the image beside its outlines
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] > 0
    # The test output is what the network gives for the test input after the spec's preprocessing.
    raw, expected = np.load(tmp_path / "test_input.npy"), np.load(tmp_path / "test_output.npy")
    config = core.Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    got = export.onnx_predict(tmp_path / "model.onnx", zoo.spec_preprocess(raw, config))
    assert np.abs(got - expected).max() <= 1e-3
    # So does the TensorFlow SavedModel, through the serving signature deepImageJ calls.
    import keras

    with zipfile.ZipFile(tmp_path / "tf_saved_model.zip") as bundle:
        bundle.extractall(tmp_path / "saved_model")
    layer = keras.layers.TFSMLayer(str(tmp_path / "saved_model"), call_endpoint="serving_default")
    saved = layer(zoo.spec_preprocess(raw, config))["probabilities"]
    assert np.abs(np.asarray(saved) - expected).max() <= 1e-3


def test_spec_preprocessing_is_close_to_the_projects():
    """For an 8-bit fluorescence image, the spec's scale_range + clip + scale_linear gives the project's
    model input to within the project's rounding to whole grey levels."""
    config = core.Config()
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(30, 8, (64, 80)), 0, 255).astype(np.uint8)
    image[20:40, 20:50] = np.clip(rng.normal(180, 20, (20, 30)), 0, 255).astype(np.uint8)  # a bright nucleus
    rgb = np.repeat(image[..., None], 3, axis=2)
    project = core.preprocess_image(rgb, "grey").astype(np.float32)
    spec = zoo.spec_preprocess(image[None, ..., None].astype(np.float32), config)[0]
    assert np.abs(project - spec).max() <= 0.5 + 1e-3


def test_bioimageio_core_test_passes_offline(exported, tmp_path, monkeypatch):
    pytest.importorskip("bioimageio.core", reason=MISSING)
    from bioimageio.core import test_description

    _, package, _ = exported
    monkeypatch.chdir(tmp_path)  # its TensorFlow adapter unzips the SavedModel into the working folder
    summary = test_description(package)
    assert summary.status == "passed", summary.format()


def test_existing_files_are_refused_and_unknown_models_named(quick_run, exported, tmp_path):
    _, run, _ = quick_run
    out, package, _ = exported
    before = package.stat().st_mtime_ns
    status, _, stderr = run_main(export, str(run), "--out", str(out))
    assert status == 2 and "exists" in stderr and "--overwrite" in stderr
    assert package.stat().st_mtime_ns == before
    status, _, stderr = run_main(export, str(tmp_path / "no-such-run"), "--out", str(tmp_path / "x"))
    assert status == 2 and "no-such-run" in stderr
    status, _, stderr = run_main(export, str(run), "--out", str(tmp_path / "only"), "--onnx-only")
    assert status == 0, stderr
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["model.onnx"]

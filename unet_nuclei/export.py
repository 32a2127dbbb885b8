"""The trained network outside this project: an ONNX file and a BioImage Model Zoo package.

    python -m unet_nuclei.export runs/my-run --out exported/       # a run (its folder, name or model.keras)
    python -m unet_nuclei.export dsb2018 --out exported/           # the shipped model

writes ``DIR/model.onnx`` and ``DIR/<name>.zip`` (``unet_nuclei.zoo``), and prints how far the ONNX
output is from Keras on a test image and how long each step took.  Needs the export tools:
``pip install -r requirements-export.txt``.

The ONNX file is the float32 network, whatever precision it trained in, with a dynamic batch, height and
width (for padded models; an unpadded one keeps its tile size).  Its input ``image`` is N x H x W x C
float32 grey values in 0..255 (C = 1 for grey models, 3 for RGB), already preprocessed the way the
project does it (``unet_model_core.preprocess_image``; the network's first layer divides by 255); its
output ``probabilities`` is N x H x W x K float32 (K = 3: background, nucleus interior, nucleus boundary,
summing to 1; or K = 1: the nucleus probability).  The file states this in its doc string and metadata.
Keras 3 writes it (``model.export(..., format="onnx")``, which runs tf2onnx on the TensorFlow backend);
it is accepted only when onnxruntime's output matches Keras within ``ONNX_TOLERANCE``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unet_model_core import Config, preprocess_image
from unet_nuclei import files

ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-3  # largest allowed difference of any probability between onnxruntime and Keras
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
EXPORT_TOOLS = "pip install -r requirements-export.txt"


class ExportError(RuntimeError):
    """The export tools are missing, or an exported file does not reproduce the Keras model."""


def class_names(config: Config) -> list[str]:
    """The output channels, in order."""
    return ["background", "interior", "boundary"] if config.num_classes == 3 else ["nucleus"]


def input_scaling(config: Config) -> str:
    """One sentence on what the network's input must be, for the ONNX file and the zoo package."""
    kind = (
        "one grey channel: the mean of the colour channels, bright nuclei on a dark background "
        "(bright-background images inverted), stretched so its 0.5th and 99.8th percentiles become 0 "
        "and 255"
        if config.input_channels == 1
        else "three channels, red, green and blue, as 8-bit values"
    )
    return (
        f"Input '{INPUT_NAME}': float32, batch x height x width x {config.input_channels} (NHWC), values "
        f"0..255, {kind}; the network divides by 255 itself.  Output '{OUTPUT_NAME}': float32, batch x "
        f"height x width x {config.num_classes}, the probabilities of {', '.join(class_names(config))}."
    )


def inference_copy(model, config: Config):
    """The float32 copy of ``model`` that any image size fits (``checkpoints.export_inference_model``)."""
    from unet_nuclei.checkpoints import export_inference_model

    return export_inference_model(model, config)


def test_image(config: Config, size: int = 128, seed: int = 0) -> np.ndarray:
    """A synthetic fluorescence image of ``size`` x ``size`` pixels as the network sees it (H x W x C
    uint8, the project's preprocessing), so that every export is checked on the same nuclei."""
    from unet_nuclei.synthetic import generate_sample

    image, _ = generate_sample(np.random.default_rng(seed), size, size, "fluorescence")
    return preprocess_image(image, config.preprocessing)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportError(f"the export needs the {module.split('.')[0]} package ({error}); {EXPORT_TOOLS}") from None


def write_onnx(model, config: Config, path, overwrite: bool = False) -> Path:
    """Write ``model`` (an inference copy, ``inference_copy``) as ONNX to ``path``, whole or not at all,
    with named inputs and dimensions and the input scaling in its doc string and metadata."""
    import keras

    onnx = _require("onnx")
    _require("tf2onnx")
    files.refuse_existing([path], overwrite)
    size = None if config.padding == "same" else config.image_size
    signature = [keras.InputSpec(shape=(None, size, size, config.input_channels), dtype="float32", name=INPUT_NAME)]
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / ONNX_FILE
        model.export(str(raw), format="onnx", input_signature=signature, verbose=False)
        proto = onnx.load(str(raw))
    graph = proto.graph
    # tf2onnx names the output after TensorFlow's "Identity:0" and the dimensions "unk__N": give them the
    # names a user reads in Netron, onnxruntime and the zoo package.
    old_output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if name == old_output else name for name in node.output]
    graph.output[0].name = OUTPUT_NAME
    for tensor in (graph.input[0], graph.output[0]):
        for dim, name in zip(tensor.type.tensor_type.shape.dim, ("batch", "height", "width")):
            if not dim.HasField("dim_value"):
                dim.dim_param = name
    proto.doc_string = "U-Net nucleus segmentation (unet_nuclei). " + input_scaling(config)
    onnx.helper.set_model_props(
        proto,
        {
            "input_scaling": input_scaling(config),
            "classes": ",".join(class_names(config)),
            "preprocessing": config.preprocessing,
            "size_multiple": str(2**config.depth),
            "threshold": str(config.threshold),
            "marker_threshold": str(config.marker_threshold),
            "min_nucleus_size": str(config.min_nucleus_size),
            "min_confidence": str(config.min_confidence),
            "nucleus_diameter": str(config.nucleus_diameter),
        },
    )
    onnx.checker.check_model(proto)
    return files.write_bytes(path, proto.SerializeToString(), overwrite)


def onnx_opset(path) -> int:
    """The ONNX opset (default domain) that a file uses."""
    onnx = _require("onnx")
    return next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    )


def onnx_predict(path, batch: np.ndarray) -> np.ndarray:
    """Run an exported ONNX file on an N x H x W x C batch with onnxruntime (CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(batch, np.float32)})[0]


def check_onnx(model, path, images) -> float:
    """The largest difference between onnxruntime's and Keras's probabilities on ``images`` (each H x W x C);
    ExportError when it exceeds ``ONNX_TOLERANCE``."""
    worst = 0.0
    for image in images:
        batch = np.asarray(image, np.float32)[None]
        expected = np.asarray(model.predict_on_batch(batch), np.float32)
        got = onnx_predict(path, batch)
        if got.shape != expected.shape:
            raise ExportError(f"{path}: ONNX output shape {got.shape} differs from Keras's {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(
            f"{path}: the ONNX output differs from Keras by up to {worst:.2e} (allowed: "
            f"{ONNX_TOLERANCE:.0e}); the file is not usable"
        )
    return worst


def export(
    model_name=None,
    out_dir="exported",
    runs_dir="runs",
    name: str | None = None,
    authors=(),
    maintainers=(),
    licence: str = "MIT",
    overwrite: bool = False,
    zoo_package: bool = True,
) -> dict:
    """Export a run, model file or shipped model (``pretrained.resolve_model``) into ``out_dir``: the
    ONNX file, checked against Keras, and the zoo package.  Returns what was written and measured:
    ``onnx``, ``package`` (paths), ``onnx_difference``, ``seconds`` (per step) and ``sizes`` (bytes)."""
    import keras

    from unet_nuclei import zoo
    from unet_nuclei.segmenter import Segmenter

    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"the export runs on Keras's TensorFlow backend (tf2onnx, SavedModel), not "
            f"{keras.backend.backend()!r}: run it with KERAS_BACKEND=tensorflow"
        )
    started = time.perf_counter()
    segmenter = Segmenter.load(model_name, runs_dir)
    model, config, info, run_dir = segmenter.model, segmenter.config, segmenter.run_info, segmenter.run_dir
    name = name or zoo.package_name(run_dir)
    out_dir = files.check_writable(out_dir, "--out")
    onnx_path, package_path = out_dir / ONNX_FILE, out_dir / f"{name}.zip"
    files.refuse_existing([onnx_path] + ([package_path] if zoo_package else []), overwrite)
    if zoo_package:
        _require("bioimageio.spec")
    copy = inference_copy(model, config)
    seconds = {"load": time.perf_counter() - started}
    started = time.perf_counter()
    write_onnx(copy, config, onnx_path, overwrite)
    seconds["onnx"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        difference = check_onnx(copy, onnx_path, [test_image(config, 128, seed) for seed in (0, 1)])
        seconds["onnx_check"] = time.perf_counter() - started
    except BaseException:
        onnx_path.unlink(missing_ok=True)  # a file that does not reproduce the model is not left behind
        raise
    result = {
        "onnx": onnx_path,
        "onnx_difference": difference,
        "seconds": seconds,
        "sizes": {"onnx": onnx_path.stat().st_size},
        "run_dir": run_dir,
        "chosen_because": info["chosen_because"],
    }
    if zoo_package:
        started = time.perf_counter()
        zoo.write_package(
            copy,
            config,
            info,
            run_dir,
            onnx_path,
            package_path,
            name=name,
            authors=authors,
            maintainers=maintainers,
            licence=licence,
            overwrite=overwrite,
        )
        seconds["package"] = time.perf_counter() - started
        result["package"] = package_path
        result["sizes"]["package"] = package_path.stat().st_size
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unet_nuclei.export",
        description="Export a trained U-Net for use outside this project: DIR/model.onnx (onnxruntime, "
        "and any ONNX runtime) and DIR/NAME.zip, a BioImage Model Zoo package for deepImageJ, "
        "ilastik, QuPath and bioimage.io. Needs: " + EXPORT_TOOLS,
    )
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a run name, a run folder or its model.keras, or a shipped model's name (default: "
        "the newest run in --runs-dir, else the shipped dsb2018)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write model.onnx and NAME.zip into")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", help="where Train.py saved runs (default: runs)")
    parser.add_argument("--name", help="the package's file name, without .zip (default: unet-nuclei-<run name>)")
    parser.add_argument(
        "--author",
        action="append",
        default=[],
        metavar="NAME",
        help="an author of the model, for the package (repeat for several; default: 'unet_nuclei contributors')",
    )
    parser.add_argument(
        "--maintainer",
        action="append",
        default=[],
        metavar="GITHUB_USER",
        help="a maintainer's GitHub user name, for the package (bioimage.io asks for one to upload)",
    )
    parser.add_argument(
        "--licence",
        default="MIT",
        metavar="SPDX",
        help="the weights' licence as an SPDX identifier, for the package (default: MIT)",
    )
    parser.add_argument("--onnx-only", action="store_true", help="write model.onnx only, no zoo package")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files (default: refuse)")
    args = parser.parse_args(argv)
    try:
        result = export(
            args.model,
            args.out,
            args.runs_dir,
            args.name,
            args.author,
            args.maintainer,
            args.licence,
            args.overwrite,
            zoo_package=not args.onnx_only,
        )
    except (ExportError, OSError, ValueError) as error:  # ModelError and FileExistsError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds, sizes = result["seconds"], result["sizes"]
    print(f"Model: {result['run_dir']} ({result['chosen_because']})")
    print(
        f"{result['onnx']}: {sizes['onnx'] / 1e6:.1f} MB, written in {seconds['onnx']:.1f}s; onnxruntime matches "
        f"Keras within {result['onnx_difference']:.1e} on the test images"
    )
    if "package" in result:
        print(
            f"{result['package']}: {sizes['package'] / 1e6:.1f} MB, written and validated in "
            f"{seconds['package']:.1f}s (bioimageio.spec format 0.5)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A BioImage Model Zoo package of a trained U-Net (bioimage.io, model spec format 0.5), for deepImageJ
(Fiji), ilastik, QuPath and the bioimage.io website.

``write_package`` writes one zip, whole or not at all, validated with ``bioimageio.spec`` before it is
renamed into place.  It holds ``rdf.yaml`` (the description: authors, licence, citations, tensors and
their axes, preprocessing, weights), the weights twice (``model.onnx``, and ``tf_saved_model.zip``, a
TensorFlow SavedModel for deepImageJ's TensorFlow engine), ``test_input.npy`` and ``test_output.npy``
(a synthetic fluorescence image and the network's output for it), ``cover.png`` (the image and its
nuclei's outlines), the run's ``config.json``, and ``README.md``, the model's documentation: inputs,
preprocessing and where it differs from the project's, outputs, how to turn the three classes into
nuclei, and a "Validation" section.

The preprocessing is written in the spec's own operations, which consumers run themselves:
``scale_range`` between the 0.5th and 99.8th percentiles per image, ``clip`` to [0, 1] and
``scale_linear`` by 255, because the network divides its input by 255.  What the spec cannot say (the
inversion of bright-background images, rounding to whole grey levels) is in the README.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from unet_model_core import Config
from unet_nuclei import files
from unet_nuclei.export import (
    INPUT_NAME,
    ONNX_FILE,
    ONNX_TOLERANCE,
    OUTPUT_NAME,
    ExportError,
    class_names,
    onnx_opset,
    onnx_predict,
)
from unet_nuclei.plots import draw_outlines
from unet_nuclei.postprocess import MIN_MARKER_SIZE, PostProcessing

SPEC_FORMAT = "0.5"
SAVED_MODEL_FILE = "tf_saved_model.zip"
TEST_SIZE = 128  # pixels a side of the test image
HALO = 16  # pixels a consumer should crop from each side of a tile's output
# The project's percentiles (unet_model_core.percentile_range), and the spec's default epsilon.
LOW_PERCENTILE, HIGH_PERCENTILE, SCALE_EPS = 0.5, 99.8, 1e-6
# (text, DOI): the U-Net paper and the DSB-2018 data.
CITATIONS = (
    (
        (
            "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
            "MICCAI 2015, LNCS 9351, 234-241 (2015)."
        ),
        "10.1007/978-3-319-24574-4_28",
    ),
    (
        (
            "Caicedo J.C. et al. Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
            "Nature Methods 16, 1247-1253 (2019). The DSB-2018 images and annotations (BBBC038v1, CC0)."
        ),
        "10.1038/s41592-019-0612-7",
    ),
)
DEFAULT_AUTHOR = "unet_nuclei contributors"


def package_name(run_dir) -> str:
    """The default package name for a run folder: ``unet-nuclei-<run name>``, in safe characters."""
    return "unet-nuclei-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir).name).strip("-.") or "model")


def spec_preprocess(batch: np.ndarray, config: Config) -> np.ndarray:
    """What a consumer's spec preprocessing makes of a raw N x H x W x C float32 batch: for grey models
    ``scale_range`` (0.5th to 99.8th percentile of each image and channel, eps 1e-6), ``clip`` to [0, 1]
    and ``scale_linear`` by 255; RGB models take 0..255 values as they are."""
    batch = np.asarray(batch, np.float32)
    if config.preprocessing != "grey":
        return batch
    low, high = np.percentile(batch, (LOW_PERCENTILE, HIGH_PERCENTILE), axis=(1, 2), keepdims=True)
    scaled = (batch - low) / (high - low + SCALE_EPS)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.float32)


def test_input(config: Config, size: int = TEST_SIZE, seed: int = 0) -> np.ndarray:
    """The package's test input: a synthetic fluorescence image as a consumer holds it, 1 x H x W x C
    float32 (the grey mean of its colour channels for grey models, its 0..255 RGB values for RGB ones)."""
    from unet_nuclei.synthetic import generate_sample

    image, _ = generate_sample(np.random.default_rng(seed), size, size, "fluorescence")
    raw = image.mean(axis=2, keepdims=True) if config.input_channels == 1 else image
    return raw.astype(np.float32)[None]


def _cover(raw: np.ndarray, output: np.ndarray, config: Config, path: Path) -> None:
    """The image beside its nuclei's outlines (found with the run's post-processing), 2:1, enlarged."""
    grey = spec_preprocess(raw, config)[0]
    shown = np.clip(grey, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(shown, cv2.COLOR_GRAY2RGB) if shown.shape[-1] == 1 else shown
    labels = PostProcessing.of(config).nuclei(output[0])
    side = np.concatenate([rgb, draw_outlines(rgb, labels)], axis=1)
    side = cv2.resize(side, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), cv2.cvtColor(side, cv2.COLOR_RGB2BGR))


def _samples(raw: np.ndarray, output: np.ndarray, folder: Path) -> None:
    """The sample tensors, for people: the test input and output as 8-bit PNGs (the output's classes as
    colour channels)."""
    cv2.imwrite(str(folder / "sample_input.png"), np.clip(raw[0], 0, 255).astype(np.uint8)[..., ::-1])
    probabilities = np.clip(np.rint(output[0] * 255), 0, 255).astype(np.uint8)
    cv2.imwrite(str(folder / "sample_output.png"), probabilities[..., ::-1])


def _saved_model(model, config: Config, path: Path) -> None:
    """The network as a zipped TensorFlow SavedModel whose serving signature maps ``INPUT_NAME`` to a
    dict holding ``OUTPUT_NAME`` (what deepImageJ and bioimageio.core's TensorFlow adapter call).

    A plain ``tf.Module`` holds the weights once; Keras's own SavedModel export stores every variable
    twice (under the layers and in a flat list), doubling the file."""
    import tensorflow as tf

    size = None if config.padding == "same" else config.image_size

    @tf.function(
        input_signature=[tf.TensorSpec((None, size, size, config.input_channels), tf.float32, name=INPUT_NAME)]
    )
    def serve(image):
        return {OUTPUT_NAME: model(image, training=False)}

    module = tf.Module()
    module.weights = [weight.value for weight in model.weights]  # the TensorFlow variables behind Keras's
    module.serve = serve
    with tempfile.TemporaryDirectory() as scratch:
        tf.saved_model.save(module, scratch, signatures={"serving_default": serve})
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
            for file in sorted(Path(scratch).rglob("*")):
                if file.is_file():
                    bundle.write(file, file.relative_to(scratch).as_posix())


def post_processing_rule(config: Config) -> str:
    """How to turn the 3-class output into nuclei without this project, in words, with the run's values."""
    if config.num_classes != 3:
        return (
            f"Threshold the nucleus probability at {config.threshold:.2f}, split touching nuclei with a "
            f"distance-transform watershed, and drop pieces smaller than {config.min_nucleus_size} pixels."
        )
    return f"""\
The network gives, for every pixel, the probabilities of background (channel 0), nucleus interior
(channel 1) and nucleus boundary (channel 2). The project turns them into nuclei with these steps and
the values chosen on the run's validation images:

1. Markers: the connected regions (4-connected) where the interior probability exceeds
   {config.marker_threshold:.2f}; regions smaller than {MIN_MARKER_SIZE} pixels are dropped.
2. Nucleus area: the pixels where 1 - background probability exceeds {config.threshold:.2f}, plus the markers.
3. A marker-controlled watershed on the inverted interior probability (1 - interior, or -interior),
   flooding from the markers and restricted to the nucleus area, gives each marker its nucleus; touching
   nuclei part where the network saw their boundary.
4. Pieces of nucleus area that no marker reached become nuclei of their own (8-connected regions).
5. Nuclei smaller than {config.min_nucleus_size} pixels are dropped{
        ""
        if not config.min_confidence
        else f", and so are those whose mean 1 - background probability is below {config.min_confidence:.2f}"
    }.

In Fiji with MorphoLibJ: threshold channel 1 above {config.marker_threshold:.2f} (Image > Adjust > Threshold,
Apply) and label it (Plugins > MorphoLibJ > Binary Images > Connected Components Labeling, connectivity
4) for the markers; threshold channel 0 below {1 - config.threshold:.2f} for the nucleus area; multiply a 32-bit copy
of channel 1 by -1 (Process > Math > Multiply); then Plugins > MorphoLibJ > Segmentation >
Marker-controlled Watershed with that copy as input, the markers and the nucleus area as mask. In
Python, scikit-image's `skimage.segmentation.watershed(-interior, markers, mask=nucleus_area)` is step 3.
"""


def _shareable(info: dict) -> dict:
    """A run's config.json without this machine's details (as ``pretrained.package_run`` ships it)."""
    from unet_nuclei.pretrained import DROPPED_KEYS

    data_dir = Path(str(info.get("data_dir") or ""))
    kept = {k: v for k, v in info.items() if k not in (*DROPPED_KEYS, "chosen_because")}
    kept["data_dir"] = str(Path("dataset") / data_dir.name) if data_dir.name else ""
    return kept


def _training_data(info: dict) -> str:
    folder = Path(str(info.get("data_dir") or "")).name
    if folder == "stage1_train":
        return "the DSB-2018 training images (BBBC038v1, CC0 1.0; Caicedo et al. 2019)"
    if folder.startswith("synthetic_sample"):
        return "the unet_nuclei project's built-in synthetic sample (no real images: a model for trying things out)"
    return f"the images in `{folder}`" if folder else "images not recorded in its config.json"


def _readme(config: Config, info: dict, run_dir: Path, name: str, difference: float) -> str:
    diameter = (
        f"The project resizes every image so that its nuclei are about {config.nucleus_diameter:g} "
        f"pixels across before predicting (a first pass finds them); resize your images likewise "
        f"(in Fiji: Image > Scale) for the best results."
        if config.nucleus_diameter
        else "The network predicts at the image's own scale."
    )
    scores = info.get("val_scores") or {}
    score_line = (
        f"On its validation images: DSB score {scores['dsb_score']:.3f}, Dice {scores['dice']:.3f}."
        if "dsb_score" in scores and "dice" in scores
        else ""
    )
    grey = config.input_channels == 1
    kind = "1 channel, grey, bright nuclei on a dark background" if grey else "3 channels, RGB"
    return f"""\
# {name}: U-Net nucleus segmentation

A U-Net (Ronneberger et al. 2015) that segments cell nuclei in microscopy images, trained by the
unet_nuclei project (run `{run_dir.name}`) on {_training_data(info)}. {score_line}

## Input
`{INPUT_NAME}`: batch x y x x x channel (NHWC), float32, {kind}; height and width any multiple of
{2**config.depth} (at least 64 here). After the preprocessing below the values are 0..255: the network
divides them by 255 itself.

## Preprocessing
{
        "The package states it in the spec's own operations, which deepImageJ, ilastik and bioimageio.core run: "
        "`scale_range` between the 0.5th and 99.8th percentiles of each image, `clip` to [0, 1], then "
        "`scale_linear` by 255 (the network divides by 255 itself)."
        if grey
        else "None beyond float32: give 8-bit RGB values 0..255."
    }

Where it differs from the project's own preprocessing (`unet_model_core.preprocess_image`):
{
        "- The project inverts bright-background images (brightfield, H&E-like stains: dark nuclei on a light "
        "background; the median of the stretched image above 0.33) so that nuclei are always bright on dark. The "
        "spec cannot express that choice: invert such images yourself first (Fiji: Edit > Invert)."
        if grey
        else ""
    }
{
        "- The project averages the colour channels to one grey channel: give a grey image (Fiji: Image > Type > "
        "8-bit, or 32-bit)."
        if grey
        else ""
    }
{
        "- The project rounds the stretched values to whole grey levels (8-bit) and never stretches a range narrower "
        "than 16 grey levels (a flat image stays flat); the spec's values are not rounded, and a nearly flat image "
        "is stretched to full range."
        if grey
        else "- The project stretches images of more than 8 bits between "
        "their 0.5th and 99.8th percentiles; convert such images to 8-bit first."
    }
- {diameter}

## Output
`{OUTPUT_NAME}`: batch x y x x x channel, float32, {config.num_classes} channel(s): {", ".join(class_names(config))}
(a softmax: they sum to 1). A consumer that tiles large images should crop {HALO} pixels from each side of
each tile's output (the halo in rdf.yaml).

## From the output to nuclei
{post_processing_rule(config)}
The values are in rdf.yaml (`config.unet_nuclei`) and in the attached `config.json` (`threshold`,
`marker_threshold`, `min_nucleus_size`, `min_confidence`).

## Weights
- `{ONNX_FILE}`: ONNX, float32, dynamic batch, height and width (onnxruntime; deepImageJ's ONNX engine).
- `{SAVED_MODEL_FILE}`: TensorFlow SavedModel (serving signature `serving_default`), for deepImageJ's
  TensorFlow 2 engine and bioimageio.core.

## Validation
- When the package was written, onnxruntime's output matched Keras within {difference:.1e} (allowed:
  {ONNX_TOLERANCE:.0e}) on two synthetic test images, and the package passed `bioimageio.spec`'s validation
  (format {SPEC_FORMAT}); `test_output.npy` is the network's output for `test_input.npy` after the
  preprocessing above.
- To check it yourself: `pip install bioimageio.core onnxruntime` (and tensorflow for the SavedModel), then
  `bioimageio test {name}.zip`. It needs no network unless the package names maintainers (their GitHub
  accounts are looked up): then, offline, set `BIOIMAGEIO_PERFORM_IO_CHECKS=false`, which skips every
  check that needs the network (local files are still checked).
- In Python without bioimageio: `onnxruntime.InferenceSession("{ONNX_FILE}").run(None, {{"{INPUT_NAME}": x}})` on
  `x` = `test_input.npy` preprocessed as above reproduces `test_output.npy`.

## Training data and citations
Trained on {_training_data(info)}. Cite the U-Net paper and, for the DSB-2018 data, Caicedo et al.,
Nature Methods 16, 1247-1253 (2019) (rdf.yaml, `cite`).
"""


def _spec_description(
    config: Config,
    info: dict,
    name: str,
    authors,
    maintainers,
    licence: str,
    folder: Path,
    weights_sources: dict,
    tensorflow_version: str,
    opset: int,
):
    from bioimageio.spec.model import v0_5 as spec

    grey = config.input_channels == 1
    step = 2**config.depth
    y, x = spec.AxisId("y"), spec.AxisId("x")
    if config.padding == "same":
        size = spec.ParameterizedSize(min=max(64, step), step=step)
        input_space = [spec.SpaceInputAxis(id=y, size=size), spec.SpaceInputAxis(id=x, size=size)]
    else:
        input_space = [
            spec.SpaceInputAxis(id=y, size=config.image_size),
            spec.SpaceInputAxis(id=x, size=config.image_size),
        ]
    channels = ["grey"] if grey else ["red", "green", "blue"]
    preprocessing = [spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))]
    if grey:
        preprocessing += [
            spec.ScaleRangeDescr(
                kwargs=spec.ScaleRangeKwargs(
                    axes=[y, x], min_percentile=LOW_PERCENTILE, max_percentile=HIGH_PERCENTILE, eps=SCALE_EPS
                )
            ),
            spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
            spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=255.0, offset=0.0)),
        ]
    input_id, output_id = spec.TensorId(INPUT_NAME), spec.TensorId(OUTPUT_NAME)
    inputs = [
        spec.InputTensorDescr(
            id=input_id,
            description=("grey image, bright nuclei on dark" if grey else "RGB image, 8-bit values"),
            axes=[
                spec.BatchAxis(),
                *input_space,
                spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in channels]),
            ],
            test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
            sample_tensor=spec.FileDescr(source=folder / "sample_input.png"),
            preprocessing=preprocessing,
        )
    ]
    output_space = [
        spec.SpaceOutputAxisWithHalo(id=axis, halo=HALO, size=spec.SizeReference(tensor_id=input_id, axis_id=axis))
        for axis in (y, x)
    ]
    outputs = [
        spec.OutputTensorDescr(
            id=output_id,
            description="probabilities of " + ", ".join(class_names(config)),
            axes=[
                spec.BatchAxis(),
                *output_space,
                spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in class_names(config)]),
            ],
            test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
            sample_tensor=spec.FileDescr(source=folder / "sample_output.png"),
        )
    ]
    weights = spec.WeightsDescr(
        tensorflow_saved_model_bundle=spec.TensorflowSavedModelBundleWeightsDescr(
            source=weights_sources["tensorflow_saved_model_bundle"], tensorflow_version=tensorflow_version
        ),
        onnx=spec.OnnxWeightsDescr(
            source=weights_sources["onnx"], opset_version=opset, parent="tensorflow_saved_model_bundle"
        ),
    )
    post = {
        "threshold": config.threshold,
        "marker_threshold": config.marker_threshold,
        "min_marker_size": MIN_MARKER_SIZE,
        "min_nucleus_size": config.min_nucleus_size,
        "min_confidence": config.min_confidence,
        "nucleus_diameter": config.nucleus_diameter,
        "preprocessing": config.preprocessing,
        "trained_in": "unet_nuclei",
        "run": info.get("run_name"),
    }
    return spec.ModelDescr(
        name=name,
        description=(
            "U-Net for cell nucleus segmentation in fluorescence, brightfield and stained-tissue "
            "images: per-pixel probabilities of " + ", ".join(class_names(config)) + "."
        ),
        authors=[spec.Author(name=a) for a in (authors or [DEFAULT_AUTHOR])],
        maintainers=[spec.Maintainer(github_user=m) for m in maintainers],
        cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in CITATIONS],
        license=spec.LicenseId(licence),
        tags=[
            "unet",
            "nuclei",
            "segmentation",
            "instance-segmentation",
            "fluorescence-light-microscopy",
            "2d",
            "keras",
            "tensorflow",
            "onnx",
            "dsb2018",
        ],
        documentation=spec.FileDescr(source=folder / "README.md"),
        covers=[spec.FileDescr(source=folder / "cover.png")],
        attachments=[spec.FileDescr(source=folder / "config.json")],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config=spec.Config(
            bioimageio=spec.BioimageioConfig(
                reproducibility_tolerance=[
                    spec.ReproducibilityTolerance(absolute_tolerance=ONNX_TOLERANCE, relative_tolerance=ONNX_TOLERANCE)
                ]
            ),
            unet_nuclei=post,
        ),
    )


def write_package(
    model,
    config: Config,
    info: dict,
    run_dir,
    onnx_path,
    path,
    name: str | None = None,
    authors=(),
    maintainers=(),
    licence: str = "MIT",
    overwrite: bool = False,
) -> Path:
    """Write the zoo package of ``model`` (an inference copy; ``onnx_path`` its ONNX file) to ``path``,
    validated with ``bioimageio.spec``, whole or not at all.  ExportError when it does not validate or its
    test output is not reproduced by the ONNX file.  ``maintainers`` are GitHub user names (bioimage.io
    wants one to upload); bioimageio.spec would look them up on GitHub, so with maintainers the
    validation here skips its network checks (``perform_io_checks``)."""
    import tensorflow as tf
    from bioimageio.spec import get_validation_context, load_description, save_bioimageio_package

    run_dir, path = Path(run_dir), Path(path)
    name = name or package_name(run_dir)
    files.refuse_existing([path], overwrite)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "package"
        folder.mkdir()
        raw = test_input(config)
        preprocessed = spec_preprocess(raw, config)
        output = np.asarray(model.predict_on_batch(preprocessed), np.float32)
        difference = float(np.abs(onnx_predict(onnx_path, preprocessed) - output).max())
        if not difference <= ONNX_TOLERANCE:
            raise ExportError(f"{onnx_path} does not reproduce the test output (difference {difference:.2e})")
        np.save(folder / "test_input.npy", raw)
        np.save(folder / "test_output.npy", output)
        _cover(raw, output, config, folder / "cover.png")
        _samples(raw, output, folder)
        shutil.copyfile(onnx_path, folder / ONNX_FILE)
        _saved_model(model, config, folder / SAVED_MODEL_FILE)
        (folder / "config.json").write_text(json.dumps(_shareable(info), indent=2, default=str) + "\n")
        (folder / "README.md").write_text(_readme(config, info, run_dir, name, difference))
        sources = {"onnx": folder / ONNX_FILE, "tensorflow_saved_model_bundle": folder / SAVED_MODEL_FILE}
        offline = get_validation_context().replace(perform_io_checks=False) if maintainers else contextlib.nullcontext()
        with offline:
            description = _spec_description(
                config,
                info,
                name,
                authors,
                maintainers,
                licence,
                folder,
                sources,
                tf.__version__.split("+")[0],
                onnx_opset(onnx_path),
            )
            package = Path(scratch) / "package.zip"
            save_bioimageio_package(description, output_path=package)
            check = load_description(package)
        if check.validation_summary.status not in ("passed", "valid-format"):
            errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in check.validation_summary.errors)
            raise ExportError(f"the zoo package does not validate: {errors}")
        return files.write_with(path, lambda temporary: shutil.copyfile(package, temporary), overwrite)

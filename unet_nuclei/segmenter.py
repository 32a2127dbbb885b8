"""The one way from an image to its nuclei: ``Segmenter``.

A ``Segmenter`` holds a trained U-Net with its run's ``Config`` and owns every step that turns an image
into nuclei, in this order:

    preprocessing   the image made grey, bright nuclei on dark and contrast-stretched, as in training
                    (``unet_model_core.preprocess_image``);
    first pass      the model's class probabilities at the image's own scale, by overlap-tile
                    (``tiling.predict_view``);
    nucleus scale   for a model trained at one nucleus size (``Config.nucleus_diameter``), the nuclei of the
                    first pass give the image's scale, and the image resized to it is predicted again;
    TTA             that pass averaged over the image's 8 flips and rotations (``Config.tta``);
    post-processing the probabilities made nuclei with the thresholds the run chose
                    (``postprocess.PostProcessing``).

``Predict_mask.py``, the end of training (``training.finalize``), the evaluation, the notebook and the
benchmarks all go through it, so they see the same nuclei.  ``Segmenter.load`` opens a run folder, a model
file or a shipped model; ``segment`` gives a ``Prediction``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from unet_model_core import Config, LoadedSample, nucleus_scale, preprocess_image, rescale_view, resize_image
from unet_nuclei.metrics import Scores, count_instances, score_image
from unet_nuclei.postprocess import PostProcessing, foreground_probability
from unet_nuclei.runs import DEFAULT_RUNS_DIR, open_run
from unet_nuclei.tiling import predict_view

log = logging.getLogger(__name__)

# A first pass that finds the nuclei within this factor of ``Config.nucleus_diameter`` is kept as it is.
RESCALE_TOLERANCE = 2**0.25
# The most pixels a rescaled image may have: a larger one is rescaled less, to fit.
MAX_RESCALED_PIXELS = 2**26
# Images of at least this many pixels show a progress bar of their tiles.
PROGRESS_PIXELS = 2**21


class ModelError(ValueError):
    """A model file that cannot be used for prediction (unreadable, or not a U-Net of this project)."""


def load_unet(path) -> keras.Model:
    """Load a ``.keras`` file and check that it is a U-Net of this project (clear error otherwise)."""
    path = Path(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file; all mean "cannot use this file".
        if path.is_file():
            # Keras says "File not found" for any file that is not a readable .keras archive.
            raise ModelError(
                f"{path}: the file exists but is damaged or not a .keras model file "
                f"({type(error).__name__}); train the run again, or pass --model with "
                f"another run"
            ) from error
        raise ModelError(
            f"{path}: cannot be loaded as a Keras model ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    names = {layer.name for layer in getattr(model, "layers", [])}
    if not {"rescale", "enc1_conv1", "probabilities"} <= names:
        raise ModelError(
            f"{path}: this Keras model is not a U-Net of this project (it lacks the "
            f"'rescale', 'enc1_conv1' and 'probabilities' layers). Use a model.keras "
            f"written by Train.py"
        )
    return model


@dataclasses.dataclass
class Prediction:
    """One image's prediction: its nucleus probability, nuclei and count, with scores when the truth is
    known.

    The arrays may be dropped (``summary``) once the files are written, so that predicting a folder of
    large images keeps only a few numbers per image."""

    name: str
    height: int
    width: int
    count: int
    image: np.ndarray | None = None  # H x W x 3 uint8 RGB
    probability: np.ndarray | None = None  # H x W nucleus probability, in the output's float dtype
    labels: np.ndarray | None = None  # H x W int32 instances
    truth_labels: np.ndarray | None = None
    scores: Scores | None = None

    @classmethod
    def from_output(
        cls,
        name: str,
        image: np.ndarray,
        output: np.ndarray,
        post: PostProcessing,
        truth_labels: np.ndarray | None = None,
    ) -> Prediction:
        """Find the nuclei of a model ``output`` (H x W x K) once, and score them when ``truth_labels``
        are given."""
        labels = post.nuclei(output)
        scores = score_image(truth_labels, labels) if truth_labels is not None else None
        height, width = labels.shape
        return cls(
            name,
            height,
            width,
            count_instances(labels),
            image,
            foreground_probability(output),
            labels,
            truth_labels,
            scores,
        )

    def summary(self) -> Prediction:
        """The same prediction without its arrays."""
        return dataclasses.replace(self, image=None, probability=None, labels=None, truth_labels=None)


@dataclasses.dataclass
class Segmenter:
    """A trained U-Net and everything that turns an image into its nuclei (see the module's docstring).

    ``tile_size`` (None: shaped to each image), ``batch_size`` (tiles per forward pass) and ``tta`` (None:
    the run's setting) are prediction options; ``post`` is the run's post-processing unless given.
    ``run_info`` and ``run_dir`` say where the model came from (``load``)."""

    model: keras.Model
    config: Config
    tile_size: int | None = None
    batch_size: int = 4
    tta: bool | None = None
    post: PostProcessing | None = None
    run_info: dict = dataclasses.field(default_factory=dict)
    run_dir: Path | None = None

    def __post_init__(self):
        if self.tta is None:
            self.tta = self.config.tta
        if self.post is None:
            self.post = PostProcessing.of(self.config)

    @classmethod
    def load(cls, run_or_file=None, runs_root=DEFAULT_RUNS_DIR, **options) -> Segmenter:
        """The segmenter of a run name or folder, a model file, or a shipped model's name; by default the
        newest run, else the shipped model (``runs.open_run``).  Architecture, preprocessing and
        post-processing come from the run, never from flags; ``options`` are the prediction options."""
        config, info, run_dir, model_path = open_run(run_or_file, runs_root)
        return cls(load_unet(model_path), config, run_info=info, run_dir=run_dir, **options)

    def native_probabilities(self, image: np.ndarray, tta: bool = False, progress=None, dtype=np.float32) -> np.ndarray:
        """The model's class probabilities (H x W x K, ``dtype``) for an H x W x 3 uint8 image of any size,
        at the image's own scale.

        The image is preprocessed as in training and predicted by overlap-tile (``tiling.predict_view``).
        ``dtype`` float16 halves the result (a large image's biggest buffer); the blending is float32
        either way.  With ``tta`` the image is predicted in its 8 flips and rotations and the
        probabilities are averaged in float32 (8 times the work, and a float32 sum).  ``progress(done,
        total)`` is told of the tiles done (without ``tta``)."""
        view = preprocess_image(np.asarray(image), self.config.preprocessing)
        if not tta:
            return self._forward(view, progress, dtype)
        total = None
        for turns in range(4):
            for flip in (False, True):
                oriented = np.rot90(view, turns)
                oriented = np.ascontiguousarray(oriented[:, ::-1] if flip else oriented)
                output = self._forward(oriented, None, dtype)
                output = np.rot90(output[:, ::-1] if flip else output, -turns)
                if total is None:
                    total = np.array(output, dtype=np.float32)
                else:
                    total += output
        total /= 8.0
        return total.astype(dtype, copy=False)

    def _forward(self, view: np.ndarray, progress, dtype) -> np.ndarray:
        return predict_view(self.model, view, self.config, self.tile_size, self.batch_size, None, progress, dtype)

    def probabilities(self, image: np.ndarray, progress=None, dtype=np.float32) -> np.ndarray:
        """The class probabilities (H x W x K) the post-processing reads: ``native_probabilities`` at the
        scale a model trained with ``config.nucleus_diameter`` learned, the image resized so that its
        nuclei's median diameter is that many pixels.  Other models predict at the native scale.

        A first pass at the native scale finds the nuclei (with the default ``PostProcessing``, so that the
        scale does not depend on the post-processing chosen later) and ``nucleus_scale`` gives the factor
        (0.5 to 2).  The image resized by it is predicted again, and the probabilities are resized back, so
        the post-processing finds the nuclei at full resolution.  A factor within ``RESCALE_TOLERANCE`` of 1
        keeps the first pass (with ``tta``, predicted again in its 8 orientations)."""
        height, width = image.shape[:2]
        if self.config.nucleus_diameter:
            first = self.native_probabilities(image, dtype=np.float16)
            factor = min(
                nucleus_scale(PostProcessing().nuclei(first), self.config.nucleus_diameter),
                math.sqrt(MAX_RESCALED_PIXELS / (height * width)),
            )
            rescale = abs(math.log(factor)) >= math.log(RESCALE_TOLERANCE)
            log.debug(
                f"{width}x{height} image: nucleus scale x{factor:.2f}, "
                + (f"predicted again at {self.config.nucleus_diameter:g}-px nuclei" if rescale else "first pass kept")
            )
            if rescale:
                del first
                rescaled = rescale_view(image, None, factor)[0]
                output = self.native_probabilities(rescaled, self.tta, progress)
                return resize_image(output, (height, width)).reshape(height, width, -1).astype(dtype, copy=False)
            if not self.tta:
                return first.astype(dtype, copy=False)
        return self.native_probabilities(image, self.tta, progress, dtype)

    def segment(
        self, image: np.ndarray, name: str = "image", truth: np.ndarray | None = None, progress: bool = True
    ) -> Prediction:
        """Predict one decoded RGB image at full resolution and find its nuclei with the run's
        post-processing; scored when ``truth`` (instance labels) is given."""
        height, width = image.shape[:2]
        bar = tqdm(
            desc=f"{name} tiles", unit="tile", leave=False, disable=not progress or height * width < PROGRESS_PIXELS
        )

        def on_progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        # Float16 probabilities halve the largest buffer of a large image; the nuclei are the same.
        output = self.probabilities(image, on_progress, np.float16)
        bar.close()
        return Prediction.from_output(name, image, output, self.post, truth)

    def outputs(self, samples: Sequence[LoadedSample], progress: bool = True) -> list[np.ndarray]:
        """The full-resolution class probabilities of decoded samples, in order (for choosing the
        post-processing, which needs the outputs rather than the nuclei)."""
        return [
            self.probabilities(s.image)
            for s in tqdm(samples, desc="Predicting validation images", disable=not progress, unit="img")
        ]

"""Accuracy on real images a model never trained on: a fixed held-out split, scored per image kind.

A split of the training set flatters a model that was tuned on it, so the held-out images are set aside
before anything else happens: ``holdout_split`` picks them from the ids and image kinds alone, the same
ones on every machine, and ``train(..., exclude_ids=...)`` never loads them.  ``evaluate`` then predicts
them exactly as ``Predict_mask.py`` does (``segmenter.Segmenter``, the run's own post-processing) and
scores them with the competition's metric, overall and per kind of microscopy, because a mean over a set
that is four-fifths fluorescence hides how a model does on stained tissue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from unet_model_core import LoadedSample
from unet_nuclei.metrics import SCORE_KEYS, Scores
from unet_nuclei.segmenter import Segmenter

# The held-out part of a dataset: a fifth of each kind, chosen by this seed.
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 2018
IMAGE_KINDS = ("fluorescence", "stained", "brightfield")


def image_kind(image: np.ndarray) -> str:
    """The kind of microscopy an RGB image looks like, judged from its pixels alone.

    "stained": colour (histology stains such as H&E); "brightfield": grey with a bright background, the
    nuclei darker than their surroundings; "fluorescence": grey with a dark background.  DSB-2018 holds
    these three, and they behave so differently that scores are reported per kind.
    """
    pixels = np.asarray(image, dtype=np.float32)
    grey = pixels.mean(axis=2)
    # The mean distance of a pixel's channels from its grey value: 0 for grey images, well above 5 for stains.
    if float(np.abs(pixels - grey[..., None]).mean()) > 5.0:
        return "stained"
    return "brightfield" if float(np.median(grey)) > 100 else "fluorescence"


def holdout_split(
    kinds: Mapping[str, str], fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[list[str], list[str]]:
    """``(training ids, held-out ids)``, stratified by image kind.

    ``kinds`` maps each image id to its kind.  Within a kind the ids are ordered by a hash of the seed
    and the id, and the first ``fraction`` of them (at least one) are held out: the split depends on the
    ids alone, not on the order in which a file system lists them or on NumPy's random streams.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    held_out = []
    for kind in sorted(set(kinds.values())):
        ids = sorted(
            (i for i, k in kinds.items() if k == kind), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
        )
        held_out += ids[: max(1, int(round(fraction * len(ids))))]
    held_out_set = set(held_out)
    return sorted(i for i in kinds if i not in held_out_set), sorted(held_out)


# Bands of an image's median nucleus diameter, in pixels, for scores by nucleus size.
SIZE_BANDS = ((0, 12), (12, 24), (24, 48), (48, math.inf))


@dataclasses.dataclass
class Evaluation:
    """Per-image scores of a model on held-out images, with each image's kind."""

    ids: list[str]
    kinds: list[str]
    scores: list[Scores]
    seconds: float = 0.0
    diameters: list[float] = dataclasses.field(default_factory=list)  # each image's median nucleus diameter, px

    def by_size(self) -> dict:
        """Mean DSB score per band of the images' median annotated nucleus diameter (``SIZE_BANDS``):
        ``{"< 12 px": {"n": ..., "dsb_score": ...}, ...}``, bands without images left out."""
        bands = {}
        for low, high in SIZE_BANDS:
            members = [i for i, d in enumerate(self.diameters) if low <= d < high]
            if members:
                name = f"< {high} px" if low == 0 else f">= {low} px" if high == math.inf else f"{low}-{high} px"
                bands[name] = {
                    "n": len(members),
                    "dsb_score": round(float(np.mean([self.scores[i].dsb_score for i in members])), 4),
                }
        return bands

    def summary(self) -> dict:
        """Mean scores overall and per kind: ``{"all": {...}, "fluorescence": {...}, ...}``, each with
        the number of images ``n``."""
        groups = {"all": list(range(len(self.ids)))}
        for kind in IMAGE_KINDS:
            members = [i for i, k in enumerate(self.kinds) if k == kind]
            if members:
                groups[kind] = members
        return {
            name: {
                "n": len(members),
                **{
                    key: round(float(np.mean([getattr(self.scores[i], key) for i in members])), 4) for key in SCORE_KEYS
                },
            }
            for name, members in groups.items()
        }

    def table(self) -> str:
        """The summary as an aligned text table."""
        lines = [f"{'images':<14}{'n':>5}" + "".join(f"{key:>11}" for key in SCORE_KEYS)]
        for name, row in self.summary().items():
            lines.append(f"{name:<14}{row['n']:>5}" + "".join(f"{row[key]:>11.4f}" for key in SCORE_KEYS))
        sizes = self.by_size()
        if sizes:
            lines.append(
                "by the images' median nucleus diameter (DSB score): "
                + ", ".join(f"{name} {row['dsb_score']:.3f} (n={row['n']})" for name, row in sizes.items())
            )
        return "\n".join(lines)

    def rows(self) -> list[dict]:
        """One JSON-ready dict per image."""
        diameters = self.diameters or [None] * len(self.ids)
        return [
            {"id": i, "kind": k, **s.rounded(), "median_diameter": None if d is None else round(d, 1)}
            for i, k, s, d in zip(self.ids, self.kinds, self.scores, diameters)
        ]


def evaluate(segmenter: Segmenter, samples: Sequence[LoadedSample], progress: bool = True) -> Evaluation:
    """Segment each sample as ``Predict_mask.py`` does and score it against its instance labels."""
    started = time.time()
    ids, kinds, scores, diameters = [], [], [], []
    for sample in tqdm(samples, desc="Scoring held-out images", unit="img", disable=not progress):
        prediction = segmenter.segment(sample.image, sample.sample_id, sample.labels.astype(np.int32), progress=False)
        ids.append(sample.sample_id)
        kinds.append(image_kind(sample.image))
        scores.append(prediction.scores)
        diameters.append(median_diameter(sample.labels))
    return Evaluation(ids, kinds, scores, time.time() - started, diameters)


def median_diameter(labels: np.ndarray) -> float:
    """The median equivalent diameter (of a disc of the same area) of an image's nuclei, in pixels; 0
    for an image without nuclei."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return float(2 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0

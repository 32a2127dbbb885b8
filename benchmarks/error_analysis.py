"""Where a trained instance-aware run loses its DSB-2018 score: nuclei outlines or their splitting, and
which post-processing changes would help, without retraining.

The run's validation images (and the held-out fifth of ``--data``, when the run never trained on it) are
predicted once, exactly as ``Predict_mask.py`` predicts them; their nuclei are then found again in
several ways and scored with the competition's metric:

* ``as chosen``: the run's own post-processing (what ``Predict_mask.py`` does);
* two oracles, which borrow half of the answer from the annotation: ``true area, model's markers`` floods
  the model's markers over the annotated nucleus area, ``true markers, model's area`` floods one marker per
  annotated nucleus (its core) over the model's nucleus area.  The one that gains more names the larger
  source of error: where the nuclei end, or how they are split;
* post-processing variants: larger smallest markers, smoothed interior before the markers, other flooding
  surfaces, holes filled, every nucleus grown by one pixel.

    python benchmarks/error_analysis.py --run runs/default        # about 2 minutes for 186 images

It prints one table (mean DSB score per image set and kind) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score a trained instance-aware run's nuclei found in several ways (its own post-processing, "
        "two oracles, post-processing variants) on its validation images and the held-out fifth, per "
        "image kind; the last line is one JSON object."
    )
    parser.add_argument("--run", default=None, help="run folder or name (default: the newest run)")
    parser.add_argument(
        "--data",
        default="dataset/stage1_train",
        metavar="DIR",
        help="the DSB-2018 training folder the run used (default: dataset/stage1_train)",
    )
    return parser


def nuclei(
    output,
    post,
    *,
    min_marker=None,
    sigma=0.0,
    surface="interior",
    fill=False,
    grow=0,
    true_area=None,
    true_markers=None,
) -> np.ndarray:
    """Instances from an H x W x 3 output, as ``instances_from_classes`` finds them, with one change."""
    from scipy import ndimage as ndi
    from skimage import filters, segmentation

    from unet_nuclei import postprocess
    from unet_nuclei.label_images import relabel_sequential, remove_small

    output = np.asarray(output, np.float32)
    interior = output[..., 1]
    if true_markers is not None:
        markers = true_markers
    else:
        blobs = filters.gaussian(interior, sigma) if sigma else interior
        markers, _ = ndi.label(blobs > post.marker_threshold)
        markers = remove_small(markers, min_marker or postprocess.MIN_MARKER_SIZE)
    area = (true_area if true_area is not None else (1.0 - output[..., 0]) > post.threshold) | (markers > 0)
    heights = {"interior": -interior, "background": output[..., 0], "distance": -ndi.distance_transform_edt(area)}[
        surface
    ]
    labels = segmentation.watershed(heights, markers, mask=area)
    orphans, _ = ndi.label(area & (labels == 0), structure=np.ones((3, 3)))
    labels = np.where(orphans > 0, orphans + labels.max(), labels).astype(np.int32)
    if fill:
        for index, box in enumerate(ndi.find_objects(labels), 1):
            if box is not None:
                hole = ndi.binary_fill_holes(labels[box] == index) & (labels[box] == 0)
                labels[box][hole] = index
    if grow:
        labels = segmentation.expand_labels(labels, grow).astype(np.int32)
    return postprocess.drop_unsure(relabel_sequential(remove_small(labels, post.min_size)), output, post.min_confidence)


def cores(labels: np.ndarray) -> np.ndarray:
    """One marker per annotated nucleus: its pixels at least 60% of its largest distance from the edge."""
    from scipy import ndimage as ndi

    markers = np.zeros_like(labels, dtype=np.int32)
    for index, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        inside = labels[box] == index
        distance = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        markers[box][distance >= max(1.0, 0.6 * distance.max())] = index
    return markers


WAYS = {
    "as chosen": {},  # the project's own code: PostProcessing.nuclei
    "true area, model's markers": {"oracle": "area"},
    "true markers, model's area": {"oracle": "markers"},
    "markers of 10+ px": {"min_marker": 10},
    "markers of 25+ px": {"min_marker": 25},
    "interior smoothed (sigma 1)": {"sigma": 1.0},
    "interior smoothed (sigma 2)": {"sigma": 2.0},
    "flooded over the background": {"surface": "background"},
    "flooded over the distance": {"surface": "distance"},
    "holes filled": {"fill": True},
    "nuclei grown by 1 px": {"grow": 1},
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    import unet_model_core as core
    from unet_nuclei import cache, evaluation, metrics
    from unet_nuclei.segmenter import ModelError, Segmenter

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from evaluate_real import check_unseen

    try:
        segmenter = Segmenter.load(args.run)
        config, info, run_dir = segmenter.config, segmenter.run_info, segmenter.run_dir
        if config.targets != "instance":
            raise ValueError(f"{run_dir} is a binary model; this analysis needs instance targets")
        loaded, problems, _ = cache.load_folder(Path(args.data), desc="Decoding the dataset")
    except (core.DataError, ModelError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    by_id = {s.sample_id: s for s in loaded}
    kinds = {i: evaluation.image_kind(s.image) for i, s in by_id.items()}
    sets = {"validation": [i for i in info.get("val_ids", []) if i in by_id]}
    _, held_out = evaluation.holdout_split(kinds)
    try:
        check_unseen(info, Path(args.data), held_out)
        sets["held-out"] = held_out
    except ValueError as error:
        print(f"held-out images left out: {error}", file=sys.stderr)
    post = segmenter.post
    scores: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
    cache.report_problems(problems)
    todo = [(name, i) for name, ids in sets.items() for i in ids]
    for name, i in tqdm(todo, desc="Predicting and scoring", unit="img"):
        sample = by_id[i]
        output = segmenter.probabilities(sample.image, dtype=np.float16)  # as Predict_mask.py predicts it
        truth = sample.labels.astype(np.int32)
        for way, options in WAYS.items():
            options = dict(options)
            oracle = options.pop("oracle", None)
            if oracle == "area":
                options["true_area"] = truth > 0
            elif oracle == "markers":
                options["true_markers"] = cores(truth)
            found = nuclei(output, post, **options) if options else post.nuclei(output)
            score = metrics.dsb_score(truth, found)
            for key in (name, f"{name} {kinds[i]}"):
                scores[way].setdefault(key, []).append(score)
    columns = sorted(scores["as chosen"], key=lambda k: (k.split()[0] != "validation", len(k.split()), k))
    means = {way: {c: float(np.mean(v[c])) for c in columns} for way, v in scores.items()}
    counts = {c: len(scores["as chosen"][c]) for c in columns}
    print(
        f"DSB-2018 score of {run_dir} (post-processing: nucleus {post.threshold:.2f}, markers "
        f"{post.marker_threshold:.2f}, nuclei of {post.min_size}+ px, confidence {post.min_confidence:.2f}+), "
        f"mean per image:"
    )
    heads = [f"{c} ({counts[c]})" for c in columns]
    width = max(len(h) for h in heads) + 2
    print(f"{'':30}" + "".join(f"{h:>{width}}" for h in heads))
    for way in WAYS:
        print(f"{way:30}" + "".join(f"{means[way][c]:>{width}.4f}" for c in columns))
    print(
        json.dumps(
            {
                "benchmark": "error_analysis",
                "run": str(run_dir),
                "images": counts,
                "dsb_score": {w: {c: round(v, 4) for c, v in m.items()} for w, m in means.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

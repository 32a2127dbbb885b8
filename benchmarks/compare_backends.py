"""Do Keras's backends find the same nuclei?  The same model file and images, segmented on TensorFlow,
JAX and PyTorch (each in its own process, as ``Predict_mask.py`` predicts: ``Segmenter.segment``), then
compared with TensorFlow's nuclei per image: the nucleus count, the pixels whose nucleus-or-background
answer differs, and the nuclei without an IoU >= 0.5 partner.

    python benchmarks/compare_backends.py                      # the shipped model, 24 held-out real images
    python benchmarks/compare_backends.py --model runs/NAME --images 60 --backends tensorflow,jax

The images are the first ``--images`` of the fixed held-out fifth of ``--data`` (``dataset/stage1_train``),
or of a generated DSB-like folder where that is missing.  A backend that is not installed is skipped and
said so.  The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BACKENDS = ("tensorflow", "jax", "torch")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def held_out_samples(data: Path, count: int):
    from unet_nuclei import cache, evaluation

    loaded, _, _ = cache.load_folder(data, progress=False)
    kinds = {sample.sample_id: evaluation.image_kind(sample.image) for sample in loaded}
    _, held_out = evaluation.holdout_split(kinds)
    by_id = {sample.sample_id: sample for sample in loaded}
    return [by_id[i] for i in held_out[:count]]


def segment_all(args) -> int:
    """The child's work: every image's labels on this process's backend, into one .npz."""
    import keras

    from unet_nuclei.segmenter import Segmenter

    segmenter = Segmenter.load(args.model)
    labels = {}
    for sample in held_out_samples(Path(args.data), args.images):
        labels[sample.sample_id] = segmenter.segment(sample.image, progress=False).labels
    np.savez_compressed(args.child, backend=keras.backend.backend(), **labels)
    return 0


def agreement(theirs: np.ndarray, ours: np.ndarray) -> dict:
    """How far ``theirs`` is from ``ours`` (the reference)."""
    from unet_nuclei.metrics import dsb_score, instance_iou_matrix

    iou = instance_iou_matrix(ours, theirs)
    unmatched = int((iou.max(axis=1, initial=0) < 0.5).sum() + (iou.max(axis=0, initial=0) < 0.5).sum())
    return {
        "count_difference": int(theirs.max()) - int(ours.max()),
        "pixels_differing": int(((theirs > 0) != (ours > 0)).sum()),
        "nucleus_pixels": int((ours > 0).sum()),
        "unmatched_nuclei": unmatched,
        "dsb_score": dsb_score(ours, theirs),  # 1.0: the same nuclei at every IoU threshold up to 0.95
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dsb2018", help="a run, model file or shipped name (dsb2018)")
    parser.add_argument("--data", default="dataset/stage1_train", help="the DSB-2018 training folder")
    parser.add_argument("--images", type=int, default=24, help="held-out images to segment (24)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; the first is the reference")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one backend's process: where its labels go
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        from unet_nuclei import synthetic

        folder = Path(tempfile.mkdtemp(prefix="compare_backends_")) / "dsb_like"
        log(f"{args.data} not found: writing a DSB-like folder of {args.images * 5} images to {folder}")
        synthetic.write_synthetic_dataset(folder, num_images=args.images * 5, seed=2018, progress=False)
        args.data = str(folder)
    if args.child:
        return segment_all(args)

    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    results, scratch = {}, Path(tempfile.mkdtemp(prefix="compare_backends_out_"))
    for backend in backends:
        out = scratch / f"{backend}.npz"
        command = [sys.executable, __file__, "--model", args.model, "--data", args.data]
        command += ["--images", str(args.images), "--child", str(out)]
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{backend}: skipped ({(done.stderr.strip().splitlines() or ['failed'])[-1]})")
            continue
        with np.load(out) as saved:
            results[backend] = {key: saved[key] for key in saved.files if key != "backend"}
        log(f"{backend}: {len(results[backend])} images segmented")
    if len(results) < 2:
        log("fewer than two backends ran: nothing to compare")
        return 1
    reference, *others = results
    figures = {"model": args.model, "images": len(results[reference]), "reference": reference, "backends": {}}
    print(
        f"{'backend':>10} {'images':>7} {'same count':>11} {'pixels differing':>17} {'of nucleus px':>14} "
        f"{'unmatched':>10} {'DSB vs ref':>11}"
    )
    for backend in others:
        rows = [agreement(results[backend][i], results[reference][i]) for i in results[reference]]
        total = {key: sum(row[key] for row in rows) for key in rows[0] if key != "dsb_score"}
        total["mean_dsb_score"] = round(float(np.mean([row["dsb_score"] for row in rows])), 4)
        same = sum(row["count_difference"] == 0 for row in rows)
        worst = max(row["pixels_differing"] for row in rows)
        figures["backends"][backend] = {**total, "images_same_count": same, "most_pixels_differing_in_one_image": worst}
        share = total["pixels_differing"] / max(1, total["nucleus_pixels"])
        print(
            f"{backend:>10} {len(rows):>7} {same:>11} {total['pixels_differing']:>17,} {share:>13.4%} "
            f"{total['unmatched_nuclei']:>10} {total['mean_dsb_score']:>11.4f}"
        )
    print(
        f"against {reference}; rerun with: python benchmarks/compare_backends.py {' '.join(argv or sys.argv[1:])}".rstrip()
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

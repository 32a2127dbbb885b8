"""Predicting a folder: images per second with and without reading ahead, against the forward-pass bound.

In one run, on a folder of DSB-like images written for the purpose (``unet_nuclei.synthetic`` in DSB-2018's
size mix, 65 images by default, the size of the DSB-2018 stage-1 test set):

  * sequential: each image read, predicted, turned into nuclei and written, one after the other
    (``predict.predict_input`` as ``Predict_mask.py`` called it before);
  * read ahead: the same, with the next images decoding in background threads while the model works
    (``predict.read_ahead``, what ``Predict_mask.py`` does now);
  * forward (the bound): the model's tiled probabilities alone (``Segmenter.native_probabilities``) on the same
    images held in memory: no reading, no nuclei, no writing.

The model is a finished run (``--model RUN``) or, by default, the untrained default model (its speed is
the same; its nuclei, and so the post-processing time, are not those of a trained model).  The last line
is one JSON object with ``folder_img_per_s`` and ``folder_vs_forward``.

    python benchmarks/bench_folder.py                       # about 3 minutes on 2 CPU cores
    python benchmarks/bench_folder.py --model runs/default --images 65
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Images per second predicting a folder, sequential vs read "
        "ahead, against the forward-pass bound; one JSON line last."
    )
    parser.add_argument("--images", type=int, default=None, help="images in the generated folder (65; 16 with --quick)")
    parser.add_argument("--quick", action="store_true", help="16 images (under a minute)")
    parser.add_argument("--model", metavar="RUN", help="a finished run (default: the untrained default model)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    args = parser.parse_args(argv)
    args.images = args.images or (4 if args.smoke else 16 if args.quick else 65)
    if args.images < 1:
        parser.error("--images must be positive")

    import unet_model_core as core
    from bench_train import DSB_SIZE_MIX
    from unet_nuclei import predict, synthetic
    from unet_nuclei.segmenter import Segmenter

    if args.model:
        segmenter = Segmenter.load(args.model)
        what = args.model
    else:
        config = core.quick_config() if args.smoke else core.Config()
        segmenter, what = Segmenter(core.build_unet_from_config(config), config), "the untrained default model"
    sizes = [(96, 96), (128, 160)] if args.smoke else DSB_SIZE_MIX
    with tempfile.TemporaryDirectory(prefix="bench_folder_") as work:
        folder = Path(work) / "images"
        synthetic.write_synthetic_dataset(folder, num_images=args.images, seed=7, sizes=sizes, progress=False)
        inputs = predict.collect_inputs([str(folder)]).items
        inputs = [predict.PredictionInput(i.name, i.image_path) for i in inputs]  # no scoring: prediction only
        images = [core.read_image(i.image_path) for i in inputs]
        pixels = sum(image.shape[0] * image.shape[1] for image in images)
        print(f"{len(inputs)} images ({pixels / 1e6:.1f} Mpx), {what}", file=sys.stderr)
        (Path(work) / "warm").mkdir()
        predict.predict_input(segmenter, inputs[0], Path(work) / "warm", progress=False)  # tracing

        def run(out: str, ahead: bool) -> float:
            (Path(work) / out).mkdir()
            started = time.perf_counter()
            stream = predict.read_ahead(inputs) if ahead else ((item, None) for item in inputs)
            for item, decoded in stream:
                predict.predict_input(
                    segmenter,
                    item,
                    Path(work) / out,
                    progress=False,
                    image=decoded.result() if decoded is not None else None,
                )
            return time.perf_counter() - started

        sequential = run("sequential", ahead=False)
        ahead = run("ahead", ahead=True)
        started = time.perf_counter()
        for image in images:
            segmenter.native_probabilities(image)
        forward = time.perf_counter() - started

    rows = [
        ("sequential (read, predict, nuclei, write)", sequential),
        ("read ahead (Predict_mask.py)", ahead),
        ("forward pass only, images in memory", forward),
    ]
    print(f"\n{'variant':<45} {'seconds':>8} {'images/s':>9} {'vs forward':>11}")
    for name, seconds in rows:
        print(f"{name:<45} {seconds:8.1f} {len(inputs) / seconds:9.2f} {forward / seconds:10.2f}x")
    figures = {
        "images": len(inputs),
        "mpx": round(pixels / 1e6, 1),
        "model": what,
        "sequential_img_per_s": round(len(inputs) / sequential, 2),
        "folder_img_per_s": round(len(inputs) / ahead, 2),
        "forward_img_per_s": round(len(inputs) / forward, 2),
        "folder_vs_forward": round(forward / ahead, 3),
        "ahead_vs_sequential": round(sequential / ahead, 3),
    }
    flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    print(f"Rerun with: python benchmarks/bench_folder.py {flags}".rstrip())
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a trained run on a REAL fluorescence nuclei image, to check that a model trained on the built-in
synthetic sample transfers to real microscopy.

The image comes from the StarDist package's wheel on PyPI (``stardist/data/images/img2d.tif`` with its
hand-annotated labels ``mask2d.tif``: 512x512, 125 nuclei, a DSB-2018 style fluorescence image; StarDist
is BSD-3-licensed).  ``pip download`` fetches the wheel from the package index only (nothing is
installed, nothing is committed).  Run from the repository root:

    python benchmarks/real_image_check.py                  # the newest run
    python benchmarks/real_image_check.py --model runs/X   # a given run

It prints Dice, IoU and the DSB-2018 score and writes ``real_image_check.png`` (image, truth, prediction)
into the run's folder (or --out).
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WHEEL_PACKAGE = "stardist==0.9.2"
MEMBERS = ("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif")


def fetch_real_image(folder: Path) -> tuple[Path, Path]:
    """Download the StarDist wheel (no dependencies, no install) and extract the 2-D image and labels."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            WHEEL_PACKAGE,
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(folder),
        ],
        check=True,
    )
    wheel = next(folder.glob("stardist-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for member in MEMBERS:
            archive.extract(member, folder)
    return folder / MEMBERS[0], folder / MEMBERS[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run folder or name (default: the newest run)")
    parser.add_argument("--runs-dir", default="runs", help="where runs are (default: runs)")
    parser.add_argument("--out", help="figure path (default: <run>/real_image_check.png)")
    args = parser.parse_args()

    import cv2
    import numpy as np

    from unet_model_core import read_image
    from unet_nuclei import plots
    from unet_nuclei.segmenter import Segmenter

    segmenter = Segmenter.load(args.model, args.runs_dir)
    run_dir = segmenter.run_dir
    with tempfile.TemporaryDirectory() as tmp:
        image_path, labels_path = fetch_real_image(Path(tmp))
        image = read_image(image_path)
        truth = cv2.imread(str(labels_path), cv2.IMREAD_UNCHANGED).astype(np.int32)
    result = segmenter.segment(image, "stardist img2d (real)", truth, progress=False)
    scores = result.scores
    out = Path(args.out) if args.out else run_dir / "real_image_check.png"
    plots.save(plots.prediction_grid([result]), out, dpi=80)
    print(
        f"Run {run_dir} on a real 512x512 fluorescence image ({scores.nuclei_true} annotated nuclei): "
        f"Dice {scores.dice:.3f}  IoU {scores.iou:.3f}  DSB score {scores.dsb_score:.3f}  "
        f"({scores.nuclei_pred} nuclei found; threshold {segmenter.post.threshold:.2f}). Figure: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

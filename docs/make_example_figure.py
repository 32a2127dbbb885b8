"""Make docs/example_prediction.png: validation images of the built-in sample, their prediction outlines
and nuclei counts, from a trained run (the newest by default).

    python docs/make_example_figure.py [--model RUN]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run folder or name (default: the newest run)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "example_prediction.png"))
    args = parser.parse_args()

    import numpy as np

    from unet_model_core import read_image
    from unet_nuclei import plots, predict
    from unet_nuclei.segmenter import Segmenter

    segmenter = Segmenter.load(args.model)
    run_dir = segmenter.run_dir
    inputs, _ = predict.validation_inputs(segmenter.run_info)
    images = [read_image(item.image_path) for item in inputs]
    # One dark-background (fluorescence) and one bright-background (stained) image, if the split has both.
    order = np.argsort([np.median(image) for image in images])
    picks = [order[0], order[-1]] if np.median(images[order[-1]]) > 100 else list(order[:2])
    shown = [segmenter.segment(images[i], inputs[i].name, progress=False) for i in picks]
    plots.save(plots.outline_pairs(shown), args.out, dpi=72)
    print(f"wrote {args.out} from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

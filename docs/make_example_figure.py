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

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import unet_model_core as core

    model, config, info, run_dir = core.load_run(args.model)
    inputs, _ = core.validation_inputs(info)
    images = [core.read_image(item.image_path) for item in inputs]
    # One dark-background (fluorescence) and one bright-background (stained) image, if the split has both.
    order = np.argsort([np.median(image) for image in images])
    picks = [order[0], order[-1]] if np.median(images[order[-1]]) > 100 else list(order[:2])
    fig, axes = plt.subplots(len(picks), 2, figsize=(8, 4 * len(picks)), squeeze=False)
    for row, index in zip(axes, picks):
        image = images[index]
        probability, _ = core.predict_mask(model, image, config)
        labels = core.label_instances(probability, config.threshold, config.min_nucleus_size)
        row[0].imshow(image)
        row[0].set_title(f"input {image.shape[1]}x{image.shape[0]}")
        row[1].imshow(core.draw_outlines(image, labels))
        row[1].set_title(f"predicted outlines: {core.count_instances(labels)} nuclei")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out} from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side statistics of the built-in synthetic sample and a real nucleus dataset, per image kind.

A model trained only on the synthetic sample is judged on real images, so the sample has to look like
them where it matters: nucleus size and shape, how many nuclei there are and how crowded, how bright the
nuclei are against their background and how busy that background is.  This script measures those from
the instance labels and the model's grey input (``preprocess_image``), per image kind as
``evaluation.image_kind`` sees it, for both folders; it prints a table, draws
``docs/synthetic_vs_real.png`` (statistics only, no image crops) and ends with one JSON line.

    python benchmarks/synthetic_vs_real.py                      # the built-in sample vs dataset/stage1_train
    python benchmarks/synthetic_vs_real.py --real dataset/real_stage1_train --figure docs/synthetic_vs_real.png
    python benchmarks/synthetic_vs_real.py --synthetic my_sample/ --real other/

Per image: nuclei, coverage (fraction of pixels in nuclei), touching fraction (nuclei that share an edge
with another nucleus), contrast (median grey of nuclei minus median of the background, 0-255 after the
model's stretch), nuclear texture (mean over nuclei of the grey standard deviation inside a nucleus over
the contrast) and background texture (standard deviation of the background after a 1-pixel Gaussian
smoothing, over the contrast).  Per nucleus: equivalent diameter, eccentricity and solidity.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_IMAGE = ("nuclei", "coverage", "touching", "contrast", "nuclear_texture", "background_texture")
PER_NUCLEUS = ("diameter", "eccentricity", "solidity")


def touching_labels(labels: np.ndarray) -> np.ndarray:
    """The label values of nuclei that share an edge (4- or 8-neighbourhood) with another nucleus."""
    touching = set()
    for a, b in (
        (labels[1:, :], labels[:-1, :]),
        (labels[:, 1:], labels[:, :-1]),
        (labels[1:, 1:], labels[:-1, :-1]),
        (labels[1:, :-1], labels[:-1, 1:]),
    ):
        contact = (a != b) & (a > 0) & (b > 0)
        touching.update(np.unique(a[contact]).tolist())
        touching.update(np.unique(b[contact]).tolist())
    return np.array(sorted(touching), dtype=np.int64)


def image_statistics(image: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """``(per-image figures, per-nucleus arrays)`` of one RGB image and its instance labels."""
    import cv2
    from scipy import ndimage
    from skimage.measure import regionprops_table

    import unet_model_core as core

    labels = np.asarray(labels, dtype=np.int32)
    grey = core.preprocess_image(image, "grey")[..., 0].astype(np.float32)
    props = regionprops_table(labels, properties=("label", "equivalent_diameter_area", "eccentricity", "solidity"))
    ids = props["label"]
    nuclei = labels > 0
    # The background a nucleus does not blur into: two pixels away from every mask.
    background = ~cv2.dilate(nuclei.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    fg = float(np.median(grey[nuclei])) if nuclei.any() else float("nan")
    bg = float(np.median(grey[background])) if background.any() else float("nan")
    # Texture is measured relative to the contrast so that a stretched and an unstretched image agree.
    contrast = max(fg - bg, 1.0)
    inner_std = ndimage.standard_deviation(grey, labels, ids) if len(ids) else np.array([])
    smooth = cv2.GaussianBlur(grey, (0, 0), 1.0)
    per_image = {
        "nuclei": int(len(ids)),
        "coverage": float(nuclei.mean()),
        "touching": float(len(touching_labels(labels)) / len(ids)) if len(ids) else float("nan"),
        "contrast": fg - bg,
        "nuclear_texture": float(np.mean(inner_std) / contrast) if len(ids) else float("nan"),
        "background_texture": float(smooth[background].std() / contrast) if background.sum() > 100 else float("nan"),
    }
    per_nucleus = {
        "diameter": props["equivalent_diameter_area"],
        "eccentricity": props["eccentricity"],
        "solidity": props["solidity"],
    }
    return per_image, per_nucleus


def folder_statistics(data_dir: Path, progress: bool = True) -> dict:
    """``{kind: {"images": n, per-image name: list, per-nucleus name: array}}`` for a dataset folder."""
    from tqdm.auto import tqdm

    from unet_nuclei import cache, evaluation

    loaded, problems, _ = cache.load_folder(data_dir, progress=progress, desc=f"Decoding {data_dir}")
    cache.report_problems(problems)
    if not loaded:
        raise ValueError(f"{data_dir} holds no readable image with masks")
    out: dict = {}
    for sample in tqdm(loaded, desc=f"Measuring {data_dir.name}", unit="img", disable=not progress):
        kind = evaluation.image_kind(sample.image)
        per_image, per_nucleus = image_statistics(sample.image, sample.labels)
        group = out.setdefault(kind, {"images": 0, **{k: [] for k in PER_IMAGE + PER_NUCLEUS}})
        group["images"] += 1
        for key, value in per_image.items():
            group[key].append(value)
        for key, values in per_nucleus.items():
            group[key].extend(np.asarray(values, dtype=float).tolist())
    return out


def summarise(stats: dict) -> dict:
    """Median and 10th-90th percentiles of every statistic, per kind (NaNs, e.g. no background, left out)."""
    summary = {}
    for kind, group in sorted(stats.items()):
        row = {"images": group["images"]}
        for key in PER_IMAGE + PER_NUCLEUS:
            values = np.asarray(group[key], dtype=float)
            values = values[np.isfinite(values)]
            row[key] = [round(float(v), 3) for v in np.percentile(values, (50, 10, 90))] if len(values) else None
        summary[kind] = row
    return summary


def table(summaries: dict) -> str:
    """An aligned text table: one row per (source, kind), median (p10-p90) per column."""
    columns = PER_NUCLEUS + PER_IMAGE
    lines = [f"{'source':<11}{'kind':<14}{'n':>5} " + " ".join(f"{c[:18]:>20}" for c in columns)]
    for source, summary in summaries.items():
        for kind, row in summary.items():
            cells = [("-" if row[c] is None else f"{row[c][0]:.3g} ({row[c][1]:.3g}-{row[c][2]:.3g})") for c in columns]
            lines.append(f"{source:<11}{kind:<14}{row['images']:>5} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def draw(stats_by_source: dict, path: Path) -> None:
    """Box plots of each statistic per (source, kind): the distributions side by side, no image pixels."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = PER_NUCLEUS + PER_IMAGE
    figure = Figure(figsize=(13, 6.5), layout="constrained")
    axes = figure.subplots(2, 5).ravel()
    groups = [(source, kind) for source, stats in stats_by_source.items() for kind in sorted(stats)]
    colours = {"synthetic": "tab:orange", "real": "tab:blue"}
    for ax, column in zip(axes, columns):
        data = []
        for source, kind in groups:
            values = np.asarray(stats_by_source[source][kind][column], dtype=float)
            data.append(values[np.isfinite(values)])
        boxes = ax.boxplot(data, whis=(10, 90), showfliers=False, patch_artist=True)
        for box, (source, _) in zip(boxes["boxes"], groups):
            box.set_facecolor(colours.get(source, "tab:grey"))
        short = {"fluorescence": "fluor.", "stained": "stained", "brightfield": "bright."}
        ax.set_xticks(range(1, len(groups) + 1), [f"{s[:5]}\n{short.get(k, k)}" for s, k in groups], fontsize=7)
        ax.set_title(column.replace("_", " ") + (" (px)" if column == "diameter" else ""), fontsize=10)
        if column in ("diameter", "nuclei"):
            ax.set_yscale("log")
    axes[-1].axis("off")
    axes[-1].legend(handles=[Patch(color=c, label=s) for s, c in colours.items()], loc="center")
    figure.suptitle("Synthetic sample vs real images, per image kind (boxes: quartiles, whiskers: p10-p90)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=70)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare the statistics of the built-in synthetic sample with a real dataset, per image kind."
    )
    parser.add_argument(
        "--synthetic", metavar="DIR", help="synthetic folder (default: the built-in sample, generated if missing)"
    )
    parser.add_argument(
        "--sample-images",
        type=int,
        metavar="N",
        help="size of the built-in sample when --synthetic is not given (default: the size Train.py uses)",
    )
    parser.add_argument(
        "--real",
        default="dataset/stage1_train",
        metavar="DIR",
        help="real dataset folder in the DSB layout (default: dataset/stage1_train)",
    )
    parser.add_argument(
        "--figure",
        default="synthetic_vs_real.png",
        metavar="PNG",
        help="where to draw the figure (default: synthetic_vs_real.png)",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from unet_nuclei import synthetic

    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            # Seconds-long self-test: two tiny generated folders stand in for the sample and the real set.
            sizes = [(64, 64), (80, 96)]
            args.synthetic = Path(scratch) / "synthetic"
            args.real = Path(scratch) / "real"
            synthetic.write_synthetic_dataset(args.synthetic, num_images=4, seed=0, sizes=sizes, progress=False)
            synthetic.write_synthetic_dataset(args.real, num_images=4, seed=1, sizes=sizes, progress=False)
        if args.synthetic is None:
            import unet_model_core as core

            args.synthetic = synthetic.ensure_sample_dataset(args.sample_images or core.Config.sample_images)
        real = Path(args.real)
        if not real.is_dir():
            print(f"error: {real} is not a folder; give the real DSB-2018 training set with --real", file=sys.stderr)
            return 2
        try:
            stats = {
                "synthetic": folder_statistics(Path(args.synthetic), progress=not args.smoke),
                "real": folder_statistics(real, progress=not args.smoke),
            }
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        summaries = {source: summarise(s) for source, s in stats.items()}
        print(table(summaries))
        figure = Path(args.figure)
        draw(stats, figure)
        print(f"figure: {figure}")
    print(
        json.dumps(
            {
                "synthetic": str(args.synthetic),
                "real": str(args.real),
                "figure": str(figure),
                "median_p10_p90": summaries,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

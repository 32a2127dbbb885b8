"""Predict nucleus masks with a trained U-Net, at full resolution.

    python Predict_mask.py image.png                       # -> predictions/image_mask.png, image_overlay.png
    python Predict_mask.py folder/ more.tif --labels --rle submission.csv
    python Predict_mask.py folder/ --measure --pixel-size 0.65 --labels tif   # + nuclei.csv, images.csv, summary.png
    python Predict_mask.py dataset/stage1_test --model runs/my-run
    python Predict_mask.py scans/ --recursive --channel 1  # every subfolder; channel 1 of multi-channel TIFFs
    python Predict_mask.py stack.tif --project max         # the maximum-intensity projection of a z-stack
    python Predict_mask.py                                 # the run's validation images, scored, as a figure

The model, its preprocessing and its threshold come from a run folder written by Train.py (the newest
one unless --model says otherwise) or, before any training, from the pretrained model shipped in
models/dsb2018; no architecture flag is ever retyped.  The work is in
``unet_nuclei.predict``; this script only parses flags and reports.  Its report lines go through
``logging`` (``unet_nuclei.logs``): ``-q`` keeps warnings and errors only, ``-v`` adds debug lines.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from unet_nuclei import logs

log = logging.getLogger("Predict_mask")  # the script's own lines; the library's are under "unet_nuclei"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment cell nuclei in images with a trained U-Net. For each IMAGE writes "
        "<stem>_mask.png (0/255, the image's exact size) and <stem>_overlay.png (nucleus "
        "outlines on the image) into --out, and prints the size, the nuclei found and the time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any bit depth is read: 8-bit images as they are, others (12/16-bit, float, signed) "
        "stretched between their 0.5th and 99.8th percentiles. TIFFs are read with every page: a "
        "z-stack, time series, ImageJ hyperstack or OME-TIFF is segmented plane by plane, and its "
        "outputs are stacks with one page per plane in the file's order (<stem>_mask.tif, "
        "<stem>_overlay.tif and, with --labels, <stem>_labels.tif, labels numbered from 1 in each "
        "plane); --project max segments the maximum-intensity projection instead. With no IMAGE, "
        "predicts the run's own validation images and saves a figure of image, ground truth and "
        "prediction with their scores. Exit status: 0 when every image was written, 1 when some "
        "were skipped (an image file that cannot be read, for one), 2 for a usage error (no model, "
        "bad flags).",
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files (PNG, JPEG, TIFF, BMP; grey, RGB, RGBA, multi-channel, z-stacks; any "
        "bit depth and size) or folders (plain, DSB layout <id>/images/<id>.png, or "
        "images/ + masks/; images beside those are predicted too). Files without an image "
        "extension in a folder are passed over",
    )
    parser.add_argument(
        "--channel",
        type=int,
        metavar="N",
        help="the channel that shows the nuclei, 0-based along the file's channel axis (as "
        "ImageJ or OME-TIFF metadata name it; for an RGB image 0 red, 1 green, 2 blue). "
        "Needed for a file with several channels (default: the run's own for its "
        "validation images, else none: grey and colour images as they are)",
    )
    parser.add_argument(
        "--project",
        choices=("max",),
        help="'max': segment the maximum-intensity projection of a z-stack (of all its planes "
        "when the file names no z axis; a time series keeps one projection per time "
        "point) instead of each plane",
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        help="also predict the images in subfolders of a folder (each read like the folder), "
        "their outputs in the same subfolders of --out (default: images in subfolders "
        "are counted and named, not predicted)",
    )
    parser.add_argument(
        "--model",
        metavar="MODEL",
        help="a run name, a run folder or its model.keras, or the name of a shipped model "
        "(dsb2018: trained on the DSB-2018 images, in models/) (default: the newest run "
        "in --runs-dir, else the shipped dsb2018)",
    )
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", help="where Train.py saved runs (default: runs)")
    parser.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist (default: refuse and skip that image)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="nucleus probability threshold (default: the one chosen on validation, stored in the run)",
    )
    parser.add_argument(
        "--marker-threshold",
        type=float,
        metavar="T",
        help="interior probability that seeds a nucleus, for instance-aware models "
        "(default: the one chosen on validation, stored in the run)",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation: average the 8 flips and rotations of each image "
        "(8x slower; default: the run's setting)",
    )
    parser.add_argument(
        "--labels",
        nargs="?",
        const="png",
        choices=("png", "tif"),
        metavar="png|tif",
        help="also write <stem>_labels.png (or with 'tif', <stem>_labels.tif), a 16-bit image "
        "with one value per nucleus (touching nuclei split by a watershed); the TIFF "
        "holds more than 65,535 nuclei and the pixel size",
    )
    parser.add_argument(
        "--rois",
        action="store_true",
        help="also write <stem>_rois.zip, an ImageJ ROI set of the nucleus outlines (one ROI per "
        "nucleus, named by its label) that Fiji's ROI Manager opens",
    )
    parser.add_argument(
        "--geojson",
        action="store_true",
        help="also write <stem>.geojson, the nucleus outlines as GeoJSON that QuPath imports as "
        "detection objects (label and area as properties)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="measure every nucleus: one row each in <out>/nuclei.csv (centroid, area, "
        "diameter, perimeter, eccentricity, solidity, mean and max grey value at the "
        "input's own bit depth, border flag), one row per image in <out>/images.csv, "
        "and <out>/summary.png when there are several images",
    )
    parser.add_argument(
        "--pixel-size",
        type=float,
        metavar="UM",
        help="micrometres per pixel, for every image: --measure also reports areas and lengths "
        "in um (columns *_um2, *_um), and --labels tif records it (default: each TIFF's "
        "own, from its ImageJ or OME metadata or resolution tags; images.csv says where "
        "each came from)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        metavar="PX",
        help="drop nuclei smaller than this many pixels (default: from the run's config)",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help="drop nuclei whose mean nucleus probability is below P; 0 keeps every one "
        "(default: the one chosen on validation, stored in the run)",
    )
    parser.add_argument(
        "--rle",
        metavar="FILE",
        help="write a DSB-2018 submission CSV (ImageId,EncodedPixels; one row per nucleus; "
        "the planes of a stack as <stem>_plane<N>, from 0)",
    )
    parser.add_argument(
        "--truth",
        metavar="DIR",
        help="ground truth to score against: DSB layout, images/ + masks/, or <stem>.png / "
        "<stem>_mask.png masks (DSB-layout inputs with masks/ are scored automatically)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        metavar="PX",
        help="square tile side for full-resolution prediction: a multiple of 2**depth (16 for the default "
        "model) and at least the model's training patch (default: tiles shaped to the image, at "
        "most 1536 px a side; smaller tiles use less memory)",
    )
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="tiles per batch (default: 4)")
    logs.add_flags(parser)
    return parser


def _labels_value_given(argv: list[str]) -> list[str]:
    """``--labels`` takes an optional format, so argparse would read ``--labels image.png`` as the format
    "image.png" and fail; a bare ``--labels`` followed by anything but a format becomes ``--labels=png``,
    so that the flag works anywhere on the line, as it did before it took a value."""
    return [
        f"{arg}=png" if arg == "--labels" and (i + 1 == len(argv) or argv[i + 1] not in ("png", "tif")) else arg
        for i, arg in enumerate(argv)
    ]


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    """Refuse flags that cannot work (exit status 2, the flag named), before anything is loaded."""
    import math

    for flag, value in (
        ("--pixel-size", args.pixel_size),
        ("--threshold", args.threshold),
        ("--marker-threshold", args.marker_threshold),
        ("--min-confidence", args.min_confidence),
    ):
        if value is not None and not math.isfinite(value):
            parser.error(f"{flag} {value}: give a number")
    if args.pixel_size is not None and not args.pixel_size > 0:
        parser.error(f"--pixel-size must be a positive number of micrometres per pixel, got {args.pixel_size}")
    if args.pixel_size is not None and not args.measure and args.labels != "tif" and not args.geojson:
        parser.error("--pixel-size is used by --measure, --labels tif and --geojson; give one of them")
    # (--tile-size is checked against the run's model before it loads: the smallest size depends on it.)
    for flag, value, least in (
        ("--min-size", args.min_size, 0),
        ("--batch-size", args.batch_size, 1),
        ("--channel", args.channel, 0),
    ):
        if value is not None and value < least:
            parser.error(f"{flag} {value}: give a whole number, {least} or more")


def main(argv=None) -> int:
    """Run the script with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_labels_value_given(sys.argv[1:] if argv is None else list(argv)))
    check_flags(parser, args)
    logs.to_console(logs.level_from_flags(args.quiet, args.verbose), log.name)
    # These import TensorFlow: after argument parsing, so --help is quick.
    import functools

    import unet_model_core as core
    from unet_nuclei import cache, files, image_files, measure, outlines, predict, runs, tiling
    from unet_nuclei.formats import rle_rows
    from unet_nuclei.segmenter import ModelError, Segmenter, load_unet

    outline_kinds = [kind for kind in outlines.OUTLINE_FILES if getattr(args, kind)]  # --rois, --geojson

    left_out, passed_over = [], []
    try:
        # Everything that can be checked is checked before the model loads and before the first image,
        # so no work is lost to a bad flag or an output that cannot be written.
        config, info, run_dir, model_path = runs.open_run(args.model, args.runs_dir)
        overrides = {
            "threshold": args.threshold,
            "marker_threshold": args.marker_threshold,
            "min_nucleus_size": args.min_size,
            "min_confidence": args.min_confidence,
            "tta": args.tta,
        }
        config = core.Config.from_dict({**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
        tiling.check_tile_size(config, args.tile_size)
        out = files.check_writable(args.out, "--out")
        channel = args.channel
        if args.images:
            found = predict.collect_inputs(args.images, args.truth, recursive=args.recursive, exclude=[out])
            inputs, problems = found.items, found.problems
            left_out, passed_over = found.left_out, found.passed_over
        else:
            inputs, problems = predict.validation_inputs(info)
            channel = config.channel if channel is None else channel
        check_outputs(args, out, inputs, outline_kinds)
        measurements = measure.Measurements() if args.measure else None
        warning = runs.unfinished_warning(run_dir, config, info)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        segmenter = Segmenter(
            load_unet(model_path), config, args.tile_size, args.batch_size, run_info=info, run_dir=run_dir
        )
    except (ModelError, core.DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    markers = f", markers {config.marker_threshold:.2f}" if config.targets == "instance" else ""
    unsure = f", confidence {config.min_confidence:.2f}+" if config.min_confidence else ""
    log.info(
        f"Model: {run_dir} ({info['chosen_because']}; {config.targets} targets, threshold "
        f"{config.threshold:.2f}{markers}{unsure}{', TTA' if config.tta else ''}); writing to {out}/"
    )
    if not args.images:
        log.info(f"No image given: predicting the {len(inputs)} validation images of {run_dir}")

    results, rows = [], []
    reader = functools.partial(
        image_files.open_image, channel=channel, project=args.project, pixel_size=args.pixel_size
    )
    wants_pixel_size = args.measure or args.labels == "tif" or args.geojson
    # The next images decode in the background while the model works on this one.
    for done, (item, decoded) in enumerate(predict.read_ahead(inputs, reader=reader)):
        started = time.time()
        try:
            image = decoded.result()
            if image.notes:  # the first line for a file that was more than one 2-D image: what was done
                outputs = "; outputs as TIFF stacks, one page per plane" if image.is_stack else ""
                log.info(f"{item.label}: {'; '.join(image.notes)}{outputs}")
            if image.is_stack and item.truth is not None:
                print(f"{item.label}: not scored: its ground truth is one plane", file=sys.stderr)
            planes = predict.predict_input(
                segmenter,
                item,
                out,
                labels=args.labels,
                overwrite=args.overwrite,
                progress=not args.quiet,
                pixel_size=args.pixel_size,
                image=image,
                outlines=outline_kinds,
            )
            if measurements is not None:
                for index, result in enumerate(planes):
                    measurements.add(
                        item.label,
                        result.labels,
                        measure.to_grey(image.planes[index]),
                        index if image.is_stack else None,
                        image.pixel_size,
                        image.pixel_size_source,
                    )
        except KeyboardInterrupt:
            print(
                f"\nInterrupted after {done} of {len(inputs)} images: their files in {out}/ are complete, "
                f"{item.label}'s were not written; no scores or --rle file were written.",
                file=sys.stderr,
            )
            return 1
        except files.OutputError as error:
            # A full disk or a lost permission fails every image after this one too: stop here.
            print(
                f"error: {item.label}: {error}. Stopped after {done} of {len(inputs)} images; their files "
                f"are complete, {item.label}'s were not written.",
                file=sys.stderr,
            )
            return 1
        except (core.DataError, FileExistsError, OSError) as error:
            problems.append((item.label, str(error)))
            print(f"{item.label}: skipped: {error}", file=sys.stderr)
            continue
        if args.rle:
            for index, result in enumerate(planes):
                rows.extend(rle_rows(f"{item.label}_plane{index}" if image.is_stack else item.label, result.labels))
        # Keep the arrays only for the validation figure; a folder of big images adds up.
        results.extend(result.summary() if args.images else result for result in planes)
        log.info(report_line(item.label, planes, image, time.time() - started, wants_pixel_size))

    try:
        write_totals(args, out, results, rows, measurements)
    except OSError as error:  # FileExistsError too: a table that appeared meanwhile
        print(f"error: {error}", file=sys.stderr)
        return 1
    if passed_over:
        log.info(
            f"Passed over {_some(passed_over)} that {'is' if len(passed_over) == 1 else 'are'} not an image "
            f"(by the extension)"
        )
    if left_out:
        log.info(
            f"Left out {_some(left_out, 'image')} in subfolders; pass --recursive to predict them too (their "
            f"outputs go to the same subfolders of {out}/)"
        )
    if problems:
        cache.report_problems(problems)
        return 1
    return 0


def check_outputs(args, out: Path, inputs, outline_kinds) -> None:
    """Refuse, before the model loads and the first image is predicted, outputs that cannot be written
    or that would replace files without --overwrite (OSError or ValueError, naming the flag or file)."""
    from unet_nuclei import files, measure, outlines

    for subfolder in sorted({item.subfolder for item in inputs if item.subfolder}):
        files.check_writable(out / subfolder, "--out")
    outlines.check_available(outline_kinds)
    if args.rle:
        if Path(args.rle).exists() and not args.overwrite:
            raise FileExistsError(f"--rle {args.rle} exists; pass --overwrite to replace it")
        files.check_writable(Path(args.rle).parent, f"--rle {args.rle}", create=False)
    if any(item.truth is not None for item in inputs) and (out / "scores.csv").exists() and not args.overwrite:
        raise FileExistsError(
            f"{out / 'scores.csv'} exists (the scores of an earlier run); pass "
            f"--overwrite to replace it, or choose another --out"
        )
    if args.measure:
        files.refuse_existing(measure.output_paths(out, len(inputs)), args.overwrite)


def report_line(label: str, planes: list, image, seconds: float, wants_pixel_size: bool) -> str:
    """The line printed for one input: its size, the nuclei found (per plane for a stack), the time, and
    its pixel size and scores where there are any."""
    result = planes[0]
    if image.is_stack:
        counts = [p.count for p in planes]
        line = (
            f"{label}: {result.width}x{result.height}, {len(planes)} planes, {sum(counts)} nuclei "
            f"({min(counts)}-{max(counts)} a plane), {seconds:.2f}s"
        )
    else:
        line = f"{label}: {result.width}x{result.height}, {result.count} nuclei, {seconds:.2f}s"
    if wants_pixel_size and image.pixel_size is not None:
        line += f", {image.pixel_size_text()}"
    if result.scores is not None:
        line += f"  Dice {result.scores.dice:.3f}  IoU {result.scores.iou:.3f}  DSB {result.scores.dsb_score:.3f}"
    return line


def write_totals(args, out: Path, results: list, rows: list, measurements) -> None:
    """After the last image: the scores table, the --rle file, the measurement tables and, for the
    validation images, their figure; each reported in a line.  OSError when one cannot be written."""
    from unet_nuclei import files, plots, predict

    scored = [r for r in results if r.scores is not None]
    if scored:
        means = predict.write_scores(scored, out / "scores.csv", overwrite=args.overwrite)
        log.info(
            f"Mean over {len(scored)} scored images: Dice {means['dice']:.3f}  IoU {means['iou']:.3f}  "
            f"DSB score {means['dsb_score']:.3f}  (per image: {out / 'scores.csv'})"
        )
    if args.rle:
        files.write_csv(args.rle, [["ImageId", "EncodedPixels"], *rows])
        log.info(f"Run-length encoding of {len(rows)} rows written to {args.rle}")
    if measurements is not None and measurements.images:
        written = measurements.write(out, overwrite=args.overwrite)
        planes_note = f" ({len(measurements.images)} planes)" if measurements.has_planes else ""
        log.info(
            f"Measurements of {len(measurements.nuclei)} nuclei in {len(measurements.names)} "
            f"images{planes_note}: {', '.join(str(p) for p in written)}"
        )
    if not args.images and results:
        figure = predict.unique_path(out / "validation_predictions.png")
        plots.save(plots.prediction_grid(results), figure, dpi=80)
        log.info(f"Figure: {figure}")


def _some(paths, noun: str = "file", shown: int = 5) -> str:
    """ "3 files (a.txt, b.csv, c.txt)": a count and the first few names."""
    names = ", ".join(str(p) for p in paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
    return f"{len(paths)} {noun}{'s' if len(paths) != 1 else ''} ({names})"


if __name__ == "__main__":
    sys.exit(main())

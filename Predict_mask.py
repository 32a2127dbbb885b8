"""Predict nucleus masks with a trained U-Net, at full resolution.

    python Predict_mask.py image.png                       # -> predictions/image_mask.png, image_overlay.png
    python Predict_mask.py folder/ more.tif --labels --rle submission.csv
    python Predict_mask.py folder/ --measure --pixel-size 0.65 --labels tif   # + nuclei.csv, images.csv, summary.png
    python Predict_mask.py dataset/stage1_test --model runs/my-run
    python Predict_mask.py                                 # the run's validation images, scored, as a figure

The model, its preprocessing and its threshold come from a run folder written by Train.py (the newest
one unless --model says otherwise) or, before any training, from the pretrained model shipped in
models/dsb2018; no architecture flag is ever retyped.  The work is in
``unet_nuclei.predict``; this script only parses flags and reports.
"""
import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment cell nuclei in images with a trained U-Net. For each IMAGE writes "
                    "<stem>_mask.png (0/255, the image's exact size) and <stem>_overlay.png (nucleus "
                    "outlines on the image) into --out, and prints the size, the nuclei found and the time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no IMAGE, predicts the run's own validation images and saves a figure of image, "
               "ground truth and prediction with their scores. Exit status: 0 when every image was "
               "written, 1 when some were skipped, 2 for a usage error (no model, bad flags).")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files (PNG, JPEG, TIFF; grey, RGB, RGBA, 16-bit; any size) or folders "
                             "(plain, DSB layout <id>/images/<id>.png, or images/ + masks/)")
    parser.add_argument("--model", metavar="MODEL",
                        help="a run name, a run folder or its model.keras, or the name of a shipped model "
                             "(dsb2018: trained on the DSB-2018 images, in models/) (default: the newest run "
                             "in --runs-dir, else the shipped dsb2018)")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", help="where Train.py saved runs (default: runs)")
    parser.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (default: refuse and skip that image)")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="nucleus probability threshold (default: the one chosen on validation, stored in the run)")
    parser.add_argument("--marker-threshold", type=float, metavar="T",
                        help="interior probability that seeds a nucleus, for instance-aware models "
                             "(default: the one chosen on validation, stored in the run)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation: average the 8 flips and rotations of each image "
                             "(8x slower; default: the run's setting)")
    parser.add_argument("--labels", nargs="?", const="png", choices=("png", "tif"), metavar="png|tif",
                        help="also write <stem>_labels.png (or with 'tif', <stem>_labels.tif), a 16-bit image "
                             "with one value per nucleus (touching nuclei split by a watershed); the TIFF "
                             "holds more than 65,535 nuclei and the pixel size")
    parser.add_argument("--rois", action="store_true",
                        help="also write <stem>_rois.zip, an ImageJ ROI set of the nucleus outlines (one ROI per "
                             "nucleus, named by its label) that Fiji's ROI Manager opens")
    parser.add_argument("--geojson", action="store_true",
                        help="also write <stem>.geojson, the nucleus outlines as GeoJSON that QuPath imports as "
                             "detection objects (label and area as properties)")
    parser.add_argument("--measure", action="store_true",
                        help="measure every nucleus: one row each in <out>/nuclei.csv (centroid, area, "
                             "diameter, perimeter, eccentricity, solidity, mean and max grey value at the "
                             "input's own bit depth, border flag), one row per image in <out>/images.csv, "
                             "and <out>/summary.png when there are several images")
    parser.add_argument("--pixel-size", type=float, metavar="UM",
                        help="micrometres per pixel: --measure also reports areas and lengths in um "
                             "(columns *_um2, *_um), and --labels tif records it")
    parser.add_argument("--min-size", type=int, metavar="PX",
                        help="drop nuclei smaller than this many pixels (default: from the run's config)")
    parser.add_argument("--min-confidence", type=float, metavar="P",
                        help="drop nuclei whose mean nucleus probability is below P; 0 keeps every one "
                             "(default: the one chosen on validation, stored in the run)")
    parser.add_argument("--rle", metavar="FILE",
                        help="write a DSB-2018 submission CSV (ImageId,EncodedPixels; one row per nucleus)")
    parser.add_argument("--truth", metavar="DIR",
                        help="ground truth to score against: DSB layout, images/ + masks/, or <stem>.png / "
                             "<stem>_mask.png masks (DSB-layout inputs with masks/ are scored automatically)")
    parser.add_argument("--tile-size", type=int, metavar="PX",
                        help="square tile side for full-resolution prediction: a multiple of 2**depth (16 for the default "
                             "model) and at least the model's training patch (default: tiles shaped to the image, at "
                             "most 1536 px a side; smaller tiles use less memory)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="tiles per batch (default: 4)")
    return parser


def _labels_value_given(argv: list[str]) -> list[str]:
    """``--labels`` takes an optional format, so argparse would read ``--labels image.png`` as the format
    "image.png" and fail; a bare ``--labels`` followed by anything but a format becomes ``--labels=png``,
    so that the flag works anywhere on the line, as it did before it took a value."""
    return [f"{arg}=png" if arg == "--labels" and (i + 1 == len(argv) or argv[i + 1] not in ("png", "tif"))
            else arg for i, arg in enumerate(argv)]


def main(argv=None) -> int:
    """Run the script with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_labels_value_given(sys.argv[1:] if argv is None else list(argv)))
    if args.pixel_size is not None and not args.pixel_size > 0:
        parser.error(f"--pixel-size must be a positive number of micrometres per pixel, got {args.pixel_size}")
    if args.pixel_size is not None and not args.measure and args.labels != "tif" and not args.geojson:
        parser.error("--pixel-size is used by --measure, --labels tif and --geojson; give one of them")
    # These import TensorFlow: after argument parsing, so --help is quick.
    import unet_model_core as core
    from unet_nuclei import cache, files, measure, outlines, plots, predict, tiling
    from unet_nuclei.instances import rle_rows
    outline_kinds = [kind for kind in outlines.OUTLINE_FILES if getattr(args, kind)]  # --rois, --geojson

    try:
        model, config, info, run_dir = predict.load_run(args.model, args.runs_dir)
        overrides = {"threshold": args.threshold, "marker_threshold": args.marker_threshold,
                     "min_nucleus_size": args.min_size, "min_confidence": args.min_confidence, "tta": args.tta}
        config = core.Config.from_dict({**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
        if args.images:
            inputs, problems = predict.collect_inputs(args.images, args.truth)
        else:
            inputs, problems = predict.validation_inputs(info)
        # Every output path is checked here, before the first image, so no work is lost at the end.
        tiling.check_tile_size(config, args.tile_size)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: give a positive number of tiles per batch")
        out = files.check_writable(args.out, "--out")
        outlines.check_available(outline_kinds)
        if args.rle:
            if Path(args.rle).exists() and not args.overwrite:
                raise FileExistsError(f"--rle {args.rle} exists; pass --overwrite to replace it")
            files.check_writable(Path(args.rle).parent, f"--rle {args.rle}", create=False)
        if any(item.truth is not None for item in inputs) and (out / "scores.csv").exists() and not args.overwrite:
            raise FileExistsError(f"{out / 'scores.csv'} exists (the scores of an earlier run); pass "
                                  f"--overwrite to replace it, or choose another --out")
        measurements = measure.Measurements(args.pixel_size) if args.measure else None
        if measurements is not None:  # before predicting, so a refusal costs nothing
            files.refuse_existing(measure.output_paths(out, len(inputs)), args.overwrite)
    except (predict.ModelError, core.DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    markers = f", markers {config.marker_threshold:.2f}" if config.targets == "instance" else ""
    unsure = f", confidence {config.min_confidence:.2f}+" if config.min_confidence else ""
    print(f"Model: {run_dir} ({info['chosen_because']}; {config.targets} targets, threshold "
          f"{config.threshold:.2f}{markers}{unsure}{', TTA' if config.tta else ''}); writing to {out}/")
    if not args.images:
        print(f"No image given: predicting the {len(inputs)} validation images of {run_dir}")

    results, rows = [], []
    # The next images decode in the background while the model works on this one.
    for done, (item, decoded) in enumerate(predict.read_ahead(inputs)):
        started = time.time()
        try:
            result = predict.predict_input(model, config, item, out, labels=args.labels, overwrite=args.overwrite,
                                           tile_size=args.tile_size, batch_size=args.batch_size,
                                           pixel_size=args.pixel_size, image=decoded.result(),
                                           outlines=outline_kinds)
            if measurements is not None:
                measurements.add_file(item.name, result.labels, item.image_path)
        except KeyboardInterrupt:
            print(f"\nInterrupted after {done} of {len(inputs)} images: their files in {out}/ are complete, "
                  f"{item.name}'s were not written; no scores or --rle file were written.", file=sys.stderr)
            return 1
        except files.OutputError as error:
            # A full disk or a lost permission fails every image after this one too: stop here.
            print(f"error: {item.name}: {error}. Stopped after {done} of {len(inputs)} images; their files "
                  f"are complete, {item.name}'s were not written.", file=sys.stderr)
            return 1
        except (core.DataError, FileExistsError, OSError) as error:
            problems.append((item.name, str(error)))
            print(f"{item.name}: skipped: {error}", file=sys.stderr)
            continue
        if args.rle:
            rows.extend(rle_rows(item.name, result.labels))
        # Keep the arrays only for the validation figure; a folder of big images adds up.
        results.append(result.summary() if args.images else result)
        line = f"{item.name}: {result.width}x{result.height}, {result.count} nuclei, {time.time() - started:.2f}s"
        if result.scores is not None:
            line += f"  Dice {result.scores.dice:.3f}  IoU {result.scores.iou:.3f}  DSB {result.scores.dsb_score:.3f}"
        print(line, flush=True)

    scored = [r for r in results if r.scores is not None]
    try:
        if scored:
            means = predict.write_scores(scored, out / "scores.csv", overwrite=args.overwrite)
            print(f"Mean over {len(scored)} scored images: Dice {means['dice']:.3f}  IoU {means['iou']:.3f}  "
                  f"DSB score {means['dsb_score']:.3f}  (per image: {out / 'scores.csv'})")
        if args.rle:
            files.write_csv(args.rle, [["ImageId", "EncodedPixels"], *rows])
            print(f"Run-length encoding of {len(rows)} rows written to {args.rle}")
        if measurements is not None and measurements.images:
            written = measurements.write(out, overwrite=args.overwrite)
            print(f"Measurements of {len(measurements.nuclei)} nuclei in {len(measurements.images)} images: "
                  f"{', '.join(str(p) for p in written)}")
        if not args.images and results:
            figure = predict.unique_path(out / "validation_predictions.png")
            plots.save(plots.prediction_grid(results), figure, dpi=80)
            print(f"Figure: {figure}")
    except OSError as error:  # FileExistsError too: a table that appeared meanwhile
        print(f"error: {error}", file=sys.stderr)
        return 1
    if problems:
        cache.report_problems(problems)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

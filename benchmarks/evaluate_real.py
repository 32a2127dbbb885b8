"""Accuracy on real DSB-2018 images that the model never trained on, per image kind.

A fixed fifth of ``dataset/stage1_train`` (stratified by kind: fluorescence, stained tissue, brightfield;
``unet_nuclei.evaluation.holdout_split``) is held out.  The script either trains a run on the other
four fifths with any ``Train.py`` flags, or takes a finished run, then predicts every held-out image as
``Predict_mask.py`` does and prints the competition score (mean over IoU thresholds 0.5-0.95 of
TP / (TP + FP + FN)), AP at IoU 0.5 and Dice, overall and per kind, ending with one JSON line.

    python benchmarks/evaluate_real.py                         # train the defaults, then score
    python benchmarks/evaluate_real.py --targets binary --name binary   # any Train.py flag
    python benchmarks/evaluate_real.py --run runs/NAME         # score a finished run
    python benchmarks/evaluate_real.py --run runs/NAME --tta   # ... with test-time augmentation
    python benchmarks/evaluate_real.py --run runs/synthetic --all   # every image, for a run that never saw them
    python benchmarks/evaluate_real.py --init dsb2018 --train-kinds stained --name ft   # fine-tune on one kind

``--all`` scores every image of ``--data`` instead of the held-out fifth.  It is meant for a run trained on
other data (the built-in synthetic sample, say), for which every real image is unseen, and is refused for a
run that trained on ``--data``.

A run that trained on held-out images is refused.  The per-image scores go to
``<run>/holdout_scores.json`` (a new name if that exists).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import Train  # noqa: E402  (the flags of Train.py are the flags of a training here)
from unet_nuclei import logs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score a U-Net on the held-out fifth of the real DSB-2018 training set, per image kind. "
        "Flags not listed here are Train.py's (see python Train.py --help).",
        epilog="Example: python benchmarks/evaluate_real.py --epochs 5 --name proxy",
    )
    parser.add_argument(
        "--data",
        default="dataset/stage1_train",
        metavar="DIR",
        help="the DSB-2018 training folder (default: dataset/stage1_train)",
    )
    parser.add_argument("--run", metavar="RUN", help="score this finished run instead of training one")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation (default: the run's setting)",
    )
    parser.add_argument(
        "--train-kinds",
        metavar="KIND[,KIND]",
        help="train only on the training images of these kinds (fluorescence, stained, "
        "brightfield), for example to fine-tune on one kind (--init); scored on every kind",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="score every image of --data, not only the held-out fifth; only for a finished "
        "--run that trained on other data (the synthetic-to-real measure)",
    )
    logs.add_flags(parser)  # -q/-v: the training's progress lines and bars, as Train.py's
    return parser


def check_unseen(info: dict, data_dir: Path, held_out: list[str]) -> None:
    """Refuse a run that trained on the same data without holding the test images out."""
    trained_on = Path(info.get("data_dir", "")).resolve()
    if trained_on != data_dir.resolve():
        return  # another dataset (the synthetic sample, say): every image here is unseen
    leaked = sorted(set(held_out) - set(info.get("held_out_ids", [])))
    if leaked:
        raise ValueError(
            f"this run trained or tuned on {len(leaked)} of the {len(held_out)} held-out images "
            f"(for example {leaked[0]}); train with this script so they stay unseen"
        )


def check_other_data(info: dict, data_dir: Path) -> None:
    """Refuse ``--all`` for a run that trained on ``data_dir``: its training images would be scored."""
    if Path(info.get("data_dir", "")).resolve() == data_dir.resolve():
        raise ValueError(
            f"--all scores every image of {data_dir}, but this run trained on that folder; "
            "score its held-out fifth without --all"
        )


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    logs.to_console(logs.level_from_flags(args.quiet, args.verbose))
    import unet_model_core as core
    from unet_nuclei import cache, evaluation, predict, training
    from unet_nuclei.segmenter import ModelError, Segmenter

    data_dir = Path(args.data)
    try:
        loaded, problems, how = cache.load_folder(data_dir, progress=not args.quiet, desc="Decoding the dataset")
        print(f"{data_dir}: images and masks {how}", file=sys.stderr)
        cache.report_problems(problems)
        kinds = {s.sample_id: evaluation.image_kind(s.image) for s in loaded}
        _, held_out = evaluation.holdout_split(kinds)
        if args.all and not args.run:
            raise ValueError("--all scores a finished run trained on other data; give it with --run")
        if args.run:
            if rest or args.train_kinds:
                raise ValueError(f"unrecognised arguments with --run: {' '.join(rest) or '--train-kinds'}")
            segmenter = Segmenter.load(args.run, tta=args.tta)
            info = segmenter.run_info
            if args.all:
                check_other_data(info, data_dir)
                held_out = sorted(kinds)
            check_unseen(info, data_dir, held_out)
        else:
            tta = [] if args.tta is None else ["--tta" if args.tta else "--no-tta"]  # the run's own setting too
            train_args = Train.build_parser(core.Config()).parse_args(rest + tta + ["--data", str(data_dir)])
            init_model, init_config = Train.resolve_init(train_args)
            if init_model is not None:  # a starting model that saw the held-out images would leak them
                check_unseen(training.read_run_config(init_model.parent)[1], data_dir, held_out)
            config = Train.config_from_args(train_args, core, init_config)
            excluded = set(held_out) | left_out_kinds(kinds, args.train_kinds)
            result = training.train(
                config,
                runs_root=train_args.runs_dir,
                run_name=train_args.name,
                resume=train_args.resume,
                exclude_ids=sorted(excluded),
                changes=Train.overrides_from_args(train_args),
                init_model=init_model,
                progress=not args.quiet,
            )
            segmenter = Segmenter.load(result.run_dir, tta=args.tta)
    except (core.DataError, ModelError, training.TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    config, run_dir = segmenter.config, segmenter.run_dir
    by_id = {s.sample_id: s for s in loaded}
    which = "all" if args.all else "held-out"
    print(
        f"Scoring {run_dir} on {len(held_out)} {which} images of {data_dir} "
        f"({', '.join(f'{n} {k}' for k, n in _counts(kinds, held_out).items())})",
        file=sys.stderr,
    )
    result = evaluation.evaluate(segmenter, [by_id[i] for i in held_out], progress=not args.quiet)
    tta = bool(segmenter.tta)
    out = predict.unique_path(Path(run_dir) / ("all_scores.json" if args.all else "holdout_scores.json"))
    summary = result.summary()
    out.write_text(
        json.dumps({"run": str(run_dir), "tta": tta, "summary": summary, "images": result.rows()}, indent=1) + "\n"
    )
    print(result.table())
    print(f"per image: {out}; {result.seconds:.0f} s to predict and score")
    figures = {
        "run": str(run_dir),
        "images": which,
        "targets": config.targets,
        "tta": tta,
        "n": summary["all"]["n"],
        "dsb_score": summary["all"]["dsb_score"],
        "ap50": summary["all"]["ap50"],
        "dice": summary["all"]["dice"],
        "per_kind": {k: v["dsb_score"] for k, v in summary.items() if k != "all"},
        "per_size": {k: v["dsb_score"] for k, v in result.by_size().items()},
        "predict_seconds": round(result.seconds, 1),
    }
    print(json.dumps(figures))
    return 0


def left_out_kinds(kinds: dict, train_kinds: str | None) -> set:
    """The ids of the images whose kind is not in ``train_kinds`` (comma-separated; None: every kind)."""
    if not train_kinds:
        return set()
    wanted = {k.strip() for k in train_kinds.split(",") if k.strip()}
    unknown = wanted - set(kinds.values())
    if unknown:
        raise ValueError(
            f"--train-kinds: no image of kind {sorted(unknown)[0]!r}; the kinds are "
            f"{', '.join(sorted(set(kinds.values())))}"
        )
    return {i for i, kind in kinds.items() if kind not in wanted}


def _counts(kinds: dict, ids) -> dict:
    counts: dict = {}
    for i in ids:
        counts[kinds[i]] = counts.get(kinds[i], 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())

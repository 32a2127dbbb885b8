"""Train the nucleus-segmentation U-Net and save a complete run.

    python Train.py                      # real DSB-2018 data if present, else the built-in sample
    python Train.py --data my_data --epochs 40 --name my-run
    python Train.py --resume runs/20261123-101500
    python Train.py --quick              # a smoke run in seconds
    python Train.py --data my_images --init dsb2018   # fine-tune the shipped model on your images

Every flag but the run's own (--runs-dir, --name, --resume, --init, --quick, --cpu-devices) is a field of
``unet_model_core.Config``, its help and default from there; ``python Train.py --help`` lists them.
The work is ``unet_nuclei.training.train``; this script only parses flags and reports.  Its lines and
the library's go through ``logging`` (``unet_nuclei.logs``): ``-q`` keeps warnings and errors only (no
progress lines, bars or Keras output), ``-v`` adds debug lines.
"""

import argparse
import logging
import sys
import types
import typing

import unet_model_core as core
from unet_nuclei import logs

log = logging.getLogger("Train")  # the script's own lines; the library's are under "unet_nuclei"

DESCRIPTION = (
    "Train a U-Net to segment cell nuclei. With no flags, trains on dataset/stage1_train (the DSB-2018 "
    "data) when it exists, otherwise on a built-in synthetic sample, and saves the run to "
    "runs/<timestamp>/."
)
EPILOG = (
    "A run folder holds model.keras, config.json (what was asked), postprocessing.json and scores.json (what "
    "was chosen and measured on the validation images), history.csv, training_curves.png and "
    "val_predictions.png; Predict_mask.py uses the newest run unless told otherwise."
)


def config_flags() -> dict:
    """The ``Flag`` of each ``Config`` field that is a flag of this script (its ``group`` is set), by
    field name, in the Config's order."""
    return {name: spec for name, spec in core.field_flags().items() if spec.group is not None}


def shown(value, none: str | None = None) -> str:
    """A default as ``--help`` shows it: 'on'/'off', comma-separated numbers, or what None means."""
    if value is None:
        return none or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def value_type(hint):
    """The type a flag's text is read as: the field's type, without its ``| None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return hint


def add_config_flags(parser: argparse.ArgumentParser, defaults) -> dict:
    """One flag per ``Config`` field with a group, from its ``Flag``; their help shows ``defaults``.
    Returns the argument groups by name, so that the script's own flags can join them.

    A bool field is a pair (``--tta``/``--no-tta``); a field with a ``parse`` is read as text and parsed
    by ``overrides_from_args``; any other is read as its type (``int``, ``float``, ``str``).  A flag left
    out is None, so only the flags given override the defaults (or, on resume, the run's values)."""
    hints = typing.get_type_hints(core.Config)
    groups = {}
    for name, spec in config_flags().items():
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        kind = value_type(hints[name])
        default = shown(getattr(defaults, name), spec.none)
        options = dict(dest=name, default=None, help=f"{spec.help} (default: {default})".replace("%", "%%"))
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction)
        else:
            options.update(type=str if spec.parse else kind, choices=spec.choices, metavar=spec.metavar)
        groups[spec.group].add_argument(core.flag_name(name), **options)
    return groups


def build_parser(defaults=None) -> argparse.ArgumentParser:
    """The flags: one per ``Config`` field with a group (their help showing ``defaults``, by default
    ``Config()``'s), and the script's own."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = add_config_flags(parser, core.Config() if defaults is None else defaults)
    groups["training"].add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        metavar="N",
        help="split the CPU into N logical devices and train data-parallel over them (tests the multi-device "
        "path without GPUs; several GPUs are used automatically)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run folders go (default: runs)")
    run.add_argument(
        "--name",
        metavar="NAME",
        help="run folder name (default: the date and time); an existing folder is never overwritten, a suffix is added",
    )
    run.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run (its name or folder) from its "
        "last good checkpoint; architecture and data come from the run, which keeps its own "
        "epoch count unless --epochs is given; a new --lr restarts the optimizer at that rate",
    )
    run.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune: start from this model's weights instead of random ones; MODEL is a shipped "
        "model (dsb2018), a run name or folder, or a model.keras. Architecture, preprocessing "
        "and targets come from it (conflicting flags are refused); its patch size, nucleus "
        "scale and loss are the defaults; the schedule defaults to a fine-tuning one "
        "(--epochs 10, --nucleus-epochs 2, --lr 0.0002), with a fresh optimizer and the "
        "post-processing chosen again on your validation images",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny sample, small model, one short epoch (other flags still apply)",
    )
    logs.add_flags(parser)
    return parser


def overrides_from_args(args) -> dict:
    """The Config fields the flags set (flags left out are absent); ValueError, naming the flag, for a
    value its ``parse`` refuses."""
    overrides = {}
    for name, spec in config_flags().items():
        value = getattr(args, name, None)
        if value is None:  # not given
            continue
        if spec.parse is not None:
            try:
                value = spec.parse(value)
            except ValueError as error:
                raise ValueError(f"{core.flag_name(name)} {error}") from None
        overrides[name] = value
    return overrides


def config_from_args(args, core, init_config=None):
    """The ``Config`` that parsed flags describe (flags left out keep the defaults, or with ``--init``
    the fine-tuning defaults from ``init_config``); ValueError, naming the flag, for a malformed list
    or a flag that would change the starting model's architecture."""
    overrides = overrides_from_args(args)
    if init_config is not None:
        from unet_nuclei.finetune import fine_tune_config

        return fine_tune_config(init_config, overrides, args.init, quick=args.quick)
    return core.quick_config(**overrides) if args.quick else core.Config(**overrides)


def resolve_init(args):
    """``(model file, its run's Config)`` for ``--init``, or ``(None, None)``."""
    if args.init is None:
        return None, None
    from unet_nuclei import pretrained, training

    run_dir, model_file = pretrained.run_and_model_file(pretrained.resolve_model(args.init, args.runs_dir)[0])
    if not model_file.is_file():
        raise FileNotFoundError(f"--init {args.init}: {run_dir} holds no {training.MODEL_FILE} yet")
    return model_file, training.read_run_config(run_dir)[0]


def main(argv=None) -> int:
    """Run the script with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    from unet_nuclei import files, training

    logs.to_console(logs.level_from_flags(args.quiet, args.verbose), log.name)
    try:
        init_model, init_config = resolve_init(args)
        config = config_from_args(args, core, init_config)
        log.info("Configuration: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
        # On resume only the flags given again count (a plain --resume keeps the run's own epochs).
        result = training.train(
            config,
            runs_root=args.runs_dir,
            run_name=args.name,
            resume=args.resume,
            cpu_devices=args.cpu_devices,
            progress=not args.quiet,
            changes=overrides_from_args(args),
            init_model=init_model,
        )
    except KeyboardInterrupt as error:
        # Exit status 1, as for any run that did not finish; the message says what exists.
        print(f"\nInterrupted: {error or 'before training started; nothing new was saved'}.", file=sys.stderr)
        return 1
    except (core.DataError, training.TrainingError, OSError, ValueError) as error:
        # Filesystem errors (files.OutputError: full disk, no permission) name the folder and the cause.
        print(f"error: {error}", file=sys.stderr)
        usage = (core.DataError, FileNotFoundError, FileExistsError, ValueError)
        return 2 if isinstance(error, usage) and not isinstance(error, files.OutputError) else 1
    if result.run_dir is not None:  # None: a worker of several machines; the chief saved the run
        log.info(f"Predict with: python Predict_mask.py IMAGE --model {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the nucleus-segmentation U-Net and save a complete run.

    python Train.py                      # real DSB-2018 data if present, else the built-in sample
    python Train.py --data my_data --epochs 40 --name my-run
    python Train.py --resume runs/20261123-101500
    python Train.py --quick              # a smoke run in seconds
    python Train.py --data my_images --init dsb2018   # fine-tune the shipped model on your images

Every flag's default comes from ``unet_model_core.Config``; ``python Train.py --help`` lists them.
The work is ``unet_nuclei.training.train``; this script only parses flags and reports.
"""
import argparse
import ast
import sys
from pathlib import Path
from types import SimpleNamespace

CORE_FILE = Path(__file__).resolve().with_name("unet_model_core.py")
CHOICE_LISTS = ("SAMPLING_MODES", "PREPROCESSING", "TARGETS", "PADDINGS", "BLOCKS", "LOSSES", "LR_SCHEDULES")


def core_settings() -> tuple[SimpleNamespace, SimpleNamespace]:
    """``Config``'s defaults and the core's lists of choices, as written in the core's source: read, not
    imported, because importing the core imports TensorFlow, and ``--help`` should not wait many seconds
    for that.  They are the literal values of the file, so they cannot drift from the imported ones
    (tests/test_train.py compares them)."""
    tree = ast.parse(CORE_FILE.read_text(encoding="utf-8"))
    choices, defaults = {}, {}
    for node in tree.body:
        names = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and len(names) == 1 and names[0] in CHOICE_LISTS:
            choices[names[0]] = ast.literal_eval(node.value)
        elif isinstance(node, ast.ClassDef) and node.name == "Config":
            for field in node.body:
                if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and field.value is not None:
                    defaults[field.target.id] = ast.literal_eval(field.value)
    return SimpleNamespace(**defaults), SimpleNamespace(**choices)


def build_parser(defaults=None) -> argparse.ArgumentParser:
    """The flags, their help showing ``defaults`` (a ``Config``; by default the core's own, read without
    importing TensorFlow)."""
    source_defaults, core = core_settings()
    d = source_defaults if defaults is None else defaults
    parser = argparse.ArgumentParser(
        description="Train a U-Net to segment cell nuclei. With no flags, trains on dataset/stage1_train "
                    "(the DSB-2018 data) when it exists, otherwise on a built-in synthetic sample, and "
                    "saves the run to runs/<timestamp>/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A run folder holds model.keras, config.json, history.csv, training_curves.png and "
               "val_predictions.png; Predict_mask.py uses the newest run unless told otherwise.")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="dataset folder in the DSB layout (<id>/images, <id>/masks) "
                      "or with images/ and masks/ subfolders (default: dataset/stage1_train if present, "
                      "else the built-in synthetic sample)")
    data.add_argument("--sample-images", type=int, metavar="N",
                      help=f"number of images in the built-in synthetic sample (default: {d.sample_images})")
    data.add_argument("--channel", type=int, metavar="N",
                      help="for multi-channel training images (ImageJ or OME-TIFF, one stain per channel): the "
                           "channel that shows the nuclei, 0-based; for RGB images 0 red, 1 green, 2 blue "
                           "(default: none; grey and colour images are read as they are, and a multi-channel "
                           "image is refused)")
    data.add_argument("--sampling", choices=core.SAMPLING_MODES,
                      help=f"'patch': random crops at native resolution, prediction at full resolution; "
                           f"'resize': whole images resized to --image-size, the original way "
                           f"(default: {d.sampling})")
    data.add_argument("--image-size", type=int, metavar="PX",
                      help=f"patch side (or resize target) in pixels (default: {d.image_size})")
    data.add_argument("--val-size", type=float, metavar="F",
                      help=f"validation images: a fraction below 1 or a count (default: {d.val_size})")
    data.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                      help="turn off flips, rotations and intensity jitter (default: on)")
    data.add_argument("--scale-range", metavar="LOW,HIGH",
                      help=f"random patch scale, so the model meets smaller and larger nuclei; 'none' keeps "
                           f"the native scale (default: {','.join(map(str, d.scale_range)) if d.scale_range else 'none'})")
    data.add_argument("--nucleus-diameter", metavar="PX",
                      help=f"a second stage of training (--nucleus-epochs) with each image rescaled so that its "
                           f"nuclei's median diameter is PX pixels (training patches from the annotations, "
                           f"jittered 0.8-1.25 times); every prediction then rescales likewise, from the nuclei "
                           f"of a first pass; 'none': native scale throughout (default: "
                           f"{d.nucleus_diameter or 'none'})")
    data.add_argument("--nucleus-epochs", type=int, metavar="N",
                      help=f"epochs of that second stage, after --epochs at native scale, its learning rate "
                           f"starting again at a fifth of --lr; 0: no first stage, the whole run at "
                           f"--nucleus-diameter, jittered by --scale-range (default: {d.nucleus_epochs})")
    data.add_argument("--area-power", type=float, metavar="P",
                      help=f"patches come from images drawn with probability proportional to their area to this "
                           f"power: 1 gives every pixel the same chance, 0 every image; in between, a few large "
                           f"images do not crowd out many small ones of another kind (default: {d.area_power})")
    data.add_argument("--preprocessing", choices=core.PREPROCESSING,
                      help=f"'grey': grey, bright nuclei on dark, contrast-stretched, the same for every kind "
                           f"of microscopy; 'rgb': the image as it is (default: {d.preprocessing})")
    model = parser.add_argument_group("model")
    model.add_argument("--targets", choices=core.TARGETS,
                       help=f"'instance': background / nucleus interior / boundary classes, so touching nuclei "
                            f"separate; 'binary': one nucleus mask, the original U-Net (default: {d.targets})")
    model.add_argument("--channels", metavar="C1,C2,...",
                       help=f"channels per level, the last being the bottleneck; the depth follows "
                            f"(default: {','.join(map(str, d.channels))})")
    model.add_argument("--padding", choices=core.PADDINGS,
                       help=f"'same' keeps the size; 'valid' is the unpadded original (default: {d.padding})")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help=f"batch normalisation after each convolution (default: {'on' if d.batch_norm else 'off'})")
    model.add_argument("--block", choices=core.BLOCKS,
                       help=f"convolutional block per level: plain, or residual with a shortcut (default: {d.block})")
    model.add_argument("--dropout", type=float, metavar="P", help=f"dropout after each block (default: {d.dropout})")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, metavar="N",
                          help=f"number of epochs (at native scale, before --nucleus-epochs) (default: {d.epochs})")
    training.add_argument("--steps-per-epoch", type=int, metavar="N",
                          help="batches per epoch (default: one pass over the training pixels)")
    training.add_argument("--batch-size", type=int, metavar="N", help=f"global batch size (default: {d.batch_size})")
    training.add_argument("--lr", dest="learning_rate", type=float, metavar="LR",
                          help=f"Adam learning rate (default: {d.learning_rate})")
    training.add_argument("--loss", choices=core.LOSSES,
                          help=f"loss; cross-entropy is categorical and Dice per class for instance targets "
                               f"(default: {d.loss})")
    training.add_argument("--lr-schedule", choices=core.LR_SCHEDULES,
                          help=f"'cosine': decay to 2%% of --lr over the run; 'plateau': halve when the "
                               f"validation loss stalls (default: {d.lr_schedule})")
    training.add_argument("--seed", type=int, help=f"random seed for the split, patches and weights (default: {d.seed})")
    training.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                          help="float16 compute on GPUs (bfloat16 on CPUs), float32 output (default: on where "
                               "the hardware is fast at it: GPUs of compute capability 7+, CPUs with bfloat16 "
                               "instructions; --no-mixed-precision forces float32)")
    training.add_argument("--xla", action="store_true", default=None, help="compile the training step with XLA (default: off)")
    training.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                          help="split the CPU into N logical devices and train data-parallel over them "
                               "(tests the multi-device path without GPUs; several GPUs are used automatically)")
    training.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help=f"test-time augmentation (the 8 flips and rotations averaged) when the post-processing "
                               f"is chosen on the validation images, kept as the run's setting for Predict_mask.py "
                               f"(default: {'on' if d.tta else 'off'})")
    run = parser.add_argument_group("run")
    run.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run folders go (default: runs)")
    run.add_argument("--name", metavar="NAME", help="run folder name (default: the date and time); "
                     "an existing folder is never overwritten, a suffix is added")
    run.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its name or folder) from its "
                     "last good checkpoint; architecture and data come from the run, which keeps its own "
                     "epoch count unless --epochs is given; a new --lr restarts the optimizer at that rate")
    run.add_argument("--init", metavar="MODEL",
                     help="fine-tune: start from this model's weights instead of random ones; MODEL is a shipped "
                          "model (dsb2018), a run name or folder, or a model.keras. Architecture, preprocessing "
                          "and targets come from it (conflicting flags are refused); its patch size, nucleus "
                          "scale and loss are the defaults; the schedule defaults to a fine-tuning one "
                          "(--epochs 10, --nucleus-epochs 2, --lr 0.0002), with a fresh optimizer and the "
                          "post-processing chosen again on your validation images")
    run.add_argument("--quick", action="store_true",
                     help="smoke run: tiny sample, small model, one short epoch (other flags still apply)")
    return parser


FIELDS = ("data", "sample_images", "channel", "sampling", "image_size", "val_size", "augment", "area_power",
          "nucleus_epochs", "preprocessing", "targets", "padding", "batch_norm", "block", "dropout", "epochs", "steps_per_epoch",
          "batch_size", "learning_rate", "loss", "lr_schedule", "seed", "mixed_precision", "xla", "tta")


def overrides_from_args(args) -> dict:
    """The Config fields the flags set (flags left out are absent); ValueError, naming the flag, for a
    malformed list."""
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if "data" in overrides:
        overrides["data_dir"] = overrides.pop("data")
    for flag, field, kind in (("--channels", "channels", int), ("--scale-range", "scale_range", float)):
        text = getattr(args, field)
        if text is None:
            continue
        if field == "scale_range" and text.strip().lower() == "none":
            overrides[field] = None
            continue
        try:
            overrides[field] = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, for example "
                             f"{'16,32,64,128,256' if kind is int else '0.6,1.8'}") from None
    text = getattr(args, "nucleus_diameter", None)
    if text is not None:
        try:
            overrides["nucleus_diameter"] = None if text.strip().lower() == "none" else float(text)
        except ValueError:
            raise ValueError(f"--nucleus-diameter {text!r}: expected a number of pixels, or 'none'") from None
        if overrides["nucleus_diameter"] == 0:  # once read as "none": say what each means instead
            raise ValueError("--nucleus-diameter 0: give the nuclei's median diameter in pixels (a positive "
                             "number, such as 20), or 'none' to train at the images' own scale")
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
    import unet_model_core as core  # imports TensorFlow, so after the flags are parsed (--help is quick)
    from unet_nuclei import files, training

    try:
        init_model, init_config = resolve_init(args)
        config = config_from_args(args, core, init_config)
        print("Configuration:", ", ".join(f"{k}={v}" for k, v in config.to_dict().items()), flush=True)
        # On resume only the flags given again count (a plain --resume keeps the run's own epochs).
        result = training.train(config, runs_root=args.runs_dir, run_name=args.name, resume=args.resume,
                                cpu_devices=args.cpu_devices, progress=True, changes=overrides_from_args(args),
                                init_model=init_model)
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
        print(f"Predict with: python Predict_mask.py IMAGE --model {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

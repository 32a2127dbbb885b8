"""Peak memory and time of predicting one large image, the whole way: ``Segmenter.segment`` (preprocessing,
overlap-tile prediction, the nuclei from the model's output), as ``Predict_mask.py`` runs it.

Each case runs in a fresh child process, which builds the model, loads the image (written by this process,
so the generator's memory never counts there), predicts it once and reports its peak resident set (VmHWM
from /proc/self/status, TensorFlow and the model included) and the seconds ``Segmenter.segment`` took.  Memory
figures are robust; times depend on what else the machine is doing.

With ``--compare REF`` the same cases also run on the code of a git commit (extracted with ``git archive``
into a temporary folder), alternating with the working tree, so "before" and "after" are measured side by
side in one run.  Without ``--model`` the model is the default architecture untrained: its speed and its
memory do not depend on the weights, but its nuclei (and so the post-processing's share) are not those of
a trained model; pass a run folder for those.

The last line printed is one JSON object with ``peak_mb_<size>`` and ``s_<size>`` for each size.

    python benchmarks/bench_predict_memory.py                        # 4096x4096 and 8000x8000
    python benchmarks/bench_predict_memory.py --compare HEAD~1       # the same, before and after
    python benchmarks/bench_predict_memory.py --model runs/latest --quick   # a trained run, 4096x4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SMOKE_MODEL = dict(image_size=32, channels=(4, 8))  # seconds, for the tests


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table and the final JSON line."""
    print(message, file=sys.stderr, flush=True)


def rss_mb(field: str) -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no " + field + " line: this benchmark needs Linux")


# --------------------------------------------------------------------------------------------------
# Child process: one prediction, with the code found first on sys.path
# --------------------------------------------------------------------------------------------------
def segmenter_of(model, config, model_arg):
    """The code under test's whole path from an image to its nuclei, as a function of the image: the
    ``Segmenter`` where the code has one, else ``predict.predict_image`` (a --compare commit from before it)."""
    try:
        from unet_nuclei.segmenter import Segmenter
    except ImportError:
        from unet_nuclei import predict

        if model_arg:
            model, config, _, _ = predict.load_run(model_arg)
        return lambda image: predict.predict_image(model, config, image, progress=False)
    segmenter = Segmenter.load(model_arg) if model_arg else Segmenter(model, config)
    return lambda image: segmenter.segment(image, progress=False)


def child(image_file: str, model_arg: str | None, smoke: bool) -> None:
    import keras
    import numpy as np

    import unet_model_core as core
    from unet_nuclei import checkpoints

    model = config = None  # a --model run is loaded by segmenter_of
    if not model_arg:
        config = core.Config(**(SMOKE_MODEL if smoke else {}))
        keras.utils.set_random_seed(config.seed)
        model = checkpoints.export_inference_model(core.build_unet_from_config(config), config)
    segment = segmenter_of(model, config, model_arg)
    image = np.load(image_file)
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    prediction = segment(image)
    seconds = time.perf_counter() - start
    if prediction.labels.shape != image.shape[:2]:
        raise RuntimeError(f"labels of shape {prediction.labels.shape} for an image of shape {image.shape}")
    print(
        json.dumps(
            {
                "peak_mb": round(rss_mb("VmHWM"), 1),
                "before_mb": round(before, 1),
                "seconds": round(seconds, 2),
                "nuclei": prediction.count,
                "code": str(Path(core.__file__).resolve().parent),
            }
        )
    )


def run_child(code_root: Path, image_file: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", image_file]
    if args.model:
        command += ["--model", args.model]
    if args.smoke:
        command.append("--smoke")
    # The code under test comes first on the path, so a --compare child imports the old commit's modules.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(code_root))
    if result.returncode != 0:
        raise RuntimeError(f"the child process ({code_root}) failed:\n{result.stderr[-3000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(answer["code"]) != code_root.resolve():
        raise RuntimeError(f"the child imported the code in {answer['code']}, not {code_root}")
    return answer


def extract_commit(ref: str, folder: Path) -> str:
    """The tracked files of commit ``ref`` under ``folder``; returns the commit's short hash."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--compare {ref}: not a commit of {REPO} ({commit.stderr.strip()})")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def make_image(side: int):
    """A synthetic fluorescence nuclei image, side x side (tiled from a 1024x1024 one when larger)."""
    import numpy as np

    from unet_nuclei import synthetic

    size = min(side, 1024)
    tile, _ = synthetic.generate_sample(np.random.default_rng(0), size, size, "fluorescence")
    reps = (-(-side // size), -(-side // size), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:side, :side])


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Peak memory (whole process) and time of Segmenter.segment on large images, each in a fresh "
        "child process; optionally the same on an older commit, side by side. Prints a table "
        "and, as its last line, one JSON object."
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="square image sides to measure (default: 4096 8000)"
    )
    parser.add_argument("--quick", action="store_true", help="the 4096x4096 image only")
    parser.add_argument(
        "--compare",
        metavar="REF",
        default=None,
        help="also measure the code of this git commit (e.g. HEAD~1), alternating with the working tree",
    )
    parser.add_argument(
        "--model", default=None, help="a run folder or model.keras (default: the default architecture, untrained)"
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    parser.add_argument("--child", metavar="IMAGE_NPY", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.model and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())  # a --compare child runs in another folder
    if args.child:
        child(args.child, args.model, args.smoke)
        return 0
    sys.path.insert(0, str(REPO))
    sizes = args.sizes or ([160, 400] if args.smoke else [4096] if args.quick else [4096, 8000])
    command = "python benchmarks/bench_predict_memory.py " + " ".join(argv)
    log(f"Rerun with: {command}")
    with tempfile.TemporaryDirectory(prefix="bench_predict_memory_") as folder:
        codes = {"after": REPO}
        commit = None
        if args.compare:
            codes = {"before": Path(folder) / "before", "after": REPO}
            codes["before"].mkdir()
            commit = extract_commit(args.compare, codes["before"])
        results: dict[str, dict[int, dict]] = {label: {} for label in codes}
        for side in sizes:
            image_file = str(Path(folder) / f"image_{side}.npy")
            import numpy as np

            np.save(image_file, make_image(side))
            for label, code in codes.items():
                log(f"{side}x{side}, {label if args.compare else 'working tree'}: predicting in a child process ...")
                results[label][side] = run_child(code, image_file, args)
                r = results[label][side]
                log(f"  peak {r['peak_mb']:.0f} MB, {r['seconds']:.1f} s, {r['nuclei']} nuclei")
            os.remove(image_file)

    model_text = f"run {args.model}" if args.model else "default architecture, untrained"
    print(f"Prediction memory benchmark: Segmenter.segment on synthetic nuclei images; model: {model_text}")
    print(
        "Peak = the child process's VmHWM (TensorFlow, the model, the image and everything Segmenter.segment "
        "allocates); 'before' = its resident set just before Segmenter.segment; B/px = (peak - before) / pixels."
    )
    print()
    print(f"{'image':>10} {'code':>12} {'peak MB':>8} {'before MB':>9} {'B/px':>6} {'seconds':>8} {'nuclei':>7}")
    for side in sizes:
        for label in results:
            r = results[label][side]
            name = f"{label} {commit}" if label == "before" else ("after" if args.compare else "this tree")
            per_pixel = (r["peak_mb"] - r["before_mb"]) * 2**20 / side**2
            print(
                f"{f'{side}x{side}':>10} {name:>12} {r['peak_mb']:>8.0f} {r['before_mb']:>9.0f} {per_pixel:>6.1f} "
                f"{r['seconds']:>8.1f} {r['nuclei']:>7}"
            )
    summary = {"benchmark": "bench_predict_memory", "model": model_text}
    for side in sizes:
        summary[f"peak_mb_{side}"] = results["after"][side]["peak_mb"]
        summary[f"s_{side}"] = results["after"][side]["seconds"]
    if args.compare:
        summary["before_commit"] = commit
        for side in sizes:
            summary[f"before_peak_mb_{side}"] = results["before"][side]["peak_mb"]
            summary[f"before_s_{side}"] = results["before"][side]["seconds"]
    summary["details"] = {label: {str(side): r for side, r in by_size.items()} for label, by_size in results.items()}
    summary["command"] = command
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

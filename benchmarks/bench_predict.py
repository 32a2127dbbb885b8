"""Full-resolution prediction benchmark: overlap-tile inference against the model's plain forward pass.

In one run, for 256x256, 520x696, 1024x1024 and 1040x1388 images (synthetic nuclei images):

  * tiled: ``Segmenter.native_probabilities`` as Predict_mask.py calls it (tiles cut from the real image
    with mirrored context, batched forward passes, the blending window, normalisation: everything),
    timed as image megapixels per second;
  * forward (the bound): the same model's plain forward pass on in-memory batches of tiles of the same
    size, in the same batch sizes and number.  Its megapixels are the input tile pixels, i.e. the
    image area that forward work would cover with NO overlap or margin waste, so the ratio
    ``tiled / forward`` shows the cost of the overlap, the context margin, the rounding of the tile
    grid, and every bit of Python around the model;
  * peak memory: each image predicted once in a fresh child process, whose VmHWM (peak resident set)
    is read from /proc/self/status, so nothing else in this process counts.  A 4096x4096 image is
    done there too, to check that a very large image stays within the 3 GB budget.

The last line printed is one JSON object.

    python benchmarks/bench_predict.py            # the full run (about 2 minutes on 2 cores)
    python benchmarks/bench_predict.py --quick    # a smaller run (under 30 seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_train import log, machine_info, machine_line  # noqa: E402  (shared helpers)

SETTINGS = {
    # image sizes timed in this process, timed repeats of each, sizes whose peak memory is measured in
    # a child process (the big one always), model overrides for the smoke test
    "full": dict(
        sizes=[(256, 256), (520, 696), (1024, 1024), (1040, 1388)],
        repeats=3,
        big=4096,
        extra_sizes=[(4096, 4096)],
        memory_sizes=[(256, 256), (520, 696), (1024, 1024), (1040, 1388)],
        model={},
    ),
    "quick": dict(
        sizes=[(256, 256), (520, 696), (1024, 1024)], repeats=1, big=4096, extra_sizes=[], memory_sizes=[], model={}
    ),
    "smoke": dict(
        sizes=[(96, 96), (200, 260)],
        repeats=1,
        big=1024,
        extra_sizes=[],
        memory_sizes=[],
        model=dict(image_size=32, channels=(4, 8)),
    ),
}


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the peak from ru_maxrss (kB on Linux, bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_image(height: int, width: int, seed: int = 0):
    """A synthetic fluorescence nuclei image of the given size (large ones tiled from a 1024x1024 one, to
    keep the generator's own memory out of the measurement)."""
    import numpy as np

    from unet_nuclei import synthetic

    if height * width > 1500 * 1500:
        tile, _ = synthetic.generate_sample(np.random.default_rng(seed), 1024, 1024, "fluorescence")
        reps = (-(-height // 1024), -(-width // 1024), 1)
        return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])
    image, _ = synthetic.generate_sample(np.random.default_rng(seed), height, width, "fluorescence")
    return image


def load_model(model_arg: str | None, overrides: dict):
    """A run's model and config (``--model``), or the default architecture untrained: the time of a
    forward pass does not depend on the weights."""
    import keras

    import unet_model_core as core
    from unet_nuclei import checkpoints
    from unet_nuclei.segmenter import Segmenter

    if model_arg:
        segmenter = Segmenter.load(model_arg)
        return segmenter.model, segmenter.config
    config = core.Config(**overrides)
    keras.utils.set_random_seed(config.seed)
    return checkpoints.export_inference_model(core.build_unet_from_config(config), config), config


def as_pair(value) -> tuple[int, int]:
    """A tile size from tile_geometry: an int for a square, or (height, width)."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def default_overlap(config, out_size, margin: int) -> int:
    """The overlap the tiled prediction uses when none is given (mirrors its rule, for the report)."""
    out = min(as_pair(out_size))
    if config.tile_overlap is not None:
        return min(config.tile_overlap, out - 1)
    return min(out // 8 if margin else 0, out - 1)


def fmt(value) -> str:
    h, w = as_pair(value)
    return str(h) if h == w else f"{h}x{w}"


# --------------------------------------------------------------------------------------------------
# Child process: peak memory of one prediction
# --------------------------------------------------------------------------------------------------
def child(image_file: str, model_arg: str | None, overrides: dict, batch_size: int) -> None:
    import numpy as np

    from unet_nuclei.segmenter import Segmenter

    model, config = load_model(model_arg, overrides)
    image = np.load(image_file)  # written by the parent, so the generator's memory never counts here
    height, width = image.shape[:2]
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    probability = Segmenter(model, config, batch_size=batch_size).native_probabilities(image)
    seconds = time.perf_counter() - start
    assert probability.shape[:2] == (height, width)
    print(
        json.dumps(
            {
                "height": height,
                "width": width,
                "peak_mb": round(rss_mb("VmHWM"), 1),
                "before_mb": round(before, 1),
                "seconds": round(seconds, 3),
                "mpx_per_s": round(height * width / seconds / 1e6, 3),
            }
        )
    )


def run_child(height: int, width: int, args) -> dict:
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as folder:
        image_file = str(Path(folder) / f"image_{height}x{width}.npy")
        np.save(image_file, make_image(height, width))
        return _run_child(image_file, height, width, args)


def _run_child(image_file: str, height: int, width: int, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        image_file,
        "--batch-size",
        str(args.batch_size),
    ]
    if args.model:
        command += ["--model", args.model]
    if args.smoke:
        command.append("--smoke")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the child process for {height}x{width} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Timing in this process
# --------------------------------------------------------------------------------------------------
def time_size(model, config, height: int, width: int, repeats: int, batch_size: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from unet_nuclei import tiling
    from unet_nuclei.segmenter import Segmenter

    segmenter = Segmenter(model, config, batch_size=batch_size)
    image = make_image(height, width)
    size, out_size, margin = tiling.tile_geometry(model, config, (height, width))
    tile_h, tile_w = as_pair(size)
    overlap = default_overlap(config, out_size, margin)
    done = []
    segmenter.native_probabilities(image, progress=lambda n, total: done.append(n))  # warm-up (traces); records batches
    chunks = [b - a for a, b in zip([0, *done[:-1]], done)]
    tiles = done[-1]

    # The bound: the same number of tiles in the same batch sizes, already in memory as float32.
    rng = np.random.default_rng(0)
    batches = {
        n: rng.uniform(0, 255, (n, tile_h, tile_w, config.input_channels)).astype(np.float32) for n in set(chunks)
    }
    tensors = {n: tf.constant(b) for n, b in batches.items()}
    forward_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def forward_predict_on_batch():
        for n in chunks:
            np.asarray(model.predict_on_batch(batches[n]))

    def forward_tf_function():
        for n in chunks:
            forward_fn(tensors[n]).numpy()

    forward_predict_on_batch()
    forward_tf_function()
    tiled_s, pob_s, tff_s = [], [], []
    for _ in range(repeats):  # interleaved, so drifts of the machine hit all three alike
        start = time.perf_counter()
        segmenter.native_probabilities(image)
        tiled_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_predict_on_batch()
        pob_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_tf_function()
        tff_s.append(time.perf_counter() - start)
    tiled, pob, tff = statistics.median(tiled_s), statistics.median(pob_s), statistics.median(tff_s)
    forward = min(pob, tff)
    image_px, tile_px = height * width, tiles * tile_h * tile_w
    return {
        "size": f"{height}x{width}",
        "height": height,
        "width": width,
        "tile": fmt(size),
        "output": fmt(out_size),
        "margin": margin,
        "overlap": overlap,
        "tiles": tiles,
        "batches": chunks,
        "tiled_s": tiled,
        "tiled_s_min": min(tiled_s),
        "tiled_s_max": max(tiled_s),
        "forward_s": forward,
        "forward_predict_on_batch_s": pob,
        "forward_tf_function_s": tff,
        "image_mpx": image_px / 1e6,
        "tile_mpx": tile_px / 1e6,
        "tiled_mpx_per_s": image_px / tiled / 1e6,
        "forward_mpx_per_s": tile_px / forward / 1e6,
        "ratio": (image_px / tiled) / (tile_px / forward),
        "waste": tile_px / image_px,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Full-resolution overlap-tile prediction benchmark: the tiled prediction against "
        "the model's plain forward pass on in-memory tiles, and peak memory up to a "
        "4096x4096 image. Prints a table and, as its last line, one JSON object."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: three image sizes, one timed repeat, peak memory of the "
        "4096x4096 image only (under two minutes on 2 cores)",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    parser.add_argument(
        "--model",
        default=None,
        help="a run folder or model.keras to time (default: the default architecture, "
        "untrained: speed does not depend on the weights)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="tiles per forward pass (default: the Segmenter's default)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per size (3; 1 with --quick)")
    parser.add_argument("--child", metavar="IMAGE_NPY", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    setting = SETTINGS[mode]
    import inspect

    from unet_nuclei import tiling
    from unet_nuclei.segmenter import Segmenter

    if args.batch_size is None:
        args.batch_size = inspect.signature(Segmenter).parameters["batch_size"].default
    if args.child:
        child(args.child, args.model, setting["model"], args.batch_size)
        return 0
    command = "python benchmarks/bench_predict.py " + " ".join(argv)
    log(f"Rerun with: {command}")
    repeats = args.repeats or setting["repeats"]
    info = machine_info()
    model, config = load_model(args.model, setting["model"])

    rows, extra = [], []
    for sizes, target, times in ((setting["sizes"], rows, repeats), (setting["extra_sizes"], extra, 1)):
        for height, width in sizes:
            log(f"Timing {height}x{width}: the tiled prediction and the plain forward pass, {times} repeat(s) ...")
            target.append(time_size(model, config, height, width, times, args.batch_size))
            log(
                f"  tiled {target[-1]['tiled_mpx_per_s']:.2f} Mpx/s, forward {target[-1]['forward_mpx_per_s']:.2f} "
                f"Mpx/s, ratio {target[-1]['ratio']:.3f}"
            )
    memory = {}
    big = setting["big"]
    for height, width in setting["memory_sizes"] + [(big, big)]:
        log(f"Peak memory of predicting {height}x{width} in a child process ...")
        memory[f"{height}x{width}"] = run_child(height, width, args)
        log(f"  {memory[f'{height}x{width}']['peak_mb']:.0f} MB")

    total_image = sum(r["image_mpx"] for r in rows)
    total_tile = sum(r["tile_mpx"] for r in rows)
    tiled_rate = total_image / sum(r["tiled_s"] for r in rows)
    forward_rate = total_tile / sum(r["forward_s"] for r in rows)
    big_key = f"{big}x{big}"
    result = {
        "benchmark": "bench_predict",
        "mode": mode,
        "tiled_vs_forward": round(tiled_rate / forward_rate, 3),
        "tiled_vs_forward_min": round(min(r["ratio"] for r in rows), 3),
        "tiled_vs_forward_by_size": {r["size"]: round(r["ratio"], 3) for r in rows + extra},
        "tiled_mpx_per_s": {r["size"]: round(r["tiled_mpx_per_s"], 3) for r in rows + extra},
        "forward_mpx_per_s": {r["size"]: round(r["forward_mpx_per_s"], 3) for r in rows + extra},
        "tiled_s_median_min_max": {
            r["size"]: [round(r["tiled_s"], 3), round(r["tiled_s_min"], 3), round(r["tiled_s_max"], 3)]
            for r in rows + extra
        },
        f"peak_mb_{big}": memory[big_key]["peak_mb"],
        "peak_mb": {k: v["peak_mb"] for k, v in memory.items()},
        "before_predict_mb": {k: v["before_mb"] for k, v in memory.items()},
        f"mpx_per_s_{big}": memory[big_key]["mpx_per_s"],
        "tile": {r["size"]: [r["tile"], r["output"], r["margin"], r["overlap"], r["tiles"]] for r in rows + extra},
        "batch_size": args.batch_size,
        "command": command,
    }
    if big != 4096:  # the smoke run's stand-in, under the key the tests look for
        result["peak_mb_4096"] = memory[big_key]["peak_mb"]

    print(f"Prediction benchmark ({mode} run)")
    print(f"Machine: {machine_line(info)}")
    print(
        f"Model:   {'run ' + args.model if args.model else 'default architecture, untrained'}: U-Net channels "
        f"{'-'.join(map(str, config.channels))}, padding={config.padding}, float32; batch of "
        f"{args.batch_size} tiles; default tile {tiling.PREDICT_TILE}, context margin {tiling.CONTEXT_MARGIN}"
    )
    print(
        "Forward bound = the model's plain forward pass (the faster of predict_on_batch and a cached "
        "tf.function) on in-memory float32 batches of tiles of the same size and number; its "
        "megapixels are the input tile pixels (no overlap or margin waste). Times: median of "
        f"{repeats} run(s)."
    )
    print()
    print(
        f"{'image':>10} {'tile/out/margin/overlap':>28} {'tiles':>5} {'tile px/img px':>14} {'tiled s':>8} "
        f"{'tiled Mpx/s':>11} {'forward Mpx/s':>13} {'tiled/fwd':>9} {'peak MB':>8}"
    )

    def table_row(r):
        geometry = f"{r['tile']}/{r['output']}/{r['margin']}/{r['overlap']}"
        peak = memory.get(r["size"], {}).get("peak_mb")
        print(
            f"{r['size']:>10} {geometry:>28} {r['tiles']:>5} {r['waste']:>14.2f} {r['tiled_s']:>8.3f} "
            f"{r['tiled_mpx_per_s']:>11.2f} {r['forward_mpx_per_s']:>13.2f} {r['ratio']:>9.3f} "
            f"{peak if peak is not None else '-':>8}"
        )

    for r in rows:
        table_row(r)
    print(
        f"{'all above':>10} {'':>28} {'':>5} {total_tile / total_image:>14.2f} {sum(r['tiled_s'] for r in rows):>8.3f} "
        f"{tiled_rate:>11.2f} {forward_rate:>13.2f} {tiled_rate / forward_rate:>9.3f}"
    )
    for r in extra:  # shown for the multi-tile case, not part of the headline ratio
        table_row(r)
    m = memory[big_key]
    print(
        f"{big_key:>10} (child process, one run including tracing): {m['seconds']:.1f} s, {m['mpx_per_s']:.2f} Mpx/s, "
        f"peak {m['peak_mb']:.0f} MB (resident before predicting: {m['before_mb']:.0f} MB for TensorFlow, the "
        f"model and the uint8 image)"
    )
    print()
    print(
        f"tiled_vs_forward = {result['tiled_vs_forward']:.3f} over all sizes (total image Mpx / total tiled s, "
        f"over total tile Mpx / total forward s; target >= 0.7); lowest single size "
        f"{result['tiled_vs_forward_min']:.3f}"
    )
    print(f"peak_mb_4096 = {result['peak_mb_4096']:.0f} MB (budget 3072 MB for the whole process)")
    print(f"Rerun: {command}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loading and training-step costs of the default real-data training, and prediction throughput, per
numeric setting, measured side by side in one process.

  1. loading: ``cache.load_folder`` into an empty cache (cold: every PNG decoded) and again (cached:
     memory-mapped), in seconds;
  2. the training step of the default model and pipeline (``make_datasets`` on the loaded data, batch 8,
     128 px patches) under each setting: float32, mixed precision (bfloat16 on CPUs, float16 on GPUs),
     XLA, and both; warm-up steps first, then ``--steps`` timed steps of ``model.fit``; an epoch is
     ``make_datasets``' steps per epoch times the step;
  3. the input pipeline alone (the same dataset iterated without the model), to give its share of a step;
  4. prediction: full-resolution tiled prediction (``Segmenter.native_probabilities``) of the largest images, in
     megapixels per second, per setting.

The settings "onednn-off" and "onednn-on" are float32 with TensorFlow's oneDNN CPU kernels forced off or
on (``TF_ENABLE_ONEDNN_OPTS``, read when TensorFlow loads, so each runs in a child process on the same
data); "float32" runs with the project's choice (on for x86; see ``unet_model_core._choose_onednn``).
The settings "jax" and "torch" are float32 on those Keras backends (``KERAS_BACKEND``, also a child
process each, fed by the NumPy ``PyDataset`` that TensorFlow reads through ``tf.data``): the same model,
data and batches, so the ratios compare the backends alone.

The data is ``--data`` if given, else ``dataset/stage1_train`` when present, else a generated DSB-like
folder (``unet_nuclei.synthetic`` in DSB-2018's size mix).  The last line is one JSON object.

    python benchmarks/bench_step.py                      # about 5 minutes on 2 CPU cores
    python benchmarks/bench_step.py --data DIR --steps 200 --settings float32,mixed+xla
    python benchmarks/bench_step.py --settings onednn-off,onednn-on,mixed --steps 20 --warmup 5
    python benchmarks/bench_step.py --settings float32,mixed,jax,torch --steps 30 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

SETTINGS = ("float32", "mixed", "xla", "mixed+xla", "onednn-off", "onednn-on", "jax", "torch")
# float32 in a child process of this script with these environment variables: TensorFlow's oneDNN CPU
# kernels forced off or on (chosen when TensorFlow loads), or another Keras backend.
CHILD_SETTINGS = {
    "onednn-off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn-on": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "jax": {"KERAS_BACKEND": "jax"},
    "torch": {"KERAS_BACKEND": "torch"},
}


def cpu_flags() -> list[str]:
    """The processor's vector-instruction flags that decide the kernels' speed (Linux), for the JSON line."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((entry for entry in text.splitlines() if entry.startswith("flags")), "")
    return [flag for flag in wanted if flag in line.split()]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_data(args) -> tuple[Path, str]:
    """The folder to measure on, and a word for the JSON line."""
    if args.data:
        return Path(args.data), "given"
    if Path("dataset/stage1_train").is_dir() and not args.smoke:
        return Path("dataset/stage1_train"), "real"
    from bench_train import DSB_SIZE_MIX
    from unet_nuclei import synthetic

    folder = Path(tempfile.mkdtemp(prefix="bench_step_data_")) / "dsb_like"
    log(f"No real data: writing a DSB-like folder of {args.images} images to {folder}")
    sizes = [(96, 96), (128, 160)] if args.smoke else DSB_SIZE_MIX
    synthetic.write_synthetic_dataset(folder, num_images=args.images, seed=2018, sizes=sizes, progress=False)
    return folder, "generated"


def time_steps(model, dataset, warmup: int, steps: int) -> float:
    """Milliseconds per training step, inside one ``fit`` call (one input iterator, as in training):
    the first ``warmup`` steps (tracing, compiling) are left out."""
    import keras

    ends = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[timer])
    return (ends[-1] - ends[warmup - 1]) * 1000 / steps


def time_input(dataset, batches: int) -> float:
    """Milliseconds per batch of the input pipeline alone (no model): a ``tf.data`` dataset (whose
    parallel threads make batches ahead) or a ``PyDataset`` (one batch after another, as one worker
    thread makes them).  Each pass runs to its end, so its iterator closes cleanly (a generator-backed
    iterator dropped mid-stream can stall teardown)."""
    if not hasattr(dataset, "take"):
        dataset[0]
        started = time.perf_counter()
        for index in range(1, batches + 1):
            dataset[index]
        return (time.perf_counter() - started) * 1000 / batches
    for _ in dataset.take(10):
        pass
    started = time.perf_counter()
    for _ in dataset.take(batches):
        pass
    return (time.perf_counter() - started) * 1000 / batches


def time_in_child(setting: str, data_dir: Path, args) -> tuple[float | None, float | None]:
    """``(ms per step, prediction Mpx/s)`` of float32 in a fresh process with the environment of
    ``setting`` (``CHILD_SETTINGS``); ``(None, None)`` if that process failed (its error is shown)."""
    import subprocess

    env = {**os.environ, **CHILD_SETTINGS[setting]}
    command = [
        sys.executable,
        __file__,
        "--data",
        str(data_dir),
        "--settings",
        "float32",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--predict-images",
        str(args.predict_images),
        "--child",
    ] + (["--smoke"] if args.smoke else [])
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        log(f"{setting:>10}: failed: {result.stderr.strip().splitlines()[-1:]}")
        return None, None
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    forced = CHILD_SETTINGS[setting].get("TF_ENABLE_ONEDNN_OPTS")
    if forced is not None and figures["cpu_kernels"]["onednn"] != (forced == "1"):
        log(f"{setting:>10}: TensorFlow did not take TF_ENABLE_ONEDNN_OPTS={forced}; not measured")
        return None, None
    return figures["step_ms"]["float32"], figures["predict_mpx_per_s"].get("float32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Loading, training-step and prediction cost per numeric "
        "setting (float32, mixed precision, XLA); one JSON line last."
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="dataset folder (default: dataset/stage1_train if present, else a generated DSB-like folder)",
    )
    parser.add_argument("--images", type=int, default=120, help="images of the generated folder (120)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per setting (60)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps per setting first (15)")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)} (default: all)"
    )
    parser.add_argument(
        "--predict-images",
        type=int,
        default=4,
        help="largest images predicted per setting for the throughput (4; 0 skips)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="float32 and mixed only, 15 timed steps (about a minute after loading)"
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one oneDNN setting's process
    args = parser.parse_args(argv)
    if args.quick or args.smoke:
        args.settings = "float32,mixed"
        args.steps, args.warmup = (2, 1) if args.smoke else (15, 5)
    if args.smoke:
        args.images, args.predict_images = 6, 1
        args.settings = "float32" if args.child else "float32,mixed,onednn-off"
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or args.steps < 1 or args.warmup < 1:
        parser.error(f"unknown setting {unknown[0]!r}" if unknown else "--steps and --warmup must be positive")

    import keras

    import unet_model_core as core
    from unet_nuclei import cache, devices, training
    from unet_nuclei.segmenter import Segmenter

    kernels = devices.cpu_kernels()

    data_dir, source = find_data(args)
    cold_root = Path(tempfile.mkdtemp(prefix="bench_step_cache_"))
    started = time.perf_counter()
    loaded, _, _ = cache.load_folder(data_dir, progress=False, root=cold_root)
    load_cold = time.perf_counter() - started
    started = time.perf_counter()
    loaded, _, how = cache.load_folder(data_dir, progress=False, root=cold_root)
    load_cached = time.perf_counter() - started
    log(f"{data_dir}: {len(loaded)} images; loading {load_cold:.1f} s cold, {load_cached:.2f} s cached ({how})")

    config = (core.quick_config if args.smoke else core.Config)(data_dir=str(data_dir))
    train_ids, val_ids = training.split_ids([s.sample_id for s in loaded], config.val_size, config.seed)
    by_id = {s.sample_id: s for s in loaded}
    train_ds, _, steps_per_epoch = core.make_datasets(
        [by_id[i] for i in train_ids], [by_id[i] for i in val_ids], config
    )
    input_ms = time_input(train_ds, args.steps)
    largest = sorted(loaded, key=lambda s: -s.image.shape[0] * s.image.shape[1])[: args.predict_images]
    device = f"{devices.gpu_count()} GPU(s)" if devices.gpu_count() else platform.processor() or platform.machine()

    step_ms, predict_mpx = {}, {}
    for setting in settings:
        if setting in CHILD_SETTINGS:
            ms, mpx = time_in_child(setting, data_dir, args)
            if ms is not None:
                step_ms[setting] = ms
                if mpx is not None:
                    predict_mpx[setting] = mpx
                log(f"{setting:>10} (float32, own process): {ms:8.1f} ms/step")
            continue
        mixed, xla = "mixed" in setting, "xla" in setting
        policy = training.set_precision(mixed)
        try:
            keras.utils.set_random_seed(config.seed)
            model = core.compile_unet(
                core.build_unet_from_config(config),
                config,
                jit_compile=xla,
                total_steps=config.epochs * steps_per_epoch,
            )
            step_ms[setting] = round(time_steps(model, train_ds, args.warmup, args.steps), 2)
            if largest:
                started = time.perf_counter()
                for sample in largest:
                    Segmenter(model, config).native_probabilities(sample.image)
                pixels = sum(s.image.shape[0] * s.image.shape[1] for s in largest)
                predict_mpx[setting] = round(pixels / 1e6 / (time.perf_counter() - started), 2)
            log(
                f"{setting:>10} ({policy}): {step_ms[setting]:8.1f} ms/step"
                + (f", prediction {predict_mpx[setting]} Mpx/s" if setting in predict_mpx else "")
            )
        except Exception as error:  # XLA or a precision may be unsupported here; say so and go on.
            log(f"{setting:>10}: failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        finally:
            keras.mixed_precision.set_global_policy("float32")
            keras.backend.clear_session()

    if not step_ms:
        log("no setting could be measured")
        return 1
    best = min(step_ms, key=step_ms.get)
    print(f"\n{'setting':>10} {'ms/step':>9} {'s/epoch':>9} {'vs float32':>11} {'predict Mpx/s':>14}")
    for setting, ms in step_ms.items():
        ratio = step_ms["float32"] / ms if "float32" in step_ms else float("nan")
        print(
            f"{setting:>10} {ms:9.1f} {ms * steps_per_epoch / 1000:9.0f} {ratio:10.2f}x "
            f"{predict_mpx.get(setting, float('nan')):14.2f}"
        )
    print(
        f"input pipeline alone: {input_ms:.1f} ms/batch ({input_ms / step_ms[best]:.0%} of the best step); "
        f"{steps_per_epoch} steps per epoch; device: {device}"
    )
    print(f"this process: {devices.describe_cpu_kernels(kernels)}")
    figures = {
        "device": device,
        "data": source,
        "images": len(loaded),
        "load_cold_s": round(load_cold, 1),
        "load_cached_s": round(load_cached, 2),
        "steps_per_epoch": steps_per_epoch,
        "step_ms": step_ms,
        "step_ms_float32": step_ms.get("float32"),
        "step_ms_best": step_ms[best],
        "best_setting": best,
        "speedup_best_vs_float32": round(step_ms["float32"] / step_ms[best], 2) if "float32" in step_ms else None,
        "input_ms_per_batch": round(input_ms, 2),
        "input_share_of_best_step": round(input_ms / step_ms[best], 3),
        "predict_mpx_per_s": predict_mpx,
        "cpu_kernels": kernels,
        "cpu_flags": cpu_flags(),
    }
    flags = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Rerun with: python benchmarks/bench_step.py {flags}".rstrip())
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-input benchmark: the project's data pipeline against the compute bound and the DSB starter.

In one run, on a DSB-like dataset written to disk for the purpose (``unet_nuclei.synthetic`` in a real
DSB-2018 size mix, one PNG per nucleus), with the default model and batch size:

  (a) the project's pipeline: ``prepare_data`` (find_samples + load_samples: every PNG decoded once, in
      threads) + ``make_datasets`` + ``model.fit``; epoch 1 is "cold" (the clock starts before the
      first file is read and includes building the model), later epochs are "warm";
  (b) the bound: the same model trained on the very patches (a) drew in its first epoch, augmented,
      held in memory as tensors, so no input work is left;
  (c) the usual DSB-starter way: a ``keras.utils.PyDataset`` whose ``__getitem__`` reads each image with
      cv2 and reads and merges every mask PNG of the sample, for every batch of every epoch (no cache),
      then random-crops the patch (workers=1, the default).

An epoch is the same number of steps of the same batch size for all three (``steps_per_epoch`` from
``make_datasets``: one pass over the training pixels), so images/s compare like for like.  It also
times a 2048x2048 float32 matrix multiply to give the fraction of the machine's matmul peak that the
training step reaches.  The last line printed is one JSON object.

    python benchmarks/bench_train.py            # the full run (about 9 minutes on 2 cores)
    python benchmarks/bench_train.py --quick    # a smaller run (under two minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A DSB-2018 stage1_train size mix (670 images: about half 256x256, then 256x320, 520x696, 360x360, a
# few 1024x1024 and 1040x1388); repeated entries act as weights for ``write_synthetic_dataset``.
DSB_SIZE_MIX = (
    [(256, 256)] * 50
    + [(256, 320)] * 16
    + [(260, 347)] * 2
    + [(360, 360)] * 13
    + [(520, 696)] * 14
    + [(1024, 1024)] * 3
    + [(1040, 1388)] * 2
)

SETTINGS = {
    # images written, steps per epoch (None: make_datasets' one pass over the pixels), warm epochs of (a)
    # measured, epochs of (b) measured, epochs of (c) measured; model overrides for the smoke test.
    "full": dict(images=200, steps=None, warm_epochs=2, memory_epochs=2, sequence_epochs=1, model={}),
    "quick": dict(images=40, steps=24, warm_epochs=1, memory_epochs=1, sequence_epochs=1, model={}),
    "smoke": dict(
        images=6,
        steps=3,
        warm_epochs=1,
        memory_epochs=1,
        sequence_epochs=1,
        model=dict(image_size=64, channels=(8, 16, 32), batch_size=4),
        sizes=[(96, 96), (128, 160)],
    ),
}


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table and the final JSON line."""
    print(message, file=sys.stderr, flush=True)


def machine_info() -> dict:
    """What the numbers were measured on."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpu": bool(tf.config.list_physical_devices("GPU")),
    }


def machine_line(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, {info['os']}, Python {info['python']}, "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}, {'GPU' if info['gpu'] else 'no GPU'}"
    )


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """Best float32 ``tf.linalg.matmul`` rate (GFLOP/s, 2*n^3 per product) over a few rounds."""
    import tensorflow as tf

    a = tf.random.stateless_normal([size, size], seed=[1, 2])
    b = tf.random.stateless_normal([size, size], seed=[3, 4])
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b).numpy()  # trace and warm up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            c = matmul(a, b)
        c.numpy()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(model) -> float:
    """Forward FLOPs of one input image: every convolution's multiply-adds x 2 (pooling, upsampling,
    concatenation, activations and the loss are left out: they are a few percent)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kh, kw, in_channels, _ = layer.kernel.shape
            total += height * width * out_channels * kh * kw * in_channels
    return 2.0 * total


def keras_policy_reset() -> None:
    import keras

    keras.mixed_precision.set_global_policy("float32")


def rerun_command(argv: list[str]) -> str:
    return "python benchmarks/bench_train.py " + " ".join(argv)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def ensure_dataset(folder: Path, images: int, seed: int, sizes) -> Path:
    """Write the DSB-like dataset once; a folder that holds it already is reused across runs."""
    from unet_nuclei import synthetic

    if folder.is_dir() and len([p for p in folder.iterdir() if p.is_dir()]) == images:
        log(f"Reusing the dataset in {folder}")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} exists but does not hold {images} samples; remove it or pass another --data-dir")
    log(f"Writing {images} DSB-like images with one PNG per nucleus to {folder} (once; reused after) ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_synthetic_dataset(folder, num_images=images, seed=seed, sizes=sizes, progress=False)
    return folder


def dataset_summary(samples) -> dict:
    """Image sizes and mask files per image of the training samples (from the files, without decoding)."""
    import cv2

    sizes: dict[str, int] = {}
    for sample in samples:
        height, width = cv2.imread(str(sample.image_path), cv2.IMREAD_UNCHANGED).shape[:2]
        key = f"{height}x{width}"
        sizes[key] = sizes.get(key, 0) + 1
    masks = [len(s.mask_paths) for s in samples]
    return {
        "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "masks_mean": statistics.mean(masks),
        "masks_min": min(masks),
        "masks_max": max(masks),
    }


def make_starter_sequence(samples, batch_size: int, steps: int, size: int, seed: int):
    """The classic DSB-2018 Kaggle-starter input: a PyDataset that decodes the image and every mask PNG
    of each sample (merged with np.maximum) for every batch, then random-crops a patch.  No cache."""
    import cv2
    import keras
    import numpy as np

    import unet_model_core as core

    class DsbStarterSequence(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()  # workers=1, use_multiprocessing=False: the defaults
            self.samples = list(samples)
            self.epoch = 0
            self.order = np.random.default_rng([seed, 0]).permutation(len(self.samples))

        def __len__(self):
            return steps

        def _read(self, sample, rng):
            image = cv2.imread(str(sample.image_path), cv2.IMREAD_COLOR)[:, :, ::-1]
            mask = np.zeros(image.shape[:2], np.uint8)
            mask_dir = sample.image_path.parent.parent / "masks"
            for name in os.listdir(mask_dir):
                mask = np.maximum(mask, cv2.imread(str(mask_dir / name), cv2.IMREAD_GRAYSCALE))
            image, mask = core.pad_to_min_size(image, size), core.pad_to_min_size(mask, size)
            top = int(rng.integers(0, image.shape[0] - size + 1))
            left = int(rng.integers(0, image.shape[1] - size + 1))
            return image[top : top + size, left : left + size], mask[top : top + size, left : left + size] > 127

        def __getitem__(self, index):
            rng = np.random.default_rng([seed, self.epoch, index])
            picks = [self.order[(index * batch_size + k) % len(self.order)] for k in range(batch_size)]
            pairs = [self._read(self.samples[i], rng) for i in picks]
            x = np.stack([p[0] for p in pairs]).astype(np.float32)
            y = np.stack([p[1] for p in pairs])[..., None].astype(np.float32)
            return x, y

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(self.samples))

    return DsbStarterSequence()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def epoch_timer(label: str, total_epochs: int, steps: int):
    """A callback that records each epoch's wall time and step times, and reports progress on stderr."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[dict] = []
            self.every = max(1, steps // 4)

        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.last = time.perf_counter()
            self.steps: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now
            if (batch + 1) % self.every == 0 or batch + 1 == steps:
                log(
                    f"  {label}: epoch {len(self.epochs) + 1}/{total_epochs}, step {batch + 1}/{steps}, "
                    f"{now - self.start:.1f} s"
                )

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(
                {"end": time.perf_counter(), "seconds": time.perf_counter() - self.start, "steps": list(self.steps)}
            )

    return EpochTimer()


def fresh_model(config):
    import keras

    import unet_model_core as core

    keras.utils.set_random_seed(config.seed)
    return core.compile_unet(core.build_unet_from_config(config), config)


def summarise(seconds: list[float], images_per_epoch: int) -> dict:
    rates = [images_per_epoch / s for s in seconds]
    return {
        "seconds": statistics.mean(seconds),
        "seconds_sd": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "images_per_s": statistics.mean(rates),
        "images_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "epochs": len(seconds),
    }


def median_step_ms(timer, epochs) -> float:
    steps = [s for e in epochs for s in timer.epochs[e]["steps"]]
    return 1000 * statistics.median(steps)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Training-input benchmark: the project's pipeline (cold and warm epochs) against "
        "the same model on in-memory tensors (the bound) and against the DSB-starter "
        "PyDataset that reads every mask PNG for every batch. Prints a table and, as its "
        "last line, one JSON object."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: 40 images, 24 steps per epoch, one measured epoch each (under two minutes on 2 cores)",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    parser.add_argument(
        "--images", type=int, default=None, help="number of images in the generated dataset (200; 40 with --quick)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where the generated dataset is written and reused across runs (default: "
        "<temp dir>/unet_bench_data/dsb_like_<N>img_seed<S>)",
    )
    parser.add_argument("--seed", type=int, default=2018, help="seed of the generated dataset (2018)")
    parser.add_argument(
        "--warm-epochs",
        type=int,
        default=None,
        help="warm epochs of (a) measured after the cold one (2; 1 with --quick)",
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="train all three in the project's mixed precision (bfloat16 on CPUs) instead of "
        "float32; the FLOP rate is then compared with the float32 matmul peak all the same",
    )
    parser.add_argument(
        "--memory-epochs",
        type=int,
        default=None,
        help="epochs of (b) measured after a short warm-up (2; 1 with --quick)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    setting = dict(SETTINGS[mode])
    images = args.images or setting["images"]
    warm_epochs = args.warm_epochs or setting["warm_epochs"]
    memory_epochs = args.memory_epochs or setting["memory_epochs"]
    sequence_epochs = setting["sequence_epochs"]
    sizes = setting.get("sizes", DSB_SIZE_MIX)
    tag = "_smoke" if mode == "smoke" else ""
    data_dir = (
        Path(args.data_dir)
        if args.data_dir
        else (Path(tempfile.gettempdir()) / "unet_bench_data" / f"dsb_like_{images}img_seed{args.seed}{tag}")
    )
    command = rerun_command(argv)
    log(f"Rerun with: {command}")

    import numpy as np
    import tensorflow as tf

    import unet_model_core as core
    from unet_nuclei import training

    info = machine_info()
    data_dir = ensure_dataset(data_dir, images, args.seed, sizes)
    config = core.Config(data_dir=str(data_dir), steps_per_epoch=setting["steps"], **setting["model"])
    batch = config.batch_size

    policy = training.set_precision(args.mixed_precision)
    log("Timing the matrix-multiply peak ...")
    matmul_size = 1024 if mode == "smoke" else 2048
    peak = matmul_peak_gflops(matmul_size)

    # (a) The project's pipeline, from files on disk.  The clock starts before the first file is read.
    log("(a) project pipeline: decode once, tf.data, fit ...")
    start = time.perf_counter()
    train_samples, val_samples, _, _ = training.prepare_data(config, progress=False)
    decoded = time.perf_counter()
    train_ds, _, steps = core.make_datasets(train_samples, val_samples, config)
    model = fresh_model(config)
    timer_a = epoch_timer("(a)", 1 + warm_epochs, steps)
    model.fit(train_ds, epochs=1 + warm_epochs, steps_per_epoch=steps, callbacks=[timer_a], verbose=0, shuffle=False)
    cold_seconds = timer_a.epochs[0]["end"] - start
    per_epoch = steps * batch
    flops_per_image = forward_flops(model)
    del model

    samples_on_disk, _ = core.find_samples(data_dir)
    train_ids = {s.sample_id for s in train_samples}
    train_files = [s for s in samples_on_disk if s.sample_id in train_ids]
    summary = dataset_summary(samples_on_disk)

    # (b) The bound: the patches (a) trained on in its first epoch (the same seed replays the same
    # stream), augmented, held in memory; a short fit traces the model first.
    log("(b) in-memory tensors: collecting the patches of (a)'s first epoch ...")
    replay, _, _ = core.make_datasets(train_samples, val_samples, config)
    xs, ys = [], []
    pipeline_start = time.perf_counter()  # the input pipeline alone, no model: its cost per epoch
    for x, y in replay.take(steps):
        xs.append(x.numpy())
        ys.append(y.numpy())
    pipeline_seconds = time.perf_counter() - pipeline_start
    x_memory, y_memory = tf.constant(np.concatenate(xs)), tf.constant(np.concatenate(ys))
    del xs, ys, replay
    memory_ds = tf.data.Dataset.from_tensor_slices((x_memory, y_memory)).batch(batch, drop_remainder=True).repeat()
    model = fresh_model(config)
    model.fit(memory_ds, epochs=1, steps_per_epoch=min(steps, 3), verbose=0, shuffle=False)  # trace first
    timer_b = epoch_timer("(b)", memory_epochs, steps)
    model.fit(memory_ds, epochs=memory_epochs, steps_per_epoch=steps, callbacks=[timer_b], verbose=0, shuffle=False)
    del model, memory_ds, x_memory, y_memory

    # (c) The DSB starter: everything read from disk for every batch, every epoch.
    log("(c) DSB-starter PyDataset: every mask PNG read for every batch ...")
    start_c = time.perf_counter()
    sequence = make_starter_sequence(train_files, batch, steps, config.image_size, config.seed)
    # The starter feeds RGB patches and binary masks: the same network with an RGB input and one class.
    model = fresh_model(dataclasses.replace(config, targets="binary", preprocessing="rgb"))
    timer_c = epoch_timer("(c)", sequence_epochs, steps)
    model.fit(sequence, epochs=sequence_epochs, steps_per_epoch=steps, callbacks=[timer_c], verbose=0, shuffle=False)
    sequence_first = timer_c.epochs[0]["end"] - start_c
    del model

    # ---- Results --------------------------------------------------------------------------------
    a_cold = summarise([cold_seconds], per_epoch)
    a_warm = summarise([e["seconds"] for e in timer_a.epochs[1:]], per_epoch)
    b = summarise([e["seconds"] for e in timer_b.epochs], per_epoch)
    c = summarise([sequence_first] + [e["seconds"] for e in timer_c.epochs[1:]], per_epoch)
    train_flops = 3 * flops_per_image  # forward + backward (activations and weights): about 3x forward
    gflops = {
        name: train_flops * r["images_per_s"] / 1e9
        for name, r in (("a_warm", a_warm), ("b_memory", b), ("a_cold", a_cold), ("c_sequence", c))
    }
    rows = [
        ("(a) project pipeline, cold: decode + epoch 1", a_cold, median_step_ms(timer_a, [0])),
        (
            f"(a) project pipeline, warm: epoch{'s' if warm_epochs > 1 else ''} 2"
            + (f"-{1 + warm_epochs}" if warm_epochs > 1 else ""),
            a_warm,
            median_step_ms(timer_a, range(1, 1 + warm_epochs)),
        ),
        ("(b) in-memory tensors (the bound)", b, median_step_ms(timer_b, range(memory_epochs))),
        ("(c) DSB-starter PyDataset, workers=1, epoch 1", c, median_step_ms(timer_c, [0])),
    ]
    result = {
        "benchmark": "bench_train",
        "mode": mode,
        "warm_vs_memory": round(a_warm["images_per_s"] / b["images_per_s"], 3),
        "cold_vs_sequence": round(a_cold["images_per_s"] / c["images_per_s"], 3),
        "cold_vs_memory": round(a_cold["images_per_s"] / b["images_per_s"], 3),
        "sequence_vs_memory": round(c["images_per_s"] / b["images_per_s"], 3),
        "images_per_s": {
            "a_cold": round(a_cold["images_per_s"], 2),
            "a_warm": round(a_warm["images_per_s"], 2),
            "a_warm_sd": round(a_warm["images_per_s_sd"], 2),
            "b_memory": round(b["images_per_s"], 2),
            "b_memory_sd": round(b["images_per_s_sd"], 2),
            "c_sequence": round(c["images_per_s"], 2),
        },
        "gflops_per_s": round(gflops["a_warm"], 1),
        "gflops_per_s_memory": round(gflops["b_memory"], 1),
        "matmul_gflops_per_s": round(peak, 1),
        "fraction_of_matmul_peak": round(gflops["a_warm"] / peak, 3),
        "fraction_of_matmul_peak_memory": round(gflops["b_memory"] / peak, 3),
        "decode_seconds": round(decoded - start, 2),
        "a_epoch1_seconds": round(timer_a.epochs[0]["seconds"], 2),
        "pipeline_alone_seconds": round(pipeline_seconds, 2),
        "precision": policy,
        "steps_per_epoch": steps,
        "batch_size": batch,
        "patch": config.image_size,
        "train_images": len(train_samples),
        "dataset_images": images,
        "masks_per_image": round(summary["masks_mean"], 1),
        "sequence_workers": 1,
        "command": command,
    }

    print(f"Training input benchmark ({mode} run)")
    print(f"Machine: {machine_line(info)}")
    print(
        f"Data:    {data_dir}: {images} DSB-like images ({', '.join(f'{k}: {v}' for k, v in summary['sizes'].items())}), "
        f"{summary['masks_mean']:.1f} mask PNGs per image on average ({summary['masks_min']}-{summary['masks_max']}); "
        f"{len(train_samples)} used for training"
    )
    print(
        f"Model:   U-Net channels {'-'.join(map(str, config.channels))}, {config.image_size}x{config.image_size} "
        f"patches, batch {batch}, {policy}; epoch = {steps} steps x {batch} = {per_epoch} patches for (a), (b), (c)"
    )
    print()
    print(f"{'variant':<48} {'seconds':>12} {'images/s':>13} {'median step ms':>14} {'vs (b)':>7} {'GFLOP/s':>8}")
    for label, r, step_ms in rows:
        seconds = f"{r['seconds']:.1f}" + (f" ±{r['seconds_sd']:.1f}" if r["epochs"] > 1 else "")
        rate = f"{r['images_per_s']:.2f}" + (f" ±{r['images_per_s_sd']:.2f}" if r["epochs"] > 1 else "")
        print(
            f"{label:<48} {seconds:>12} {rate:>13} {step_ms:>14.0f} "
            f"{r['images_per_s'] / b['images_per_s']:>7.3f} {train_flops * r['images_per_s'] / 1e9:>8.1f}"
        )
    print()
    print(
        f"(a) cold = {decoded - start:.1f} s finding and decoding {len(train_samples) + len(val_samples)} images "
        f"and all their mask PNGs once (load_samples, threads) + make_datasets, building the model and epoch 1 "
        f"({timer_a.epochs[0]['seconds']:.1f} s, tracing included); (c) epoch 1 includes building the model and "
        f"tracing too. ± is the sd over the measured epochs."
    )
    print(
        f"The input pipeline alone (no model) makes one epoch of {steps} batches in {pipeline_seconds:.1f} s "
        f"({per_epoch / pipeline_seconds:.0f} images/s, {per_epoch / pipeline_seconds / b['images_per_s']:.0f}x "
        f"what the model consumes)."
    )
    print(f"warm_vs_memory   = (a) warm / (b)  = {result['warm_vs_memory']:.3f}   (target >= 0.9)")
    print(
        f"cold_vs_sequence = (a) cold / (c)  = {result['cold_vs_sequence']:.3f}   (target >= 5); "
        f"upper limit here: (b) / (c) = {1 / result['sequence_vs_memory']:.3f}"
    )
    print(
        f"Compute: {flops_per_image / 1e9:.2f} GFLOP forward per {config.image_size}x{config.image_size} patch "
        f"(convolution multiply-adds x 2), training step = 3 x forward per image = "
        f"{train_flops * batch / 1e9:.1f} GFLOP per step of {batch}; (a) warm {gflops['a_warm']:.1f} GFLOP/s "
        f"and (b) {gflops['b_memory']:.1f} GFLOP/s = {result['fraction_of_matmul_peak']:.0%} and "
        f"{result['fraction_of_matmul_peak_memory']:.0%} of the float32 matmul peak measured in this run "
        f"({peak:.0f} GFLOP/s, float32 {matmul_size}x{matmul_size} tf.linalg.matmul, best of 3 x 10)"
    )
    print(f"Rerun: {command}")
    keras_policy_reset()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

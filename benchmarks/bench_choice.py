"""The post-processing choice at the end of training (``training.finalize``), timed in its parts: the
model's outputs on the validation images (with and without TTA), then the search over thresholds, marker
thresholds and smallest sizes, the plain way (each setting's nuclei grown afresh, as before 2026-12-06)
against ``choose_post_processing`` (nuclei grown once per threshold pair) with 1 and 2 threads.  It checks
that every way chooses the same post-processing with the same scores.

    python benchmarks/bench_choice.py --run /work/runs/default-ea36             # all its validation images
    python benchmarks/bench_choice.py --run runs/NAME --images 12 --workers 1,2

Run it from the repository root (a run's ``data_dir`` is relative to it).  The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plain_search(truths, outputs):
    """The search as it was: every setting's nuclei from ``PostProcessing.nuclei``, then the confidence step."""
    import itertools

    from unet_nuclei.metrics import mean_scores, score_image
    from unet_nuclei.postprocess import (
        CONFIDENCE_GRID,
        MARKER_GRID,
        MIN_SIZE_GRID,
        THRESHOLD_GRID,
        PostProcessing,
        drop_unsure,
    )

    best = None
    for threshold, marker, size in itertools.product(THRESHOLD_GRID, MARKER_GRID, MIN_SIZE_GRID):
        post = PostProcessing(float(threshold), float(marker), int(size))
        mean = mean_scores([score_image(t, post.nuclei(o)) for t, o in zip(truths, outputs)])
        key = (round(mean["dsb_score"], 6), round(mean["dice"], 6))
        if best is None or key > best[0]:
            best = (key, post, mean)
    chosen = best[1]
    found = [chosen.nuclei(o) for o in outputs]
    for confidence in (c for c in CONFIDENCE_GRID if c > 0):
        per_image = [score_image(t, drop_unsure(f.copy(), o, confidence)) for t, f, o in zip(truths, found, outputs)]
        mean = mean_scores(per_image)
        key = (round(mean["dsb_score"], 6), round(mean["dice"], 6))
        if key > best[0]:
            best = (key, PostProcessing(chosen.threshold, chosen.marker_threshold, chosen.min_size, confidence), mean)
    return best[1], {k: round(v, 4) for k, v in best[2].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a finished run folder (its best model and validation images)")
    parser.add_argument("--images", type=int, default=0, help="the first N validation images (default: all)")
    parser.add_argument("--workers", default="1,2", help="thread counts to time, comma-separated (default 1,2)")
    parser.add_argument("--skip-plain", action="store_true", help="do not time the plain search (the slowest)")
    args = parser.parse_args(argv)

    import dataclasses

    import keras

    from unet_nuclei import cache
    from unet_nuclei.postprocess import choose_post_processing
    from unet_nuclei.runs import MODEL_FILE, read_run_config, validation_samples
    from unet_nuclei.segmenter import Segmenter

    run = Path(args.run)
    config, info = read_run_config(run)
    samples, _ = validation_samples(info)
    loaded, _ = cache.load_ids(info["data_dir"], [s.sample_id for s in samples], False, channel=config.channel)
    loaded = loaded[: args.images] if args.images else loaded
    model = keras.saving.load_model(run / MODEL_FILE)
    truths = [s.labels for s in loaded]
    log(
        f"{run}: {len(loaded)} validation images, {sum(s.image.shape[0] * s.image.shape[1] for s in loaded) / 1e6:.1f} Mpx"
    )

    rows, figures = [], {"images": len(loaded)}
    for tta in (False, True):
        segmenter = Segmenter(model, dataclasses.replace(config, tta=tta))
        started = time.perf_counter()
        outputs = segmenter.outputs(loaded, progress=False)
        seconds = time.perf_counter() - started
        rows.append((f"outputs, TTA {'on' if tta else 'off'}", seconds, ""))
        figures[f"outputs_tta_{'on' if tta else 'off'}_s"] = round(seconds, 1)
    # The search runs on the outputs the run itself uses (its TTA setting, the last computed when it is on).
    if not config.tta:
        outputs = Segmenter(model, config).outputs(loaded, progress=False)

    chosen = {}
    if not args.skip_plain:
        started = time.perf_counter()
        chosen["plain"] = plain_search(truths, outputs)
        figures["search_plain_s"] = round(time.perf_counter() - started, 1)
        rows.append(("search, plain (every setting grown)", figures["search_plain_s"], "1.00x"))
    for workers in [int(w) for w in args.workers.split(",")]:
        started = time.perf_counter()
        post, scores, _ = choose_post_processing(truths, outputs, workers=workers)
        seconds = time.perf_counter() - started
        chosen[f"workers {workers}"] = (post, scores)
        figures[f"search_{workers}_threads_s"] = round(seconds, 1)
        ratio = f"{figures['search_plain_s'] / seconds:.2f}x" if "search_plain_s" in figures else ""
        rows.append((f"search, grown once, {workers} thread(s)", seconds, ratio))

    print(f"\n{'step':<40} {'seconds':>9} {'speed-up':>9}")
    for name, seconds, ratio in rows:
        print(f"{name:<40} {seconds:>9.1f} {ratio:>9}")
    same = len({(p, tuple(sorted(s.items()))) for p, s in chosen.values()}) == 1
    first = next(iter(chosen.values()))
    print(f"\nchosen: {first[0]}  DSB {first[1]['dsb_score']:.4f}; the same by every way: {same}")
    figures.update(same_choice=same, dsb_score=first[1]["dsb_score"])
    print("Rerun: python benchmarks/bench_choice.py --run RUN [--images N] [--workers 1,2]")
    print(json.dumps(figures))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

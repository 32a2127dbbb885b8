"""Draw docs/time_to_accuracy.png: the held-out score of finished runs against their training time, overall
and per image kind, one point per run, for choosing a schedule by time to accuracy (issue 36).

Each run is a folder scored by ``benchmarks/evaluate_real.py`` (its ``holdout_scores.json``); its time is
``train_seconds`` of its ``config.json`` (model.fit, every epoch's validation and checkpoints; the decoding
before and the post-processing choice after are not in it) and its schedule's label comes from the
config (epochs + nucleus epochs, learning rate, warm-up, and the channels where they are not the
default's).

    python docs/make_time_to_accuracy.py /work/runs/sched-10-2 /work/runs/default-ea36 /work/runs/long-40-5
    python docs/make_time_to_accuracy.py RUN ... --processor "2-core Xeon, AVX-512 BF16" --out docs/time_to_accuracy.png

Runs of another processor kind go in a second call's figure or, with ``--processor`` per group, as separate
lines: ``--group`` starts a new line (``RUN ... --group "AVX2-only" RUN ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KINDS = ("all", "fluorescence", "stained", "brightfield")
DEFAULT_CHANNELS = [16, 32, 64, 128, 256]


def read_point(run: Path) -> dict:
    """One run's training minutes, schedule label and held-out scores."""
    config = json.loads((run / "config.json").read_text())
    scores = sorted(run.glob("holdout_scores*.json"))
    if not scores:
        raise SystemExit(f"{run} has no holdout_scores.json: score it with benchmarks/evaluate_real.py --run {run}")
    summary = json.loads(scores[0].read_text())["summary"]  # the first scoring: the run's own setting
    label = f"{config['epochs']}+{config.get('nucleus_epochs', 0)}, lr {config['learning_rate']:g}"
    if config.get("warmup_epochs"):
        label += f", warm-up {config['warmup_epochs']:g}"
    if config.get("channels", DEFAULT_CHANNELS) != DEFAULT_CHANNELS:
        label += f", channels {config['channels'][0]}-{config['channels'][-1]}"
    return {
        "run": run.name,
        "label": label,
        "minutes": config["train_seconds"] / 60,
        **{kind: summary[kind]["dsb_score"] for kind in KINDS if kind in summary},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="scored run folders; '--group NAME' between them starts a new line")
    parser.add_argument("--processor", default="this processor", help="the first group's name")
    parser.add_argument("--target", type=float, help="a score to mark on the 'all' panel (the default's within 0.01)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "time_to_accuracy.png"), help="the figure's path")
    args, rest = parser.parse_known_args(argv)
    groups, name, items = {args.processor: []}, args.processor, args.runs + rest
    index = 0
    while index < len(items):
        if items[index] == "--group":
            name = items[index + 1]
            groups[name] = []
            index += 2
            continue
        groups[name].append(read_point(Path(items[index])))
        index += 1

    from matplotlib.figure import Figure

    from unet_nuclei import plots

    fig = Figure(figsize=(4.0 * len(KINDS), 3.6), layout="tight")
    axes = fig.subplots(1, len(KINDS), sharex=True)
    for ax, kind in zip(axes, KINDS):
        for (group, points), marker in zip(groups.items(), "os^D"):
            points = sorted((p for p in points if kind in p), key=lambda p: p["minutes"])
            ax.plot([p["minutes"] for p in points], [p[kind] for p in points], marker=marker, label=group)
            for point in points:
                ax.annotate(
                    point["label"],
                    (point["minutes"], point[kind]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        ax.set_title(f"{kind} (held out)")
        ax.set_xlabel("training minutes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("DSB-2018 score")
    if args.target is not None:
        axes[0].axhline(args.target, color="grey", linestyle="--", linewidth=1, label=f"target {args.target:.3f}")
    axes[0].legend(fontsize=8, loc="upper left")
    plots.save(fig, Path(args.out), dpi=100)
    for group, points in groups.items():
        for point in sorted(points, key=lambda p: p["minutes"]):
            scores = ", ".join(f"{kind} {point[kind]:.3f}" for kind in KINDS if kind in point)
            print(f"{group}: {point['run']} ({point['label']}), {point['minutes']:.1f} min: {scores}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The held-out evaluation: a fixed split by image kind, and a benchmark that never scores seen images."""

import json
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, run_main
from unet_nuclei import evaluation

sys.path.insert(0, str(ROOT / "benchmarks"))
import evaluate_real


def _kinds(counts):
    return {f"{kind}{i:03d}": kind for kind, n in counts.items() for i in range(n)}


def test_holdout_split_is_stratified_disjoint_and_complete():
    kinds = _kinds({"fluorescence": 541, "stained": 105, "brightfield": 18})
    train, held_out = evaluation.holdout_split(kinds)
    assert sorted(train + held_out) == sorted(kinds) and not set(train) & set(held_out)
    per_kind = {k: sum(kinds[i] == k for i in held_out) for k in ("fluorescence", "stained", "brightfield")}
    assert per_kind == {"fluorescence": 108, "stained": 21, "brightfield": 4}  # round(0.2 * n) of each
    # A kind with a single image still gives one to the held-out set.
    assert len(evaluation.holdout_split({"a": "stained", "b": "fluorescence"})[1]) == 2


def test_holdout_split_depends_on_the_ids_and_seed_only():
    kinds = _kinds({"fluorescence": 50, "stained": 10})
    _, held_out = evaluation.holdout_split(kinds)
    shuffled = dict(reversed(list(kinds.items())))
    assert evaluation.holdout_split(shuffled)[1] == held_out  # order of listing does not matter
    # Images of another kind do not move this kind's held-out images.
    more = {**kinds, **_kinds({"brightfield": 7})}
    assert set(held_out) <= set(evaluation.holdout_split(more)[1])
    assert evaluation.holdout_split(kinds, seed=1)[1] != held_out
    with pytest.raises(ValueError, match="fraction"):
        evaluation.holdout_split(kinds, fraction=1.5)


def test_summary_and_table_give_means_per_kind():
    from unet_nuclei.metrics import Scores

    scores = [Scores(1.0, 1.0, 0.8, 1.0, 3, 3), Scores(0.5, 0.4, 0.2, 0.5, 4, 2), Scores(0.9, 0.8, 0.6, 0.7, 1, 1)]
    result = evaluation.Evaluation(["a", "b", "c"], ["fluorescence", "fluorescence", "stained"], scores)
    summary = result.summary()
    assert summary["all"] == {"n": 3, "dice": 0.8, "iou": 0.7333, "dsb_score": 0.5333, "ap50": 0.7333}
    assert summary["fluorescence"]["dsb_score"] == 0.5 and summary["stained"]["n"] == 1
    assert "brightfield" not in summary
    assert "stained" in result.table() and result.rows()[1]["id"] == "b"


def test_scores_by_nucleus_size():
    from unet_nuclei.metrics import Scores

    labels = np.zeros((40, 40), np.int32)
    labels[0:10, 0:10], labels[20:24, 20:24] = 1, 2  # areas 100 and 16: median 58 px, about 8.6 px across
    assert evaluation.median_diameter(labels) == pytest.approx(2 * np.sqrt(58 / np.pi))
    assert evaluation.median_diameter(np.zeros((4, 4), np.int32)) == 0.0
    scores = [Scores(1, 1, 0.8, 1, 3, 3), Scores(1, 1, 0.2, 1, 3, 3), Scores(1, 1, 0.6, 1, 3, 3)]
    result = evaluation.Evaluation(["a", "b", "c"], ["fluorescence"] * 3, scores, diameters=[8.6, 30.0, 50.0])
    assert result.by_size() == {
        "< 12 px": {"n": 1, "dsb_score": 0.8},
        "24-48 px": {"n": 1, "dsb_score": 0.2},
        ">= 48 px": {"n": 1, "dsb_score": 0.6},
    }
    assert re.search(r"24-48 px\W+0\.200\b", result.table()) and result.rows()[2]["median_diameter"] == 50.0


def test_a_run_that_saw_the_held_out_images_is_refused(quick_run, tiny_dataset):
    _, run, _ = quick_run  # trained on tiny_dataset with nothing held out
    status, _, stderr = run_main(evaluate_real, "--data", str(tiny_dataset), "--run", str(run))
    assert status == 2 and "held-out images" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_trains_without_the_held_out_images_then_scores_them(tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    status, stdout, stderr = run_main(
        evaluate_real, "--data", str(tiny_dataset), "--quick", "--runs-dir", str(runs), "--name", "eval"
    )
    assert status == 0, stderr
    figures = json.loads(stdout.strip().splitlines()[-1])
    info = json.loads((runs / "eval" / "config.json").read_text())
    assert figures["n"] == len(info["held_out_ids"]) >= 1
    assert not set(info["held_out_ids"]) & set(info["val_ids"])  # never tuned on either
    assert 0 <= figures["dsb_score"] <= 1 and set(figures["per_kind"]) <= set(evaluation.IMAGE_KINDS)
    saved = json.loads((runs / "eval" / "holdout_scores.json").read_text())
    assert sorted(row["id"] for row in saved["images"]) == info["held_out_ids"]
    # The finished run can be scored again (not refused: its held-out images were held out).
    status, stdout, _ = run_main(evaluate_real, "--data", str(tiny_dataset), "--run", str(runs / "eval"))
    assert status == 0 and json.loads(stdout.strip().splitlines()[-1])["dsb_score"] == figures["dsb_score"]
    assert (runs / "eval" / "holdout_scores-2.json").is_file()  # the first report is kept


def test_all_scores_every_image_of_other_data_and_is_refused_on_the_training_data(quick_run, tiny_dataset, tmp_path):
    from unet_nuclei import synthetic

    _, run, _ = quick_run  # trained on tiny_dataset
    status, _, stderr = run_main(evaluate_real, "--data", str(tiny_dataset), "--run", str(run), "--all")
    assert status == 2 and "--all" in stderr and str(tiny_dataset) in stderr and "Traceback" not in stderr
    status, _, stderr = run_main(evaluate_real, "--data", str(tiny_dataset), "--all", "--quick")
    assert status == 2 and "--run" in stderr

    other = tmp_path / "other"  # data the run never saw: every image is scored, not a fifth
    ids = synthetic.write_synthetic_dataset(other, num_images=5, seed=9, sizes=[(96, 96)], progress=False)
    status, stdout, stderr = run_main(evaluate_real, "--data", str(other), "--run", str(run), "--all")
    assert status == 0, stderr
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["images"] == "all" and figures["n"] == len(ids) == 5
    saved = json.loads((run / "all_scores.json").read_text())
    assert sorted(row["id"] for row in saved["images"]) == ids

"""The benchmarks run as a user runs them and end with their JSON line.  Timings are never checked: they
depend on the machine.  The hidden --smoke setting shrinks each benchmark to seconds (tiny model, a few
images, a few steps); --quick takes a minute or two and is left to the user."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_benchmark(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing on stdout"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_bench_train_smoke_prints_its_table_and_json(tmp_path):
    result = run_benchmark("bench_train.py", "--smoke", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    data = last_json(result)
    for key in (
        "warm_vs_memory",
        "cold_vs_sequence",
        "gflops_per_s",
        "fraction_of_matmul_peak",
        "matmul_gflops_per_s",
        "masks_per_image",
        "steps_per_epoch",
    ):
        assert key in data, key
    assert data["warm_vs_memory"] > 0 and data["cold_vs_sequence"] > 0 and data["gflops_per_s"] > 0
    assert data["fraction_of_matmul_peak"] > 0
    assert data["sequence_workers"] == 1
    for label in (
        "(a) project pipeline, cold",
        "(a) project pipeline, warm",
        "(b) in-memory tensors",
        "(c) DSB-starter PyDataset",
        "Machine:",
    ):
        assert label in result.stdout, label
    assert "python benchmarks/bench_train.py --smoke" in result.stdout  # how to rerun
    # The generated dataset is reused by the next run rather than written again.
    again = run_benchmark("bench_train.py", "--smoke", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert "Reusing" in again.stderr
    last_json(again)


@pytest.mark.slow
def test_bench_predict_smoke_prints_its_table_and_json(tmp_path):
    result = run_benchmark("bench_predict.py", "--smoke", cwd=tmp_path)
    data = last_json(result)
    for key in ("tiled_vs_forward", "peak_mb_4096", "tiled_vs_forward_by_size", "tiled_mpx_per_s", "forward_mpx_per_s"):
        assert key in data, key
    assert data["tiled_vs_forward"] > 0
    assert data["peak_mb_4096"] > 0  # measured in a child process
    assert "input tile pixels" in result.stdout  # the bound's definition is stated
    assert "python benchmarks/bench_predict.py --smoke" in result.stdout


@pytest.mark.slow
def test_bench_predict_memory_smoke_measures_both_codes_side_by_side(tmp_path):
    result = run_benchmark("bench_predict_memory.py", "--smoke", "--compare", "HEAD", cwd=tmp_path)
    data = last_json(result)
    for key in ("peak_mb_160", "s_160", "peak_mb_400", "s_400", "before_peak_mb_400", "before_s_400"):
        assert data[key] > 0, key  # every figure comes from a child process that ran
    details = data["details"]
    assert details["after"]["400"]["code"] != details["before"]["400"]["code"]  # two different trees ran
    assert "python benchmarks/bench_predict_memory.py --smoke --compare HEAD" in result.stdout
    assert "B/px" in result.stdout


@pytest.mark.slow
def test_bench_folder_smoke_compares_read_ahead_with_the_bound(tmp_path):
    data = last_json(run_benchmark("bench_folder.py", "--smoke", cwd=tmp_path))
    assert data["images"] == 4
    for key in ("sequential_img_per_s", "folder_img_per_s", "forward_img_per_s", "folder_vs_forward"):
        assert data[key] > 0, key


@pytest.mark.slow
def test_bench_step_smoke_times_each_setting(tmp_path):
    result = run_benchmark("bench_step.py", "--smoke", cwd=tmp_path)
    data = last_json(result)
    # onednn-off ran in its own process, with the kernels off, beside this process's float32.
    assert set(data["step_ms"]) == {"float32", "mixed", "onednn-off"} and data["load_cached_s"] >= 0
    assert (
        set(data["cpu_kernels"]) == {"backend", "onednn", "chosen_by"}
        and data["cpu_kernels"]["backend"] == "tensorflow"
    )
    assert data["best_setting"] in data["step_ms"] and data["steps_per_epoch"] > 0


@pytest.mark.parametrize(
    "script", ["bench_train.py", "bench_predict.py", "bench_predict_memory.py", "bench_folder.py", "bench_step.py"]
)
def test_benchmarks_explain_their_flags(script, tmp_path):
    result = run_benchmark(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--smoke" not in result.stdout  # the test setting stays hidden


def test_the_backend_comparison_explains_its_flags(tmp_path):
    result = run_benchmark("compare_backends.py", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--backends" in result.stdout and "--model" in result.stdout


def test_the_gpu_script_explains_its_two_steps(tmp_path):
    result = run_benchmark("gpu_backend_run.py", "run", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--backend" in result.stdout and "--train-args" in result.stdout


@pytest.mark.slow
def test_the_gpu_script_trains_scores_and_predicts_on_jax(tmp_path, tiny_dataset):
    """The GPU script's ``run`` step, tried on the CPU as its docstring says, on a tiny folder."""
    pytest.importorskip("jax")
    out = tmp_path / "out"
    train_args = "--epochs 1 --nucleus-epochs 0 --steps-per-epoch 2 --image-size 64 --no-tta"
    result = run_benchmark(
        "gpu_backend_run.py",
        "run",
        "--backend",
        "jax",
        "--out",
        str(out),
        "--data",
        str(tiny_dataset),
        "--train-args",
        train_args,
        "--predict-images",
        "2",
        cwd=tmp_path,
    )
    figures = last_json(result)
    assert figures["backend"] == "jax" and len(figures["epoch_seconds"]) == 1
    assert figures["predict_images"] == 2 and figures["held_out"]["n"] >= 1
    assert len(list((out / "predictions").glob("*_mask.png"))) == 2


@pytest.mark.slow
def test_synthetic_vs_real_smoke_prints_statistics_per_kind_and_draws_the_figure(tmp_path):
    result = run_benchmark("synthetic_vs_real.py", "--smoke", "--figure", str(tmp_path / "stats.png"), cwd=tmp_path)
    figures = last_json(result)
    assert (tmp_path / "stats.png").stat().st_size > 1000
    for source in ("synthetic", "real"):
        summary = figures["median_p10_p90"][source]
        assert summary and sum(row["images"] for row in summary.values()) == 4
        for row in summary.values():
            median, p10, p90 = row["diameter"]
            assert 0 < p10 <= median <= p90
            assert 0 <= row["coverage"][0] <= 1 and 0 <= row["touching"][0] <= 1
    assert "diameter" in result.stdout.splitlines()[0]


@pytest.mark.slow
def test_error_analysis_scores_the_ways_of_finding_nuclei_on_the_validation_images(quick_run, tiny_dataset, tmp_path):
    _, run_dir, _ = quick_run
    result = run_benchmark("error_analysis.py", "--run", str(run_dir), "--data", str(tiny_dataset), cwd=tmp_path)
    figures = last_json(result)
    # The quick run trained on the whole tiny folder, so only its validation images are analysed.
    assert "held-out" in result.stderr and set(figures["images"]) >= {"validation"}
    assert not any(key.startswith("held-out") for key in figures["images"])
    ways = figures["dsb_score"]
    assert {"as chosen", "true area, model's markers", "true markers, model's area", "holes filled"} <= set(ways)
    assert all(0 <= score <= 1 for way in ways.values() for score in way.values())
    assert result.stdout.splitlines()[2].startswith("as chosen")  # the table: title, header, the rows

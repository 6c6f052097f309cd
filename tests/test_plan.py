"""``ead-dist plan``: the extrapolation (pure), the memory figure against the real stages'
measured peaks, and the commands through the installed entry point."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from conftest import tiny_config
from ead_dist import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = os.path.join(os.path.dirname(sys.executable), "ead-dist")


# --- pure extrapolation ---------------------------------------------------------------------

def _experts(epochs: int) -> plan.StagePrediction:
    return plan.experts_prediction(
        step_seconds=0.02, checkpoint_seconds=0.0, train_load_seconds=0.0,
        test_load_seconds=0.0, peak_mb=500.0,
        count=4, epochs=epochs, train_samples=60_000, loaded_train=60_000, test_samples=10_000,
        batch_size=256, save_every=50, values_per_sample=784, concurrent=2)


def test_experts_time_is_positive_and_linear_in_epochs():
    one, three = _experts(1), _experts(3)
    assert one.seconds > 0
    # 4 experts in 2 waves, 234 steps an epoch (ragged batch dropped), 20 ms a step
    assert one.seconds == pytest.approx(2 * 234 * 0.02)
    assert three.seconds == pytest.approx(3 * one.seconds)
    assert one.peak_mb == three.peak_mb  # memory does not grow with epochs
    assert one.machine_mb == pytest.approx(2 * one.peak_mb)


def test_experts_load_the_split_once_per_process_and_the_test_split_per_expert():
    prediction = plan.experts_prediction(
        step_seconds=0.02, checkpoint_seconds=0.0, train_load_seconds=10.0,
        test_load_seconds=1.0, peak_mb=500.0, count=4, epochs=1, train_samples=60_000,
        loaded_train=60_000, test_samples=10_000, batch_size=256, save_every=50,
        values_per_sample=784, concurrent=2)
    # both processes load D at once, then train 2 experts each (2 waves)
    assert prediction.seconds == pytest.approx(10.0 + 2 * (234 * 0.02 + 1.0))


def test_experts_memory_adds_the_loaded_split():
    prediction = _experts(1)
    train_peak = plan.LOAD_PEAK_BYTES_PER_VALUE * 60_000 * 784 / plan.MIB
    assert prediction.peak_mb == pytest.approx(500.0 + train_peak)


def test_realgrad_time_scales_with_checkpoints_and_divides_by_workers():
    def predict(checkpoints, workers):
        return plan.realgrad_prediction(
            batch_seconds=0.5, load_sample_seconds=0.0, peak_mb=600.0, sums_mb_chunk=100.0,
            checkpoints=checkpoints, chunk=4, selected_samples=12_000, workers=workers,
            batch_size=500)

    base = predict(8, 1)
    assert base.seconds == pytest.approx(8 * 24 * 0.5)
    assert predict(16, 1).seconds == pytest.approx(2 * base.seconds)
    assert predict(8, 2).seconds == pytest.approx(base.seconds / 2)
    assert base.peak_mb == 700.0 and predict(8, 2).machine_mb == 1400.0
    assert plan.realgrad_passes(8, 3) == 3 and plan.realgrad_passes(8, None) == 1


def test_distill_and_evaluate_are_linear():
    distill = [plan.distill_prediction(iteration_seconds=0.1, peak_mb=700, iterations=n,
                                       held_mb=10, held_what="x") for n in (100, 300)]
    assert distill[1].seconds == pytest.approx(3 * distill[0].seconds) and distill[0].seconds > 0

    def evaluate(epochs):
        return plan.evaluate_prediction(
            epoch_seconds={"convnet": 0.05}, test_seconds={"convnet": 0.0}, peak_mb=700,
            sets=3, runs=2, epochs=epochs, test_samples=10_000, values_per_sample=784,
            concurrent=2)

    assert evaluate(300).seconds == pytest.approx(2 * evaluate(150).seconds)
    assert evaluate(300).seconds == pytest.approx(6 * 300 * 0.05 / 2)


def test_realgrad_sums_and_real_terms_bytes():
    assert plan.real_terms_bytes(1000, 10, 4, class_terms=False) == 4 * 1000 * 6
    assert plan.real_terms_bytes(1000, 10, 4, class_terms=True) == 4 * 1000 * (6 + 10 + 40)


def test_check_memory_names_the_stage_that_does_not_fit():
    stages = [plan.StagePrediction("experts", 1.0, 600.0, 2, "x"),
              plan.StagePrediction("distill", 1.0, 1500.0, 1, "y")]
    plan.check_memory(stages, 2000.0)
    with pytest.raises(plan.InsufficientMemoryError, match="stage distill .* 1500 MiB"):
        plan.check_memory(stages, 1400.0)
    with pytest.raises(plan.InsufficientMemoryError, match="stage experts .* 1200 MiB"):
        plan.check_memory(stages, 1000.0)
    table = plan.format_table(stages, 1000.0)
    assert table.splitlines()[0].split()[:2] == ["stage", "time"]
    assert "experts" in table and "1000 MiB available" in table


# --- the memory figure against the real stages ----------------------------------------------

def _stage_peak(config, stage: str) -> float:
    """Run one real stage (without Ray) and return the peak memory it recorded."""
    if stage == "experts":
        from ead_dist.stages.experts import run_experts

        return max(e["peak_memory_mb"] for e in run_experts(config, use_ray=False)["experts"])
    if stage == "realgrad":
        from ead_dist.stages.realgrad import run_realgrad

        return run_realgrad(config, use_ray=False)["peak_memory_mb_rank0"]
    if stage == "distill":
        from ead_dist.stages.distill import distill

        return distill(config)["peak_memory_mb"]
    from ead_dist.stages.evaluate import run_evaluate

    return run_evaluate(config, use_ray=False)["peak_memory_mb"]


@pytest.mark.slow
def test_planned_memory_is_within_30_percent_of_each_stage_measured_peak(
        tmp_path, small_fashion_mnist):
    from ead_dist.calibrate import plan_run

    config = tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                         {"ray.enabled": False, "evaluate.baselines": ["init"]})
    predicted = {p.stage: p for p in plan_run(config)}
    assert predicted["ingest"].seconds == 0.0  # already ingested
    # Each real stage in its own fresh process, as each calibration ran: its peak is its own.
    context = multiprocessing.get_context("spawn")
    for stage in ("experts", "realgrad", "distill", "evaluate"):
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            measured = pool.submit(_stage_peak, config, stage).result()
        assert predicted[stage].seconds > 0
        assert abs(predicted[stage].peak_mb - measured) <= 0.3 * measured, (
            stage, predicted[stage].peak_mb, measured)


# --- the commands ---------------------------------------------------------------------------

def _ead_dist(*args, env_extra=None):
    if not os.path.isfile(ENTRY_POINT):
        pytest.fail(f"{ENTRY_POINT} is missing: install the package (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    return subprocess.run([ENTRY_POINT, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def _tiny_args(tmp_path):
    # DATA not ingested: the calibration uses random tensors of Fashion-MNIST's shape.
    return ["pipelines/tiny_test.yaml", "--set", f"run={tmp_path / 'run'}",
            "--set", f"data.url={tmp_path / 'no-data'}"]


@pytest.mark.slow
def test_plan_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plans" / "plan.json"  # a folder not made yet: plan makes it
    done = _ead_dist("plan", *_tiny_args(tmp_path), "--json", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["stage", "time"]
    assert [line.split()[0] for line in lines[1:6]] == ["ingest", "experts", "realgrad",
                                                          "distill", "evaluate"]
    stages = json.loads(out.read_text())["stages"]
    assert [s["stage"] for s in stages] == ["ingest", "experts", "realgrad", "distill",
                                            "evaluate"]
    assert all(s["seconds"] > 0 and s["peak_mb"] > 0 for s in stages)


@pytest.mark.slow
def test_run_check_memory_stops_before_any_stage_when_a_stage_does_not_fit(tmp_path):
    done = _ead_dist("run", *_tiny_args(tmp_path), "--check-memory",
                     env_extra={"EAD_DIST_MEMORY_MB": "300"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ead-dist: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("ead-dist: error: stage ")
    assert "300 MiB available" in errors[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_an_image_text_config_is_planned_as_pairs_not_misread_as_classes():
    """plan_run hands an image-text config to the pair calibrations (tests/test_plan_pairs.py),
    which need DATA's meta.json and say so, before any calibration runs."""
    from ead_dist.calibrate import plan_run
    from ead_dist.config import ConfigError, load_config

    config = load_config("pipelines/scenes_tiny.yaml", ["data.url=/nonexistent/scenes"])
    with pytest.raises(ConfigError, match="/nonexistent/scenes is not ingested: an image-text "
                                          "plan reads the pairs' count"):
        plan_run(config, run_calibration=None)

"""``ead-dist plan`` for image-text runs: the composition of the calibrated units into stage
predictions (given measurements), the errors, and the memory figure against the real stages'
measured peaks on the scene captions."""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor

import pytest

from conftest import small_pair_config
from ead_dist.calibrate_pairs import (
    calibrate_pair_distill,
    calibrate_pair_evaluate,
    calibrate_pair_experts,
    calibrate_pair_reading,
    calibrate_pair_realgrad,
    pair_shape,
    plan_pair_run,
)
from ead_dist.config import ConfigError
from ead_dist.plan import MIB
from ead_dist.stages.realgrad import sums_bytes

MEASURED = {  # what a calibration might have measured, per unit
    calibrate_pair_reading: {"load_pair_seconds": 0.002, "count_pair_seconds": 0.0005,
                             "peak_mb": 300.0},
    calibrate_pair_experts: {"step_seconds": 0.1, "checkpoint_seconds": 0.5, "peak_mb": 500.0},
    calibrate_pair_realgrad: {"batch_seconds": 0.3, "parameters": 1000, "peak_mb": 600.0},
    calibrate_pair_distill: {"iteration_seconds": 0.2, "parameters": 1000, "peak_mb": 700.0},
    calibrate_pair_evaluate: {"epoch_seconds": 0.05, "recall_pair_seconds": 0.001,
                              "test_calibration_pairs": 20, "peak_mb": 400.0},
}


def _given(calls: list):
    def run_calibration(function, config, shape, threads, copies=1):
        calls.append((function.__name__, threads, copies))
        return dict(MEASURED[function])
    return run_calibration


def _config(tmp_path, scenes, **sections):
    return small_pair_config(str(tmp_path / "run"), scenes, sections)


def test_the_data_shape_comes_from_meta_json(scenes, tmp_path):
    shape = pair_shape(_config(tmp_path, scenes))
    assert (shape.total_pairs, shape.shards, shape.image_size) == (160, 2, 32)
    assert shape.train_pairs == 120 and shape.test_pairs == 40  # held_out 0.25 of 160


def test_a_trajectory_plan_is_the_units_times_the_counts(scenes, tmp_path):
    calls = []
    config = _config(tmp_path, scenes)  # SMALL_PAIRS: 1 expert x 1 epoch of 96 pairs, batch 32
    stages = {p.stage: p for p in plan_pair_run(config, _given(calls), cpus=2)}
    assert list(stages) == ["ingest", "experts", "realgrad", "distill", "evaluate"]
    assert stages["ingest"].seconds == 0.0 and stages["realgrad"].seconds == 0.0
    # 3 steps and 3 checkpoints (steps 0, 2, 3); the 96 train pairs decoded once, listing the
    # 128 keys they lie among (a quarter are held out); at the end the 20 test pairs, among 80
    train_read = 128 * 0.0005 + 96 * 0.002
    test_read = 80 * 0.0005 + 20 * 0.002
    assert stages["experts"].seconds == pytest.approx(train_read + 3 * 0.1 + 3 * 0.5
                                                      + test_read)
    assert stages["experts"].peak_mb == pytest.approx(500 + 13 * 96 * 3 * 32 * 32 / MIB)
    # 4 iterations; the initial draw counts the 128 pairs of the shards the prefix of 96 train
    # pairs lies in (96 / 0.75) and decodes N = 8
    assert stages["distill"].seconds == pytest.approx(4 * 0.2 + 128 * 0.0005 + 8 * 0.002)
    # the 3 checkpoints of the one expert, 2 of which the calibration held
    assert stages["distill"].peak_mb == pytest.approx(700 + 1 * 4 * 1000 / MIB)
    # 3 sets (init, random_real by default) x 1 run x (2 epochs + recall of 20) + reading the
    # 20 test pairs + random_real's draw
    assert stages["evaluate"].seconds == pytest.approx(
        3 * (2 * 0.05 + 20 * 0.001) + test_read + 128 * 0.0005 + 8 * 0.002)
    assert [name for name, _, _ in calls] == ["calibrate_pair_reading",
                                              "calibrate_pair_experts",
                                              "calibrate_pair_distill",
                                              "calibrate_pair_evaluate"]


def test_a_matching_plan_adds_realgrad_over_its_batches_and_workers(scenes, tmp_path):
    calls = []
    config = _config(tmp_path, scenes, distill={"objective": "matching"},
                     realgrad={"checkpoints": 2, "real_samples": 64, "p_batches": 2,
                               "p_batch_size": 16, "workers": 2},
                     ray={"enabled": True})
    stages = {p.stage: p for p in plan_pair_run(config, _given(calls), cpus=2)}
    realgrad = stages["realgrad"]
    # 4 D batches + 2 P batches of 16 over 2 workers: 3 batches each per checkpoint; each
    # worker decodes its 48 pairs once; the driver counts the prefix's 128 pairs serially
    assert realgrad.seconds == pytest.approx(2 * 3 * 0.3 + 48 * 0.002 + 128 * 0.0005)
    assert realgrad.processes == 2
    assert realgrad.peak_mb == pytest.approx(600 + sums_bytes(1000, 1, 2, False, 2) / MIB)
    # the coordinator holds one more checkpoint's g_D, g_P [2, n] and theta
    assert stages["distill"].peak_mb == pytest.approx(700 + 4 * 1000 * (2 + 2) / MIB)
    assert ("calibrate_pair_realgrad", 1, 2) in calls  # two 1-thread workers at once


def test_a_plan_refuses_data_that_is_not_ingested_or_not_pairs(tmp_path, small_fashion_mnist,
                                                              scenes):
    config = _config(tmp_path, scenes)
    config.data.url = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'} is not ingested"):
        plan_pair_run(config, _given([]), cpus=2)
    config.data.url = small_fashion_mnist
    with pytest.raises(ConfigError, match="describes a classification dataset"):
        plan_pair_run(config, _given([]), cpus=2)


def _stage_peak(config, stage: str) -> float:
    from ead_dist.run import run_stages
    from ead_dist.stages.experts import run_experts

    if stage == "experts":
        return max(e["peak_memory_mb"] for e in run_experts(config, use_ray=False)["experts"])
    return run_stages(config, (stage,))[stage]["peak_memory_mb"]


@pytest.mark.slow
def test_planned_memory_of_an_image_text_run_is_within_30_percent_of_each_measured_peak(
        scenes, tmp_path):
    from ead_dist.calibrate import plan_run

    config = _config(tmp_path, scenes)
    predicted = {p.stage: p for p in plan_run(config)}
    context = multiprocessing.get_context("spawn")
    for stage in ("experts", "distill", "evaluate"):
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            measured = pool.submit(_stage_peak, config, stage).result()
        assert predicted[stage].seconds > 0
        assert abs(predicted[stage].peak_mb - measured) <= 0.3 * measured, (
            stage, predicted[stage].peak_mb, measured)
    shutil.rmtree(config.run)

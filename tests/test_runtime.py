"""Where work runs: placement on GPUs, and the whole pipeline in one process without Ray."""

import pytest

from conftest import tiny_config
from ead_dist import storage
from ead_dist.runtime import concurrent_runs, gpu_share


def test_placement_never_asks_for_more_gpus_than_the_cluster_has():
    assert concurrent_runs(20, cpus=16, gpus=1, use_gpu=True) == 1
    assert concurrent_runs(20, cpus=16, gpus=1, use_gpu=True, runs_per_gpu=4) == 4
    assert concurrent_runs(20, cpus=2, gpus=8, use_gpu=True) == 2
    assert concurrent_runs(3, cpus=16, gpus=0, use_gpu=False) == 3
    assert gpu_share(True, 4) == 0.25 and gpu_share(False, 4) == 0.0


def test_every_stage_runs_in_this_process_without_ray(small_fashion_mnist, tmp_path,
                                                      monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.enabled: false must not use Ray")

    for name in ("init", "remote", "get", "put", "wait"):
        monkeypatch.setattr(ray, name, no_ray)
    from ead_dist.run import run_stages

    config = tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                         {"ray.enabled": False, "distill.objective": "trajectory",
                          "distill.expert_span": 1, "distill.student_steps": 2})
    summary = run_stages(config, ("experts", "realgrad", "distill", "evaluate"))
    assert "skipped" in summary["realgrad"]
    report = storage.read_json(storage.join(config.run, "eval.json"))
    assert set(report["results"]) == {"synthetic", "random_real", "init"}
    assert summary["distill"]["segments"] >= 1
    # Each stage's metrics and the run's provenance sit beside its results.
    lines = storage.read_bytes(storage.join(config.run, "distill", "metrics.jsonl")).splitlines()
    assert len(lines) == config.distill.iterations
    expert_lines = storage.read_bytes(storage.join(config.run, "experts", "expert-000",
                                                   "metrics.jsonl")).splitlines()
    assert len(expert_lines) == len(storage.list_files(
        storage.join(config.run, "experts", "expert-000"), "step-*.safetensors"))
    assert storage.read_json(storage.join(config.run, "run.json"))["config"]["run"] == config.run
    with pytest.raises(AssertionError, match="must not use Ray"):
        ray.remote(lambda: 0)


@pytest.mark.cluster
def test_tasks_are_retried_after_a_lost_worker_but_not_after_their_own_error(ray_session,
                                                                              tmp_path):
    from ead_dist.config import RayConfig
    from ead_dist.data.pipeline import ShardError
    from ead_dist.runtime import task_retry_options

    # Defined here so that Ray ships it by value (workers cannot import this test module).
    def _attempt(marker: str, error: str) -> str:
        """A task that records each attempt; the first dies (a lost worker) or raises."""
        import os

        with open(marker, "a") as f:
            f.write("x")
        first = os.path.getsize(marker) == 1
        if error == "crash" and first:
            os._exit(1)
        if error == "shard":
            from ead_dist.data.pipeline import ShardError

            raise ShardError("bad shard")
        return "done"

    task = ray_session.remote(num_cpus=1, **task_retry_options(RayConfig(task_retries=2)))(
        _attempt)
    crashed, raised = tmp_path / "crashed", tmp_path / "raised"
    assert ray_session.get(task.remote(str(crashed), "crash")) == "done"
    assert crashed.read_text() == "xx"
    with pytest.raises(ShardError):
        ray_session.get(task.remote(str(raised), "shard"))
    assert raised.read_text() == "x"  # an application error is not retried

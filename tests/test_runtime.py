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


# Run in a fresh process: a Ray node that declares 2 GPUs on this CPU-only machine (as `ray
# start --num-gpus=2` does), so Ray places GPU requests without any device behind them.
_FAKE_GPU_NODE = """
import json, sys, threading, time
import ray
from conftest import tiny_config
from ead_dist.run import run_stages
from ead_dist.stages import realgrad

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
         object_store_memory=100 * 1024**2)
low, stage = {}, [None]

def watch():
    while True:
        if stage[0]:
            free = ray.available_resources().get("GPU", 0.0)
            low[stage[0]] = min(low.get(stage[0], 2.0), free)
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
config = tiny_config(sys.argv[1], sys.argv[2], {
    "experts.count": 3, "experts.train_samples": 128, "ray.runs_per_gpu": 2,
    "realgrad.workers": 4, "distill.objective": "trajectory", "distill.expert_span": 1,
    "distill.student_steps": 2, "distill.iterations": 2})
for name in ("experts", "distill"):
    stage[0] = name
    run_stages(config, (name,))
    time.sleep(0.1)
stage[0] = None
print(json.dumps({"use_gpu": config.ray.use_gpu, "low": low,
                  "realgrad_workers": realgrad._workers(config)}))
"""


@pytest.mark.cluster
@pytest.mark.slow
def test_stages_place_within_the_gpus_of_a_node_that_declares_them(small_fashion_mnist,
                                                                    tmp_path):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).parent
    env = dict(os.environ, RAY_ADDRESS="",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _FAKE_GPU_NODE, str(tmp_path / "run"),
                           small_fashion_mnist], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["use_gpu"] is True  # a cluster with GPUs uses them when ray.use_gpu is unset
    # 3 experts, 2 CPUs, runs_per_gpu 2: two actors of half a GPU each, one GPU left free.
    assert found["low"]["experts"] == 1.0
    assert found["low"]["distill"] == 1.0  # the coordinator: one whole GPU
    assert found["realgrad_workers"] == 2  # 4 asked, one NCCL rank per GPU
    assert len(storage.list_files(storage.join(str(tmp_path / "run"), "experts"),
                                  "expert-*")) == 3

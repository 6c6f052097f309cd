"""Errors raised inside Ray reach the user as the project's own one-line error."""

import os
import pathlib
import subprocess
import sys

import pytest
from ray.exceptions import RayTaskError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from ead_dist.config import ConfigError
from ead_dist.data.pipeline import ShardError
from ead_dist.ray_errors import unwrap
from ead_dist.storage import StorageError

REPO = pathlib.Path(__file__).parent.parent


def _task_error(cause: Exception) -> Exception:
    wrapped = RayTaskError("f", "Traceback (most recent call last):\n ...", cause)
    return wrapped.as_instanceof_cause()


def test_unwrap_task_actor_and_train_errors():
    shard = ShardError("bad shard s3://b/train/shard-000001.tar")
    assert unwrap(_task_error(shard)) is shard
    # A task that called a task: wrapped twice.
    assert unwrap(_task_error(_task_error(shard))) is shard
    stale = ConfigError("distill.objective 'matching' -> 'scalar'")
    group = WorkerGroupError("rank 1 failed", {1: _task_error(stale), 0: _task_error(shard)})
    assert unwrap(group) is shard  # the lowest rank's
    assert unwrap(ControllerError(_task_error(stale))) is stale
    plain = StorageError("missing object: x")
    assert unwrap(plain) is plain
    assert isinstance(unwrap(RuntimeError("a bug")), RuntimeError)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "ead_dist.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.cluster
@pytest.mark.slow
def test_corrupt_checkpoint_in_an_expert_actor_is_one_line_and_exit_2(small_fashion_mnist,
                                                                      tmp_path):
    run = tmp_path / "run"
    corrupt = run / "experts" / "expert-000" / "step-000003.safetensors"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # resumed from: read
    done = _cli("experts", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                "--set", f"data.url={small_fashion_mnist}", "--set", "ray.num_cpus=2",
                "--set", "ray.object_store_memory_mb=200")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "ead-dist: error: " in line]
    assert len(errors) == 1 and str(corrupt) in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr

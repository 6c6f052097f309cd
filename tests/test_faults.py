"""The faults a cluster has, made real on a local Ray instance: an expert actor, a realgrad
worker and the coordinator killed with SIGKILL mid-work, and an S3 endpoint that fails
requests for a while and then recovers. Each run must lose nothing, redo nothing it had
published, and end equal to a clean run of the same config."""

import json
import os
import shutil

import pytest
import torch

from conftest import tiny_config
from ead_dist import storage
from ead_dist.metrics import MetricsLog
from ray_processes import KillWhen, own_processes, titled


def _mtimes(directory: str, pattern: str) -> dict[str, int]:
    """{file name: mtime_ns} of the local files matching ``pattern`` in ``directory``."""
    return {os.path.basename(u): os.stat(u).st_mtime_ns
            for u in storage.list_files(directory, pattern)}


def _assert_tensor_files_equal(expected_url: str, got_url: str, rtol: float = 0.0) -> None:
    expected, _ = storage.load_tensors(expected_url)
    got, _ = storage.load_tensors(got_url)
    assert set(expected) == set(got), got_url
    for name in expected:
        if rtol == 0.0 or not expected[name].is_floating_point():
            assert torch.equal(expected[name], got[name]), f"{got_url}: {name}"
        else:
            scale = expected[name].abs().max()
            assert (got[name] - expected[name]).abs().max() <= rtol * scale, f"{got_url}: {name}"


@pytest.fixture
def ray_workers(ray_session):
    """The session's Ray, whose workers must run the code under test (not another install of
    the package: they inherit this process's PYTHONPATH)."""
    import ead_dist

    where = ray_session.get(ray_session.remote(lambda: __import__("ead_dist").__file__).remote())
    assert where == ead_dist.__file__
    return ray_session


# --- an expert actor killed mid-trajectory ---------------------------------------------------

EXPERT = {"experts.count": 1, "experts.epochs": 2, "experts.batch_size": 32,
          "experts.save_every": 4, "experts.train_samples": 512,
          "ray.actor_restarts": 1, "ray.task_retries": 1}


@pytest.mark.cluster
def test_an_expert_actor_killed_mid_trajectory_resumes_without_duplicate_or_missing_checkpoints(
        small_fashion_mnist, tmp_path, ray_workers):
    from ead_dist.stages.experts import expert_dir, run_experts

    clean = tiny_config(str(tmp_path / "clean"), small_fashion_mnist, EXPERT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an expert actor trains: the same float summation order
    try:
        clean_index = run_experts(clean, use_ray=False)
    finally:
        torch.set_num_threads(threads)

    config = tiny_config(str(tmp_path / "killed"), small_fashion_mnist, EXPERT)
    directory = expert_dir(config.run, 0)
    done = storage.join(directory, "trajectory.json")
    with KillWhen(titled("ray::ExpertWorker"),
                  condition=lambda: len(_mtimes(directory, "step-*.safetensors")) >= 3,
                  snapshot=lambda: (_mtimes(directory, "step-*.safetensors"),
                                    os.path.exists(done))) as killer:
        index = run_experts(config, use_ray=True)
    assert killer.killed, "the expert finished before it could be killed"
    published, finished = killer.seen
    assert not finished, "killed after the trajectory was complete: not mid-trajectory"
    # Ray restarted the actor and reran the call; it resumed from the last checkpoint, so
    # nothing published before the kill was written again ...
    after = _mtimes(directory, "step-*.safetensors")
    assert {name: after[name] for name in published} == published
    # ... and the trajectory is the clean run's: the same checkpoints, none twice, none missing,
    # with the same parameters.
    clean_dir = expert_dir(clean.run, 0)
    assert sorted(after) == sorted(_mtimes(clean_dir, "step-*.safetensors"))
    assert index["experts"][0]["checkpoints"] == clean_index["experts"][0]["checkpoints"]
    assert index["experts"][0]["test_accuracy"] == clean_index["experts"][0]["test_accuracy"]
    for name in after:
        _assert_tensor_files_equal(storage.join(clean_dir, name), storage.join(directory, name))
    steps = [line["step"] for line in MetricsLog(directory).lines]
    assert steps == sorted(set(steps)) == [c["step"] for c in index["experts"][0]["checkpoints"]]


# --- a realgrad worker killed mid-pass -------------------------------------------------------

REALGRAD = {"experts.count": 1, "experts.train_samples": 256, "realgrad.checkpoints": 2,
            "realgrad.chunk": 1, "realgrad.real_samples": 300, "realgrad.batch_size": 16,
            "realgrad.workers": 2, "ray.train_failures": 1}


@pytest.fixture(scope="module")
def experts_done(small_fashion_mnist, tmp_path_factory):
    """A run with its experts trained (in this process); tests copy it."""
    from ead_dist.stages.experts import run_experts

    run = str(tmp_path_factory.mktemp("faults") / "base")
    run_experts(tiny_config(run, small_fashion_mnist, REALGRAD), use_ray=False)
    return run


@pytest.mark.cluster
@pytest.mark.slow
def test_a_realgrad_worker_killed_mid_pass_is_restarted_and_the_terms_equal_a_clean_run(
        experts_done, small_fashion_mnist, tmp_path, ray_workers):
    from ead_dist.stages.realgrad import realgrad_url, run_realgrad, term_file

    clean = tiny_config(str(tmp_path / "clean"), small_fashion_mnist, REALGRAD)
    shutil.copytree(experts_done, clean.run)
    run_realgrad(clean, use_ray=False)

    config = tiny_config(str(tmp_path / "killed"), small_fashion_mnist, REALGRAD)
    shutil.copytree(experts_done, config.run)
    directory = realgrad_url(config.run)
    # Two passes of one checkpoint each; the kill takes a worker of the second pass (one not
    # seen before the first pass published its file), before the second publishes.
    first_pass: set[int] = set()

    def second_pass_worker() -> int | None:
        workers = set(own_processes("ray::RayTrainWorker"))
        if not os.path.exists(storage.join(directory, term_file(0))):
            first_pass.update(workers)
            return None
        return min(workers - first_pass, default=None)

    with KillWhen(second_pass_worker, condition=lambda: True,
                  snapshot=lambda: _mtimes(directory, "ckpt-*.safetensors")) as killer:
        index = run_realgrad(config, use_ray=True)
    assert killer.killed, "realgrad finished before a worker could be killed"
    assert list(killer.seen) == [term_file(0)], f"not killed in the second pass: {killer.seen}"
    after = _mtimes(directory, "ckpt-*.safetensors")
    assert after[term_file(0)] == killer.seen[term_file(0)]  # the first pass was not redone
    assert sorted(after) == [term_file(i) for i in range(2)] and index["passes"] == 2
    for name in after:  # float32 sums over 2 workers against 1 process: summation order
        _assert_tensor_files_equal(storage.join(realgrad_url(clean.run), name),
                                   storage.join(directory, name), rtol=1e-5)


# --- the coordinator killed mid-run ----------------------------------------------------------

COORDINATOR = dict(REALGRAD, **{"realgrad.workers": 1, "distill.ipc": 10,
                                "distill.iterations": 20, "distill.save_every": 4,
                                "ray.task_retries": 1})


@pytest.mark.cluster
@pytest.mark.slow
def test_the_coordinator_killed_mid_run_resumes_from_its_last_state_to_the_same_set(
        experts_done, small_fashion_mnist, tmp_path, ray_workers):
    from ead_dist.run import run_stages
    from ead_dist.stages.distill import distill
    from ead_dist.stages.realgrad import run_realgrad

    base = tiny_config(str(tmp_path / "base"), small_fashion_mnist, COORDINATOR)
    shutil.copytree(experts_done, base.run)
    run_realgrad(base, use_ray=False)
    clean = tiny_config(str(tmp_path / "clean"), small_fashion_mnist, COORDINATOR)
    shutil.copytree(base.run, clean.run)
    distill(clean)

    config = tiny_config(str(tmp_path / "killed"), small_fashion_mnist, COORDINATOR)
    shutil.copytree(base.run, config.run)
    directory = storage.join(config.run, "distill")
    with KillWhen(titled("ray::distill"),
                  condition=lambda: len(_mtimes(directory, "state-*.safetensors")) >= 2,
                  snapshot=lambda: _mtimes(directory, "state-*.safetensors")) as killer:
        run_stages(config, ("distill",))  # the coordinator as a Ray task, retried by Ray
    assert killer.killed, "the coordinator finished before it could be killed"
    assert "state-000020.safetensors" not in killer.seen, "killed after its last iteration"
    summary = storage.read_json(storage.join(directory, "summary.json"))
    newest = int(max(killer.seen).split("-")[1].split(".")[0])
    # The retried task resumed from a state saved before the kill (or one the killed process
    # published between the snapshot and the kill), never from the start.
    assert summary["resumed_at"] >= newest > 0
    after = _mtimes(directory, "state-*.safetensors")
    assert {name: after[name] for name in killer.seen} == killer.seen  # none rewritten
    iterations = [line["iteration"] for line in MetricsLog(directory).lines]
    assert iterations == list(range(20))  # every iteration's line once: none lost, none twice
    _assert_tensor_files_equal(storage.join(clean.run, "synthetic.safetensors"),
                               storage.join(config.run, "synthetic.safetensors"), rtol=1e-6)


# --- an S3 endpoint that fails requests for a while, then recovers ----------------------------

FLAKY = {"experts.count": 1, "experts.train_samples": 256, "realgrad.checkpoints": 2,
         "realgrad.real_samples": 200, "distill.iterations": 4, "distill.save_every": 2,
         "ray.enabled": False}


def _upload(local_dir: str, url: str) -> None:
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                storage.publish_bytes(storage.join(url, relative), f.read())


@pytest.mark.s3
def test_a_run_through_an_s3_endpoint_that_fails_requests_and_recovers_equals_a_clean_run(
        small_fashion_mnist, s3_endpoint, s3_bucket):
    from ead_dist.run import run_stages
    from flaky_s3 import FlakyS3

    data = f"{s3_bucket}/data/fashion_mnist"
    storage.configure({"endpoint_url": s3_endpoint})
    _upload(small_fashion_mnist, data)
    stages = ("experts", "realgrad", "distill")
    clean = tiny_config(f"{s3_bucket}/runs/clean", data,
                        dict(FLAKY, **{"storage.s3_endpoint_url": s3_endpoint}))
    try:
        run_stages(clean, stages)
        # Every 4th request fails (503 SlowDown, 500 InternalError, a reset connection, in
        # turn) until 9 have failed (the experts' reads and writes); then it recovers.
        with FlakyS3(s3_endpoint, every=4, failures=9) as flaky:
            config = tiny_config(f"{s3_bucket}/runs/flaky", data,
                                 dict(FLAKY, **{"storage.s3_endpoint_url": flaky.url}))
            run_stages(config, stages)
        assert flaky.recovered, (flaky.requests, flaky.failed)
        assert all(count == 3 for count in flaky.failed.values()), flaky.failed
        storage.configure({"endpoint_url": s3_endpoint})
        for name in ("experts/expert-000/trajectory.json", "realgrad/index.json"):
            a = storage.read_json(storage.join(clean.run, name))
            b = json.loads(storage.read_bytes(storage.join(config.run, name)).decode()
                           .replace(config.run, clean.run))  # the URLs of its checkpoints
            for volatile in ("seconds", "peak_memory_mb", "peak_memory_mb_rank0"):
                a.pop(volatile, None), b.pop(volatile, None)
            assert a == b, name
        clean_files = [u.rsplit("/", 2)[-2:] for u in storage.list_files(
            storage.join(clean.run, "experts", "expert-000"), "step-*.safetensors")]
        flaky_files = [u.rsplit("/", 2)[-2:] for u in storage.list_files(
            storage.join(config.run, "experts", "expert-000"), "step-*.safetensors")]
        assert clean_files == flaky_files and clean_files
        for name in ["/".join(["experts", *f]) for f in clean_files] + [
                "realgrad/ckpt-0000.safetensors", "realgrad/ckpt-0001.safetensors",
                "distill/init.safetensors", "synthetic.safetensors"]:
            _assert_tensor_files_equal(storage.join(clean.run, name),
                                       storage.join(config.run, name))
    finally:
        storage.configure()

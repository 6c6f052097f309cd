"""A real two-node Ray cluster on loopback: ``ead-dist submit`` runs a tiny pipeline on it with
DATA and RUN on S3 (moto), Ray places experts and realgrad workers on both nodes, and the
synthetic set is the one a single-node run makes (marked ``cluster``, ``s3``)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import _free_port
from ead_dist import storage

ROOT = Path(__file__).resolve().parent.parent


def _start(args: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, so teardown can kill it alone."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                 "--disable-usage-stats", "--object-store-memory=80000000",
                                 *args], stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _state_client(address: str, token: str):
    """Ray's state API at the head's dashboard, with this cluster's token."""
    from ray.util.state import StateApiClient

    return StateApiClient(address=address, headers={"Authorization": f"Bearer {token}"})


def _alive_nodes(address: str, token: str) -> list[str]:
    from ray.util.state.common import ListApiOptions, StateResource

    try:
        nodes = _state_client(address, token).list(StateResource.NODES, ListApiOptions(),
                                                   raise_on_missing_output=False)
    except Exception:  # the dashboard is still starting
        return []
    return [node.node_id for node in nodes if node.state == "ALIVE"]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second raylet, one CPU each, on loopback; yields (job server URL, token, env).

    Both run under ``RAY_AUTH_MODE=token`` with a token made here: a Ray 2.60 head turns token
    auth on by itself where ``~/.ray/auth_token`` exists, but ``ray start --address`` does not,
    and the second node is then refused with ``InvalidAuthToken``. Setting the mode and token
    explicitly for every process makes the cluster the same on any machine. Teardown kills the
    two process groups only (``ray stop`` would end every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="ead2n-", dir="/tmp")  # short: unix socket paths
    token = secrets.token_hex(32)
    # No AWS_* variables on the nodes: the job gets S3's endpoint and keys from submit alone.
    here = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env = {**here, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # `python` in the job's entrypoint is the interpreter running these tests.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    port, dashboard_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    groups = []
    try:
        groups.append(_start(
            ["--head", f"--port={port}", "--num-cpus=1", "--resources={\"node1\": 1}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--ray-client-server-port={_free_port()}"],
            os.path.join(temp_dir, "head.log"), env))
        groups.append(_start(
            [f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources={\"node2\": 1}",
             f"--dashboard-agent-listen-port={_free_port()}"],
            os.path.join(temp_dir, "node2.log"), env))
        deadline = time.monotonic() + 180  # seconds; a loaded 2-core machine is slow
        while len(_alive_nodes(address, token)) < 2:
            for process, name in zip(groups, ("head", "node2")):
                if process.poll() is not None:
                    pytest.fail(f"ray start ({name}) exited:\n"
                                + Path(temp_dir, f"{name}.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("two Ray nodes were not alive within 180 s:\n" + "\n".join(
                    Path(temp_dir, f"{n}.log").read_text()[-1500:] for n in ("head", "node2")))
            time.sleep(1)
        yield address, token, env
    finally:
        for process in reversed(groups):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_nodes(address: str, token: str) -> dict[str, set[str]]:
    """The node ids of every actor the cluster has run, dead or alive, by class name."""
    from ray.util.state.common import ListApiOptions, StateResource

    actors = _state_client(address, token).list(
        StateResource.ACTORS, ListApiOptions(limit=10_000, detail=True),
        raise_on_missing_output=False)
    nodes: dict[str, set[str]] = {}
    for actor in actors:
        nodes.setdefault(actor.class_name, set()).add(actor.node_id)
    return nodes


# Each node has one CPU, so two expert actors and two realgrad workers of one CPU each cannot
# share a node. Evaluation is kept to its minimum: only the synthetic set is compared.
SETTINGS = {"experts.count": 2, "realgrad.workers": 2, "realgrad.checkpoints": 2,
            "evaluate.epochs": 1, "evaluate.test_samples": 100}


def _config_text(run: str, data: str) -> str:
    raw = yaml.safe_load((ROOT / "pipelines" / "tiny_test.yaml").read_text())
    raw["run"], raw["data"]["url"] = run, data
    for dotted, value in SETTINGS.items():
        section, field = dotted.split(".")
        raw[section][field] = value
    return yaml.safe_dump(raw)


@pytest.mark.cluster
@pytest.mark.s3
@pytest.mark.slow
def test_submitted_run_spreads_over_two_nodes_and_matches_one_node(
        two_nodes, small_fashion_mnist_raw, s3_endpoint, s3_bucket, tmp_path):
    import torch

    from conftest import tiny_config
    from ead_dist.data.ingest import ingest_classification
    from ead_dist.run import run_stages

    address, token, env = two_nodes
    data, run = storage.join(s3_bucket, "data"), storage.join(s3_bucket, "run")
    ingest_classification("fashion_mnist", small_fashion_mnist_raw, data, shard_size=200,
                          use_ray=False)
    # A config outside the checkout: submit ships its text with the job.
    config_file = tmp_path / "two_nodes.yaml"
    config_file.write_text(_config_text(run, data))
    # submit forwards the moto endpoint and keys (AWS_*) as the job's environment.
    submitted = subprocess.run(
        [sys.executable, "-m", "ead_dist.cli", "submit", str(config_file), "--address", address],
        env={**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
        capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    assert storage.exists(storage.join(run, "eval.json"))

    # Both nodes ran experts and realgrad workers (Ray Train V2's worker actor class).
    nodes = set(_alive_nodes(address, token))
    placed = _actor_nodes(address, token)
    assert placed["ExpertWorker"] == nodes, placed
    assert placed["RayTrainWorker"] == nodes, placed

    # The same config on one node, in this process, without Ray, from the same shards.
    local = tiny_config(str(tmp_path / "local"), data,
                        dict(SETTINGS, **{"ray.enabled": False}))
    # On one torch thread, as the expert actors train: on some CPUs two threads already round
    # the experts differently (7.5e-5 of a weight's largest entry, seen on this project's
    # machines), which says nothing about the cluster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stages(local, ("experts", "realgrad", "distill"))
    finally:
        torch.set_num_threads(threads)
    # Each stage's output against the single-node run's. The experts came out bitwise equal
    # here (one thread each); 1e-5 allows for another thread count's rounding.
    for expert in storage.read_json(storage.join(run, "experts", "index.json"))["experts"]:
        last = expert["checkpoints"][-1]["file"]
        _assert_close(storage.join(run, "experts", last),
                      storage.join(local.run, "experts", last), 1e-5)
    # Realgrad: two workers sum their shards and all_reduce, one process sums them in one
    # pass, and float32 addition is not associative. At a trained checkpoint the mean gradient
    # is small beside the per-sample ones it sums, so that moved g_D by 2.6e-5 of its largest
    # entry here; the counts are exact.
    for name in ("ckpt-0000.safetensors", "ckpt-0001.safetensors"):
        _assert_close(storage.join(run, "realgrad", name),
                      storage.join(local.run, "realgrad", name), 1e-4)
    # The synthetic set: six coordinator steps from those terms moved its images by 4e-6 of
    # their largest entry here.
    _assert_close(storage.join(run, "synthetic.safetensors"),
                  storage.join(local.run, "synthetic.safetensors"), 1e-4)


def _assert_close(url: str, reference_url: str, tolerance: float) -> None:
    """Every tensor of ``url`` equal to ``reference_url``'s: integers exactly, floats within
    ``tolerance`` of the reference's largest entry."""
    import torch

    got, _ = storage.load_tensors(url)
    expected, _ = storage.load_tensors(reference_url)
    assert set(got) == set(expected), url
    for name, reference in expected.items():
        if reference.is_floating_point():
            error = (got[name] - reference).abs().max()
            assert error <= tolerance * reference.abs().max(), (url, name, float(error))
        else:
            assert torch.equal(got[name], reference), (url, name)

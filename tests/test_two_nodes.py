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
    """A head and a second raylet, one CPU each, on loopback; yields (job server URL, env).

    Both run under ``RAY_AUTH_MODE=token`` with a token made here: a Ray 2.60 head turns token
    auth on by itself where ``~/.ray/auth_token`` exists, but ``ray start --address`` does not,
    and the second node is then refused with ``InvalidAuthToken``. Setting the mode and token
    explicitly for every process makes the cluster the same on any machine. Teardown kills the
    two process groups only (``ray stop`` would end every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="ead2n-", dir="/tmp")  # short: unix socket paths
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
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


@pytest.mark.cluster
def test_two_nodes_come_up(two_nodes):
    address, token, _ = two_nodes
    assert len(_alive_nodes(address, token)) == 2

"""ead_dist/submit.py: the job's entrypoint and runtime environment, and a real submission to a
Ray head started with ``ray start`` on loopback (marked ``cluster``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest

import ead_dist
from ead_dist import submit
from ead_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_run_entrypoint_is_relative_to_the_checkout():
    entrypoint = submit.run_entrypoint(str(ROOT / "pipelines" / "tiny_test.yaml"),
                                       ["distill.ipc=2", "run=s3://b/runs/a b"], ROOT)
    assert entrypoint == ("python -m ead_dist.cli run pipelines/tiny_test.yaml "
                          "--set distill.ipc=2 --set 'run=s3://b/runs/a b'")


def test_a_config_outside_the_checkout_travels_as_text_and_loads_the_same(tmp_path,
                                                                          monkeypatch):
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "pipelines" / "tiny_test.yaml").read_text())
    entrypoint = submit.run_entrypoint(str(outside), ["distill.ipc=3"], ROOT)
    assert entrypoint == ("python -m ead_dist.cli run env:EAD_DIST_CONFIG_YAML "
                          "--set distill.ipc=3")
    shipped = submit.shipped_config(str(outside), ROOT)
    assert submit.shipped_config(str(ROOT / "pipelines" / "tiny_test.yaml"), ROOT) == {}
    # What the job's entrypoint loads from its environment is the config loaded here.
    monkeypatch.setenv("EAD_DIST_CONFIG_YAML", shipped["EAD_DIST_CONFIG_YAML"])
    assert (load_config("env:EAD_DIST_CONFIG_YAML", ["distill.ipc=3"]).to_json()
            == load_config(str(outside), ["distill.ipc=3"]).to_json())
    monkeypatch.delenv("EAD_DIST_CONFIG_YAML")
    with pytest.raises(ConfigError, match="EAD_DIST_CONFIG_YAML is unset"):
        load_config("env:EAD_DIST_CONFIG_YAML")
    outside.write_text("name: x\n" + "#" * 70_000)
    with pytest.raises(submit.SubmitError, match="too large"):
        submit.shipped_config(str(outside), ROOT)


def test_forwarded_env_takes_only_set_s3_variables():
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
               "AWS_SESSION_TOKEN": "", "HOME": "/root"}
    assert submit.forwarded_env(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000",
                                             "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


class _FakeClient:
    """Stands in for JobSubmissionClient: records the submission, never runs it."""

    submitted: ClassVar[dict] = {}

    def __init__(self, address):
        self.address = address

    def submit_job(self, **kwargs):
        _FakeClient.submitted = kwargs
        return kwargs["submission_id"]


def test_submit_job_sends_the_checkout_and_never_logs_secrets(monkeypatch, caplog):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    monkeypatch.setattr(submit, "_send_auth_token", lambda: None)  # no head to authenticate to
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    path = str(ROOT / "pipelines" / "tiny_test.yaml")
    config = load_config(path, ["distill.ipc=3"])
    with caplog.at_level(logging.DEBUG, logger="ead_dist"):
        job_id = submit.submit_job(path, ["distill.ipc=3"], config, "http://head:8265",
                                   wait=False)
    sent = _FakeClient.submitted
    assert job_id == sent["submission_id"] and job_id.startswith("ead-tiny-")
    assert sent["entrypoint"] == ("python -m ead_dist.cli run pipelines/tiny_test.yaml "
                                  "--set distill.ipc=3")
    env = sent["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert {".venv", "runs", "data", ".git", "benchmarks/results"} <= set(env["excludes"])
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"
    assert "AWS_SECRET_ACCESS_KEY" in caplog.text  # the name is logged, never the value
    assert "very-secret-value" not in caplog.text and "AKIDEXAMPLE" not in caplog.text
    assert "run is a local path" in caplog.text
    assert "EAD_DIST_CONFIG_YAML" not in env["env_vars"]  # the config travels in the checkout


def test_submit_job_ships_a_config_from_outside_the_checkout(monkeypatch, tmp_path):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    monkeypatch.setattr(submit, "_send_auth_token", lambda: None)
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "pipelines" / "tiny_test.yaml").read_text())
    submit.submit_job(str(outside), [], load_config(str(outside)), "http://head:8265",
                      wait=False)
    sent = _FakeClient.submitted
    assert sent["entrypoint"] == "python -m ead_dist.cli run env:EAD_DIST_CONFIG_YAML"
    assert sent["runtime_env"]["env_vars"]["EAD_DIST_CONFIG_YAML"] == outside.read_text()


# --- a real Ray head on loopback -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_missing() -> str | None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what `ray start` itself checks)
    except ImportError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in its own process group and temp dir; yields the job
    server's URL. Its own temp dir keeps other ``ray.init()`` calls on this machine from
    joining it. Teardown kills this process group only: ``ray stop`` would end every Ray on
    the machine, and a graceful SIGTERM drains for up to 30 s."""
    missing = _dashboard_missing()
    if missing:
        pytest.fail(f"the Ray job server needs ray[default], a dependency ({missing})")
    temp_dir = tempfile.mkdtemp(prefix="eadr-", dir="/tmp")  # short: unix socket paths
    # Every port `ray start` would otherwise take at a fixed default (the dashboard agent's
    # 52365, the client server's 10001) is chosen free: another Ray on this machine (the test
    # session's own ray.init) holds the defaults, and the head's job agent then never starts.
    port, dashboard_port, agent_port, client_port = (_free_port() for _ in range(4))
    log_path = os.path.join(temp_dir, "ray-start.log")
    auth_mode = os.environ.get("RAY_AUTH_MODE")  # submit may set it (see _send_auth_token)
    with open(log_path, "w") as log_file:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
             f"--dashboard-agent-listen-port={agent_port}",
             f"--ray-client-server-port={client_port}",
             "--object-store-memory=100000000", "--disable-usage-stats"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            # `python` in an entrypoint is the interpreter running these tests.
            env={**os.environ, "RAY_ADDRESS": "",
                 "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180  # seconds; a loaded 2-core machine is slow
        while not _answers(address):
            if head.poll() is not None:
                pytest.fail("ray start exited:\n" + Path(log_path).read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("the job server did not answer within 180 s:\n"
                            + Path(log_path).read_text()[-3000:])
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


def _answers(address: str) -> bool:
    """Whether the dashboard answers HTTP at all (401 too: heads require a token by default)."""
    try:
        with urllib.request.urlopen(address + "/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.mark.cluster
def test_submit_entrypoint_runs_on_a_real_head(ray_head, capsys):
    entrypoint = "python -c \"import ead_dist; print('ok', ead_dist.__version__)\""
    status = submit.submit_entrypoint(ray_head, entrypoint, timeout_s=600)
    assert status == "SUCCEEDED"
    assert f"ok {ead_dist.__version__}" in capsys.readouterr().out


@pytest.mark.cluster
def test_failed_job_raises(ray_head):
    with pytest.raises(submit.SubmitError, match="FAILED"):
        submit.submit_entrypoint(ray_head, "python -c 'raise SystemExit(3)'", timeout_s=600)

"""Send a run to a Ray cluster through Ray's job submission API, and follow it to its end.

The job's runtime environment is this checkout (``working_dir``), so the cluster runs the
code and the pipeline file as they are here; the entrypoint is ``python -m ead_dist.cli run
CONFIG --set ...``, which loads the config again on the cluster. A config from outside the
checkout travels as its YAML text in the job's environment. The job server is the Ray
dashboard (``http://HEAD:8265``), which needs ``ray[default]`` on the head node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from .config import RunConfig

log = logging.getLogger(__name__)

# Paths of the checkout that never travel with a job: environments, outputs, data, history.
EXCLUDES = [".venv", "runs", "data", ".git", "benchmarks/results", "__pycache__",
            ".pytest_cache", "*.egg-info"]
# S3 settings the stages read from the environment (storage.py); forwarded only when set.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# A config from outside the checkout travels as its text in this variable; the entrypoint
# reads it as ``env:EAD_DIST_CONFIG_YAML``. Linux caps one variable at 128 KiB.
SHIPPED_CONFIG_ENV = "EAD_DIST_CONFIG_YAML"
MAX_SHIPPED_CONFIG_BYTES = 64 * 1024


class SubmitError(RuntimeError):
    """The job could not be submitted, or it ended without succeeding."""


def repo_root() -> Path:
    """The checkout this package was imported from: the job's working directory."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SubmitError(f"ead_dist was imported from {root}, which is not a checkout of the "
                          "project (no pyproject.toml): submit from a clone, installed with "
                          "`pip install -e .`")
    return root


def forwarded_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The S3 variables of ``FORWARDED_ENV`` that are set here."""
    return {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}


def _inside(config_path: str, root: Path) -> Path | None:
    """``config_path`` relative to the checkout ``root``, or None when it lies outside."""
    try:
        return Path(config_path).resolve().relative_to(root)
    except ValueError:
        return None


def run_entrypoint(config_path: str, overrides: list[str], root: Path) -> str:
    """``python -m ead_dist.cli run CONFIG --set ...`` with CONFIG relative to ``root``, or
    ``env:EAD_DIST_CONFIG_YAML`` for a config outside it (see ``shipped_config``)."""
    relative = _inside(config_path, root)
    config = f"env:{SHIPPED_CONFIG_ENV}" if relative is None else relative.as_posix()
    words = ["python", "-m", "ead_dist.cli", "run", config]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def shipped_config(config_path: str, root: Path) -> dict[str, str]:
    """The job's environment variable holding the config's YAML text when the config lies
    outside the checkout (only the checkout travels as the working_dir); else nothing."""
    if _inside(config_path, root) is not None:
        return {}
    text = Path(config_path).read_text()
    if len(text.encode()) > MAX_SHIPPED_CONFIG_BYTES:
        raise SubmitError(f"{config_path} is outside the checkout {root} and too large "
                          f"({len(text.encode())} bytes) to ship in an environment variable: "
                          "put it under pipelines/")
    return {SHIPPED_CONFIG_ENV: text}


def _warn_local_urls(config: RunConfig) -> None:
    for field, url in (("run", config.run), ("data.url", config.data.url)):
        if "://" not in url or url.startswith("file://"):
            log.warning("%s is a local path: on the cluster it resolves inside the job's "
                        "working directory on each node; use s3://... (or a path every node "
                        "mounts) for a multi-node run", field)


def _send_auth_token() -> None:
    """Send Ray's auth token where one is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``), as ``ray.init`` does when it joins a cluster: a Ray 2.60 head
    started where a token exists requires it, and ``JobSubmissionClient`` alone sends it only
    under ``RAY_AUTH_MODE=token``. An explicit ``RAY_AUTH_MODE`` is left as it is."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def follow_job(client, job_id: str, out: TextIO | None = None, poll_seconds: float = 1.0,
               timeout_s: float | None = None):
    """Copy the job's logs to ``out`` (stdout) as they come; return its terminal ``JobStatus``.

    With ``timeout_s``, a job not finished by then raises ``SubmitError`` (it keeps running).
    """
    import aiohttp

    out = out or sys.stdout
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        pass  # the status check below names the state the job is stuck in
    except (RuntimeError, aiohttp.ClientError) as error:
        # The stream can drop (a proxy, a restarted head) while the job goes on.
        log.warning("log stream of job %s ended early (%s); waiting for its status", job_id,
                    error)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(poll_seconds)
        status = client.get_job_status(job_id)
    return status


def _submit_when_agent_ready(client, *, attempts: int = 30, pause_s: float = 2.0, **job) -> str:
    """Submit, waiting while a freshly started head reports no job agent yet (HTTP 500)."""
    for attempt in range(attempts):
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or attempt == attempts - 1:
                raise
            log.info("the head's job agent is not up yet; retrying in %.0f s", pause_s)
            time.sleep(pause_s)
    raise AssertionError("unreachable")


def submit_entrypoint(
    address: str,
    entrypoint: str,
    *,
    working_dir: Path | None = None,
    env_vars: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    submission_id: str | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
) -> str:
    """Submit ``entrypoint`` as a Ray job at ``address`` (``http://HEAD:8265``).

    Returns the submission id when ``wait`` is false; else follows the logs to stdout and
    returns the final status ("SUCCEEDED"), raising ``SubmitError`` if the job failed or was
    stopped.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env: dict = {"working_dir": str(working_dir or repo_root()), "excludes": EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
        # Names only: values may be credentials.
        log.info("forwarding environment variables: %s", ", ".join(sorted(env_vars)))
    _send_auth_token()
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as error:
        raise SubmitError(f"cannot reach a Ray job server at {address}: {error} (the head must "
                          "run the dashboard, which needs ray[default])") from error
    job_id = _submit_when_agent_ready(client, entrypoint=entrypoint, runtime_env=runtime_env,
                                      metadata=metadata, submission_id=submission_id)
    log.info("submitted job %s to %s: %s", job_id, address, entrypoint)
    if not wait:
        log.info("follow it with: ray job logs --address %s --follow %s", address, job_id)
        return job_id
    try:
        status = follow_job(client, job_id, timeout_s=timeout_s)
    except KeyboardInterrupt:
        log.warning("stopped following; job %s goes on (ray job stop --address %s %s ends it)",
                    job_id, address, job_id)
        return client.get_job_status(job_id).value
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise SubmitError(f"job {job_id} ended {status}: {info.message or 'no message'} "
                          f"(logs: ray job logs --address {address} {job_id})")
    log.info("job %s succeeded", job_id)
    return status.value


def submit_job(config_path: str, overrides: list[str], config: RunConfig, address: str,
               wait: bool = True) -> str:
    """``ead-dist run CONFIG --set ...`` as a Ray job; see ``submit_entrypoint`` for the result.

    ``config`` is the validated config, loaded here before submitting so mistakes fail fast;
    the cluster loads the same file with the same overrides again.
    """
    root = repo_root()
    entrypoint = run_entrypoint(config_path, overrides, root)
    _warn_local_urls(config)
    submission_id = f"ead-{re.sub(r'[^A-Za-z0-9_-]', '-', config.name)}-{uuid.uuid4().hex[:8]}"
    metadata = {"name": config.name, "config": config_path, "run": config.run}
    env_vars = {**forwarded_env(), **shipped_config(config_path, root)}
    return submit_entrypoint(address, entrypoint, working_dir=root, env_vars=env_vars,
                             metadata=metadata, submission_id=submission_id, wait=wait)

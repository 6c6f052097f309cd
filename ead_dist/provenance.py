"""What made a run: its resolved config, the package version and the git commit, in RUN/run.json.

Written once per invocation of the stages (``ead_dist.run.run_stages``), replacing the previous
record: it describes the latest command run against RUN. Each stage's own ``fingerprint.json``
keeps the settings its outputs were made with.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from typing import Optional

from . import __version__, storage
from .config import RunConfig

RUN_RECORD_NAME = "run.json"


def git_commit(directory: Optional[str] = None) -> Optional[str]:
    """The commit checked out where this package lives (None outside a git checkout, as in an
    installed wheel or a Ray job's working_dir, which leaves .git behind)."""
    directory = directory or os.path.dirname(os.path.abspath(__file__))
    try:
        done = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def run_record(config: RunConfig, stages: tuple[str, ...]) -> dict:
    return {"config": config.model_dump(mode="json"), "stages": list(stages),
            "version": __version__, "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def record_run(config: RunConfig, stages: tuple[str, ...]) -> str:
    """Publish ``RUN/run.json`` for this invocation; returns its URL."""
    url = storage.join(config.run, RUN_RECORD_NAME)
    storage.publish_json(url, run_record(config, stages))
    return url

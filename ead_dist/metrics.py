"""A stage's metrics as JSON lines (``metrics.jsonl``), kept in memory and published whole.

Objects on S3 cannot be appended to, so the log is honest about when lines reach storage: a
line is buffered when logged and written when the stage calls :meth:`MetricsLog.publish`, which
republishes the whole file (published whole, like every object: a reader sees the old file or
the new one). Stages publish at their save points, so the lines on storage describe exactly the
work that a rerun will not redo; lines logged after the last save point are lost with the
process, as that work is. A resumed stage reopens the file and drops lines past the point it
resumes from (:meth:`MetricsLog.truncate`), so no line is written twice.

Each file has one writer: ``RUN/distill/metrics.jsonl`` (the coordinator, one line per
iteration), ``RUN/experts/expert-NNN/metrics.jsonl`` (its actor, one line per checkpoint),
``RUN/evaluate/metrics.jsonl`` (the driver, one line per finished run).
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import storage

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """The metrics of one writer under ``directory`` (a URL), earlier lines included."""

    def __init__(self, directory: str):
        self.url = storage.join(directory, METRICS_NAME)
        self.lines: list[dict[str, Any]] = []
        if storage.exists(self.url):
            text = storage.read_bytes(self.url).decode()
            self.lines = [json.loads(line) for line in text.splitlines() if line.strip()]

    def log(self, **values: Any) -> None:
        """Buffer one line; ``time`` (Unix seconds) is added."""
        self.lines.append(dict(values, time=round(time.time(), 3)))

    def truncate(self, key: str, limit: int) -> None:
        """Drop the lines whose ``key`` is ``limit`` or more (work a resumed run redoes)."""
        self.lines = [line for line in self.lines if line.get(key, -1) < limit]

    def publish(self) -> None:
        """Write every line to storage, replacing the file."""
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in self.lines)
        storage.publish_bytes(self.url, text.encode())

"""Kill one of this test session's own Ray worker processes, by its process title, when a
condition on storage holds: the faults a cluster has (a lost worker, actor or coordinator),
made real with SIGKILL.

Only descendants of this process are candidates (the raylet that ``ray.init`` starts is a
child of the driver, and its workers are the raylet's children), so Ray sessions of other
processes on the machine are never touched. Ray titles a worker process ``ray::<Actor>`` or
``ray::<Actor>.<method>`` for an actor and ``ray::<function>`` for a task.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command may hold spaces and parentheses: the fields follow the last ')'.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
    return parents


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def own_processes(title_prefix: str) -> list[int]:
    """Descendants of this process whose title starts with ``title_prefix``."""
    parents = _parents()
    me = os.getpid()

    def descends(pid: int) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == me:
                return True
        return False

    return sorted(pid for pid in parents
                  if pid != me and descends(pid) and _title(pid).startswith(title_prefix))


def titled(title_prefix: str) -> Callable[[], int | None]:
    """A target for :class:`KillWhen`: the first of this session's processes so titled."""
    def first() -> int | None:
        pids = own_processes(title_prefix)
        return pids[0] if pids else None
    return first


class KillWhen:
    """A thread that SIGKILLs the process ``target()`` names (a pid, or None for none yet) as
    soon as ``condition()`` holds, polling every ``poll_s``, and records ``snapshot()`` just
    before the kill.

    Use as a context manager around the call that should survive the kill; afterwards
    ``killed`` is the pid killed (None if the condition never held while a target lived) and
    ``seen`` what ``snapshot()`` returned.
    """

    def __init__(self, target: Callable[[], int | None], condition: Callable[[], bool],
                 snapshot: Callable[[], Any] = lambda: None, poll_s: float = 0.02,
                 timeout_s: float = 600.0):
        self.target, self.condition, self.snapshot = target, condition, snapshot
        self.poll_s, self.timeout_s = poll_s, timeout_s
        self.killed: int | None = None
        self.seen: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.condition():
                pid = self.target()
                if pid is not None:
                    self.seen = self.snapshot()
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    return
            time.sleep(self.poll_s)

    def __enter__(self) -> "KillWhen":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

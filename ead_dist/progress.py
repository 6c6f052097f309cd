"""Progress bars that read well wherever the work runs.

On the driver this is tqdm. Inside a Ray task or actor plain tqdm prints a new line per update
through Ray's log forwarding, so there the bar is Ray's own (``ray.experimental.tqdm_ray``),
which the driver draws in place. On the driver the bar is drawn on a terminal; off one (a log
file, CI) a redraw would be one more line, so there the bar is a log line at most once every
``LOG_EVERY_S`` seconds and one at the end, with the rate and the time left: a distillation that
runs an hour in the background shows where it is. All three take the same few calls:
``update``, ``set_postfix_str`` and ``close``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


def inside_ray_worker() -> bool:
    """Whether this process is a Ray task or actor (not the driver)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class _RayBar:
    """Ray's tqdm with the calls the stages use (it has no postfix and no ``initial``)."""

    def __init__(self, desc: str, total: int, initial: int, unit: str):
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        self.desc = desc
        self.bar = ray_tqdm(desc=desc, total=total, unit=unit)
        if initial:
            self.bar.update(initial)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_description(f"{self.desc} {text}")

    def close(self) -> None:
        self.bar.close()


class LogBar:
    """Progress as log lines: at most one every ``every_s`` seconds, and one at ``close``.

    A line reads ``distill: 40/200 it (20%), 15.2 s/it, about 41 min left, loss=1.2e-01``; the
    rate counts only the steps done since this bar started, so a resumed stage does not claim
    the earlier steps' speed. ``clock`` is ``time.monotonic`` unless a test passes its own.
    """

    def __init__(self, desc: str, total: int, initial: int, unit: str,
                 every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.n, self.unit = desc, total, initial, unit
        self.every_s, self.clock = every_s, clock
        self.initial, self.postfix, self.closed = initial, "", False
        self.started = self.last_logged = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_logged >= self.every_s:
            self._log()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed and self.n > self.initial:
            self._log()
        self.closed = True

    def line(self) -> str:
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        done, elapsed = self.n - self.initial, self.clock() - self.started
        if done > 0 and elapsed > 0:
            per_step = elapsed / done
            parts.append(f"{per_step:.3g} s/{self.unit}")
            if self.n < self.total:
                parts.append(f"about {format_duration(per_step * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _log(self) -> None:
        self.last_logged = self.clock()
        log.info("%s", self.line())


def format_duration(seconds: float, digits: int = 0) -> str:
    """``seconds`` in s below 2 minutes, in min below 2 hours, else in h (at least 1 digit)."""
    if seconds < 120:
        return f"{seconds:.{digits}f} s"
    if seconds < 7200:
        return f"{seconds / 60:.{digits}f} min"
    return f"{seconds / 3600:.{max(digits, 1)}f} h"


def progress_bar(desc: str, total: int, initial: int = 0, unit: str = "it"):
    """A bar for ``total`` steps, ``initial`` of them already done (a resumed stage)."""
    if inside_ray_worker():
        return _RayBar(desc, total, initial, unit)
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        return LogBar(desc, total, initial, unit)
    return tqdm(desc=desc, total=total, initial=initial, unit=unit)

"""Progress bars that read well wherever the work runs.

On the driver this is tqdm. Inside a Ray task or actor plain tqdm prints a new line per update
through Ray's log forwarding, so there the bar is Ray's own (``ray.experimental.tqdm_ray``),
which the driver draws in place. On the driver the bar is drawn only on a terminal. Both take
the same few calls: ``update``, ``set_postfix_str``
and ``close``.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


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


def progress_bar(desc: str, total: int, initial: int = 0, unit: str = "it"):
    """A bar for ``total`` steps, ``initial`` of them already done (a resumed stage)."""
    if inside_ray_worker():
        return _RayBar(desc, total, initial, unit)
    # disable=None: no bar when stderr is not a terminal (a log file, CI), where each redraw
    # would be one more line; the stages log their start and end either way.
    return tqdm(desc=desc, total=total, initial=initial, unit=unit, disable=None)

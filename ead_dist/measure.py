"""What a stage reports about the process that ran it."""

from __future__ import annotations

import resource


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (a reused Ray worker reports the
    peak over its whole life, so a stage's figure is an upper bound)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

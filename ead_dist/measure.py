"""Memory figures: the peak of the process that ran a stage; what this machine has left."""

from __future__ import annotations

import os
import resource


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (a reused Ray worker reports the
    peak over its whole life, so a stage's figure is an upper bound)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Overrides what this machine reports (a container whose /proc/meminfo shows the host's, or
# a test): the MiB that ``ead-dist run --check-memory`` may plan for.
MEMORY_OVERRIDE = "EAD_DIST_MEMORY_MB"


def available_memory_mb() -> float:
    """Memory this process could still take, in MiB: MemAvailable from /proc/meminfo, capped
    by the cgroup's limit (cgroup v2 ``memory.max`` less ``memory.current``) where one is set;
    ``EAD_DIST_MEMORY_MB`` overrides both."""
    if os.environ.get(MEMORY_OVERRIDE):
        return float(os.environ[MEMORY_OVERRIDE])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):  # no /proc: free physical pages
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**2
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, (int(limit) - used) / 1024**2)
    except (OSError, ValueError):
        pass
    return available

"""Start (or join) Ray for a run, with settings that work on small machines, and place work on
it: devices, GPU shares, retries, tasks over shard groups."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

from .config import RayConfig, RunConfig
from .progress import progress_bar

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(config: RayConfig, enabled: bool = True):
    """Ray for the body of the ``with``: joins ``config.address`` or starts a local instance.

    An already initialised Ray (tests, a job on a cluster) is used as it is and left running.
    """
    if not enabled:
        yield None
        return
    import ray

    if ray.is_initialized():
        yield ray
        return
    options: dict = {"include_dashboard": False, "log_to_driver": True}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        options["address"] = address
    else:
        if config.num_cpus:
            options["num_cpus"] = config.num_cpus
        if config.object_store_memory_mb:
            options["object_store_memory"] = config.object_store_memory_mb * 1024**2
    ray.init(**options)
    log.info("Ray resources: %s", ray.cluster_resources())
    try:
        yield ray
    finally:
        ray.shutdown()


def compute_device(use_gpu: bool | None) -> torch.device:
    """This process's device: its GPU when the run uses GPUs (None: when there is one) and
    Ray gave it one, else the CPU."""
    wanted = use_gpu is not False
    return torch.device("cuda") if wanted and torch.cuda.is_available() else torch.device("cpu")


def cluster_has_gpus(enabled: bool = True) -> bool:
    """Whether the Ray cluster (or, without Ray, this process) has a GPU."""
    if not enabled:
        return torch.cuda.is_available()
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def concurrent_runs(wanted: int, cpus: int, gpus: float, use_gpu: bool | None,
                    runs_per_gpu: int = 1) -> int:
    """How many one-CPU actors or tasks to start for ``wanted`` jobs: no more than the CPUs, and
    on GPUs no more than ``runs_per_gpu`` per GPU (more would wait forever for a GPU)."""
    count = min(wanted, max(1, cpus))
    if use_gpu:
        count = min(count, max(1, int(gpus * runs_per_gpu)))
    return max(1, count)


def gpu_share(use_gpu: bool | None, runs_per_gpu: int = 1) -> float:
    """The GPU fraction each actor or task asks Ray for."""
    return 1.0 / runs_per_gpu if use_gpu else 0.0


def task_retry_options(config: RayConfig) -> dict:
    """``ray.remote`` options of an idempotent task: rerun it when its worker dies, never when
    it raises (``retry_exceptions=False``: an application error is not a transient one)."""
    return {"max_retries": config.task_retries, "retry_exceptions": False}


def actor_retry_options(config: RayConfig) -> dict:
    """``ray.remote`` options of an expert actor: restart it when its process dies and rerun
    the call it was in, which resumes from the expert's last published checkpoint."""
    return {"max_restarts": config.actor_restarts, "max_task_retries": config.task_retries}


def map_over_shards(config: RunConfig, use_ray: bool, job, groups: list, *shared,
                    desc: Optional[str] = None) -> list:
    """``job(config, group, *shared)`` for every shard group, results in the groups' order: one
    Ray task each (one CPU, the run's storage settings, retried when its worker dies), or in
    this process without Ray. With ``desc``, a progress bar counts the groups as they end."""
    bar = progress_bar(desc, len(groups), unit="shard group") if desc else None
    if not use_ray:
        results = []
        for group in groups:
            results.append(job(config, group, *shared))
            if bar:
                bar.update()
    else:
        import ray

        task = ray.remote(num_cpus=1,
                          num_gpus=gpu_share(config.ray.use_gpu, config.ray.runs_per_gpu),
                          **task_retry_options(config.ray))(job)
        shared_refs = [ray.put(value) for value in shared]  # once, not once per task
        config_ref = ray.put(config)
        refs = [task.remote(config_ref, group, *shared_refs) for group in groups]
        position = {ref: i for i, ref in enumerate(refs)}
        results, pending = [None] * len(refs), refs
        while pending:  # as they end, for the bar; each result goes to its group's place
            done, pending = ray.wait(pending, num_returns=1)
            results[position[done[0]]] = ray.get(done[0])
            if bar:
                bar.update()
    if bar:
        bar.close()
    return results

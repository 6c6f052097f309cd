"""Run stages of a configuration in order, in single-node mode or on a joined Ray cluster.

Each stage skips itself when its outputs exist, so rerunning a config resumes an interrupted
run; a stage whose outputs were made under other settings stops instead (ead_dist.fingerprint).
The stage functions take the config; this module only sequences them inside Ray.
"""

from __future__ import annotations

import logging
import time

# The models (torchvision, which imports torch._dynamo) load here, before any Ray work: dynamo
# reads the working directory once, and a Ray job's working directory is replaced under it when
# a second raylet on the same machine unpacks the same package (tests/test_two_nodes.py), after
# which os.getcwd() fails in this process.
from . import models  # noqa: F401
from . import storage
from .config import IMAGE_TEXT_DATASETS, RunConfig
from .provenance import record_run
from .runtime import cluster_has_gpus, ray_session, task_retry_options

log = logging.getLogger(__name__)


def _ingest(config: RunConfig) -> dict:
    from .data.image_text import ingest_image_text
    from .data.ingest import ingest_classification

    if config.data.dataset == "cc3m":
        meta = ingest_image_text("cc3m", config.data.source, config.data.url,
                                 image_size=config.data.image_size, use_ray=config.ray.enabled)
    else:
        meta = ingest_classification(config.data.dataset, config.data.source, config.data.url,
                                     shard_size=config.data.shard_size,
                                     use_ray=config.ray.enabled)
    return {"dataset": meta.name, "splits": {k: v.size for k, v in meta.splits.items()}}


def _experts(config: RunConfig) -> dict:
    from .stages.experts import run_experts

    index = run_experts(config, use_ray=config.ray.enabled)
    return {"experts": len(index["experts"]),
            "test_accuracy": [e.get("test_accuracy", e.get("test_recall"))
                              for e in index["experts"]]}


def _realgrad(config: RunConfig) -> dict:
    from .alignment import REAL_TERM_OBJECTIVES
    from .stages.realgrad import run_realgrad

    if config.distill.method == "dm" and config.distill.dm_real == "realgrad":
        from .stages.dm_real import run_dm_means

        return run_dm_means(config, use_ray=config.ray.enabled)
    if config.distill.method != "ead":
        from .stages.weights import ensure_weights

        # DM reads its real batches in its loop, but their weights come from a pass over the
        # shards like the real terms' (Ray tasks here, not the one distill task)
        weights = ensure_weights(config, use_ray=config.ray.enabled)
        return {"skipped": f"method {config.distill.method} reads no real terms",
                **({"weights": weights} if weights else {})}
    if config.distill.objective not in REAL_TERM_OBJECTIVES:
        return {"skipped": f"objective {config.distill.objective} reads expert checkpoints, "
                           "not real terms"}
    return run_realgrad(config, use_ray=config.ray.enabled)


def _distill(config: RunConfig) -> dict:
    from .stages.distill import distill

    if not config.ray.enabled:
        return distill(config)
    import ray

    # The coordinator is one process; it uses this node's cores for its own torch threads.
    gpus = 1 if config.ray.use_gpu else 0
    # Retried when its process dies: it resumes from its last saved state.
    task = ray.remote(num_cpus=1, num_gpus=gpus, **task_retry_options(config.ray))(distill)
    return ray.get(task.remote(config))


def _evaluate(config: RunConfig) -> dict:
    from .stages.evaluate import run_evaluate

    return run_evaluate(config, use_ray=config.ray.enabled)


STAGE_FUNCTIONS = {"ingest": _ingest, "experts": _experts, "realgrad": _realgrad,
                   "distill": _distill, "evaluate": _evaluate}


def summarise(report: dict) -> str:
    """One line per evaluated set: mean ± std test accuracy per architecture."""
    lines = []
    names = {"synthetic": "distilled S", "init": "init (real + soft labels)",
             "random_real": "random real, hard labels"}
    for name, per_model in report["results"].items():
        cells = ", ".join(f"{model} {100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"
                          for model, s in per_model.items())
        lines.append(f"  {names.get(name, name):28s} {cells}")
    return "\n".join(lines)


def summarise_recall(report: dict) -> str:
    """One line per evaluated set: mean recall@1/5/10 both ways, in %."""
    lines = []
    for name, per_model in report["results"].items():
        for model, s in per_model.items():
            cells = ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(s["mean"].items()))
            lines.append(f"  {name:12s} {model}: {cells}")
    return "\n".join(lines)


def run_stages(config: RunConfig, stages: tuple[str, ...]) -> dict:
    storage.apply_settings(config.storage)  # the driver's; every task and actor applies its own
    summary = {}
    with ray_session(config.ray, enabled=config.ray.enabled):
        if config.ray.use_gpu is None:
            config.ray.use_gpu = cluster_has_gpus(config.ray.enabled)
            log.info("Ray cluster GPUs: %s", "using them" if config.ray.use_gpu else "none")
        record_run(config, stages)  # after use_gpu is resolved: the config the stages get
        for stage in stages:
            started = time.perf_counter()
            log.info("stage %s: starting", stage)
            summary[stage] = STAGE_FUNCTIONS[stage](config)
            summary[stage + "_seconds"] = round(time.perf_counter() - started, 1)
            log.info("stage %s: done in %.1f s", stage, summary[stage + "_seconds"])
    if "evaluate" in stages and config.data.dataset in IMAGE_TEXT_DATASETS:
        print(f"\n{config.name}: held-out retrieval recall, {config.image_text.pairs} pairs, "
              f"{config.evaluate.runs} run(s) each\n" + summarise_recall(summary["evaluate"]))
    elif "evaluate" in stages:
        print(f"\n{config.name}: test accuracy, IPC {config.distill.ipc}, "
              f"{config.evaluate.runs} run(s) each\n" + summarise(summary["evaluate"]))
    return summary

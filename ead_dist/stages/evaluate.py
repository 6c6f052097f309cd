"""Evaluate stage: train fresh networks on S (and on the baselines), test on the real test set.

One Ray task per (set, architecture, seed). The protocol of docs/design.md section 4: SGD with
momentum 0.9, weight decay 5e-4, lr halved at the midpoint, DSA during training when
configured. Each finished run is published at once as ``RUN/evaluate/<set>-<model>-<seed>.json``
and a rerun skips those, so a killed evaluation loses only the runs in flight. The report,
with the protocol, goes to ``RUN/eval.json`` when every run is done; the settings behind them
to ``RUN/evaluate/fingerprint.json`` (``ead_dist.fingerprint``), which guards the per-run files
too.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from .. import storage
from ..augment import dsa_strategy
from ..config import IMAGE_TEXT_DATASETS, ConfigError, RunConfig
from ..data.arrays import load_split
from ..data.meta import read_meta
from ..fingerprint import StaleRunError, guard
from ..models import build_model
from ..measure import peak_memory_mb
from ..metrics import MetricsLog
from ..progress import progress_bar
from ..runtime import compute_device, gpu_share, task_retry_options
from ..supervised import LR_SCHEDULES, accuracy, train_classifier
from ..synthetic import class_balanced_indices, load_synthetic

log = logging.getLogger(__name__)


def evaluation_sets(config: RunConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The sets to evaluate: the distilled one and the configured baselines, same size."""
    meta = read_meta(config.data.url)
    sets = {}
    images, labels, _, _ = load_synthetic(storage.join(config.run, "synthetic.safetensors"))
    sets["synthetic"] = (images, labels)
    if "init" in config.evaluate.baselines:
        init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
        sets["init"] = (init["images"], init["labels"])
    if "random_real" in config.evaluate.baselines:
        train_images, train_labels, _ = load_split(config.data.url, "train", meta=meta)
        # A different draw from the one S started from (seed + 1), hard labels.
        chosen = class_balanced_indices(train_labels, config.distill.ipc, meta.num_classes,
                                        torch.Generator().manual_seed(config.distill.seed + 1))
        sets["random_real"] = (train_images[chosen], train_labels[chosen])
    return sets


def evaluation_lr(config: RunConfig) -> float:
    """The lr every evaluation run trains at: ``evaluate.lr``, or with ``learned`` the student
    step size recorded in the distilled set (MTT's evaluation)."""
    if config.evaluate.lr != "learned":
        return config.evaluate.lr
    url = storage.join(config.run, "synthetic.safetensors")
    learned = storage.load_metadata(url).get("student_lr")
    if learned is None:
        raise ConfigError(f"evaluate.lr 'learned': {url} records no learned step size (sets "
                          f"distilled before it was recorded, or not by the trajectory "
                          f"objective): set evaluate.lr to a number")
    return float(learned)


def train_and_test(config: RunConfig, images: torch.Tensor, targets: torch.Tensor,
                   model_name: str, seed: int, test: tuple[torch.Tensor, torch.Tensor],
                   threads: int = 1) -> dict:
    """Test accuracy of ``model_name`` trained from scratch (seed) on (images, targets)."""
    started = time.perf_counter()
    storage.apply_settings(config.storage)
    torch.set_num_threads(threads)
    meta = read_meta(config.data.url)
    torch.manual_seed(seed)
    model = build_model(model_name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(model_name))
    model.to(compute_device(config.ray.use_gpu))
    strategy = dsa_strategy(meta.name) if config.evaluate.augmentation == "dsa" else None
    train_classifier(model, images, targets, epochs=config.evaluate.epochs, lr=config.evaluate.lr,
                     batch_size=config.evaluate.batch_size, augmentation=strategy, seed=seed,
                     lr_schedule=config.evaluate.lr_schedule)
    return {"accuracy": accuracy(model, *test), "seconds": time.perf_counter() - started,
            "peak_memory_mb": peak_memory_mb()}


def describe_schedule(schedule: str, epochs: int) -> str:
    """The evaluation's lr schedule in words, for eval.json's protocol."""
    if schedule == "constant":
        return "constant"
    return f"times {LR_SCHEDULES[schedule]} after {epochs // 2 + 1} epochs"


def run_result_url(run_url: str, name: str, model: str, seed: int) -> str:
    """Where one finished (set, model, seed) run is published."""
    return storage.join(run_url, "evaluate", f"{name}-{model}-{seed}.json")


def run_evaluate(config: RunConfig, use_ray: bool = True) -> dict:
    if config.data.dataset in IMAGE_TEXT_DATASETS:
        from .evaluate_pairs import run_evaluate_pairs  # it builds on this module

        return run_evaluate_pairs(config)
    guard(config, "evaluate")
    lr_source = "learned" if config.evaluate.lr == "learned" else "config"
    config = config.model_copy(update={"evaluate": config.evaluate.model_copy(
        update={"lr": evaluation_lr(config)})})
    eval_url = storage.join(config.run, "eval.json")
    if storage.exists(eval_url):
        report = storage.read_json(eval_url)
        # The fingerprint leaves baselines out (more of them change no other result); a
        # report without one that this config asks for is still not its result.
        missing = sorted(set(config.evaluate.baselines) - set(report["results"]))
        if missing:
            raise StaleRunError(f"{eval_url} has no results for evaluate.baselines {missing}: "
                                f"delete it and rerun evaluate")
        return report
    started = time.perf_counter()
    meta = read_meta(config.data.url)
    test_images, test_labels, _ = load_split(config.data.url, "test", meta=meta,
                                             limit=config.evaluate.test_samples)
    sets = evaluation_sets(config)
    jobs = [(name, model, seed) for name in sets for model in config.evaluate.models
            for seed in range(config.evaluate.runs)]
    outcomes: dict[tuple, dict] = {}
    for job in jobs:
        url = run_result_url(config.run, *job)
        if storage.exists(url):
            outcomes[job] = storage.read_json(url)
    if outcomes:
        log.info("evaluate: %d of %d runs already published", len(outcomes), len(jobs))
    jobs = [job for job in jobs if job not in outcomes]
    metrics = MetricsLog(storage.join(config.run, "evaluate"))
    progress = progress_bar("evaluate", total=len(jobs), unit="run")

    def publish(job: tuple, outcome: dict) -> None:
        storage.publish_json(run_result_url(config.run, *job), outcome)
        metrics.log(set=job[0], model=job[1], seed=job[2], accuracy=outcome["accuracy"],
                    seconds=round(outcome["seconds"], 2))
        metrics.publish()
        outcomes[job] = outcome
        progress.update(1)

    if use_ray:
        import ray

        task = ray.remote(num_cpus=1, num_gpus=gpu_share(config.ray.use_gpu,
                                                         config.ray.runs_per_gpu),
                          **task_retry_options(config.ray))(train_and_test)
        test_ref = ray.put((test_images, test_labels))
        config_ref = ray.put(config)
        # Top-level ObjectRef arguments reach the task as their values.
        set_refs = {name: (ray.put(x), ray.put(y)) for name, (x, y) in sets.items()}
        pending = {task.remote(config_ref, *set_refs[name], model, seed, test_ref):
                   (name, model, seed) for name, model, seed in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            publish(job, ray.get(done[0]))
    else:
        for name, model, seed in jobs:
            publish((name, model, seed), train_and_test(
                config, *sets[name], model, seed, (test_images, test_labels),
                threads=torch.get_num_threads()))
    progress.close()
    results: dict = {}
    for (name, model, seed), outcome in sorted(outcomes.items()):
        summary = results.setdefault(name, {}).setdefault(model, {"runs": [], "seconds": []})
        summary["runs"].append(outcome["accuracy"])
        summary["seconds"].append(round(outcome["seconds"], 2))
    for per_model in results.values():
        for summary in per_model.values():
            runs = summary["runs"]
            summary["mean"] = statistics.fmean(runs)
            summary["std"] = statistics.pstdev(runs) if len(runs) > 1 else 0.0
    report = {
        "results": results,
        "protocol": {"epochs": config.evaluate.epochs, "lr": config.evaluate.lr,
                     "lr_source": lr_source,
                     "lr_schedule": describe_schedule(config.evaluate.lr_schedule,
                                                      config.evaluate.epochs),
                     "optimizer": "SGD momentum 0.9 weight decay 5e-4",
                     "batch_size": config.evaluate.batch_size,
                     "augmentation": config.evaluate.augmentation, "runs": config.evaluate.runs,
                     "test_samples": len(test_labels), "ipc": config.distill.ipc,
                     "model_options": config.model.options_for("convnet")},
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": max(o["peak_memory_mb"] for o in outcomes.values()),
    }
    storage.publish_json(eval_url, report)
    return report


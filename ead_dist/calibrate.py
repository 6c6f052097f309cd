"""Calibration runs behind ``ead-dist plan``: a few units of each stage's work, timed.

Each stage's calibration runs in a fresh spawned process, so the peak memory it reports
(``ead_dist.measure.peak_memory_mb``, the process's peak RSS) is that stage's alone: a few
expert SGD steps, a few realgrad batches at one checkpoint, a few coordinator iterations on
a throwaway initial set with random real terms of the right shapes, a few evaluation epochs.
A stage that runs several processes at once here (experts, realgrad workers, evaluation runs
under Ray) is calibrated by as many copies at once, so its timing sees their contention.
They use the run's model, settings and data shapes, and the real data when DATA is ingested
(else random tensors of the dataset's known shape). ``ead_dist.plan`` extrapolates.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from . import storage
from .config import IMAGE_TEXT_DATASETS, ConfigError, RunConfig
from .measure import peak_memory_mb
from .plan import (
    MIB,
    StagePrediction,
    distill_prediction,
    evaluate_prediction,
    experts_prediction,
    ingest_prediction,
    real_terms_bytes,
    realgrad_prediction,
)

log = logging.getLogger(__name__)

# Shapes of the datasets ingest knows, for a plan made before ingest: (C, H, W), classes,
# train size, test size.
KNOWN_DATASETS = {
    "mnist": ((1, 28, 28), 10, 60_000, 10_000),
    "fashion_mnist": ((1, 28, 28), 10, 60_000, 10_000),
    "cifar10": ((3, 32, 32), 10, 50_000, 10_000),
    "cifar100": ((3, 32, 32), 100, 50_000, 10_000),
    "svhn": ((3, 32, 32), 10, 73_257, 26_032),
    "tiny_imagenet": ((3, 64, 64), 200, 100_000, 10_000),
}
TIMED = 3  # units timed after one warm-up unit


@dataclass
class DataShape:
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    train: int
    test: int
    ingested: bool

    @property
    def values(self) -> int:
        return math.prod(self.image_shape)


def data_shape(config: RunConfig) -> DataShape:
    """What the stages will see: from DATA/meta.json when ingested, else the known shape."""
    from .data.meta import read_meta

    if storage.exists(storage.join(config.data.url, "meta.json")):
        meta = read_meta(config.data.url)
        return DataShape(meta.name, tuple(meta.image_shape), meta.num_classes,
                         meta.splits["train"].size, meta.splits["test"].size, True)
    if config.data.dataset not in KNOWN_DATASETS:
        raise ConfigError(f"ead-dist plan: {config.data.url} is not ingested and the shape of "
                          f"dataset {config.data.dataset!r} is unknown: ingest it first")
    shape, classes, train, test = KNOWN_DATASETS[config.data.dataset]
    return DataShape(config.data.dataset, shape, classes, train, test, False)


def _model(config: RunConfig, shape: DataShape, name: str | None = None) -> torch.nn.Module:
    from .models import build_model

    name = name or config.model.name
    return build_model(name, shape.image_shape[0], shape.num_classes,
                       tuple(shape.image_shape[1:]), **config.model.options_for(name))


def _samples(config: RunConfig, shape: DataShape, count: int, split: str = "train"
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``count`` normalised images and labels (real when ingested, cycled if the split is
    smaller) and the seconds it took to load and decode one sample."""
    if not shape.ingested:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(count, *shape.image_shape, generator=generator),
                torch.randint(0, shape.num_classes, (count,), generator=generator), 0.0)
    from .data.arrays import load_split

    started = time.perf_counter()
    images, labels, _ = load_split(config.data.url, split, limit=count)
    per_sample = (time.perf_counter() - started) / len(labels)
    repeat = math.ceil(count / len(labels))
    return images.repeat(repeat, 1, 1, 1)[:count], labels.repeat(repeat)[:count], per_sample


def _timed(unit, count: int = TIMED) -> float:
    """Seconds per call of ``unit()`` over ``count`` calls after one warm-up call."""
    unit()
    started = time.perf_counter()
    for _ in range(count):
        unit()
    return (time.perf_counter() - started) / count


# --- the calibrations, each run in its own process ------------------------------------------

def calibrate_ingest(config: RunConfig, shape: DataShape, threads: int) -> dict:
    import numpy as np

    from .data.shards import write_classification_shard

    torch.set_num_threads(threads)
    count = 256
    rng = np.random.default_rng(0)
    c, h, w = shape.image_shape
    images = rng.integers(0, 256, (count, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, shape.num_classes, count)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_classification_shard(os.path.join(folder, "shard-000000.tar"), images, labels, 0)
        seconds = (time.perf_counter() - started) / count
    return {"sample_seconds": seconds, "peak_mb": peak_memory_mb()}


def calibrate_experts(config: RunConfig, shape: DataShape, threads: int) -> dict:
    from .augment import dsa_strategy
    from .stages.experts import METRIC_SAMPLES, _fit
    from .trajectory import sgd_trajectory

    torch.set_num_threads(threads)
    settings = config.experts
    steps = TIMED + 1
    images, labels, load = _samples(config, shape,
                                     max(settings.batch_size * steps, METRIC_SAMPLES))
    model = _model(config, shape)
    augmentation = dsa_strategy(shape.name) if settings.augmentation == "dsa" else None

    def train(count: int) -> None:
        # run the steps out; the generator yields only theta_0 at this save_every
        deque(sgd_trajectory(model, images[: settings.batch_size * count],
                             labels[: settings.batch_size * count], epochs=1,
                             lr=settings.lr, batch_size=settings.batch_size,
                             save_every=10**9, seed=0, augmentation=augmentation), maxlen=0)

    train(1)  # warm-up
    started = time.perf_counter()
    train(steps)
    step_seconds = (time.perf_counter() - started) / steps
    with tempfile.TemporaryDirectory() as folder:
        def record() -> None:  # what each recorded checkpoint costs the stage
            _fit(model, images[:METRIC_SAMPLES], labels[:METRIC_SAMPLES])
            storage.save_tensors(os.path.join(folder, "step.safetensors"),
                                 {k: v.detach() for k, v in model.named_parameters()}, {})

        checkpoint_seconds = _timed(record, 1)
    return {"step_seconds": step_seconds, "checkpoint_seconds": checkpoint_seconds,
            "load_sample_seconds": load, "peak_mb": peak_memory_mb()}


def _selected(config: RunConfig, shape: DataShape) -> tuple[int, int]:
    """Samples of the D sample and of the P batches a realgrad pass decodes."""
    real = shape.train if config.realgrad.real_samples is None else \
        min(config.realgrad.real_samples, shape.train)
    return real, min(config.realgrad.p_batches * config.realgrad.p_batch_size, shape.train)


def calibrate_realgrad(config: RunConfig, shape: DataShape, threads: int) -> dict:
    from .effect import parameters_of
    from .real_terms import grouped_gradient_sums
    from .stages.realgrad import sum_rows

    torch.set_num_threads(threads)
    settings = config.realgrad
    size = settings.batch_size
    images, labels, load = _samples(config, shape, size)
    model = _model(config, shape)
    theta = parameters_of(model)
    classes, num_p = shape.num_classes, settings.p_batches
    d_rows, p_rows = sum_rows(classes, num_p, settings.class_terms)
    # The batch's mix of D-sample and P-batch samples, as in a real pass.
    real, p_total = _selected(config, shape)
    in_d = torch.arange(size) < round(size * real / (real + p_total))
    batch_of = torch.where(in_d, -1, torch.arange(size) % num_p)
    p_class = torch.where(batch_of >= 0, batch_of * classes + labels, -1)
    if settings.class_terms:
        d_groups, p_groups = torch.where(in_d, labels, -1), p_class
    else:
        d_groups, p_groups = torch.where(in_d, 0, -1), batch_of
    sums = {"d": 0, "p": 0}

    def batch() -> None:  # partial_sums' accumulate for one checkpoint
        d_sum, _ = grouped_gradient_sums(model, theta, images, labels, d_groups, d_rows)
        p_sum, _ = grouped_gradient_sums(model, theta, images, labels, p_groups, p_rows)
        sums["d"] = sums["d"] + d_sum
        sums["p"] = sums["p"] + p_sum

    return {"batch_seconds": _timed(batch), "load_sample_seconds": load,
            "peak_mb": peak_memory_mb()}


def calibrate_distill(config: RunConfig, shape: DataShape, threads: int) -> dict:
    from .augment import dsa_strategy
    from .coordinator import Coordinator, RealTerms, Segment, StudentSettings
    from .effect import parameters_of
    from .synthetic import SyntheticSet

    torch.set_num_threads(threads)
    settings = config.distill
    classes = shape.num_classes
    count = settings.ipc * classes  # stored images
    per_class = settings.ipc * settings.formation ** 2  # training images (multi-formation)
    images, _, _ = _samples(config, shape, count)
    generator = torch.Generator().manual_seed(0)
    synthetic = SyntheticSet(images, torch.randn(per_class * classes, classes,
                                                 generator=generator),
                             torch.arange(classes).repeat_interleave(per_class))
    model = _model(config, shape)
    theta = parameters_of(model)
    n = sum(v.numel() for v in theta.values())
    terms = segments = student = None
    if settings.objective == "trajectory":
        target = {k: v + 1e-3 * torch.randn(v.shape, generator=generator)
                  for k, v in theta.items()}
        segments = [Segment(theta, target)]
        student = StudentSettings(steps=settings.student_steps,
                                  batch_size=settings.student_batch_size,
                                  initial_lr=settings.student_lr or config.experts.lr,
                                  lr_lr=settings.lr_student_lr,
                                  recompute=settings.unroll == "recompute")
    else:
        k = config.realgrad.p_batches

        def random(*size: int) -> torch.Tensor:
            return 1e-3 * torch.randn(*size, generator=generator)

        g_D, g_P = random(n), random(k, n)
        extra = {}
        if config.realgrad.class_terms:
            extra = {"g_D_classes": random(classes, n), "g_P_classes": random(k, classes, n),
                     "real_dots_classes": torch.zeros(k, classes)}
        terms = [RealTerms(theta=theta, lr=config.experts.lr, g_D=g_D, g_P=g_P,
                           real_dots=g_P @ g_D, **extra)]
    coordinator = Coordinator(
        model, synthetic, objective=settings.objective, terms=terms, segments=segments,
        student=student, coefficient=settings.coefficient, real_size=shape.train,
        lr_images=settings.lr_images, lr_labels=settings.lr_labels,
        learn_labels=settings.learn_labels,
        checkpoints_per_iteration=settings.checkpoints_per_iteration,
        augmentation=dsa_strategy(shape.name) if settings.augmentation == "dsa" else None,
        distance=settings.distance, skip_head_and_biases=settings.skip_head_and_biases,
        normalise=settings.normalise, seed=settings.seed)
    return timed_iterations(coordinator, n)


def timed_iterations(coordinator, parameters: int) -> dict:
    """A distill calibration's result: seconds per coordinator iteration (after a warm-up
    one), the model's parameter count and this process's peak memory."""
    iteration = iter(range(TIMED + 1))
    seconds = _timed(lambda: coordinator.step(next(iteration)))
    return {"iteration_seconds": seconds, "parameters": parameters, "peak_mb": peak_memory_mb()}


def calibrate_evaluate(config: RunConfig, shape: DataShape, threads: int) -> dict:
    from .augment import dsa_strategy
    from .supervised import accuracy, train_classifier

    torch.set_num_threads(threads)
    settings = config.evaluate
    count = config.distill.ipc * config.distill.formation ** 2 * shape.num_classes
    images, labels, _ = _samples(config, shape, count)
    targets = torch.softmax(torch.randn(count, shape.num_classes), 1)
    test_count = min(1000, _test_samples(config, shape))
    test_images, test_labels, _ = _samples(config, shape, test_count, "test")
    strategy = dsa_strategy(shape.name) if settings.augmentation == "dsa" else None
    epoch_seconds, test_seconds = {}, {}
    for name in settings.models:
        model = _model(config, shape, name)
        train_classifier(model, images, targets, epochs=1, lr=settings.lr,
                         batch_size=settings.batch_size, augmentation=strategy)  # warm-up
        started = time.perf_counter()
        train_classifier(model, images, targets, epochs=2, lr=settings.lr,
                         batch_size=settings.batch_size, augmentation=strategy)
        epoch_seconds[name] = (time.perf_counter() - started) / 2
        started = time.perf_counter()
        accuracy(model, test_images, test_labels)
        test_seconds[name] = (time.perf_counter() - started) / test_count \
            * _test_samples(config, shape)
    return {"epoch_seconds": epoch_seconds, "test_seconds": test_seconds,
            "test_calibration_samples": test_count, "peak_mb": peak_memory_mb()}


def _test_samples(config: RunConfig, shape: DataShape) -> int:
    limit = config.evaluate.test_samples
    return shape.test if limit is None else min(limit, shape.test)


def _isolated(function, *args, copies: int = 1) -> dict:
    """``function(*args)`` in ``copies`` fresh spawned processes at once, as many as the stage
    runs at once here, so the timing sees their contention for the cores; each peak memory is
    its process's own. Times are averaged over the copies, the peak is the largest."""
    with ProcessPoolExecutor(copies, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        results = [future.result() for future in
                   [pool.submit(function, *args) for _ in range(copies)]]
    return {key: _combine(key, [r[key] for r in results]) for key in results[0]}


def _combine(key: str, values: list):
    if key == "peak_mb":
        return max(values)
    if isinstance(values[0], dict):
        return {k: _combine(k, [v[k] for v in values]) for k in values[0]}
    return sum(values) / len(values) if isinstance(values[0], float) else values[0]


# --- the plan --------------------------------------------------------------------------------

def _cpus(config: RunConfig) -> int:
    return config.ray.num_cpus or len(os.sched_getaffinity(0))


def plan_run(config: RunConfig, run_calibration=_isolated) -> list[StagePrediction]:
    """Calibrate every stage of ``config`` and extrapolate its time and peak memory."""
    cpus = _cpus(config)
    if config.data.dataset in IMAGE_TEXT_DATASETS:
        from .calibrate_pairs import plan_pair_run

        return plan_pair_run(config, run_calibration, cpus)
    shape = data_shape(config)
    on_ray = config.ray.enabled
    # Under Ray each expert, realgrad worker and evaluation run is a 1-CPU process (one torch
    # thread); without Ray one process does them in turn with every core.
    worker_threads = 1 if on_ray else cpus
    predictions = []

    if shape.ingested:
        predictions.append(ingest_prediction(done=True))
    elif config.data.dataset == "cc3m":
        predictions.append(StagePrediction("ingest", None, None, 0, "cc3m: not predicted"))
    else:
        measured = run_calibration(calibrate_ingest, config, shape, 1)
        predictions.append(ingest_prediction(
            done=False, sample_seconds=measured["sample_seconds"],
            samples=shape.train + shape.test, values_per_sample=shape.values,
            peak_mb=measured["peak_mb"], concurrent=cpus if on_ray else 1))

    e = config.experts
    measured = run_calibration(calibrate_experts, config, shape, worker_threads,
                               copies=min(e.count, cpus) if on_ray else 1)
    train = shape.train if e.train_samples is None else min(e.train_samples, shape.train)
    predictions.append(experts_prediction(
        step_seconds=measured["step_seconds"], checkpoint_seconds=measured["checkpoint_seconds"],
        train_load_seconds=shape.train * measured["load_sample_seconds"],
        test_load_seconds=shape.test * measured["load_sample_seconds"],
        peak_mb=measured["peak_mb"],
        count=e.count, epochs=e.epochs, train_samples=train, loaded_train=shape.train,
        test_samples=shape.test, batch_size=e.batch_size, save_every=e.save_every,
        values_per_sample=shape.values, concurrent=min(e.count, cpus) if on_ray else 1))

    from .alignment import REAL_TERM_OBJECTIVES
    from .stages.realgrad import sums_bytes

    d = config.distill
    parameters = sum(p.numel() for p in _model(config, shape).parameters())
    reads_terms = d.method == "ead" and d.objective in REAL_TERM_OBJECTIVES
    r = config.realgrad
    if reads_terms:
        workers = r.workers if on_ray else 1
        measured = run_calibration(calibrate_realgrad, config, shape, worker_threads,
                                   copies=workers)
        chunk = min(r.chunk or r.checkpoints, r.checkpoints)
        predictions.append(realgrad_prediction(
            batch_seconds=measured["batch_seconds"],
            load_sample_seconds=measured["load_sample_seconds"], peak_mb=measured["peak_mb"],
            sums_mb_chunk=sums_bytes(parameters, shape.num_classes, r.p_batches, r.class_terms,
                                     chunk) / MIB,
            checkpoints=r.checkpoints, chunk=r.chunk, workers=workers, batch_size=r.batch_size,
            selected_samples=sum(_selected(config, shape))))
    else:
        predictions.append(StagePrediction(
            "realgrad", 0.0, None, 0, f"skipped: {d.method}/{d.objective} reads no real terms"))

    if d.method != "ead":
        predictions.append(StagePrediction("distill", None, None, 1,
                                           f"method {d.method}: not predicted"))
    else:
        measured = run_calibration(calibrate_distill, config, shape,
                                   d.threads or cpus)
        if reads_terms:
            per_term = real_terms_bytes(parameters, shape.num_classes, r.p_batches,
                                        r.class_terms)
            held = (r.checkpoints - 1) * per_term / MIB
            what = f"real terms of {r.checkpoints - 1} more checkpoints"
        else:
            from .plan import expert_checkpoints

            recorded = e.count * expert_checkpoints(e.epochs, train, e.batch_size, e.save_every)
            held = max(0, recorded - 2) * 4 * parameters / MIB
            what = f"{recorded} expert checkpoints"
        predictions.append(distill_prediction(
            iteration_seconds=measured["iteration_seconds"], peak_mb=measured["peak_mb"],
            iterations=d.iterations, held_mb=held, held_what=what))

    v = config.evaluate
    sets = 1 + len(v.baselines)
    jobs = sets * len(v.models) * v.runs
    measured = run_calibration(calibrate_evaluate, config, shape, worker_threads,
                               copies=min(jobs, cpus) if on_ray else 1)
    test = _test_samples(config, shape)
    predictions.append(evaluate_prediction(
        epoch_seconds=measured["epoch_seconds"], test_seconds=measured["test_seconds"],
        peak_mb=measured["peak_mb"], sets=sets, runs=v.runs, epochs=v.epochs,
        test_samples=max(0, test - measured["test_calibration_samples"]),
        values_per_sample=shape.values, concurrent=min(jobs, cpus) if on_ray else 1))
    return predictions


def write_plan(config: RunConfig, json_path: str | None = None) -> str:
    """The plan as a table (returned) and, with ``json_path``, as JSON (its folder made first,
    so that a path in a folder not made yet never throws the calibration away)."""
    import json

    from .measure import available_memory_mb
    from .plan import format_table

    if json_path and os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    predictions = plan_run(config)
    available = available_memory_mb()
    if json_path:
        with open(json_path + ".tmp", "w") as f:
            json.dump({"config": config.name, "available_mb": available,
                       "stages": [p.to_dict() for p in predictions]}, f, indent=2)
        os.replace(json_path + ".tmp", json_path)  # a reader never sees half a plan
    return format_table(predictions, available)


def check_run_memory(config: RunConfig) -> None:
    """Calibrate, then raise InsufficientMemoryError if a stage would not fit here."""
    from .measure import available_memory_mb
    from .plan import check_memory

    predictions = plan_run(config)
    check_memory(predictions, available_memory_mb())
    log.info("memory check: every stage fits in %.0f MiB", available_memory_mb())

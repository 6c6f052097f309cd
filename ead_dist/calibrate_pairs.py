"""Calibration behind ``ead-dist plan`` for image-text runs (``data.dataset: cc3m``).

The image-text counterpart of :mod:`ead_dist.calibrate`, with the same method: each stage's
unit of work, run a few times in a fresh spawned process (``calibrate._isolated``) on the
run's own dual encoder and on real pairs decoded from DATA's shards, then extrapolated by
``ead_dist.plan``'s formulas. The units:

- experts: SGD steps on the contrastive loss of ``experts.batch_size`` pairs, and one
  recorded checkpoint (probe loss and recall, the file);
- realgrad: one batch gradient of ``realgrad.p_batch_size`` pairs at one checkpoint
  (``real_terms.batch_loss_gradient``, as ``pair_partial_sums`` runs it), and the count of
  one shard's pairs read without decoding, which the driver does for every shard of D;
- distill: coordinator iterations on N pairs (``image_text.pairs``) with the configured
  objective and similarity, against a made-up segment or made-up real terms of the right size;
- evaluate: epochs of Adam on N pairs and the recall of the held-out pairs.

Pairs are decoded once per calibration (its seconds per pair is the decode cost every stage
pays); DATA must be ingested (``meta.json`` lists the shards and their sizes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import torch

from . import storage
from .calibrate import TIMED, _timed, timed_iterations
from .config import ConfigError, RunConfig
from .measure import peak_memory_mb
from .plan import (
    FLOAT_BYTES,
    MIB,
    StagePrediction,
    distill_prediction,
    expert_checkpoints,
    experts_prediction,
    ingest_prediction,
    real_terms_bytes,
    realgrad_prediction,
)

PROBE_TEST_PAIRS = 200  # held-out pairs the evaluation calibration measures recall on
READ_PAIRS = 1024  # train pairs decoded to time the reading (and a quarter of them)


@dataclass
class PairShape:
    image_size: int
    total_pairs: int  # every pair in DATA's shards (meta.json)
    shards: int
    held_out: float  # image_text.held_out: the hash fraction kept for evaluation

    @property
    def values(self) -> int:
        return 3 * self.image_size**2

    @property
    def train_pairs(self) -> int:
        """The train split's expected size: the pairs outside the held-out hash fraction."""
        return max(1, round(self.total_pairs * (1 - self.held_out)))

    @property
    def test_pairs(self) -> int:
        return max(1, round(self.total_pairs * self.held_out))


def pair_shape(config: RunConfig) -> PairShape:
    """DATA's size from its meta.json; image-text needs it (no known shape stands in)."""
    from .data.meta import read_meta

    if not storage.exists(storage.join(config.data.url, "meta.json")):
        raise ConfigError(f"ead-dist plan: {config.data.url} is not ingested: an image-text "
                          "plan reads the pairs' count and image size from its meta.json "
                          "(ead-dist ingest validates img2dataset shards in place)")
    meta = read_meta(config.data.url)
    if meta.task != "image_text":
        raise ConfigError(f"ead-dist plan: {config.data.url}/meta.json describes a {meta.task} "
                          f"dataset, not the image-text pairs data.dataset "
                          f"{config.data.dataset!r} needs")
    shards = sum(len(split.shards) for split in meta.splits.values())
    return PairShape(meta.image_shape[1], sum(s.size for s in meta.splits.values()), shards,
                     config.image_text.held_out)


def _pairs(config: RunConfig, count: int, split: str = "train"):
    """``count`` decoded pairs of ``split`` (cycled when it holds fewer) and how many were
    read."""
    from .data.pairs import load_pairs

    pairs = load_pairs(config.data.url, config.image_text, split, limit=count)
    repeat = math.ceil(count / len(pairs.tokens))
    return (pairs.images.repeat(repeat, 1, 1, 1)[:count], pairs.tokens.repeat(repeat, 1)[:count],
            len(pairs.tokens))


def _read_seconds(config: RunConfig, count: int) -> tuple[float, int]:
    started = time.perf_counter()
    _, _, read = _pairs(config, count)
    return time.perf_counter() - started, read


def _model(config: RunConfig, shape: PairShape) -> torch.nn.Module:
    from .stages.pair_experts import pair_model

    return pair_model(config, shape.image_size)


# --- the calibrations, each run in its own process ------------------------------------------

def calibrate_pair_reading(config: RunConfig, shape: PairShape, threads: int) -> dict:
    """What every stage pays to read pairs: seconds to read and decode one train pair, and to
    count one without decoding (the draws' and realgrad's counts), on DATA's first shard."""
    from .data.meta import read_meta
    from .data.pairs import split_counts

    torch.set_num_threads(threads)
    _pairs(config, 16)  # warm-up: the first read pays the imports and the decoders' set-up
    small, few = _read_seconds(config, READ_PAIRS // 4)
    large, many = _read_seconds(config, READ_PAIRS)
    # The slope between two reads: what one more pair costs, without the per-read start-up
    # that the stages pay once per read of thousands of pairs. Data too small for a slope
    # (or a noisy one) gives the larger read's mean.
    slope = (large - small) / (many - few) if many >= 2 * few else 0.0
    load = slope if slope > 0 else large / many
    started = time.perf_counter()
    counted = split_counts(config.data.url, config.image_text, "train",
                           meta=read_meta(config.data.url), shards=[0])[0]
    count = (time.perf_counter() - started) / max(1, counted)
    return {"load_pair_seconds": load, "count_pair_seconds": count, "peak_mb": peak_memory_mb()}


def calibrate_pair_experts(config: RunConfig, shape: PairShape, threads: int) -> dict:
    from .retrieval import model_recall
    from .stages.experts import METRIC_SAMPLES
    from .trajectory import sgd_steps, step_augmentation

    torch.set_num_threads(threads)
    batch = config.experts.batch_size
    images, tokens, _ = _pairs(config, max(batch * (TIMED + 1), METRIC_SAMPLES))
    model = _model(config, shape)

    def train(count: int) -> None:
        def step_loss(net: torch.nn.Module, step: int) -> torch.Tensor:
            rows = slice(step * batch, (step + 1) * batch)
            return net(step_augmentation(images[rows], config.image_text.augmentation, 0, step),
                       tokens[rows])

        # run the steps out; the generator yields only theta_0 at this save_every
        deque(sgd_steps(model, step_loss, count, lr=config.experts.lr, save_every=10**9),
              maxlen=0)

    train(1)  # warm-up
    started = time.perf_counter()
    train(TIMED + 1)
    step_seconds = (time.perf_counter() - started) / (TIMED + 1)
    probe_images, probe_tokens = images[:METRIC_SAMPLES], tokens[:METRIC_SAMPLES]
    with tempfile.TemporaryDirectory() as folder:
        def record() -> None:  # what each recorded checkpoint costs the stage
            with torch.no_grad():
                model(probe_images, probe_tokens)
            model_recall(model, probe_images, probe_tokens, ks=(1,))
            storage.save_tensors(os.path.join(folder, "step.safetensors"),
                                 {k: v.detach() for k, v in model.named_parameters()}, {})

        checkpoint_seconds = _timed(record, 1)
    return {"step_seconds": step_seconds, "checkpoint_seconds": checkpoint_seconds,
            "peak_mb": peak_memory_mb()}


def calibrate_pair_realgrad(config: RunConfig, shape: PairShape, threads: int) -> dict:
    from .effect import parameters_of
    from .real_terms import batch_loss_gradient

    torch.set_num_threads(threads)
    images, tokens, _ = _pairs(config, config.realgrad.p_batch_size)
    model = _model(config, shape)
    theta = parameters_of(model)
    batch_seconds = _timed(lambda: batch_loss_gradient(model, theta, (images, tokens)))
    return {"batch_seconds": batch_seconds,
            "parameters": sum(v.numel() for v in theta.values()), "peak_mb": peak_memory_mb()}


def calibrate_pair_distill(config: RunConfig, shape: PairShape, threads: int) -> dict:
    from .coordinator import Coordinator, RealTerms, Segment, StudentSettings
    from .effect import parameters_of
    from .stages.distill_pairs import initial_similarity, pair_loss
    from .synthetic import SyntheticSet

    torch.set_num_threads(threads)
    settings, pairs = config.distill, config.image_text.pairs
    images, tokens, _ = _pairs(config, pairs)
    model = _model(config, shape)
    with torch.no_grad():
        text = model.embed_tokens(tokens)
    theta = parameters_of(model)
    n = sum(v.numel() for v in theta.values())
    generator = torch.Generator().manual_seed(0)
    common = dict(lr_images=settings.lr_images, lr_labels=config.image_text.lr_text,
                  learn_labels=config.image_text.learn_captions, seed=settings.seed,
                  step_loss=pair_loss,
                  soft_labels=False, similarity=initial_similarity(config, pairs, "cpu"),
                  lr_similarity=config.image_text.lr_similarity,
                  augmentation=config.image_text.augmentation)
    synthetic = SyntheticSet(images, text, torch.arange(pairs))
    if settings.objective == "trajectory":
        target = {k: v + 1e-3 * torch.randn(v.shape, generator=generator)
                  for k, v in theta.items()}
        student = StudentSettings(
            steps=settings.student_steps, batch_size=settings.student_batch_size,
            initial_lr=settings.student_lr or config.experts.lr, lr_lr=settings.lr_student_lr,
            recompute=settings.unroll == "recompute")
        coordinator = Coordinator(model, synthetic, objective="trajectory",
                                  segments=[Segment(theta, target)], student=student, **common)
    else:
        k = config.realgrad.p_batches
        g_D = 1e-3 * torch.randn(n, generator=generator)
        g_P = 1e-3 * torch.randn(k, n, generator=generator)
        terms = [RealTerms(theta=theta, lr=config.experts.lr, g_D=g_D, g_P=g_P,
                           real_dots=g_P @ g_D)]
        coordinator = Coordinator(
            model, synthetic, objective=settings.objective, terms=terms,
            coefficient=settings.coefficient, real_size=shape.train_pairs,
            checkpoints_per_iteration=settings.checkpoints_per_iteration,
            distance=settings.distance, skip_head_and_biases=settings.skip_head_and_biases,
            normalise=settings.normalise, **common)
    return timed_iterations(coordinator, n)


def calibrate_pair_evaluate(config: RunConfig, shape: PairShape, threads: int) -> dict:
    from .retrieval import model_recall
    from .stages.evaluate_pairs import train_on_pairs

    torch.set_num_threads(threads)
    settings = config.evaluate
    images, tokens, _ = _pairs(config, config.image_text.pairs)
    model = _model(config, shape)
    with torch.no_grad():
        text = model.embed_tokens(tokens)

    def train(epochs: int) -> None:
        train_on_pairs(model, images, text, epochs=epochs, lr=settings.lr,
                       batch_size=settings.batch_size, seed=0,
                       augmentation=config.image_text.augmentation)

    train(1)  # warm-up
    started = time.perf_counter()
    train(2)
    epoch_seconds = (time.perf_counter() - started) / 2
    probe = min(PROBE_TEST_PAIRS, config.image_text.test_pairs, shape.test_pairs)
    test_images, test_tokens, _ = _pairs(config, probe, "test")
    started = time.perf_counter()
    model_recall(model, test_images, test_tokens)
    recall_seconds = (time.perf_counter() - started) / probe
    return {"epoch_seconds": epoch_seconds, "recall_pair_seconds": recall_seconds,
            "test_calibration_pairs": probe,
            "peak_mb": peak_memory_mb()}


# --- the plan --------------------------------------------------------------------------------

def expert_train_pairs(config: RunConfig, shape: PairShape) -> int:
    """The pairs an expert's epoch covers: ``image_text.train_pairs`` or the train split."""
    limit = config.image_text.train_pairs
    return shape.train_pairs if limit is None else min(limit, shape.train_pairs)


def realgrad_batch_counts(config: RunConfig, shape: PairShape) -> tuple[int, int]:
    """(D batches, pairs D is drawn from): as ``build_pair_plan`` draws them, from the pool of
    whole batches of B in D (D: the experts' in-memory prefix, or the train split)."""
    r = config.realgrad
    d_pairs = expert_train_pairs(config, shape) if config.image_text.expert_data == "memory" \
        else shape.train_pairs
    pool = max(1, d_pairs // r.p_batch_size)  # shards' ragged ends make it a little smaller
    wanted = pool if r.real_samples is None else min(pool, max(1, r.real_samples
                                                               // r.p_batch_size))
    return wanted, d_pairs


def split_read_seconds(reading: dict, pairs: int, fraction: float) -> float:
    """Reading the first ``pairs`` pairs of a split that holds ``fraction`` of every shard's
    keys (by hash): the keys on the way are listed without decoding, the split's decoded."""
    return pairs / fraction * reading["count_pair_seconds"] + pairs * reading["load_pair_seconds"]


def count_seconds(reading: dict, shape: PairShape, train: int, tasks: int) -> float:
    """Counting, without decoding, the pairs of the shards that hold the first ``train`` train
    pairs: the whole split by one task per shard (``tasks`` at once), a prefix in this process
    shard after shard (as ``data/pairs.py`` does either way)."""
    if train >= shape.train_pairs:
        return shape.total_pairs * reading["count_pair_seconds"] / max(1, tasks)
    return round(train / (1 - shape.held_out)) * reading["count_pair_seconds"]


def draw_seconds(reading: dict, shape: PairShape, train: int, drawn: int, tasks: int) -> float:
    """A seeded draw of ``drawn`` of the first ``train`` train pairs
    (``data/pairs.sample_pairs``): they are counted, then the drawn ones decoded."""
    return count_seconds(reading, shape, train, tasks) + drawn * reading["load_pair_seconds"]


def plan_pair_run(config: RunConfig, run_calibration, cpus: int) -> list[StagePrediction]:
    """Calibrate every stage of an image-text ``config`` and extrapolate its time and peak
    memory (``calibrate.plan_run`` for ``data.dataset: cc3m``)."""
    from .stages.distill_pairs import check_pair_objective
    from .stages.realgrad import sums_bytes

    check_pair_objective(config)
    settings, d = config.image_text, config.distill
    shape = pair_shape(config)
    on_ray = config.ray.enabled
    worker_threads = 1 if on_ray else cpus
    tasks = min(cpus, shape.shards) if on_ray else 1  # per-shard work: Ray tasks or serial
    reading = run_calibration(calibrate_pair_reading, config, shape, 1)
    load = reading["load_pair_seconds"]
    train = expert_train_pairs(config, shape)
    test_pairs = min(settings.test_pairs, shape.test_pairs)
    predictions = [ingest_prediction(done=True)]

    e = config.experts
    concurrent = min(e.count, cpus) if on_ray else 1
    measured = run_calibration(calibrate_pair_experts, config, shape, worker_threads,
                               copies=concurrent)
    # A streaming expert decodes every batch it trains on and holds one shuffle buffer; an
    # in-memory one decodes and holds its train pairs once.
    stream = settings.expert_data == "stream"
    experts = experts_prediction(
        step_seconds=measured["step_seconds"] + (e.batch_size * load if stream else 0.0),
        checkpoint_seconds=measured["checkpoint_seconds"],
        train_load_seconds=0.0 if stream else
        split_read_seconds(reading, train, 1 - shape.held_out),
        test_load_seconds=split_read_seconds(reading, test_pairs, shape.held_out),
        peak_mb=measured["peak_mb"] + (settings.stream_buffer * shape.values / MIB
                                       if stream else 0.0),
        count=e.count, epochs=e.epochs, train_samples=train,
        loaded_train=0 if stream else train, test_samples=test_pairs, batch_size=e.batch_size,
        save_every=e.save_every, values_per_sample=shape.values, concurrent=concurrent)
    predictions.append(dataclasses.replace(experts, basis=experts.basis.replace(
        "the loaded split", "a shuffle buffer, each batch decoded" if stream
        else f"the {train} decoded train pairs")))

    if d.objective == "trajectory":
        predictions.append(StagePrediction("realgrad", 0.0, None, 0,
                                           "skipped: trajectory reads no real terms"))
    else:
        r = config.realgrad
        workers = r.workers if on_ray else 1
        measured = run_calibration(calibrate_pair_realgrad, config, shape, worker_threads,
                                   copies=workers)
        parameters = measured["parameters"]
        d_batches, d_pairs = realgrad_batch_counts(config, shape)
        chunk = min(r.chunk or r.checkpoints, r.checkpoints)
        gradients = realgrad_prediction(
            batch_seconds=measured["batch_seconds"], load_sample_seconds=load,
            peak_mb=measured["peak_mb"],
            sums_mb_chunk=sums_bytes(parameters, 1, r.p_batches, False, chunk) / MIB,
            checkpoints=r.checkpoints, chunk=r.chunk, workers=workers,
            batch_size=r.p_batch_size,
            # a P batch that is also a D batch is computed once: at most d + K batches
            selected_samples=(d_batches + r.p_batches) * r.p_batch_size)
        # The driver first counts D's pairs shard by shard.
        counting = count_seconds(reading, shape, d_pairs, tasks)
        predictions.append(dataclasses.replace(
            gradients, seconds=gradients.seconds + counting,
            basis=gradients.basis.replace("batches/worker", "batches of pairs/worker")
            + f"; + counting D's pairs, {counting:.0f} s"))

    measured = run_calibration(calibrate_pair_distill, config, shape, d.threads or cpus)
    parameters = measured["parameters"]
    if d.objective == "trajectory":
        recorded = expert_checkpoints(e.epochs, train, e.batch_size, e.save_every)
        loaded = recorded if d.max_start is None else min(recorded,
                                                          d.max_start + d.expert_span + 1)
        loaded = max(0, loaded - d.min_start)
        held = max(0, e.count * loaded - 2) * FLOAT_BYTES * parameters / MIB
        what = f"{e.count * loaded} expert checkpoints"
    else:
        r = config.realgrad
        held = (r.checkpoints - 1) * real_terms_bytes(parameters, 1, r.p_batches, False) / MIB
        what = f"real terms of {r.checkpoints - 1} more checkpoints"
    distill = distill_prediction(iteration_seconds=measured["iteration_seconds"],
                                 peak_mb=measured["peak_mb"], iterations=d.iterations,
                                 held_mb=held, held_what=what)
    # The initial pairs: a seeded draw of N from the experts' pairs, once, before iteration 0.
    initial = 0.0 if storage.exists(storage.join(config.run, "distill", "init.safetensors")) \
        else draw_seconds(reading, shape, train, settings.pairs, tasks)
    predictions.append(dataclasses.replace(
        distill, seconds=distill.seconds + initial,
        basis=distill.basis + f"; + drawing the {settings.pairs} initial pairs, {initial:.0f} s"))

    v = config.evaluate
    sets = 1 + len(v.baselines)
    measured = run_calibration(calibrate_pair_evaluate, config, shape, worker_threads)
    seconds = (sets * v.runs * (v.epochs * measured["epoch_seconds"]
                                + test_pairs * measured["recall_pair_seconds"])
               + split_read_seconds(reading, test_pairs, shape.held_out))
    if "random_real" in v.baselines:  # another seeded draw of N train pairs
        seconds += draw_seconds(reading, shape, train, settings.pairs, tasks)
    predictions.append(StagePrediction(
        "evaluate", seconds,
        measured["peak_mb"] + FLOAT_BYTES * test_pairs * shape.values / MIB, 1,
        f"{sets} sets x {v.runs} runs x {v.epochs} epochs x "
        f"{measured['epoch_seconds'] * 1e3:.1f} ms + recall of {test_pairs} held-out pairs, "
        "in one process; + the held-out pairs"))
    return predictions

"""Distill stage: the coordinator learns S against the precomputed real terms.

It never holds D: the initial S is IPC real images per class, drawn in one streaming pass over
the train shards that keeps only the chosen ones. Per iteration it samples t_m checkpoints
(and one P batch of each from the bank), computes the synthetic gradients g_S at theta_t with
a double-backward graph, and steps Adam on the images and the label logits. Its cost per
iteration depends on |S| and the model, not on |D|. State is saved every ``save_every``
iterations to ``RUN/distill/state-NNNNNN.safetensors`` (images, label logits, Adam moments)
and a rerun resumes from the newest one; the randomness of iteration i is a function of
(seed, i), so a resumed run ends where an uninterrupted one does.
``RUN/synthetic.safetensors`` is the result; ``RUN/distill/fingerprint.json`` records the
settings it belongs to (``ead_dist.fingerprint``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from typing import Optional

import torch
from torch import nn

from .. import storage
from ..augment import dsa_strategy
from ..config import ConfigError, RunConfig
from ..data.arrays import class_balanced_sample
from ..data.meta import read_meta
from ..data.reservoir import TooFewSamplesError
from ..fingerprint import STEP_SIZE_FIELDS, guard, record_divergence
from ..models import build_model
from ..progress import progress_bar
from ..measure import peak_memory_mb
from ..metrics import MetricsLog
from ..runtime import compute_device
from ..coordinator import Coordinator, DivergedError, RealTerms, Segment, StudentSettings
from ..formation import check_factor
from ..synthetic import (
    SyntheticSet,
    correctly_classified_first,
    initial_set,
    save_synthetic,
    set_tensors,
    synthetic_from_state,
)
from .experts import experts_url, is_image_text
from .realgrad import realgrad_url

log = logging.getLogger(__name__)


def load_real_terms(run_url: str, device: torch.device | str = "cpu",
                    experts: Optional[Collection[int]] = None) -> tuple[list[RealTerms], dict]:
    """The real terms of every checkpoint realgrad published (of ``experts`` only, if given)."""
    index = storage.read_json(storage.join(realgrad_url(run_url), "index.json"))
    terms = []
    for entry in index["checkpoints"]:
        if experts is not None and entry["expert"] not in experts:
            continue
        tensors, _ = storage.load_tensors(storage.join(realgrad_url(run_url), entry["file"]))
        # float32 whatever realgrad.dtype stored them as
        tensors = {k: v.to(device, torch.float32) for k, v in tensors.items()}
        theta = {k: v.to(device) for k, v in storage.load_tensors(entry["checkpoint"])[0].items()}
        terms.append(RealTerms(theta=theta, lr=entry["lr"], g_D=tensors["g_D"],
                               g_P=tensors["g_P"], real_dots=tensors["real_dots"],
                               g_D_classes=tensors.get("g_D_classes"),
                               g_P_classes=tensors.get("g_P_classes"),
                               real_dots_classes=tensors.get("real_dots_classes")))
    return terms, index


def load_segments(run_url: str, span: int, max_start: int | None,
                  device: torch.device | str = "cpu",
                  experts: Optional[Collection[int]] = None,
                  min_start: int = 0) -> list[Segment]:
    """Every (theta_t, theta_t+span) pair of recorded checkpoints of every expert (of
    ``experts`` only, if given) whose start is at least checkpoint ``min_start`` and at most
    ``max_start`` (None: any start with a target). Only those checkpoints are loaded."""
    index = storage.read_json(storage.join(experts_url(run_url), "index.json"))
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(entry: dict) -> dict[str, torch.Tensor]:
        if entry["file"] not in cache:
            tensors, _ = storage.load_tensors(storage.join(experts_url(run_url), entry["file"]))
            cache[entry["file"]] = {k: v.to(device) for k, v in tensors.items()}
        return cache[entry["file"]]

    segments = []
    for expert in index["experts"]:
        if experts is not None and expert["expert"] not in experts:
            continue
        checkpoints = expert["checkpoints"]
        last_start = len(checkpoints) - 1 - span
        if max_start is not None:
            last_start = min(last_start, max_start)
        for start in range(min_start, last_start + 1):
            segments.append(Segment(load(checkpoints[start]), load(checkpoints[start + span])))
    return segments


def fitted_experts(config: RunConfig) -> range:
    """The experts the coordinator fits: all but the last ``distill.held_out_experts``."""
    return range(config.experts.count - config.distill.held_out_experts)


def held_out_experts(config: RunConfig) -> range:
    return range(config.experts.count - config.distill.held_out_experts, config.experts.count)


# Draws (iterations' worth of checkpoints or segments, batches, augmentations) behind each of
# the two objective values that measure how far S generalises to held-out experts.
GENERALISATION_DRAWS = 16


def state_url(run_url: str, iteration: int) -> str:
    return storage.join(run_url, "distill", f"state-{iteration:06d}.safetensors")


def _teachers(config: RunConfig, meta) -> list[nn.Module]:
    """The final checkpoints of the experts whose logits give the initial soft labels: expert 0
    (``label_init: first_expert``) or every expert (``ensemble``, their mean logits)."""
    index = storage.read_json(storage.join(experts_url(config.run), "index.json"))
    fitted = fitted_experts(config)
    experts = index["experts"][:1] if config.distill.label_init == "first_expert" else \
        [expert for expert in index["experts"] if expert["expert"] in fitted]
    models = []
    for expert in experts:
        final = expert["checkpoints"][-1]
        theta, _ = storage.load_tensors(storage.join(experts_url(config.run), final["file"]))
        model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                            tuple(meta.image_shape[1:]),
                            **config.model.options_for(config.model.name))
        model.load_state_dict(theta, strict=False)
        models.append(model.eval())
    return models


# ``init_images: correct`` draws this many candidates per slot and keeps correctly classified ones.
CANDIDATES_PER_IMAGE = 4


def initialise(config: RunConfig) -> SyntheticSet:
    """The initial S, published once as ``RUN/distill/init.safetensors`` (the 'init' baseline).

    IPC real images per class, drawn while streaming the shards (never all of D), with soft
    labels softmax(teacher logits / temperature). With ``init_images: correct`` the draw is
    CANDIDATES_PER_IMAGE times larger and the images the teachers classify correctly come first.
    With ``formation`` f each stored image tiles f^2 real images (``ead_dist/formation.py``).
    """
    url = storage.join(config.run, "distill", "init.safetensors")
    meta = read_meta(config.data.url)
    if storage.exists(url):
        return synthetic_from_state(storage.load_tensors(url)[0], meta.num_classes)
    settings = config.distill
    try:
        check_factor(tuple(meta.image_shape[1:]), settings.formation)
    except ValueError as error:
        raise ConfigError(f"distill.formation: {error} of {config.data.url}") from error
    per_class = settings.ipc * settings.formation ** 2  # training images per class
    teachers = _teachers(config, meta)

    def teacher_logits(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([teacher(x) for teacher in teachers]).mean(0)

    pool = per_class * (CANDIDATES_PER_IMAGE if settings.init_images == "correct" else 1)
    try:
        images, labels = class_balanced_sample(config.data.url, "train", pool, settings.seed,
                                               meta=meta)
    except TooFewSamplesError as error:
        raise ConfigError(f"distill.ipc {settings.ipc} is impossible with the train split of "
                          f"{config.data.url}: {error}") from error
    if settings.init_images == "correct":
        with torch.no_grad():
            predicted = torch.cat([teacher_logits(images[i:i + 500]).argmax(1)
                                   for i in range(0, len(images), 500)])
        keep = correctly_classified_first(labels, predicted, per_class, meta.num_classes)
        images, labels = images[keep], labels[keep]
    synthetic = initial_set(images, labels, settings.ipc, meta.num_classes, teacher_logits,
                            settings.label_temperature, settings.seed, settings.formation)
    storage.save_tensors(url, dict(set_tensors(synthetic), label_logits=synthetic.label_logits),
                         synthetic_metadata(config, meta, method="init"))
    return synthetic


def synthetic_metadata(config: RunConfig, meta, method: str) -> dict:
    metadata = {"dataset": meta.name, "method": method, "ipc": config.distill.ipc,
                "num_classes": meta.num_classes, "mean": meta.mean, "std": meta.std,
                "config": config.to_json()}
    if config.distill.formation > 1:
        metadata["formation"] = config.distill.formation
    return metadata


def iterate(run_url: str, optimiser, iterations: int, save_every: int, desc: str
            ) -> tuple[list[float], int, float]:
    """Run ``optimiser.step(i)`` for every iteration not yet saved, with a progress bar.

    ``optimiser`` is anything with ``step(i) -> loss``, ``state()`` and ``load_state()`` (the
    coordinator, DM, DC). It resumes from the newest ``RUN/distill/state-*.safetensors``, saves
    every ``save_every`` iterations and at the end, and on DivergedError saves the last good
    state before raising. Returns every iteration's loss, where it resumed, and its seconds.
    """
    start, losses = 0, []
    saved = storage.list_files(storage.join(run_url, "distill"), "state-*.safetensors")
    if saved:
        tensors, state_meta = storage.load_tensors(saved[-1])
        optimiser.load_state(tensors)
        start, losses = state_meta["iteration"], state_meta["losses"]
        log.info("distill: resuming at iteration %d from %s", start, saved[-1])
    metrics = MetricsLog(storage.join(run_url, "distill"))
    metrics.truncate("iteration", start)  # lines past the state resumed from are redone
    started = time.perf_counter()
    progress = progress_bar(desc, iterations, start)

    def save(iteration: int) -> None:
        metrics.publish()  # before the state: a state on storage never lacks its lines
        storage.save_tensors(state_url(run_url, iteration), optimiser.state(),
                             {"iteration": iteration, "losses": losses})

    for iteration in range(start, iterations):
        step_started = time.perf_counter()
        try:
            losses.append(optimiser.step(iteration))
        except DivergedError as error:
            save(iteration)  # the state before this step is the last good one
            progress.close()
            record_divergence(run_url, iteration, str(error))
            raise DivergedError(f"{error}; the state before it is saved, and a rerun with a "
                                f"lower step size ({', '.join(STEP_SIZE_FIELDS)}) resumes "
                                f"from iteration {iteration}") from error
        metrics.log(iteration=iteration, loss=losses[-1],
                    seconds=round(time.perf_counter() - step_started, 4))
        progress.update(1)
        progress.set_postfix_str(f"loss={losses[-1]:.3e}")
        if (iteration + 1) % save_every == 0 or iteration + 1 == iterations:
            save(iteration + 1)
    progress.close()
    return losses, start, time.perf_counter() - started


def generalisation(config: RunConfig, coordinator: Coordinator, device) -> dict:
    """The final S's objective on the experts it fitted and on the held-out ones, over the same
    GENERALISATION_DRAWS fresh draws (iterations past the run's)."""
    settings = config.distill
    held_out = held_out_experts(config)
    if settings.objective == "trajectory":
        pool = {"segments": load_segments(config.run, settings.expert_span, settings.max_start,
                                          device, held_out, min_start=settings.min_start)}
    else:
        pool = {"terms": load_real_terms(config.run, device, held_out)[0]}
    if not next(iter(pool.values())):
        raise ConfigError(f"distill.held_out_experts {settings.held_out_experts}: experts "
                          f"{list(held_out)} have no {next(iter(pool))} to measure S on "
                          f"(realgrad.checkpoints picked none of theirs?)")
    draws = range(settings.iterations, settings.iterations + GENERALISATION_DRAWS)
    fitted_value = coordinator.objective_value(draws)
    held_out_value = coordinator.objective_value(draws, **pool)
    log.info("distill: objective on the fitted experts %.4g, on held-out experts %s %.4g",
             fitted_value, list(held_out), held_out_value)
    return {"held_out_experts": list(held_out), "draws": GENERALISATION_DRAWS,
            "objective_fitted": fitted_value, "objective_held_out": held_out_value,
            "ratio": held_out_value / fitted_value if fitted_value else None}


def distill(config: RunConfig) -> dict:
    """Run (or resume, or skip when done) the coordinator; publishes RUN/synthetic.safetensors."""
    storage.apply_settings(config.storage)  # a Ray task: the driver's settings do not reach it
    guard(config, "distill")
    out_url = storage.join(config.run, "synthetic.safetensors")
    summary_url = storage.join(config.run, "distill", "summary.json")
    if storage.exists(out_url):
        done = storage.read_json(summary_url) if storage.exists(summary_url) else {}
        return dict(done, synthetic=out_url, skipped=True)
    torch.set_num_threads(config.distill.threads or len(os.sched_getaffinity(0)))
    if is_image_text(config):
        from .distill_pairs import distill_pairs  # it builds on this module

        return distill_pairs(config)
    if config.distill.method != "ead":
        from .baselines import distill_baseline  # it builds on this module

        return distill_baseline(config)
    meta = read_meta(config.data.url)
    synthetic = initialise(config)
    device = compute_device(config.ray.use_gpu)
    settings = config.distill
    terms, segments, index = None, None, None
    fitted = fitted_experts(config)
    if settings.objective == "trajectory":
        segments = load_segments(config.run, settings.expert_span, settings.max_start, device,
                                 fitted, min_start=settings.min_start)
    else:
        terms, index = load_real_terms(config.run, device, fitted)
    model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(config.model.name))
    model.to(device)
    student = StudentSettings(
        steps=settings.student_steps, batch_size=settings.student_batch_size,
        initial_lr=settings.student_lr or config.experts.lr, lr_lr=settings.lr_student_lr,
        recompute=settings.unroll == "recompute")
    coordinator = Coordinator(
        model, synthetic, objective=settings.objective, terms=terms, segments=segments,
        student=student if settings.objective == "trajectory" else None,
        coefficient=settings.coefficient, real_size=meta.splits["train"].size,
        lr_images=settings.lr_images, lr_labels=settings.lr_labels,
        learn_labels=settings.learn_labels,
        checkpoints_per_iteration=settings.checkpoints_per_iteration,
        augmentation=dsa_strategy(meta.name) if settings.augmentation == "dsa" else None,
        distance=settings.distance, skip_head_and_biases=settings.skip_head_and_biases,
        normalise=settings.normalise, seed=settings.seed, device=device,
    )
    losses, start, seconds = iterate(config.run, coordinator, settings.iterations,
                                     settings.save_every, f"distill ({settings.objective})")
    final = coordinator.synthetic
    done = settings.iterations - start  # this call's iterations (0 when it found them all saved)
    summary = {
        "method": "ead", "reads_real_data_in_loop": False,
        "synthetic": out_url, "iterations": settings.iterations, "seconds": seconds,
        "iterations_run": done, "resumed_at": start,
        "seconds_per_iteration": seconds / done if done else None, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # How far S moved from its initialisation: relative L2 change of the images, and the
        # mean total-variation distance between initial and final soft labels.
        "image_change": float((final.images - synthetic.images).norm() / synthetic.images.norm()),
        "label_change": float((final.labels - synthetic.labels).abs().sum(1).mean() / 2),
        "checkpoints": len(terms) if terms else None,
        "segments": len(segments) if segments else None,
        "real_samples": index["real_samples"] if index else None,
        "student_lr": float(coordinator.student_lr.detach()) if segments else None,
        "peak_memory_mb": peak_memory_mb(),
    }
    if settings.held_out_experts:
        summary["generalisation"] = generalisation(config, coordinator, device)
    storage.publish_json(summary_url, summary)  # before the result, whose presence means done
    metadata = synthetic_metadata(config, meta, method=f"ead-{settings.objective}")
    if segments:  # the trajectory objective's learned step size (evaluate.lr: learned)
        metadata["student_lr"] = summary["student_lr"]
    save_synthetic(out_url, final, metadata)
    return summary

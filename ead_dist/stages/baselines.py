"""Distill by a baseline (``distill.method``: random, herding, dm, dc) instead of EAD.

Each starts from the run's initial set (``RUN/distill/init.safetensors``, the one EAD starts
from and evaluate's ``init`` baseline reads) and publishes ``RUN/synthetic.safetensors`` with
hard labels, so ``evaluate`` compares them on the same experts, data and protocol. DM and DC
hold the training split and draw real batches every iteration (the EAD coordinator never
reads D); herding embeds it once. DM and DC save state every ``save_every`` iterations and
resume as EAD does (``distill.iterate``), with DSA applied siamese as the published methods do.
The summary records the method, its time (the loop's, for DM and DC) and memory, and whether it
reads D in its loop. With ``distill.formation`` f > 1 every method keeps IPC stored images per
class, each f^2 training images (the initial set's tiling; herding tiles f^2 herded images).
"""

from __future__ import annotations

import time

import torch

from .. import storage
from ..augment import dsa_strategy
from ..config import RunConfig
from ..data.arrays import load_split
from ..data.meta import read_meta
from ..fingerprint import caches_dm_means, resamples_real_batches
from ..formation import encode
from ..measure import peak_memory_mb
from ..methods import READS_REAL_DATA_IN_LOOP, dc, dm
from ..methods.herding import herding_selection
from ..methods.random_real import random_real
from ..models import build_model
from ..models.embedding import embed
from ..runtime import compute_device
from ..synthetic import SyntheticSet, hard_labelled, save_synthetic
from .distill import initialise, iterate, synthetic_metadata
from .dm_real import load_dm_means
from .experts import final_expert
from .weights import ensure_weights, load_weights

EMBED_BATCH = 500


def _network_factory(config: RunConfig, meta):
    """The run's model, freshly initialised on each call (DM's and DC's random networks)."""
    def make() -> torch.nn.Module:
        return build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                           tuple(meta.image_shape[1:]),
                           **config.model.options_for(config.model.name))
    return make


def _herding(config: RunConfig, meta, device) -> tuple[SyntheticSet, dict]:
    images, labels, _ = load_split(config.data.url, "train", meta=meta)
    expert = final_expert(config, meta).to(device)
    with torch.no_grad():
        embeddings = torch.cat([embed(expert, images[i:i + EMBED_BATCH].to(device)).cpu()
                                for i in range(0, len(images), EMBED_BATCH)])
    factor = config.distill.formation  # f^2 herded images tile each stored image
    chosen = herding_selection(embeddings, labels, config.distill.ipc * factor ** 2,
                               meta.num_classes)
    return (hard_labelled(encode(images[chosen], factor), labels[chosen].clone(),
                          meta.num_classes),
            {"real_samples": len(labels)})


def _optimiser(config: RunConfig, meta, initial: SyntheticSet, device):
    """DM or DC over the run's initial set, with the training split in memory (DM with
    ``dm_real: realgrad`` reads realgrad's cached real means instead)."""
    settings = config.distill
    common = dict(real_batch_size=settings.real_batch_size, augmentation=dsa_strategy(meta.name),
                  seed=settings.seed, device=device)
    start = hard_labelled(initial.images, initial.classes, meta.num_classes)
    if caches_dm_means(config):
        means, class_sizes = load_dm_means(config)
        real_means = dm.CachedRealMeans(means, class_sizes, device, resamples_real_batches(config))
        return dm.DistributionMatching(
            _network_factory(config, meta), start, real_means=real_means,
            lr_images=settings.baseline_lr_images or dm.LR_IMAGES, **common), 0
    images, labels, _ = load_split(config.data.url, "train", meta=meta)
    # Shards hold samples in key order, so row i of the split is sample i of the weights.
    weights = load_weights(ensure_weights(config))
    if settings.method == "dm":
        return dm.DistributionMatching(
            _network_factory(config, meta), start, images, labels,
            lr_images=settings.baseline_lr_images or dm.LR_IMAGES, real_weights=weights,
            resample=resamples_real_batches(config), **common), len(labels)
    outer, inner = (settings.outer_loop, settings.inner_loop)
    if outer is None or inner is None:
        default_outer, default_inner = dc.loops_for(settings.ipc)
        outer, inner = outer or default_outer, inner or default_inner
    return dc.GradientMatching(
        _network_factory(config, meta), start, images, labels, outer_loop=outer,
        inner_loop=inner, lr_images=settings.baseline_lr_images or dc.LR_IMAGES,
        lr_net=settings.lr_net, real_weights=weights, resample=resamples_real_batches(config),
        **common), len(labels)


def distill_baseline(config: RunConfig) -> dict:
    """Make (or resume) the baseline's set; publishes RUN/synthetic.safetensors and a summary."""
    settings, method = config.distill, config.distill.method
    meta = read_meta(config.data.url)
    device = compute_device(config.ray.use_gpu)
    initial = initialise(config)
    started = time.perf_counter()
    losses, start, extra = [], 0, {}
    if method == "random":
        final = random_real(initial, meta.num_classes)
    elif method == "herding":
        final, extra = _herding(config, meta, device)
    elif method in ("dm", "dc"):
        optimiser, real_samples = _optimiser(config, meta, initial, device)
        losses, start, seconds = iterate(config.run, optimiser, settings.iterations,
                                   settings.save_every, f"distill ({method})")
        final = optimiser.synthetic
        extra = {"real_samples": real_samples, "augmentation": dsa_strategy(meta.name),
                 "weights": config.weights.method}
        if method == "dc":
            extra.update(outer_loop=optimiser.outer_loop, inner_loop=optimiser.inner_loop)
    else:
        raise ValueError(f"unknown distill.method {method!r}")
    if method in ("random", "herding"):
        seconds = time.perf_counter() - started
    iterations = settings.iterations if method in ("dm", "dc") else 0
    done = iterations - start
    summary = {
        "method": method,
        "reads_real_data_in_loop": READS_REAL_DATA_IN_LOOP[method] and not caches_dm_means(config),
        "synthetic": storage.join(config.run, "synthetic.safetensors"),
        "iterations": iterations, "iterations_run": done, "resumed_at": start,
        "seconds": seconds, "seconds_per_iteration": seconds / done if done else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "image_change": float((final.images - initial.images).norm() / initial.images.norm()),
        "peak_memory_mb": peak_memory_mb(), **extra,
    }
    storage.publish_json(storage.join(config.run, "distill", "summary.json"), summary)
    save_synthetic(summary["synthetic"], final, synthetic_metadata(config, meta, method=method))
    return summary

"""Weights stage: per-sample weights of the training split (``weights.method``), once per run.

    RUN/weights/weights.safetensors   weights float32 [N train], indexed by sample index (the
                                      shard key); log_density float64 [N] and labels int64 [N],
                                      from which the weights follow at any temperature;
                                      metadata: the settings, the expert checkpoint, each
                                      class's bandwidth and reference size

Three passes over the train shards, each split among ``realgrad.workers`` Ray tasks (one CPU
each; in this process without Ray): labels only (no decoding), then the expert's embeddings of
the reference sample (``weights.sample`` per class, seeded), then every sample's embedding
against its class's reference. The driver holds the reference embeddings and one float per
sample, never D. realgrad, DM's real means and DM call :func:`ensure_weights`; the file is
remade when its recorded settings differ from the run's. When only ``weights.temperature``
differs, the weights are recomputed from the recorded densities, with no pass over the shards.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from .. import storage
from ..config import RunConfig
from ..data.arrays import normalise
from ..data.meta import read_meta, shard_counts, shard_urls
from ..data.pipeline import classification_label, classification_samples, raw_samples
from ..fingerprint import _json_values, data_content, weights_fields
from ..models.embedding import embed
from ..progress import progress_bar
from ..runtime import compute_device, map_over_shards
from ..weights import (
    log_density,
    median_distance,
    reference_indices,
    weights_from_log_density,
)
from .experts import experts_url, final_expert

log = logging.getLogger(__name__)


def weights_url(run_url: str) -> str:
    return storage.join(run_url, "weights", "weights.safetensors")


def planned_weights(config: RunConfig) -> Optional[str]:
    """Where the run's weights are, or None when ``weights.method`` is none (unweighted)."""
    return None if config.weights.method == "none" else weights_url(config.run)


def _settings(config: RunConfig, meta) -> dict:
    index = storage.read_json(storage.join(experts_url(config.run), "index.json"))
    return _json_values({**weights_fields(config), "data.content": data_content(meta),
                         "expert": index["experts"][0]["checkpoints"][-1]["file"]})


def ensure_weights(config: RunConfig, use_ray: bool = False) -> Optional[str]:
    """The URL of the run's weights, computed first (by Ray tasks with ``use_ray``) if absent or
    made under other settings."""
    url = planned_weights(config)
    if url is None:
        return None
    meta = read_meta(config.data.url)
    wanted = _settings(config, meta)
    if storage.exists(url):
        recorded = storage.load_metadata(url)
        if recorded.get("settings") == wanted:
            return url
        if _only_temperature_differs(recorded.get("settings") or {}, wanted):
            tensors, _ = storage.load_tensors(url)
            if "log_density" in tensors:
                reweight(url, tensors, recorded, wanted, meta.num_classes)
                return url
        log.warning("weights at %s were made with other settings: recomputing", url)
    compute_weights(config, meta, url, wanted, use_ray)
    return url


def _only_temperature_differs(recorded: dict, wanted: dict) -> bool:
    def density_settings(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k != "weights.temperature"}
    return bool(recorded) and density_settings(recorded) == density_settings(wanted)


def reweight(url: str, tensors: dict, recorded: dict, wanted: dict, num_classes: int) -> None:
    """Publish the weights at ``wanted``'s temperature from the densities recorded at ``url``."""
    started = time.perf_counter()
    temperature = wanted["weights.temperature"]
    weights = weights_from_log_density(tensors["log_density"], tensors["labels"], num_classes,
                                       temperature)
    storage.save_tensors(url, {**tensors, "weights": weights},
                         {**recorded, "settings": wanted, "reweighted_from_temperature":
                          recorded["settings"]["weights.temperature"]})
    log.info("weights: temperature %s -> %s from the recorded densities, %.1f s",
             recorded["settings"]["weights.temperature"], temperature,
             time.perf_counter() - started)


def load_weights(url: Optional[str]) -> Optional[torch.Tensor]:
    return None if url is None else storage.load_tensors(url)[0]["weights"]


def _shard_groups(urls: list[str], counts: list[int], parts: int) -> list[tuple[list, list]]:
    """The train shards dealt round-robin into at most ``parts`` groups of (urls, counts)."""
    parts = max(1, min(parts, len(urls)))
    return [(urls[i::parts], counts[i::parts]) for i in range(parts)]


def _labels_of(config: RunConfig, group: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, labels) of a shard group, read without decoding an image."""
    storage.apply_settings(config.storage)
    meta = read_meta(config.data.url)
    urls, counts = group
    keys, labels = [], []
    for sample in raw_samples(urls, split_nodes=False, counts=counts):
        keys.append(int(sample["__key__"]))
        labels.append(classification_label(sample, meta.num_classes))
    return torch.tensor(keys, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)


def _embeddings_of(config: RunConfig, group: tuple):
    """(keys, labels, expert embeddings) of the samples of a shard group (urls, counts, wanted)
    whose keys are in ``wanted`` (a key tensor; None: all of them)."""
    urls, counts, wanted = group
    parts = list(_embedded_batches(config, (urls, counts), wanted, "weights: reference"))
    return tuple(torch.cat(column) for column in zip(*parts)) if parts else (
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0))


def _log_densities_of(config: RunConfig, group: tuple, reference: dict, bandwidths: dict):
    """(keys, log p) of every sample of a shard group against its class's reference."""
    keys_out, log_p_out = [], []
    for keys, y, z in _embedded_batches(config, group, None, "weights: density"):
        log_p = torch.zeros(len(keys), dtype=torch.float64)
        for c in torch.unique(y).tolist():
            mask = y == c
            ref_keys, ref_z = reference[c]
            log_p[mask] = log_density(z[mask], ref_z, bandwidths[c], keys[mask], ref_keys)
        keys_out.append(keys)
        log_p_out.append(log_p)
    if not keys_out:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(keys_out), torch.cat(log_p_out)


def _embedded_batches(config: RunConfig, group: tuple, wanted: Optional[torch.Tensor],
                      desc: str):
    """(keys [B], labels [B], embeddings [B, d]) batch by batch over a shard group."""
    storage.apply_settings(config.storage)
    meta = read_meta(config.data.url)
    device = compute_device(config.ray.use_gpu)
    expert = final_expert(config, meta).to(device)
    urls, counts = group
    chosen = None if wanted is None else set(wanted.tolist())
    select = None if chosen is None else (lambda key: int(key) in chosen)
    total = sum(counts) if chosen is None else len(chosen)
    progress = progress_bar(desc, total=total, unit="sample")
    batch: list = []
    for sample in classification_samples(urls, image_shape=meta.image_shape,
                                         num_classes=meta.num_classes, split_nodes=False,
                                         select=select):
        batch.append(sample)
        if len(batch) == config.weights.batch_size:
            yield _embed_batch(expert, batch, meta, device)
            progress.update(len(batch))
            batch = []
    if batch:
        yield _embed_batch(expert, batch, meta, device)
        progress.update(len(batch))
    progress.close()


def _embed_batch(expert, batch, meta, device):
    keys = torch.tensor([int(key) for key, _, _ in batch])
    labels = torch.tensor([label for _, _, label in batch])
    x = normalise(torch.stack([image for _, image, _ in batch]), meta.mean, meta.std)
    with torch.no_grad():
        return keys, labels, embed(expert, x.to(device)).cpu()


def compute_weights(config: RunConfig, meta, url: str, settings: dict,
                    use_ray: bool = False) -> torch.Tensor:
    """Kernel-density weights of every training sample (:mod:`ead_dist.weights`); published.

    Three passes over the train shards, each split among ``realgrad.workers`` Ray tasks (or run
    here without Ray): labels (nothing decoded), the expert's embeddings of the reference sample,
    then every sample's log density against its class's reference. The driver holds the
    reference embeddings and one number per sample, never the images. When the reference is the
    whole split (``weights.sample`` at least every class's size) the second pass has embedded
    every sample, and the densities are computed here without a third.
    """
    started = time.perf_counter()
    options = config.weights
    size, classes = meta.splits["train"].size, meta.num_classes
    groups = _shard_groups(shard_urls(config.data.url, meta, "train"),
                           shard_counts(meta, "train"), config.realgrad.workers)
    labels = torch.full((size,), -1, dtype=torch.int64)
    group_keys = []
    for keys, y in map_over_shards(config, use_ray, _labels_of, groups):
        labels[keys] = y
        group_keys.append(keys)
    generator = torch.Generator().manual_seed(options.seed)
    chosen = [reference_indices(torch.nonzero(labels == c).flatten(), options.sample, generator)
              for c in range(classes)]
    wanted = torch.cat(chosen).sort().values
    in_reference = torch.zeros(size, dtype=torch.bool)
    in_reference[wanted] = True
    # each task gets the reference keys its own shards hold (and its progress bar their count)
    parts = map_over_shards(config, use_ray, _embeddings_of,
                            [(urls, counts, keys[in_reference[keys]].sort().values)
                             for (urls, counts), keys in zip(groups, group_keys)])
    keys = torch.cat([part[0] for part in parts])
    y = torch.cat([part[1] for part in parts])
    z = torch.cat([part[2] for part in parts if len(part[0])])
    order = torch.argsort(keys)  # the reference in key order, however the shards were dealt
    keys, y, z = keys[order], y[order], z[order]
    reference = {c: (keys[y == c], z[y == c]) for c in range(classes) if (y == c).any()}
    bandwidths = {c: options.bandwidth or median_distance(ref_z)
                  for c, (_, ref_z) in reference.items()}
    log_p = torch.zeros(size, dtype=torch.float64)
    if len(wanted) == size:  # every class is its own reference: all embeddings are here
        for ref_keys, ref_z in reference.values():
            c = int(labels[ref_keys[0]])
            log_p[ref_keys] = log_density(ref_z, ref_z, bandwidths[c], ref_keys, ref_keys)
        passes = 2
    else:
        for part_keys, part_log_p in map_over_shards(config, use_ray, _log_densities_of,
                                                      groups, reference, bandwidths):
            log_p[part_keys] = part_log_p
        passes = 3
    weights = weights_from_log_density(log_p, labels, classes, options.temperature)
    storage.save_tensors(url, {"weights": weights, "log_density": log_p, "labels": labels}, {
        "settings": settings, "bandwidths": [bandwidths.get(c) for c in range(classes)],
        "reference_sizes": [len(part) for part in chosen], "tasks": len(groups),
        "passes": passes, "seconds": time.perf_counter() - started})
    log.info("weights: %d samples in %d shard group(s), max weight %.3g, %.1f s", size,
             len(groups), float(weights.max()), time.perf_counter() - started)
    return weights

"""Weights stage: per-sample weights of the training split (``weights.method``), once per run.

    RUN/weights/weights.safetensors   weights float32 [N train], indexed by sample index (the
                                      shard key); metadata: the settings, the expert checkpoint,
                                      each class's bandwidth and reference size

For now a Ray-free pass in this process, streaming the train shards three times: labels only
(no decoding), then the expert's embeddings of the reference sample (``weights.sample`` per
class, seeded), then every sample's embedding against its class's reference. It holds the
reference embeddings and one float per sample, not D. realgrad and DM call
:func:`ensure_weights`; the file is remade when its recorded settings differ from the run's.
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
from ..runtime import compute_device
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


def ensure_weights(config: RunConfig) -> Optional[str]:
    """The URL of the run's weights, computed first if absent or made under other settings."""
    url = planned_weights(config)
    if url is None:
        return None
    meta = read_meta(config.data.url)
    wanted = _settings(config, meta)
    if storage.exists(url):
        if storage.load_metadata(url).get("settings") == wanted:
            return url
        log.warning("weights at %s were made with other settings: recomputing", url)
    compute_weights(config, meta, url, wanted)
    return url


def load_weights(url: Optional[str]) -> Optional[torch.Tensor]:
    return None if url is None else storage.load_tensors(url)[0]["weights"]


def _embeddings(expert, urls, meta, select, batch_size, device):
    """(keys [B], labels [B], embeddings [B, d]) batch by batch over the selected samples."""
    batch: list = []
    for sample in classification_samples(urls, image_shape=meta.image_shape,
                                         num_classes=meta.num_classes, split_nodes=False,
                                         select=select):
        batch.append(sample)
        if len(batch) == batch_size:
            yield _embed_batch(expert, batch, meta, device)
            batch = []
    if batch:
        yield _embed_batch(expert, batch, meta, device)


def _embed_batch(expert, batch, meta, device):
    keys = torch.tensor([int(key) for key, _, _ in batch])
    labels = torch.tensor([label for _, _, label in batch])
    x = normalise(torch.stack([image for _, image, _ in batch]), meta.mean, meta.std)
    with torch.no_grad():
        return keys, labels, embed(expert, x.to(device)).cpu()


def compute_weights(config: RunConfig, meta, url: str, settings: dict) -> torch.Tensor:
    """Kernel-density weights of every training sample (:mod:`ead_dist.weights`); published."""
    started = time.perf_counter()
    options = config.weights
    device = compute_device(config.ray.use_gpu)
    urls = shard_urls(config.data.url, meta, "train")
    size, classes = meta.splits["train"].size, meta.num_classes
    labels = torch.full((size,), -1, dtype=torch.int64)
    for sample in raw_samples(urls, split_nodes=False,  # labels only: nothing decoded
                              counts=shard_counts(meta, "train")):
        labels[int(sample["__key__"])] = classification_label(sample, classes)
    generator = torch.Generator().manual_seed(options.seed)
    chosen = [reference_indices(torch.nonzero(labels == c).flatten(), options.sample, generator)
              for c in range(classes)]
    wanted = {int(i) for part in chosen for i in part}
    expert = final_expert(config, meta).to(device)
    reference = {c: ([], []) for c in range(classes)}
    for keys, y, z in _embeddings(expert, urls, meta, lambda key: int(key) in wanted,
                                  options.batch_size, device):
        for c in torch.unique(y).tolist():
            reference[c][0].append(keys[y == c])
            reference[c][1].append(z[y == c])
    reference = {c: (torch.cat(k), torch.cat(z)) for c, (k, z) in reference.items() if k}
    bandwidths = {c: options.bandwidth or median_distance(z) for c, (_, z) in reference.items()}
    log_p = torch.zeros(size, dtype=torch.float64)
    progress = progress_bar("weights", total=size, unit="sample")
    for keys, y, z in _embeddings(expert, urls, meta, None, options.batch_size, device):
        for c in torch.unique(y).tolist():
            mask = y == c
            ref_keys, ref_z = reference[c]
            log_p[keys[mask]] = log_density(z[mask], ref_z, bandwidths[c], keys[mask], ref_keys)
        progress.update(len(keys))
    progress.close()
    weights = weights_from_log_density(log_p, labels, classes, options.temperature)
    storage.save_tensors(url, {"weights": weights}, {
        "settings": settings, "bandwidths": [bandwidths.get(c) for c in range(classes)],
        "reference_sizes": [len(part) for part in chosen],
        "seconds": time.perf_counter() - started})
    log.info("weights: %d samples, max weight %.3g, %.1f s", size, float(weights.max()),
             time.perf_counter() - started)
    return weights

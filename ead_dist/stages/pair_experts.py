"""Experts on image-caption pairs: open_clip's dual encoder trained with its contrastive loss.

The same stage as for classification (``stages/experts.py`` runs it, with the same actors,
resume and index), the same checkpoint files (``expert-NNN/step-SSSSSS.safetensors``, theta_t
by name, eta_t and the step in the metadata) and the same SGD loop (``trajectory_of``): only
the batch loss and the data differ. ``trajectory.json`` records held-out retrieval recall
(``test_recall``) where classification records test accuracy.
"""

from __future__ import annotations

import logging
import time

import torch

from .. import storage
from ..config import RunConfig
from ..data.meta import read_meta
from ..data.pairs import Pairs, load_pairs
from ..measure import peak_memory_mb
from ..metrics import MetricsLog
from ..models.dual_encoder import build_dual_encoder
from ..retrieval import model_recall
from ..runtime import compute_device
from ..trajectory import steps_per_epoch, trajectory_of
from .experts import METRIC_SAMPLES, _last_checkpoint, checkpoint_name, expert_dir

log = logging.getLogger(__name__)


def pair_model(config: RunConfig, image_size: int) -> torch.nn.Module:
    settings = config.image_text
    return build_dual_encoder(settings.model, image_size, settings.context_length,
                              settings.pretrained)


def load_train_pairs(config: RunConfig) -> Pairs:
    return load_pairs(config.data.url, config.image_text, "train",
                      limit=config.image_text.train_pairs)


def train_one_pair_expert(config: RunConfig, expert: int, pairs: Pairs | None = None) -> dict:
    """Train (or finish) expert ``expert`` on pairs; returns its trajectory record."""
    directory = expert_dir(config.run, expert)
    done_url = storage.join(directory, "trajectory.json")
    if storage.exists(done_url):
        return storage.read_json(done_url)
    started = time.perf_counter()
    meta = read_meta(config.data.url)
    pairs = pairs or load_train_pairs(config)
    images, tokens = pairs.images, pairs.tokens
    seed = config.experts.seed * 1000 + expert
    if config.experts.train_samples and config.experts.train_samples < len(tokens):
        subset = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
        subset = subset[: config.experts.train_samples]
        images, tokens = images[subset], tokens[subset]
    torch.manual_seed(seed)
    model = pair_model(config, meta.image_shape[1])
    device = compute_device(config.ray.use_gpu)
    model.to(device)
    images, tokens = images.to(device), tokens.to(device)

    def batch_loss(net: torch.nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        batch = batch.to(device)
        return net(images[batch], tokens[batch])

    start = _last_checkpoint(directory)
    metrics = MetricsLog(directory)
    if start is not None:
        log.info("expert %d: resuming at step %d", expert, start.step)
        metrics.truncate("step", start.step + 1)
    per_epoch = steps_per_epoch(len(tokens), config.experts.batch_size)
    for checkpoint in trajectory_of(
        model, len(tokens), batch_loss, epochs=config.experts.epochs, lr=config.experts.lr,
        batch_size=config.experts.batch_size, save_every=config.experts.save_every, seed=seed,
        start=start,
    ):
        with torch.no_grad():
            model.eval()
            loss = float(model(images[:METRIC_SAMPLES], tokens[:METRIC_SAMPLES]))
            model.train()
        recall = model_recall(model, images[:METRIC_SAMPLES], tokens[:METRIC_SAMPLES], ks=(1,))
        metrics.log(step=checkpoint.step, epoch=round(checkpoint.step / per_epoch, 3),
                    loss=loss, train_recall=recall,
                    seconds=round(time.perf_counter() - started, 2))
        metrics.publish()
        storage.save_tensors(
            storage.join(directory, checkpoint_name(checkpoint.step)), checkpoint.params,
            {"step": checkpoint.step, "lr": checkpoint.lr, "expert": expert,
             "model": config.image_text.model},
        )
    test = load_pairs(config.data.url, config.image_text, "test",
                      limit=config.image_text.test_pairs, meta=meta)
    steps = sorted(int(u.rsplit("step-", 1)[1].split(".")[0])
                   for u in storage.list_files(directory, "step-*.safetensors"))
    record = {
        "expert": expert,
        "checkpoints": [{"step": s, "file": f"expert-{expert:03d}/{checkpoint_name(s)}",
                         "lr": config.experts.lr} for s in steps],
        "train_samples": len(tokens),
        "test_recall": model_recall(model, test.images.to(device), test.tokens.to(device)),
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
    }
    storage.publish_json(done_url, record)
    log.info("expert %d: %d checkpoints, held-out recall %s", expert, len(steps),
             record["test_recall"])
    return record

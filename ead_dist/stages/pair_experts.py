"""Experts on image-caption pairs: open_clip's dual encoder trained with its contrastive loss.

The same stage as for classification (``stages/experts.py`` runs it, with the same actors,
resume and index), the same checkpoint files (``expert-NNN/step-SSSSSS.safetensors``, theta_t
by name, eta_t and the step in the metadata) and the same SGD loop (``trajectory_of``): only
the batch loss and the data differ. ``trajectory.json`` records held-out retrieval recall
(``test_recall``) where classification records test accuracy.
"""

from __future__ import annotations

import time

import torch

from .. import storage
from ..config import RunConfig
from ..data.meta import read_meta
from ..data.pairs import Pairs, load_pairs
from ..models.dual_encoder import build_dual_encoder
from ..retrieval import model_recall
from ..runtime import compute_device
from ..trajectory import steps_per_epoch, trajectory_of
from .experts import (
    METRIC_SAMPLES,
    expert_dir,
    expert_seed,
    finish_expert,
    record_checkpoint,
    resume_point,
    train_subset,
)

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
    seed = expert_seed(config, expert)
    subset = train_subset(config, expert, len(tokens))
    if subset is not None:
        images, tokens = images[subset], tokens[subset]
    torch.manual_seed(seed)
    model = pair_model(config, meta.image_shape[1])
    device = compute_device(config.ray.use_gpu)
    model.to(device)
    images, tokens = images.to(device), tokens.to(device)

    def batch_loss(net: torch.nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        batch = batch.to(device)
        return net(images[batch], tokens[batch])

    start, metrics = resume_point(directory, expert)
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
        record_checkpoint(directory, metrics, checkpoint, expert, config.image_text.model,
                          epoch=round(checkpoint.step / per_epoch, 3), loss=loss,
                          train_recall=recall, seconds=round(time.perf_counter() - started, 2))
    test = load_pairs(config.data.url, config.image_text, "test",
                      limit=config.image_text.test_pairs, meta=meta)
    recall = model_recall(model, test.images.to(device), test.tokens.to(device))
    return finish_expert(config, expert, len(tokens), started, {"test_recall": recall})

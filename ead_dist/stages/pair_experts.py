"""Experts on image-caption pairs: open_clip's dual encoder trained with its contrastive loss.

The same stage as for classification (``stages/experts.py`` runs it, with the same actors,
resume and index), the same checkpoint files (``expert-NNN/step-SSSSSS.safetensors``, theta_t
by name, eta_t and the step in the metadata) and the same SGD loop (``trajectory.sgd_steps``):
only the batch loss and the data differ. ``trajectory.json`` records held-out retrieval recall
(``test_recall``) where classification records test accuracy.

``image_text.expert_data`` says where an expert's batches come from: ``memory``, the
``train_pairs`` decoded pairs held as tensors and reshuffled every epoch (exact resume); or
``stream``, read from the shards as open_clip trains (resampled shards, a shuffle buffer), so
an expert holds one buffer however large the data; its train loss and recall are measured on
the first pairs of the train split, and a resumed expert continues on a fresh order.
"""

from __future__ import annotations

import time

import torch

from .. import storage
from ..config import RunConfig
from ..data.meta import read_meta
from ..data.pairs import Pairs, load_pairs, train_batches
from ..models.dual_encoder import build_dual_encoder
from ..retrieval import model_recall
from ..runtime import compute_device
from ..trajectory import sgd_steps, step_augmentation, steps_per_epoch, trajectory_of
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


def load_train_pairs(config: RunConfig) -> Pairs | None:
    """The pairs every expert trains on, held in memory; None when experts stream them."""
    if config.image_text.expert_data == "stream":
        return None
    return load_pairs(config.data.url, config.image_text, "train",
                      limit=config.image_text.train_pairs)


def epoch_pairs(config: RunConfig, meta) -> int:
    """A streamed expert's epoch: ``image_text.train_pairs``, else the train split's expected
    size (the pairs outside the held-out hash fraction)."""
    if config.image_text.train_pairs:
        return config.image_text.train_pairs
    total = sum(split.size for split in meta.splits.values())
    return max(1, round(total * (1 - config.image_text.held_out)))


def train_one_pair_expert(config: RunConfig, expert: int, pairs: Pairs | None = None) -> dict:
    """Train (or finish) expert ``expert`` on pairs held in memory or streamed from the shards
    (``image_text.expert_data``); returns its trajectory record."""
    directory = expert_dir(config.run, expert)
    done_url = storage.join(directory, "trajectory.json")
    if storage.exists(done_url):
        return storage.read_json(done_url)
    started = time.perf_counter()
    meta = read_meta(config.data.url)
    seed = expert_seed(config, expert)
    torch.manual_seed(seed)
    model = pair_model(config, meta.image_shape[1])
    device = compute_device(config.ray.use_gpu)
    model.to(device)
    start, metrics = resume_point(directory, expert)
    settings = config.experts
    strategy = config.image_text.augmentation
    if config.image_text.expert_data == "stream":
        size = epoch_pairs(config, meta)
        # A resumed expert draws a fresh order (seeded by its step): a stream cannot seek.
        batches = train_batches(config.data.url, config.image_text, settings.batch_size,
                                seed * 1_000_003 + (start.step if start else 0), meta)

        def step_loss(net: torch.nn.Module, step: int) -> torch.Tensor:
            images, tokens = next(batches)
            return net(step_augmentation(images.to(device), strategy, seed, step),
                       tokens.to(device))

        steps = sgd_steps(model, step_loss, settings.epochs * steps_per_epoch(
            size, settings.batch_size), lr=settings.lr, save_every=settings.save_every,
            start=start)
        probe = load_pairs(config.data.url, config.image_text, "train", limit=METRIC_SAMPLES,
                           meta=meta)
        probe_images, probe_tokens = probe.images.to(device), probe.tokens.to(device)
    else:
        pairs = pairs or load_train_pairs(config)
        images, tokens = pairs.images, pairs.tokens
        subset = train_subset(config, expert, len(tokens))
        if subset is not None:
            images, tokens = images[subset], tokens[subset]
        images, tokens = images.to(device), tokens.to(device)
        size = len(tokens)

        def batch_loss(net: torch.nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
            batch = batch.to(device)
            return net(step_augmentation(images[batch], strategy, seed, step), tokens[batch])

        steps = trajectory_of(model, size, batch_loss, epochs=settings.epochs, lr=settings.lr,
                              batch_size=settings.batch_size, save_every=settings.save_every,
                              seed=seed, start=start)
        probe_images, probe_tokens = images[:METRIC_SAMPLES], tokens[:METRIC_SAMPLES]
    per_epoch = steps_per_epoch(size, settings.batch_size)
    for checkpoint in steps:
        with torch.no_grad():
            model.eval()
            loss = float(model(probe_images, probe_tokens))
            model.train()
        recall = model_recall(model, probe_images, probe_tokens, ks=(1,))
        record_checkpoint(directory, metrics, checkpoint, expert, config.image_text.model,
                          epoch=round(checkpoint.step / per_epoch, 3), loss=loss,
                          train_recall=recall, seconds=round(time.perf_counter() - started, 2))
    test = load_pairs(config.data.url, config.image_text, "test",
                      limit=config.image_text.test_pairs, meta=meta)
    recall = model_recall(model, test.images.to(device), test.tokens.to(device))
    return finish_expert(config, expert, size, started, {"test_recall": recall})

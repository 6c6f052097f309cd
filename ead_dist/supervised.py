"""Train a classifier on a tensor set (hard or soft labels) and measure its accuracy.

The protocol is the dataset-distillation evaluation's (DC/DSA/MTT `evaluate_synset`): SGD with
momentum 0.9 and weight decay 5e-4, lr 0.01, batch 256, one learning-rate step at the middle of
training, DSA on every training batch with per-sample parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ead_dist.augment import augment

# Factor on the lr after the first epochs // 2 + 1 epochs. The DC/DSA/MTT code multiplies by
# 0.1 at that point ("tenth"); this project's protocol names halving ("halve").
LR_SCHEDULES = {"halve": 0.5, "tenth": 0.1, "constant": 1.0}


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augmentation: str | None = None,
    seed: int = 0,
    lr_schedule: str = "halve",
    callback: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train model in place on (images, targets) and return it.

    targets are int64 class indices [N] or float probabilities [N, K] (soft cross-entropy,
    -sum_k y_k log softmax(f(x))_k, which for one-hot rows equals the hard loss). augmentation
    is a DSA strategy string (one op per batch, per-sample values) or None. seed fixes the
    shuffling and the augmentation draws; the model's initialisation is the caller's. The first
    epochs // 2 + 1 epochs run at lr, the rest at lr * LR_SCHEDULES[lr_schedule] (momentum
    carries over; DC's code starts a fresh optimizer there).
    callback(epoch, mean_loss) runs after every epoch; progress shows a tqdm bar over epochs.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {lr_schedule!r}")
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
    if targets.dim() == 1:
        if targets.dtype != torch.int64:
            raise ValueError(f"hard targets must be int64 class indices, got {targets.dtype}")
    elif targets.dim() != 2 or not targets.is_floating_point():
        raise ValueError(
            f"targets must be int64 [N] or float [N, K], got {targets.dtype} {tuple(targets.shape)}"
        )

    device = _device_of(model)
    images = images.to(device)
    targets = targets.to(device)
    # A CPU generator keeps shuffling and augmentation identical on every device.
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    n = images.shape[0]

    model.train()
    for epoch in tqdm(range(epochs), disable=not progress, desc="train", unit="epoch"):
        if epoch == epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] = lr * LR_SCHEDULES[lr_schedule]
        order = torch.randperm(n, generator=generator).to(device)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            batch = images[index]
            if augmentation is not None:
                batch = augment(batch, augmentation, generator)
            # cross_entropy takes class indices or class probabilities alike.
            loss = F.cross_entropy(model(batch), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * index.shape[0]
        if callback is not None:
            callback(epoch, total_loss / max(n, 1))
    return model


@torch.no_grad()
def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1024,
) -> float:
    """Fraction of images whose argmax logit is their int64 label, in eval mode."""
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            predicted = model(batch).argmax(dim=1).cpu()
            correct += int((predicted == labels[start : start + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / images.shape[0]

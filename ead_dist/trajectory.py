"""Expert training with plain SGD, yielding the trajectory {(theta_t, eta_t)} it walks.

Pure: tensors in, checkpoints out; the experts stage stores them. The data order and the
augmentation of every step are functions of (seed, step), so a trajectory resumed from any
recorded checkpoint continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .augment import augment
from .effect import cross_entropy, parameters_of


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]
    lr: float  # eta_t: the step size used from this checkpoint on


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return max(1, num_samples // batch_size)  # drop the ragged last batch: equal step sizes


# (model, indices of the batch, step) -> the batch's mean loss
BatchLoss = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


def step_augmentation(images: torch.Tensor, strategy: Optional[str], seed: int,
                      step: int) -> torch.Tensor:
    """An expert's batch at ``step`` under the DSA ``strategy`` (None: as it is), drawn per
    image from (seed, step), so that a resumed expert repeats its draws."""
    if not strategy:
        return images
    return augment(images, strategy, torch.Generator().manual_seed(seed * 1_000_003 + step))


def sgd_trajectory(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    save_every: int,
    seed: int,
    augmentation: Optional[str] = None,
    start: Optional[Checkpoint] = None,
) -> Iterator[Checkpoint]:
    """Train the classifier ``model`` in place on (images, labels) with cross-entropy; yield
    theta_0, every ``save_every``-th step and the last one (see :func:`trajectory_of`)."""

    def batch_loss(net: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        batch = batch.to(images.device)
        return cross_entropy(net(step_augmentation(images[batch], augmentation, seed, step)),
                             labels[batch])

    return trajectory_of(model, len(labels), batch_loss, epochs=epochs, lr=lr,
                         batch_size=batch_size, save_every=save_every, seed=seed, start=start)


def trajectory_of(
    model: nn.Module,
    num_samples: int,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    save_every: int,
    seed: int,
    start: Optional[Checkpoint] = None,
) -> Iterator[Checkpoint]:
    """Train ``model`` in place with plain SGD on ``batch_loss`` over reshuffled epochs of
    ``num_samples`` samples; yield theta_0, every ``save_every``-th step and the last one.

    With ``start`` the model resumes from that checkpoint (which is not yielded again).
    """
    per_epoch = steps_per_epoch(num_samples, batch_size)

    def step_loss(net: nn.Module, step: int) -> torch.Tensor:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(
            seed * 100_003 + epoch))
        return batch_loss(net, order[offset * batch_size : (offset + 1) * batch_size], step)

    return sgd_steps(model, step_loss, epochs * per_epoch, lr=lr, save_every=save_every,
                     start=start)


def sgd_steps(
    model: nn.Module,
    step_loss: Callable[[nn.Module, int], torch.Tensor],
    total_steps: int,
    *,
    lr: float,
    save_every: int,
    start: Optional[Checkpoint] = None,
) -> Iterator[Checkpoint]:
    """``total_steps`` plain SGD steps on ``step_loss(model, step)`` (the step's batch loss,
    wherever its batch comes from: an index batch of tensors in memory, or the next batch of a
    stream); yields theta_0, every ``save_every``-th step and the last one. With ``start`` the
    model resumes from that checkpoint (not yielded again)."""
    first_step = 0
    if start is not None:
        model.load_state_dict(start.params, strict=False)
        first_step = start.step
    else:
        yield Checkpoint(0, parameters_of(model), lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # stateless: resume is exact
    model.train()
    for step in range(first_step, total_steps):
        loss = step_loss(model, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"expert loss became {loss.item()} at step {step}; lower "
                                     "experts.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % save_every == 0 or step + 1 == total_steps:
            yield Checkpoint(step + 1, parameters_of(model), lr)

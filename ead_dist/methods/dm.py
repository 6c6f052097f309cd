"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network and, per class c, a real batch R_c; the
real and the synthetic images of the class go through one DSA draw (siamese), and the loss is
Eq. 4 of the paper with the embedding psi = the features before the classifier:

    L(S) = sum_c || mean_{x in R_c} psi(x) - mean_{s in S_c} psi(s) ||^2

SGD with momentum 0.5 steps the images (DM's lr 1.0 for ConvNet); labels stay hard.

The real side, mean_{x in R_c} psi(x) at iteration i, does not depend on S. It comes from one
of two places (``distill.dm_real``):

- ``loop`` (:class:`InLoopRealMeans`): the training split is held in memory and R_c embedded
  every iteration, as the paper's code does; the loop reads D.
- ``realgrad`` (:class:`CachedRealMeans`): the realgrad pass (:mod:`ead_dist.stages.dm_real`)
  replays every iteration's draws over the shards, data-parallel, and stores the means; the
  loop then reads no real data, like EAD's coordinator. Both sides replay the same draws
  (:func:`draw_iteration`), so the sets agree up to float rounding.

With per-sample weights w (``weights.method``, :mod:`ead_dist.weights`) the real class mean
estimates sum_i w_i psi(x_i) / sum_i w_i over the class in one of two ways
(``distill.weighted_batches``): ``mean``, the weighted mean over a uniformly drawn R_c; or
``resample``, the plain mean over an R_c drawn with replacement with probability proportional
to w (importance resampling), which keeps every drawn sample when a few hold most of the
weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from ..augment import AugmentParams, apply_augmentation, sample_augmentation
from ..models.embedding import embed
from ..synthetic import SyntheticSet
from .image_sgd import (ImageSGD, RealByClass, fresh_network, iteration_generator,
                        resampled_positions)

LR_IMAGES = 1.0  # DM's lr_img for ConvNet


def mean_embedding(embedded: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """mean psi over a batch [B, d], or sum_i w_i psi_i / sum_i w_i with ``weights`` [B]."""
    if weights is None:
        return embedded.mean(0)
    w = weights.to(embedded)
    return (w.unsqueeze(1) * embedded).sum(0) / w.sum()


def distribution_matching_loss(embedded_real: Tensor, embedded_synthetic: Tensor,
                               real_weights: Optional[Tensor] = None) -> Tensor:
    """|| mean psi(real) - mean psi(synthetic) ||^2 for one class (one term of Eq. 4); with
    ``real_weights`` [B] the real mean is the weighted one."""
    return ((mean_embedding(embedded_real, real_weights) - embedded_synthetic.mean(0)) ** 2).sum()


@dataclass
class IterationDraws:
    """What iteration i draws: its network and, per class, the positions of the real batch in
    that class's member list (None where resampled batches were drawn without the weights)
    and one DSA draw (None without augmentation)."""

    network: nn.Module
    picks: list[Optional[Tensor]]
    params: list[Optional[AugmentParams]]


def draw_iteration(make_network: Callable[[], nn.Module], seed: int, iteration: int,
                   class_sizes: list[int], batch_size: int, strategy: Optional[str],
                   image_size: tuple[int, int], device: torch.device | str,
                   resampled: bool = False,
                   class_weights: Optional[list[Tensor]] = None) -> IterationDraws:
    """The draws of iteration ``iteration``, a function of (seed, iteration, class sizes) only:
    the network, then per class a batch of up to ``batch_size`` member positions (without
    replacement) and one DSA draw for the whole class (real and synthetic alike).

    ``resampled``: each class's batch is ``batch_size`` positions drawn with replacement in
    proportion to ``class_weights[c]`` (its members' weights, in member order), from a stream
    of its own seeded by the iteration's generator. The network and the DSA draws are then the
    same with or without the weights, so a loop on cached means replays them without
    ``class_weights`` (its picks are None)."""
    if class_weights is not None and not resampled:
        raise ValueError("class_weights are for resampled draws")
    generator = iteration_generator(seed, iteration)
    network = fresh_network(make_network, generator, device)
    network.requires_grad_(False)  # only the images learn
    picks: list[Optional[Tensor]] = []
    params = []
    for c, size in enumerate(class_sizes):
        if not resampled:
            picks.append(torch.randperm(size, generator=generator)[:batch_size])
        else:
            stream = torch.Generator().manual_seed(
                int(torch.randint(2**62, (1,), generator=generator)))
            picks.append(None if class_weights is None
                         else resampled_positions(class_weights[c], batch_size, stream))
        params.append(sample_augmentation(strategy, 1, generator, image_size, device,
                                          per_sample=False) if strategy else None)
    return IterationDraws(network, picks, params)


def augmented(images: Tensor, params: Optional[AugmentParams]) -> Tensor:
    return images if params is None else apply_augmentation(images, params)


class RealMeans(Protocol):
    """The real side of DM: per-class mean embeddings [C, d] of an iteration's real batches.
    ``resampled``: its batches are drawn in proportion to the weights; ``class_weights``: the
    weights those draws need, where this side draws them (None otherwise)."""

    class_sizes: list[int]
    resampled: bool
    class_weights: Optional[list[Tensor]]

    def __call__(self, iteration: int, draws: IterationDraws) -> Tensor: ...


class InLoopRealMeans:
    """Embeds each iteration's real batches from the training split held in memory. With
    ``real_weights``: weighted means of uniform batches, or with ``resample`` plain means of
    batches drawn in proportion to the weights."""

    def __init__(self, real_images: Tensor, real_labels: Tensor, num_classes: int,
                 real_weights: Optional[Tensor] = None, device: torch.device | str = "cpu",
                 resample: bool = False):
        self.real = RealByClass(real_images, real_labels, num_classes, real_weights, device,
                                resample)
        self.class_sizes = [len(m) for m in self.real.members]
        self.resampled = resample
        self.class_weights = self.real.draw_weights

    def __call__(self, iteration: int, draws: IterationDraws) -> Tensor:
        means = []
        for members, picks, params in zip(self.real.members, draws.picks, draws.params):
            if picks is None:
                raise ValueError("these draws hold no real batches (drawn without the weights)")
            rows = members[picks].to(self.real.images.device)
            with torch.no_grad():
                embedded = embed(draws.network, augmented(self.real.images[rows], params))
            means.append(mean_embedding(embedded, self.real.weights_of(rows)))
        return torch.stack(means)


class CachedRealMeans:
    """Reads each iteration's real class means from the realgrad pass's tensor [I, C, d]
    (``resampled`` as the pass drew them: the loop's network and DSA draws depend on it)."""

    class_weights = None  # the pass drew the real batches

    def __init__(self, means: Tensor, class_sizes: list[int], device: torch.device | str = "cpu",
                 resampled: bool = False):
        self.means, self.class_sizes = means.to(device), list(class_sizes)
        self.resampled = resampled

    def __call__(self, iteration: int, draws: IterationDraws) -> Tensor:
        if iteration >= len(self.means):
            raise ValueError(f"iteration {iteration}: the cached DM real means cover "
                             f"{len(self.means)} iterations; rerun realgrad")
        return self.means[iteration]


class DistributionMatching:
    """One DM optimisation of S; ``step(i)`` runs iteration i (the coordinator's interface)."""

    def __init__(self, make_network: Callable[[], nn.Module], synthetic: SyntheticSet,
                 real_images: Optional[Tensor] = None, real_labels: Optional[Tensor] = None, *,
                 real_means: Optional[RealMeans] = None, lr_images: float = LR_IMAGES,
                 real_batch_size: int = 256, augmentation: Optional[str] = None, seed: int = 0,
                 device: torch.device | str = "cpu", real_weights: Optional[Tensor] = None,
                 resample: bool = False):
        """The real side is ``real_means``, or else the split (``real_images``,
        ``real_labels``, optionally ``real_weights``, ``resample``) embedded in the loop."""
        self.make_network, self.device = make_network, device
        self.descent = ImageSGD(synthetic, lr_images, momentum=0.5, device=device)
        if real_means is None:
            if real_images is None or real_labels is None:
                raise ValueError("DM needs real_means or the real images and labels")
            real_means = InLoopRealMeans(real_images, real_labels, self.descent.num_classes,
                                         real_weights, device, resample)
        self.real_means = real_means
        self.real_batch_size, self.augmentation, self.seed = real_batch_size, augmentation, seed

    @property
    def synthetic(self) -> SyntheticSet:
        return self.descent.synthetic

    def draws(self, iteration: int) -> IterationDraws:
        return draw_iteration(self.make_network, self.seed, iteration,
                              self.real_means.class_sizes, self.real_batch_size,
                              self.augmentation, tuple(self.descent.images.shape[-2:]),
                              self.device, self.real_means.resampled,
                              self.real_means.class_weights)

    def loss(self, iteration: int) -> Tensor:
        """Eq. 4 at iteration ``iteration`` (a graph to the synthetic images)."""
        draws = self.draws(iteration)
        real = self.real_means(iteration, draws)
        images = self.descent.training_images()
        total = images.new_zeros(())
        for c, members in enumerate(self.descent.class_members):
            synthetic = augmented(images[members], draws.params[c])
            total = total + ((real[c] - embed(draws.network, synthetic).mean(0)) ** 2).sum()
        return total

    def step(self, iteration: int) -> float:
        return self.descent.update(self.loss(iteration), iteration, "dm")

    def state(self) -> dict[str, Tensor]:
        return self.descent.state()

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.descent.load_state(tensors)

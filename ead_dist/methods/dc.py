"""DC with DSA: gradient matching (Zhao, Mopuri & Bilen, ICLR 2021; Zhao & Bilen, ICML 2021).

Every iteration draws a freshly initialised network and runs ``outer_loop`` rounds. Each
round, per class c, a real batch R_c and the synthetic images S_c go through one DSA draw
(siamese), and the images take one SGD step down

    L(S) = sum_c d( grad_theta CE(S_c), grad_theta CE(R_c) )

with DC's distance d: per layer, the sum over output channels of 1 - cos between the two
gradients, 1-D parameters (biases, norm scales) left out. Between rounds the network trains
``inner_loop`` epochs on S (with DSA, per sample), so later rounds match at states that
training on S reaches. Labels stay hard. It reads real data every iteration.

With per-sample weights w (``weights.method``, :mod:`ead_dist.weights`) the real batch's loss
is the weighted mean sum_i w_i CE_i / sum_i w_i, as in EAD's real terms and DM's class means;
or, with ``resample`` (``distill.weighted_batches: resample``), the plain mean over a batch
drawn with replacement in proportion to w.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..alignment import gradient_distance
from ..augment import augment
from ..coordinator import DivergedError
from ..synthetic import SyntheticSet
from .image_sgd import (
    ImageSGD,
    RealByClass,
    fresh_network,
    iteration_generator,
    siamese_augment,
)

LR_IMAGES = 0.1  # DC/DSA's lr_img
# DC's (outer_loop, inner_loop) by images per class (its get_loops).
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
TRAIN_BATCH_SIZE = 256  # DC's batch_train: the batch of the inner loop's epochs on S


def loops_for(ipc: int) -> tuple[int, int]:
    if ipc not in LOOPS:
        raise ValueError(f"DC defines outer/inner loops for ipc in {sorted(LOOPS)}, not {ipc}: "
                         "set distill.outer_loop and distill.inner_loop")
    return LOOPS[ipc]


def matching_distance(g_synthetic: list[Tensor], g_real: list[Tensor]) -> Tensor:
    """DC's distance: sum over parameters of sum over output channels (the first dimension)
    of 1 - cos(g_synthetic[c], g_real[c]); 1-D parameters count 0 (alignment's
    ``layer_cosine``, given per-parameter gradients)."""
    layout = [(str(i), tuple(g.shape)) for i, g in enumerate(g_real)]
    return gradient_distance(torch.cat([g.flatten() for g in g_synthetic]),
                             torch.cat([g.flatten() for g in g_real]), layout, "layer_cosine")


def real_loss(logits: Tensor, label: int, weights: Optional[Tensor] = None) -> Tensor:
    """Cross-entropy of a real batch of one class: its mean, or with ``weights`` [B] the
    weighted mean sum_i w_i CE_i / sum_i w_i."""
    target = torch.full((len(logits),), label, device=logits.device)
    if weights is None:
        return F.cross_entropy(logits, target)
    w = weights.to(logits.dtype)
    return (w * F.cross_entropy(logits, target, reduction="none")).sum() / w.sum()


class GradientMatching:
    """One DC/DSA optimisation of S; ``step(i)`` runs iteration i (the coordinator's interface)."""

    def __init__(self, make_network: Callable[[], nn.Module], synthetic: SyntheticSet,
                 real_images: Tensor, real_labels: Tensor, *, outer_loop: int, inner_loop: int,
                 lr_images: float = LR_IMAGES, lr_net: float = 0.01, real_batch_size: int = 256,
                 augmentation: Optional[str] = None, seed: int = 0,
                 real_weights: Optional[Tensor] = None, device: torch.device | str = "cpu",
                 resample: bool = False):
        self.make_network, self.device = make_network, device
        self.descent = ImageSGD(synthetic, lr_images, momentum=0.5, device=device)
        self.real = RealByClass(real_images, real_labels, self.descent.num_classes, real_weights,
                                device, resample)
        self.outer_loop, self.inner_loop, self.lr_net = outer_loop, inner_loop, lr_net
        self.real_batch_size, self.augmentation, self.seed = real_batch_size, augmentation, seed

    @property
    def synthetic(self) -> SyntheticSet:
        return self.descent.synthetic

    def matching_loss(self, network: nn.Module, generator: torch.Generator) -> Tensor:
        """sum_c d(g_S_c, g_R_c) at the network's current weights (a graph to the images)."""
        parameters = list(network.parameters())
        images = self.descent.training_images()
        total = images.new_zeros(())
        for c, members in enumerate(self.descent.class_members):
            rows = self.real.draw(c, self.real_batch_size, generator)
            real, synthetic = siamese_augment(self.real.images[rows], images[members],
                                              self.augmentation, generator)
            g_real = torch.autograd.grad(real_loss(network(real), c, self.real.weights_of(rows)),
                                         parameters)
            g_synthetic = torch.autograd.grad(
                F.cross_entropy(network(synthetic), self.descent.classes[members]), parameters,
                create_graph=True)
            total = total + matching_distance(g_synthetic, [g.detach() for g in g_real])
        return total

    def train_on_synthetic(self, network: nn.Module, optimizer: torch.optim.Optimizer,
                           generator: torch.Generator) -> None:
        """``inner_loop`` epochs of SGD on S (fixed images, hard labels), DSA per sample."""
        images, classes = self.descent.training_images().detach(), self.descent.classes
        for _ in range(self.inner_loop):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            for start in range(0, len(images), TRAIN_BATCH_SIZE):
                batch = order[start:start + TRAIN_BATCH_SIZE]
                x = images[batch]
                if self.augmentation:
                    x = augment(x, self.augmentation, generator)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(network(x), classes[batch]).backward()
                optimizer.step()

    def step(self, iteration: int) -> float:
        """One outer iteration; the mean matching loss over its rounds. On divergence the
        images are put back as they were before the iteration, then DivergedError."""
        before = self.descent.state()
        generator = iteration_generator(self.seed, iteration)
        network = fresh_network(self.make_network, generator, self.device)
        optimizer = torch.optim.SGD(network.parameters(), lr=self.lr_net, momentum=0.5)
        losses = []
        try:
            for round_ in range(self.outer_loop):
                losses.append(self.descent.update(self.matching_loss(network, generator),
                                                  iteration, "dc"))
                if round_ < self.outer_loop - 1:
                    self.train_on_synthetic(network, optimizer, generator)
        except DivergedError:
            self.descent.load_state(before)
            raise
        return sum(losses) / len(losses)

    def state(self) -> dict[str, Tensor]:
        return self.descent.state()

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.descent.load_state(tensors)

"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network and, per class c, a real batch R_c; the
real and the synthetic images of the class go through one DSA draw (siamese), and the loss is
Eq. 4 of the paper with the embedding psi = the features before the classifier:

    L(S) = sum_c || mean_{x in R_c} psi(x) - mean_{s in S_c} psi(s) ||^2

SGD with momentum 0.5 steps the images (DM's lr 1.0 for ConvNet); labels stay hard. Unlike
EAD's coordinator it reads real data every iteration, so it holds the training split.

With per-sample weights w (``weights.method``, :mod:`ead_dist.weights`) the real class mean is
the weighted mean sum_i w_i psi(x_i) / sum_i w_i over the drawn batch R_c.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from ..models.embedding import embed
from ..synthetic import SyntheticSet
from .image_sgd import (
    ImageSGD,
    fresh_network,
    iteration_generator,
    real_indices,
    siamese_augment,
)

LR_IMAGES = 1.0  # DM's lr_img for ConvNet


def distribution_matching_loss(embedded_real: Tensor, embedded_synthetic: Tensor,
                               real_weights: Optional[Tensor] = None) -> Tensor:
    """|| mean psi(real) - mean psi(synthetic) ||^2 for one class (one term of Eq. 4); with
    ``real_weights`` [B] the real mean is the weighted one."""
    if real_weights is None:
        real_mean = embedded_real.mean(0)
    else:
        w = real_weights.to(embedded_real)
        real_mean = (w.unsqueeze(1) * embedded_real).sum(0) / w.sum()
    return ((real_mean - embedded_synthetic.mean(0)) ** 2).sum()


class DistributionMatching:
    """One DM optimisation of S; ``step(i)`` runs iteration i (the coordinator's interface)."""

    def __init__(self, make_network: Callable[[], nn.Module], synthetic: SyntheticSet,
                 real_images: Tensor, real_labels: Tensor, *, lr_images: float = LR_IMAGES,
                 real_batch_size: int = 256, augmentation: Optional[str] = None, seed: int = 0,
                 device: torch.device | str = "cpu", real_weights: Optional[Tensor] = None):
        self.make_network, self.device = make_network, device
        self.descent = ImageSGD(synthetic, lr_images, momentum=0.5, device=device)
        self.real_images = real_images.to(device)
        if real_weights is not None and len(real_weights) != len(real_images):
            raise ValueError(f"{len(real_weights)} weights for {len(real_images)} real images")
        self.real_weights = None if real_weights is None else real_weights.to(device)
        self.real_members = [torch.nonzero(real_labels.cpu() == c).flatten()
                             for c in range(self.descent.num_classes)]
        self.real_batch_size, self.augmentation, self.seed = real_batch_size, augmentation, seed

    @property
    def synthetic(self) -> SyntheticSet:
        return self.descent.synthetic

    def loss(self, iteration: int) -> Tensor:
        """Eq. 4 at iteration ``iteration`` (a graph to the synthetic images)."""
        generator = iteration_generator(self.seed, iteration)
        network = fresh_network(self.make_network, generator, self.device)
        network.requires_grad_(False)  # only the images learn
        total = self.descent.images.new_zeros(())
        for c, members in enumerate(self.descent.class_members):
            chosen = real_indices(self.real_members[c], self.real_batch_size,
                                  generator).to(self.real_images.device)
            real = self.real_images[chosen]
            weights = None if self.real_weights is None else self.real_weights[chosen]
            real, synthetic = siamese_augment(real, self.descent.images[members],
                                              self.augmentation, generator)
            with torch.no_grad():
                embedded_real = embed(network, real)
            total = total + distribution_matching_loss(embedded_real, embed(network, synthetic),
                                                       weights)
        return total

    def step(self, iteration: int) -> float:
        return self.descent.update(self.loss(iteration), iteration, "dm")

    def state(self) -> dict[str, Tensor]:
        return self.descent.state()

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.descent.load_state(tensors)

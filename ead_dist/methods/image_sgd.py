"""What DM and DC share: SGD on the synthetic images (labels stay hard), the real split held by
class with its per-sample weights, and the draws of one iteration, each a function of (seed,
iteration) so that a resumed run ends where an uninterrupted one does.

The draws: a freshly initialised network, a real batch of one class, and one DSA draw applied
to a real and a synthetic batch alike (siamese). No I/O: the real images come in as a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from ..augment import apply_augmentation, sample_augmentation
from ..coordinator import DivergedError
from ..formation import decode
from ..synthetic import SyntheticSet, hard_labelled


class ImageSGD:
    """The synthetic images under SGD with momentum, and their hard classes.

    ``images`` are the stored images that learn; with multi-formation (``formation`` f > 1,
    read from the set's shapes) each decodes to f^2 training images, which ``classes`` and
    ``class_members`` index and the losses see (``training_images()``)."""

    def __init__(self, synthetic: SyntheticSet, lr: float, momentum: float = 0.5,
                 device: torch.device | str = "cpu"):
        self.images = synthetic.images.to(device).clone().requires_grad_(True)
        self.formation = synthetic.formation
        self.classes = synthetic.classes.to(device)
        self.num_classes = synthetic.label_logits.shape[1]
        self.class_members = [torch.nonzero(self.classes == c).flatten()
                              for c in range(self.num_classes)]
        self.optimizer = torch.optim.SGD([self.images], lr=lr, momentum=momentum)

    def training_images(self) -> Tensor:
        """The images the losses see: the stored ones decoded (a graph to them)."""
        return decode(self.images, self.formation)

    @property
    def synthetic(self) -> SyntheticSet:
        return hard_labelled(self.images.detach().cpu().clone(), self.classes.cpu(),
                             self.num_classes)

    def update(self, loss: Tensor, iteration: int, method: str) -> float:
        """One SGD step on the images down ``loss``; DivergedError (before stepping) when the
        loss or its gradient is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss) or not torch.isfinite(self.images.grad).all():
            raise DivergedError(f"iteration {iteration}: the {method} loss or its gradient is not "
                                f"finite (loss {loss.item()}); lower distill.baseline_lr_images")
        self.optimizer.step()
        return float(loss.detach())

    def state(self) -> dict[str, Tensor]:
        tensors = {"images": self.images.detach().clone(), "classes": self.classes.clone()}
        momentum = self.optimizer.state.get(self.images, {}).get("momentum_buffer")
        if momentum is not None:
            tensors["momentum"] = momentum.detach().clone()
        return tensors

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(tensors["images"])
        self.optimizer.state.pop(self.images, None)
        if "momentum" in tensors:
            self.optimizer.state[self.images] = {
                "momentum_buffer": tensors["momentum"].to(self.images.device).clone()}


class RealByClass:
    """The real training images held in memory, indexed by class, with their per-sample weights
    as DC and DM use them: with ``resample`` each class's batches are drawn in proportion to its
    members' weights (``draw_weights[c]``, in member order) and averaged plainly; otherwise the
    batches are uniform and the loss weights each sample (``loss_weights``)."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int,
                 weights: Optional[Tensor] = None, device: torch.device | str = "cpu",
                 resample: bool = False):
        if weights is not None and len(weights) != len(images):
            raise ValueError(f"{len(weights)} weights for {len(images)} real images")
        if resample and weights is None:
            raise ValueError("resampled real batches need the real weights")
        self.images = images.to(device)
        self.members = [torch.nonzero(labels.cpu() == c).flatten() for c in range(num_classes)]
        self.draw_weights = [weights.cpu()[m] for m in self.members] if resample else None
        self.loss_weights = None if weights is None or resample else weights.to(device)

    def draw(self, c: int, size: int, generator: torch.Generator) -> Tensor:
        """Rows of a batch of class ``c`` (:func:`real_indices`), on the images' device."""
        weights = None if self.draw_weights is None else self.draw_weights[c]
        return real_indices(self.members[c], size, generator, weights).to(self.images.device)

    def weights_of(self, rows: Tensor) -> Optional[Tensor]:
        """The loss weights of those rows; None for plain means."""
        return None if self.loss_weights is None else self.loss_weights[rows]


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The CPU generator behind every draw of one iteration (the coordinator's scheme)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def fresh_network(make_network: Callable[[], nn.Module], generator: torch.Generator,
                  device: torch.device | str) -> nn.Module:
    """A newly initialised network whose weights depend on the generator only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return make_network().to(device)


def real_indices(members: Tensor, size: int, generator: torch.Generator,
                 weights: Optional[Tensor] = None) -> Tensor:
    """Up to ``size`` of ``members`` (indices of one class), drawn without replacement; with
    ``weights`` (one per member), ``size`` of them drawn with replacement, each with probability
    proportional to its weight (:func:`resampled_positions`)."""
    if weights is None:
        return members[torch.randperm(len(members), generator=generator)[:size]]
    return members[resampled_positions(weights, size, generator)]


def resampled_positions(weights: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """``size`` positions drawn with replacement, position j with probability w_j / sum w.

    The plain mean over such a batch estimates the weighted mean sum_j w_j x_j / sum_j w_j
    without bias, like the weighted mean of a uniform batch, but every drawn sample counts
    alike: when a few samples hold most of the weight, the uniform batch holds few of them and
    its weighted mean rests on those few."""
    if len(weights) == 0 or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
        raise ValueError("resampling needs non-negative weights with a positive total")
    return torch.multinomial(weights.detach().double().cpu(), size, replacement=True,
                             generator=generator)


def real_batch(real_images: Tensor, members: Tensor, size: int,
               generator: torch.Generator) -> Tensor:
    """Up to ``size`` real images of one class (``members`` its indices), drawn without
    replacement."""
    return real_images[real_indices(members, size, generator).to(real_images.device)]


def siamese_augment(real: Tensor, synthetic: Tensor, strategy: Optional[str],
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Both batches under one DSA draw (one value per op for the whole batch, so batches of
    different sizes share it); unchanged when ``strategy`` is None."""
    if not strategy:
        return real, synthetic
    params = sample_augmentation(strategy, 1, generator, tuple(synthetic.shape[-2:]),
                                 synthetic.device, per_sample=False)
    return apply_augmentation(real, params), apply_augmentation(synthetic, params)

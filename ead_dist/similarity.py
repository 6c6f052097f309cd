"""LoRS's learned similarity: the [N, N] targets of a pair set's contrastive loss.

CLIP's loss asks image i to match caption i alone (the identity as targets). LoRS learns the
targets beside the pairs, so that a synthetic pair can also teach how much it resembles the
others. Two forms, both starting at the identity and kept non-negative (a negative target
rewards a student for driving a probability to zero without bound; measured without it:
the trajectory loss went from 1.0 to 23 within 20 iterations, half of the entries negative):

- ``FullSimilarity``: every entry learned, N^2 parameters, projected onto non-negative
  matrices after each optimiser step.
- ``LowRankSimilarity``: ``diag(d) + L R^T`` with ``L``, ``R`` of shape [N, rank] (LoRS's
  low-rank form, a per-pair diagonal in place of its scalar), N (2 rank + 1) parameters,
  cut at zero when composed. ``L`` starts at zero and ``R`` small and random: the product is
  zero at the start, and ``L`` still gets a gradient (``R`` does not until ``L`` moves).

Pure tensor code; the coordinator owns the optimiser, ``stages/distill_pairs.py`` the files.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


class FullSimilarity:
    def __init__(self, matrix: Tensor):
        self.matrix = matrix.clone().requires_grad_(True)

    @classmethod
    def identity(cls, n: int, device: torch.device | str = "cpu") -> "FullSimilarity":
        return cls(torch.eye(n, device=device))

    def parameters(self) -> list[Tensor]:
        return [self.matrix]

    def targets(self) -> Tensor:
        return self.matrix

    def project(self) -> None:
        with torch.no_grad():
            self.matrix.clamp_(min=0.0)

    def tensors(self) -> dict[str, Tensor]:
        return {"similarity": self.matrix.detach()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.matrix.copy_(tensors["similarity"])


class LowRankSimilarity:
    def __init__(self, diagonal: Tensor, left: Tensor, right: Tensor):
        if left.shape != right.shape or left.dim() != 2 or len(left) != len(diagonal):
            raise ValueError(f"low-rank similarity factors do not fit: diagonal "
                             f"{tuple(diagonal.shape)}, left {tuple(left.shape)}, right "
                             f"{tuple(right.shape)}")
        self.diagonal = diagonal.clone().requires_grad_(True)
        self.left = left.clone().requires_grad_(True)
        self.right = right.clone().requires_grad_(True)

    @classmethod
    def identity(cls, n: int, rank: int, seed: int = 0, scale: float = 0.01,
                 device: torch.device | str = "cpu") -> "LowRankSimilarity":
        right = scale * torch.randn(n, rank, generator=torch.Generator().manual_seed(seed))
        return cls(torch.ones(n, device=device), torch.zeros(n, rank, device=device),
                   right.to(device))

    def parameters(self) -> list[Tensor]:
        return [self.diagonal, self.left, self.right]

    def targets(self) -> Tensor:
        return compose_low_rank(self.diagonal, self.left, self.right)

    def project(self) -> None:
        """Nothing to do: the targets are non-negative by construction (the cut in
        :func:`compose_low_rank`)."""

    def tensors(self) -> dict[str, Tensor]:
        return {"similarity_diagonal": self.diagonal.detach(),
                "similarity_left": self.left.detach(), "similarity_right": self.right.detach()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.diagonal.copy_(tensors["similarity_diagonal"])
            self.left.copy_(tensors["similarity_left"])
            self.right.copy_(tensors["similarity_right"])


def compose_low_rank(diagonal: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``max(diag(diagonal) + left right^T, 0)``, the [N, N] targets of the low-rank form.
    The gradient passes where the sum is >= 0, zero included: the product starts exactly at
    zero off the diagonal, and torch.clamp's and relu's gradients are 0 there, which would
    keep the zero-initialised ``left`` at zero for ever."""
    raw = torch.diag_embed(diagonal) + left @ right.T
    return torch.where(raw >= 0, raw, torch.zeros_like(raw))


def similarity_from_tensors(tensors: dict[str, Tensor]) -> Optional[Tensor]:
    """The [N, N] targets a set file holds: ``similarity`` whole, or the low-rank factors
    composed; None when it holds neither (the identity)."""
    if "similarity" in tensors:
        return tensors["similarity"]
    names = ("similarity_diagonal", "similarity_left", "similarity_right")
    if all(name in tensors for name in names):
        return compose_low_rank(*(tensors[name] for name in names)).detach()
    return None


LearnedSimilarity = Union[FullSimilarity, LowRankSimilarity]

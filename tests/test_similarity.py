"""LoRS's learned similarity (ead_dist/similarity.py): both forms start at the identity, stay
non-negative, and a file's tensors compose back to the targets."""

from __future__ import annotations

import torch

from ead_dist.similarity import (FullSimilarity, LowRankSimilarity, compose_low_rank,
                                 similarity_from_tensors)


def test_both_forms_start_at_the_identity_with_their_parameter_counts():
    full, low = FullSimilarity.identity(6), LowRankSimilarity.identity(6, rank=2, seed=3)
    assert torch.equal(full.targets(), torch.eye(6))
    assert torch.equal(low.targets(), torch.eye(6))
    assert sum(p.numel() for p in full.parameters()) == 36
    assert sum(p.numel() for p in low.parameters()) == 6 * (2 * 2 + 1)


def test_the_zero_started_factor_gets_a_gradient_at_the_identity():
    # The product is exactly zero off the diagonal at the start; torch.clamp and relu pass no
    # gradient there, which would leave the low-rank part at zero for ever.
    low = LowRankSimilarity.identity(5, rank=3, seed=0)
    weights = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    (low.targets() * weights).sum().backward()
    assert low.left.grad.abs().max() > 0
    assert torch.allclose(low.left.grad, weights @ low.right.detach())


def test_targets_stay_non_negative():
    low = LowRankSimilarity(torch.tensor([1.0, -0.5]), torch.tensor([[1.0], [-1.0]]),
                            torch.tensor([[1.0], [1.0]]))
    targets = low.targets()
    assert torch.equal(targets, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    full = FullSimilarity(torch.tensor([[1.0, -0.2], [0.3, 1.0]]))
    full.project()
    assert torch.equal(full.targets(), torch.tensor([[1.0, 0.0], [0.3, 1.0]]))


def test_a_files_tensors_compose_back_to_the_targets():
    low = LowRankSimilarity(torch.rand(4), torch.randn(4, 2), torch.randn(4, 2))
    assert torch.equal(similarity_from_tensors(low.tensors()), low.targets().detach())
    assert torch.equal(similarity_from_tensors({"similarity": torch.ones(3, 3)}),
                       torch.ones(3, 3))
    assert similarity_from_tensors({"images": torch.ones(1)}) is None
    assert torch.equal(compose_low_rank(torch.ones(2), torch.zeros(2, 1), torch.ones(2, 1)),
                       torch.eye(2))

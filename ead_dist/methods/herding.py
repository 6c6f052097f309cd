"""Herding: per class, the real samples whose running mean embedding approaches the class mean.

Welling's herding as iCaRL selects exemplars with it: greedily, step t picks the sample that
brings the mean of the t picked embeddings closest to the mean of all the class's embeddings.
The embedding is a trained network's penultimate features (the stage uses expert 0's final
checkpoint). Pure: tensors in, indices out.
"""

from __future__ import annotations

import torch
from torch import Tensor


def herding_indices(embeddings: Tensor, k: int) -> Tensor:
    """Indices of k rows of ``embeddings`` [N, d], in the order picked: at step t,
    argmin_i || mu - (e_1 + ... + e_{t-1} + e_i) / t ||^2 over rows i not yet picked, with mu
    the mean of all rows (ties: the lowest index)."""
    if not 0 < k <= len(embeddings):
        raise ValueError(f"cannot pick {k} of {len(embeddings)} samples")
    mu = embeddings.mean(0)
    picked_sum = torch.zeros_like(mu)
    available = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
    picks = []
    for t in range(1, k + 1):
        distance = ((mu - (picked_sum + embeddings) / t) ** 2).sum(1)
        distance[~available] = float("inf")
        i = int(distance.argmin())
        picks.append(i)
        available[i] = False
        picked_sum = picked_sum + embeddings[i]
    return torch.tensor(picks, dtype=torch.int64)


def herding_selection(embeddings: Tensor, labels: Tensor, ipc: int, num_classes: int) -> Tensor:
    """Indices into the whole set of ``ipc`` herded samples of every class, class-major."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[herding_indices(embeddings[members], ipc)])
    return torch.cat(picks)

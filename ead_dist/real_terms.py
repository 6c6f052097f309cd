"""The real-data terms of one checkpoint, as sums that add up across workers (pure math).

A data-parallel worker sees a part of D. What it contributes must be additive so an
all-reduce can combine parts: gradient *sums* per group and sample counts per group. Means and
the scalars < g_P, g_D > are formed once, after the reduction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .effect import parameter_order


def grouped_gradient_sums(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, labels: Tensor,
    groups: Tensor, num_groups: int,
) -> tuple[Tensor, Tensor]:
    """sum_{i in group j} grad_theta loss(x_i, y_i) for every group j, and the group sizes.

    Returns ([num_groups, n] float, [num_groups] int64). Each group runs its own forward and
    backward, so the cost is one pass over the batch however many groups there are. Samples
    with group -1 are skipped.
    """
    names = parameter_order(model, params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    numel = sum(v.numel() for v in leaves.values())
    reference = next(iter(leaves.values()))
    sums = torch.zeros(num_groups, numel, dtype=reference.dtype, device=reference.device)
    counts = torch.zeros(num_groups, dtype=torch.int64)
    for group in torch.unique(groups).tolist():
        if group < 0:
            continue
        mask = groups == group
        logits = functional_call(model, leaves, (inputs[mask],))
        loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        sums[group] = torch.cat([(g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                                 for k, g in zip(names, grads)])
        counts[group] = int(mask.sum())
    return sums, counts


def class_means(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean gradients [G, n] (zero for empty groups) and the overall mean [n]."""
    safe = counts.clamp(min=1).to(sums.dtype).unsqueeze(1)
    total = counts.sum().clamp(min=1).to(sums.dtype)
    return sums / safe, sums.sum(0) / total

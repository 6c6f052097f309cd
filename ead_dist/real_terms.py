"""The real-data terms of one checkpoint, as sums that add up across workers (pure math).

A data-parallel worker sees a part of D. What it contributes must be additive so an
all-reduce can combine parts: gradient *sums* per group and sample counts per group. Means and
the scalars < g_P, g_D > are formed once, after the reduction. With per-sample weights
(:mod:`ead_dist.weights`) the sums are weighted and the counts become weight totals, so the
same reduction gives weighted means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .effect import parameter_order


def grouped_gradient_sums(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, labels: Tensor,
    groups: Tensor, num_groups: int, weights: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """sum_{i in group j} w_i grad_theta loss(x_i, y_i) for every group j, and the group totals.

    Returns ([num_groups, n] float, [num_groups]): without ``weights`` (w_i = 1) the totals are
    the group sizes (int64), with per-sample ``weights`` [B] the weight totals sum_{i in j} w_i
    (float64, so that they add up across workers without drift). Each group runs its own
    forward and backward, so the cost is one pass over the batch however many groups there
    are. Samples with group -1 are skipped. With ``out`` ([num_groups, n]) the sums are added
    into it in place and it is returned: a caller summing over batches then holds one copy of
    the sums, not three (its own, this batch's, and their out-of-place total).
    """
    names = parameter_order(model, params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    numel = sum(v.numel() for v in leaves.values())
    reference = next(iter(leaves.values()))
    sums = out if out is not None else torch.zeros(num_groups, numel, dtype=reference.dtype,
                                                     device=reference.device)
    totals = torch.zeros(num_groups, dtype=torch.int64 if weights is None else torch.float64)
    for group in torch.unique(groups).tolist():
        if group < 0:
            continue
        mask = groups == group
        logits = functional_call(model, leaves, (inputs[mask],))
        if weights is None:
            loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
            totals[group] = int(mask.sum())
        else:
            w = weights[mask]
            per_sample = torch.nn.functional.cross_entropy(logits, labels[mask],
                                                           reduction="none")
            loss = (per_sample * w.to(per_sample.dtype)).sum()
            totals[group] = w.double().sum().cpu()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        sums[group] += torch.cat([(g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                                  for k, g in zip(names, grads)])
    return sums, totals


def batch_loss_gradient(model: nn.Module, params: Mapping[str, Tensor],
                        inputs: tuple[Tensor, ...]) -> Tensor:
    """grad_theta L(b, theta) for a ``model`` whose output is the loss of its batch b (a dual
    encoder's contrastive loss, which is no sum over samples): flat, in parameter order."""
    names = parameter_order(model, params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = functional_call(model, leaves, inputs)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                      for k, g in zip(names, grads)])


def batch_means(d_sum: Tensor, d_batches: Tensor, p_sums: Tensor, p_batches: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Terms over fixed batches: g_D = (1/|B_D|) sum_{b in B_D} grad L(b), g_P[k] = grad L(P_k)
    (``p_sums`` [K, n] over the batches counted in ``p_batches`` [K], one each) and
    real_dots[k] = < g_P[k], g_D >. An uncounted batch gives zeros."""
    g_D = d_sum / safe_counts(d_batches).to(d_sum.dtype)
    g_P = p_sums / safe_counts(p_batches).to(p_sums.dtype).unsqueeze(1)
    return g_D, g_P, g_P @ g_D


def class_means(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean gradients [G, n] (zero for empty groups) and the overall mean [n].

    ``counts`` are sample counts, or weight totals for weighted sums (weighted means)."""
    safe = safe_counts(counts).to(sums.dtype).unsqueeze(1)
    total = safe_counts(counts.sum()).to(sums.dtype)
    return sums / safe, sums.sum(0) / total


def safe_counts(counts: Tensor) -> Tensor:
    """Counts with empty groups as 1 (their sums are zero, so their means are too)."""
    if counts.is_floating_point():
        return torch.where(counts > 0, counts, torch.ones_like(counts))
    return counts.clamp(min=1)

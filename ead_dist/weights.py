"""Per-sample weights of the real data by kernel density in an expert's feature space (pure).

The seed paper's bias-aware reweighting: a real sample in a dense region of its class (the
bias-aligned majority) is down-weighted, a rare one (bias-conflicting) up-weighted, so that the
weighted real statistics are those of an unbiased set. With psi the expert's penultimate
features, R_c a reference sample of class c and a Gaussian kernel of bandwidth h,

    p(x) = 1/|R_c| sum_{r in R_c} exp(-||psi(x) - psi(r)||^2 / (2 h^2))
    w(x) = p(x)^(-1/T) / mean_{x' in class c} p(x')^(-1/T)        (mean 1 within each class)

h defaults to the median pairwise distance within R_c (the median heuristic). A sample that is
itself in R_c counts its own kernel term once, as every sample does (see :func:`log_density`),
so the estimate does not depend on whether x was drawn into the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def median_distance(reference: Tensor, max_points: int = 2000) -> float:
    """The median of the pairwise Euclidean distances within ``reference`` [M, d] (over its
    first ``max_points`` rows: the median settles long before M^2 pairs)."""
    points = reference[:max_points].double()
    if len(points) < 2:
        return 1.0
    distances = torch.cdist(points, points)
    upper = torch.triu_indices(len(points), len(points), offset=1)
    median = float(distances[upper[0], upper[1]].median())
    return median if median > 0 else 1.0


def log_density(queries: Tensor, reference: Tensor, bandwidth: float,
                query_keys: Optional[Tensor] = None, reference_keys: Optional[Tensor] = None,
                chunk: int = 1024) -> Tensor:
    """log p(x) for each query [Q, d] against ``reference`` [M, d] (the equation above), [Q].

    Every query counts its own kernel term exp(0) = 1 exactly once: with keys given, a reference
    row with the query's key is left out of the sum and the self term added instead, so the
    estimate is (1 + sum over the others) / (1 + number of others).
    """
    out = []
    reference = reference.double()
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].double()
        exponent = -torch.cdist(q, reference).pow(2) / (2 * bandwidth**2)
        others = torch.full((len(q),), float(len(reference)), dtype=torch.float64)
        if query_keys is not None and reference_keys is not None:
            same = query_keys[start:start + chunk, None] == reference_keys[None, :]
            exponent = exponent.masked_fill(same, -math.inf)
            others = others - same.sum(1).double()
        total = torch.logaddexp(torch.logsumexp(exponent, dim=1), torch.zeros(len(q),
                                                                              dtype=torch.float64))
        out.append(total - torch.log1p(others))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def weights_from_log_density(log_p: Tensor, labels: Tensor, num_classes: int,
                             temperature: float = 1.0) -> Tensor:
    """w = p^(-1/T), normalised to mean 1 within each class; float32 [N]."""
    log_w = -log_p.double() / temperature
    weights = torch.zeros_like(log_w)
    for c in range(num_classes):
        members = labels == c
        if members.any():
            shifted = log_w[members] - log_w[members].max()  # no overflow at small T
            w = shifted.exp()
            weights[members] = w / w.mean()
    return weights.float()


def kde_weights(embeddings: Tensor, labels: Tensor, num_classes: int, *,
                bandwidth: Optional[float] = None, temperature: float = 1.0,
                sample: Optional[int] = None, seed: int = 0) -> tuple[Tensor, list[float]]:
    """Kernel-density weights [N] of embeddings [N, d] held in memory, and each class's
    bandwidth. The reference of class c is a random ``sample`` of its members (all of them when
    None or when the class is smaller). The realgrad-scale pass streams instead
    (:mod:`ead_dist.stages.weights`), with these same functions."""
    generator = torch.Generator().manual_seed(seed)
    log_p = torch.zeros(len(labels), dtype=torch.float64)
    keys = torch.arange(len(labels))
    bandwidths = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) == 0:
            bandwidths.append(float("nan"))
            continue
        chosen = reference_indices(members, sample, generator)
        h = bandwidth or median_distance(embeddings[chosen])
        bandwidths.append(h)
        log_p[members] = log_density(embeddings[members], embeddings[chosen], h,
                                     keys[members], keys[chosen])
    return weights_from_log_density(log_p, labels, num_classes, temperature), bandwidths


def reference_indices(members: Tensor, sample: Optional[int],
                      generator: torch.Generator) -> Tensor:
    """A uniform random subset of ``members`` of size ``sample`` (all when it is larger)."""
    if sample is None or sample >= len(members):
        return members
    return members[torch.randperm(len(members), generator=generator)[:sample]].sort().values

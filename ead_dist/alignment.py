"""The losses the coordinator minimises: effect alignment against precomputed real terms.

Pure functions of flat gradient vectors (docs/design.md section 1). With G = D and A = S the
effect of replacing D by S, as seen by a real batch P at checkpoint t, is
eta_t < g_P, g_S - g_D >; the EAD loss drives it to zero. ``scalar`` is the paper's Eq. 7 (with
``coefficient="paper"`` its printed 1 - alpha weight on the real term); the others hold more
effects at zero at once: one per class (``per_class_effect``), every direction of each class
gradient (``class_matching``), or every direction of the whole gradient (``matching``, the
limit of the vector of effects: plain gradient matching at the expert's checkpoints).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .effect import paper_one_minus_alpha

OBJECTIVES = ("scalar", "per_class_effect", "class_matching", "matching", "trajectory")
# The objectives that compare with precomputed real terms (the realgrad stage); ``trajectory``
# compares with stored expert checkpoints instead (unroll.py).
REAL_TERM_OBJECTIVES = OBJECTIVES[:4]
COEFFICIENTS = ("derived", "paper")
# The objectives image-text pairs support: those that need no classes.
PAIR_OBJECTIVES = ("matching", "scalar", "trajectory")
# The objectives that need the synthetic gradient per class (g_Sc) rather than of all of S.
CLASSWISE_SYNTHETIC = ("class_matching",)


def real_coefficient(coefficient: str, real_size: int, synthetic_size: int) -> float:
    """Weight of < g_P, g_D > in the scalar loss: 1 as derived, 1 - alpha as the paper prints."""
    if coefficient == "derived":
        return 1.0
    if coefficient == "paper":
        return paper_one_minus_alpha(real_size, synthetic_size)
    raise ValueError(f"coefficient must be one of {COEFFICIENTS}, got {coefficient!r}")


def scalar_effect(g_S: Tensor, g_P: Tensor, real_dot: Tensor, weight: float = 1.0) -> Tensor:
    """< g_P, g_S > - weight * < g_P, g_D >: the signed effect of D -> S on P at one checkpoint."""
    return torch.dot(g_P, g_S) - weight * real_dot


def ead_loss(
    g_S: list[Tensor], g_P: list[Tensor], real_dots: list[Tensor], lrs: list[float],
    coefficient: str = "derived", real_size: int = 1, synthetic_size: int = 1,
) -> Tensor:
    """Eq. 7: | sum_t eta_t ( < g_P^t, g_S^t > - c < g_P^t, g_D^t > ) |, c from the coefficient."""
    weight = real_coefficient(coefficient, real_size, synthetic_size)
    total = sum(eta * scalar_effect(s, p, d, weight) for s, p, d, eta in
                zip(g_S, g_P, real_dots, lrs))
    return torch.abs(total)


def per_class_effect_loss(g_S: Tensor, g_P_classes: Tensor, real_dots_classes: Tensor) -> Tensor:
    """sum_c < g_Pc, g_S - g_D >^2, P_c the class-c part of P (one effect per class)."""
    return ((g_P_classes @ g_S - real_dots_classes) ** 2).sum()


def class_matching_loss(g_S_classes: Tensor, g_D_classes: Tensor) -> Tensor:
    """sum_c || g_Sc - g_Dc ||^2: every direction of every class's effect."""
    return ((g_S_classes - g_D_classes) ** 2).sum()


def matching_loss(g_S: Tensor, g_D: Tensor) -> Tensor:
    """|| g_S - g_D ||^2: every direction of the effect (gradient matching at checkpoint t)."""
    return ((g_S - g_D) ** 2).sum()


DISTANCES = ("l2", "layer_cosine", "layer_l1")
Layout = list[tuple[str, tuple[int, ...]]]  # (name, shape) of each parameter, in flat order


def _layers(g: Tensor, layout: Layout) -> list[Tensor]:
    return list(torch.split(g, [int(torch.Size(shape).numel()) for _, shape in layout], dim=-1))


def gradient_distance(g_S: Tensor, g_D: Tensor, layout: Layout, distance: str = "l2",
                      skip_head_and_biases: bool = False) -> Tensor:
    """The distance between a synthetic and a real gradient, summed over layers.

    ``l2``: || g_S - g_D ||^2 over every entry (``matching_loss``). ``layer_cosine`` (DC's):
    per layer, sum over output channels of 1 - cos(g_S[c], g_D[c]); 1-D parameters (biases,
    norm scales) are always left out, as in DC. ``layer_l1`` (IDC's): per layer, the L1 norm of
    the difference. With ``skip_head_and_biases`` the last weight matrix (the classifier head)
    and every 1-D parameter are left out. Works on [n] or batched [..., n] gradients.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if distance == "l2" and not skip_head_and_biases:
        return ((g_S - g_D) ** 2).sum()
    head = max(i for i, (_, shape) in enumerate(layout) if len(shape) > 1)
    total = g_S.new_zeros(())
    for i, (s, d, (_, shape)) in enumerate(zip(_layers(g_S, layout), _layers(g_D, layout),
                                              layout)):
        one_dimensional = len(shape) <= 1
        if skip_head_and_biases and (one_dimensional or i == head):
            continue
        if distance == "l2":
            total = total + ((s - d) ** 2).sum()
        elif distance == "layer_l1":
            total = total + (s - d).abs().sum()
        elif not one_dimensional:
            rows = s.shape[:-1] + (shape[0], -1)
            cos = torch.nn.functional.cosine_similarity(s.reshape(rows), d.reshape(rows), dim=-1,
                                                        eps=1e-8)
            total = total + (1 - cos).sum()
    return total

"""The losses the coordinator minimises: effect alignment against precomputed real terms.

Pure functions of flat gradient vectors (DESIGN section 1). With G = D and A = S the effect of
replacing D by S, as seen by a real batch P at checkpoint t, is eta_t < g_P, g_S - g_D >; the
EAD loss drives it to zero. ``scalar`` is the paper's Eq. 7 (with ``coefficient="paper"`` its
printed 1 - alpha weight on the real term); the others hold more effects at zero at once: one
per class (``per_class_effect``), every direction of each class gradient
(``class_matching``), or every direction of the whole gradient (``matching``, the limit of
the vector of effects: plain gradient matching at the expert's checkpoints).
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

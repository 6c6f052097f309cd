"""Random real: class-balanced real images with hard labels, the floor every method must beat."""

from __future__ import annotations

from ..synthetic import SyntheticSet, hard_labelled


def random_real(initial: SyntheticSet, num_classes: int) -> SyntheticSet:
    """The initial set's images (a seeded class-balanced draw of real images) with one-hot
    labels of the class each was drawn from, in place of the teacher's soft labels."""
    return hard_labelled(initial.images.clone(), initial.classes.clone(), num_classes)

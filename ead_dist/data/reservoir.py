"""A seeded, class-balanced random sample of a labelled stream, held in O(per_class x classes).

Reservoir sampling (algorithm R) kept per class: after the stream has shown n_c items of class
c, each of them is in class c's reservoir with probability per_class / n_c, so the sample is
uniform within each class without the stream ever being held. The draw is a function of the
seed and the order of the stream.
"""

from __future__ import annotations

import random
from typing import Iterable, TypeVar

Item = TypeVar("Item")


class TooFewSamplesError(ValueError):
    """A class has fewer items in the stream than the sample asks for."""


def class_reservoirs(stream: Iterable[tuple[int, Item]], per_class: int, num_classes: int,
                     seed: int) -> list[list[Item]]:
    """``per_class`` items of each class of ``stream`` (pairs (label, item)), uniformly drawn."""
    rng = random.Random(seed)
    reservoirs: list[list[Item]] = [[] for _ in range(num_classes)]
    seen = [0] * num_classes
    for label, item in stream:
        seen[label] += 1
        if len(reservoirs[label]) < per_class:
            reservoirs[label].append(item)
        else:
            slot = rng.randrange(seen[label])
            if slot < per_class:
                reservoirs[label][slot] = item
    for c, count in enumerate(seen):
        if count < per_class:
            raise TooFewSamplesError(f"class {c} has {count} samples, fewer than ipc={per_class}")
    return reservoirs


def reservoir_positions(total: int, count: int, seed: int) -> list[int]:
    """The positions that :func:`class_reservoirs` keeps of a one-class stream of ``total``
    items, slot by slot. Its random draws depend on how many items it has seen, never on what
    they are, so the positions can be drawn first and the items fetched after, by whoever
    holds them (shard by shard, in parallel): the same draw as the stream's, no item held."""
    if total < count:
        raise TooFewSamplesError(f"{total} samples, fewer than the {count} asked for")
    rng = random.Random(seed)
    kept = list(range(count))
    for seen in range(count + 1, total + 1):
        slot = rng.randrange(seen)
        if slot < count:
            kept[slot] = seen - 1
    return kept

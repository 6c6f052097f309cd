"""Colored Fashion-MNIST: the colour bias, as pure functions of arrays (no I/O).

Each class c has its own colour PALETTE[c]. In a biased split a fraction ``1 - r`` of each
class's images is tinted with the class's colour (bias-aligned) and exactly round(r * n_c) of
them, chosen at random, with a uniformly drawn *other* colour (bias-conflicting). In an unbiased
split every image gets a uniformly random colour, independent of its class. Tinting multiplies
the grey image by the colour, so the garment (bright) takes the colour and the background
stays black.
"""

from __future__ import annotations

import numpy as np

CONFLICT_RATIOS = (0.01, 0.02, 0.05, 0.10)

# Ten fixed, distinct colours (RGB), one per class.
PALETTE = np.array([
    [255, 0, 0],      # red
    [0, 255, 0],      # green
    [0, 0, 255],      # blue
    [255, 255, 0],    # yellow
    [255, 0, 255],    # magenta
    [0, 255, 255],    # cyan
    [255, 128, 0],    # orange
    [128, 0, 255],    # violet
    [255, 255, 255],  # white
    [128, 128, 128],  # grey
], dtype=np.uint8)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "violet", "white",
                "grey")


def assign_colours(labels: np.ndarray, num_colours: int, conflict_ratio: float | None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The colour index of every image [N] and whether it conflicts with its class's colour [N].

    ``conflict_ratio`` None: unbiased (a uniform colour per image). Otherwise exactly
    round(conflict_ratio * n_c) images of class c get a colour drawn uniformly from the other
    ``num_colours - 1``, the rest the class's own colour (colour index = class index).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    if conflict_ratio is None:
        colours = rng.integers(0, num_colours, size=len(labels))
        return colours, colours != labels
    if labels.max(initial=-1) >= num_colours:
        raise ValueError(f"{num_colours} colours cannot give each of {labels.max() + 1} classes "
                         "its own")
    colours = labels.copy()
    conflicting = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, int(round(conflict_ratio * len(members))), replace=False)
        # A uniform draw over the other colours: skip c by shifting draws >= c up by one.
        others = rng.integers(0, num_colours - 1, size=len(chosen))
        colours[chosen] = others + (others >= c)
        conflicting[chosen] = True
    return colours, conflicting


def tint(grey: np.ndarray, colours: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, 1] grey images times their colours -> uint8 [N, H, W, 3]:
    pixel * colour / 255, rounded."""
    if grey.ndim == 4:
        grey = grey[..., 0]
    rgb = palette[colours].astype(np.uint32)[:, None, None, :]
    return ((grey.astype(np.uint32)[..., None] * rgb + 127) // 255).astype(np.uint8)

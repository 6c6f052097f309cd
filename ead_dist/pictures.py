"""Pictures of a run as matplotlib Figures, drawn from tensors and lists without any I/O: the
synthetic set as a grid with one row per class, the coordinator's loss curve, and the accuracy
of the distilled set against its baselines.

The grid is one mosaic image with the titles written over it, not one axes per image: a set of
100 classes x 50 images stays a single imshow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure

IMAGE_INCHES = 1.0  # each synthetic image is drawn this wide
TITLE_BAND = 0.35  # height of the band above each image that holds its title, per image height
GAP = 0.1  # space between neighbouring images, per image width
MARGIN_INCHES = (1.4, 0.5)  # left (class names), top (figure title)
SET_NAMES = {"synthetic": "distilled", "init": "initial set", "random_real": "random real"}


def class_rows(classes: torch.Tensor, num_classes: int, per_class: int) -> list[list[int]]:
    """For each class, the indices of the images drawn in its row: the first ``per_class`` of
    the images initialised from it, in set order."""
    rows: list[list[int]] = [[] for _ in range(num_classes)]
    for index, c in enumerate(classes.tolist()):
        if len(rows[c]) < per_class:
            rows[c].append(index)
    return rows


def cell_origin(row: int, column: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(y, x) of the top-left pixel of the image at (row, column) of the mosaic."""
    height, width = image_size
    band, gap = math.ceil(TITLE_BAND * height), math.ceil(GAP * width)
    return row * (band + height) + band, column * (width + gap) + gap // 2


def mosaic(pixels: torch.Tensor, rows: list[list[int]]) -> np.ndarray:
    """The grid as one image on white: row r holds the images ``rows[r]`` from left to right.

    ``pixels`` is [N, C, H, W] in [0, 1] with C 1 or 3; the result is [h, w] for one channel,
    [h, w, 3] for three."""
    channels, height, width = pixels.shape[1:]
    if channels not in (1, 3):
        raise ValueError(f"can draw 1- or 3-channel images, not {channels}")
    columns = max([len(row) for row in rows] + [1])
    grid = np.ones((len(rows) * (math.ceil(TITLE_BAND * height) + height),
                    columns * (width + math.ceil(GAP * width)), channels), dtype=np.float32)
    images = pixels.permute(0, 2, 3, 1).numpy()
    for r, indices in enumerate(rows):
        for column, index in enumerate(indices):
            y, x = cell_origin(r, column, (height, width))
            grid[y:y + height, x:x + width] = images[index]
    return grid[:, :, 0] if channels == 1 else grid


def _short(name: str, length: int = 14) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def synthetic_grid(pixels: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                   class_names: list[str], per_class: int = 10, title: str = "") -> Figure:
    """The set as a grid, one row per class (the class each image was initialised from), each
    image titled with its top soft label and that label's probability.

    ``pixels`` [N, C, H, W] in [0, 1] (normalisation undone), ``labels`` [N, K] probabilities,
    ``classes`` [N]; at most ``per_class`` images of each class are drawn."""
    height, width = pixels.shape[2:]
    rows = class_rows(classes, len(class_names), per_class)
    grid = mosaic(pixels, rows)
    inches_per_pixel = IMAGE_INCHES / width
    left, top = MARGIN_INCHES
    # At least wide enough for the title; the equal-aspect image is centred in any extra width.
    size = (max(4.5, left + grid.shape[1] * inches_per_pixel),
            top + grid.shape[0] * inches_per_pixel)
    figure = Figure(figsize=size)
    axes = figure.add_axes((left / size[0], 0.0, 1.0 - left / size[0], 1.0 - top / size[1]))
    axes.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0,
                interpolation="nearest")
    for r, indices in enumerate(rows):
        for column, index in enumerate(indices):
            y, x = cell_origin(r, column, (height, width))
            probability, top_class = labels[index].max(dim=0)
            axes.text(x + width / 2, y - 0.5, f"{_short(class_names[int(top_class)])} "
                      f"{float(probability):.2f}", ha="center", va="bottom", fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([cell_origin(r, 0, (height, width))[0] + height / 2 for r in range(len(rows))],
                    [_short(name, 20) for name in class_names])
    axes.tick_params(left=False)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        figure.suptitle(title, y=1.0 - 0.1 / size[1], va="top", fontsize=10)
    return figure


def loss_curve(losses: list[float], title: str = "coordinator loss") -> Figure:
    """The loss at every coordinator iteration; on a log scale when every value is positive."""
    figure = Figure(figsize=(6.0, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(range(1, len(losses) + 1), losses, linewidth=1.0)
    if losses and min(losses) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    return figure


def accuracy_bars(results: dict[str, dict[str, dict]]) -> Figure:
    """Test accuracy (%) of each set on each model, mean with a std error bar, from
    ``eval.json``'s ``results[set][model]`` (``mean`` and ``std`` as fractions). The distilled
    set comes first."""
    sets = sorted(results, key=lambda name: (name != "synthetic", name))
    models = list(dict.fromkeys(model for name in sets for model in results[name]))
    width = 0.8 / max(len(sets), 1)
    figure = Figure(figsize=(max(4.0, 1.0 + 0.5 * len(models) * len(sets)), 3.5),
                    layout="constrained")
    axes = figure.add_subplot()
    for k, name in enumerate(sets):
        positions = [m + (k - (len(sets) - 1) / 2) * width for m, model in enumerate(models)
                     if model in results[name]]
        means = [100 * results[name][model]["mean"] for model in models if model in results[name]]
        stds = [100 * results[name][model]["std"] for model in models if model in results[name]]
        bars = axes.bar(positions, means, width, yerr=stds, capsize=4,
                        label=SET_NAMES.get(name, name))
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    axes.set_xticks(range(len(models)), models)
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 105)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title("accuracy against the baselines")
    return figure

"""Bias-aware distillation (issue #18): Colored Fashion-MNIST, per-sample weights in the real
terms and in DM, and the kernel-density weights."""

import numpy as np
import pytest
import torch

from ead_dist import storage
from ead_dist.data.colouring import PALETTE, assign_colours, tint
from ead_dist.data.formats.idx import read_fashion_mnist
from ead_dist.data.ingest import BIAS_FILE
from ead_dist.data.meta import read_meta, shard_urls
from ead_dist.data.pipeline import load_classification_tensors


@pytest.fixture(scope="module")
def colored(small_fashion_mnist_raw, tmp_path_factory):
    """The 600/300 real Fashion-MNIST subset, coloured at r = 10 %, through the command line."""
    from ead_dist.cli import main

    out = str(tmp_path_factory.mktemp("colored") / "cfm")
    assert main(["ingest", "colored-fashion-mnist", "--conflict-ratio", "0.1", "--out", out,
                 "--source", small_fashion_mnist_raw, "--shard-size", "200", "--no-ray"]) == 0
    return out


def test_colored_fashion_mnist_has_the_stated_conflict_ratio_per_class(colored):
    meta = read_meta(colored)
    assert meta.name == "colored_fashion_mnist" and meta.image_shape == [3, 28, 28]
    assert meta.attributes["conflict_ratio"] == 0.1
    flags, info = storage.load_tensors(storage.join(colored, BIAS_FILE))
    _, labels, _ = load_classification_tensors(shard_urls(colored, meta, "train"))
    colour, conflicting = flags["train_colour"], flags["train_conflicting"]
    assert len(colour) == len(labels) == 600
    for c in range(10):
        members = labels == c
        assert int(conflicting[members].sum()) == round(0.1 * int(members.sum()))
        assert (colour[members & ~conflicting] == c).all()  # the class's own colour
        assert (colour[members & conflicting] != c).all()  # another one
    assert info["conflict_ratio"] == 0.1


def test_colours_are_applied_to_the_foreground_as_stated(colored, small_fashion_mnist_raw):
    meta = read_meta(colored)
    flags, _ = storage.load_tensors(storage.join(colored, BIAS_FILE))
    for split in ("train", "test"):
        images, _, keys = load_classification_tensors(shard_urls(colored, meta, split))
        grey = read_fashion_mnist(small_fashion_mnist_raw, split).images[:, :, :, 0]
        order = [int(k) for k in keys]
        expected = tint(grey[order], flags[f"{split}_colour"].numpy()[order])
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected)
    # Tinting: a white pixel takes the colour, black stays black, grey scales it.
    pixels = np.array([[[255, 0, 128]]], dtype=np.uint8)
    tinted = tint(pixels, np.array([6]))  # orange (255, 128, 0)
    assert tinted[0, 0].tolist() == [[255, 128, 0], [0, 0, 0], [128, 64, 0]]


def test_the_test_split_is_unbiased(colored):
    meta = read_meta(colored)
    flags, _ = storage.load_tensors(storage.join(colored, BIAS_FILE))
    _, labels, _ = load_classification_tensors(shard_urls(colored, meta, "test"))
    colour = flags["test_colour"]
    assert float((colour == labels).float().mean()) < 0.25  # biased train: 0.9
    for c in range(10):
        assert len(torch.unique(colour[labels == c])) >= 6  # ~30 images a class
    # At full size, every class's colours cover all ten, each about a tenth of the class.
    full = np.repeat(np.arange(10), 1000)
    colours, _ = assign_colours(full, 10, None, seed=1)
    for c in range(10):
        counts = np.bincount(colours[full == c], minlength=10)
        assert (counts > 0).all() and counts.max() < 140 and counts.min() > 60


def test_colouring_is_deterministic_given_the_seed():
    labels = np.repeat(np.arange(10), 100)
    a = assign_colours(labels, 10, 0.05, seed=3)
    b = assign_colours(labels, 10, 0.05, seed=3)
    c = assign_colours(labels, 10, 0.05, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert int(a[1].sum()) == 10 * 5 and len(PALETTE) == len({tuple(p) for p in PALETTE})

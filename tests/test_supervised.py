import copy
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ead_dist.augment import DSA_STRATEGY
from ead_dist.models import build_model
from ead_dist.supervised import accuracy, train_classifier

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not on disk"
)


def read_idx(split: str, count: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """count normalised images [count, 1, 28, 28] and int64 labels from the gzip IDX files."""
    with gzip.open(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz", "rb") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    with gzip.open(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    pixels = pixels.reshape(-1, 1, 28, 28)[skip : skip + count]
    images = (torch.from_numpy(pixels.astype(np.float32)) / 255.0 - MEAN) / STD
    return images, torch.from_numpy(labels[skip : skip + count].astype(np.int64))


@pytest.fixture(scope="module")
def fashion():
    train = read_idx("train", 200)
    test = read_idx("t10k", 500)
    return train, test


def small_convnet(seed=0):
    torch.manual_seed(seed)
    return build_model("convnet", 1, 10, (28, 28), width=32)


def test_trains_above_chance_on_real_images(fashion):
    (x, y), (x_test, y_test) = fashion
    model = small_convnet()
    before = accuracy(model, x_test, y_test)
    losses = []
    train_classifier(
        model, x, y, epochs=5, batch_size=16, callback=lambda epoch, loss: losses.append(loss)
    )
    after = accuracy(model, x_test, y_test)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert after > 0.5, f"test accuracy {after:.3f} (untrained {before:.3f})"


def test_soft_one_hot_targets_match_hard_labels(fashion):
    (x, y), (x_test, _) = fashion
    hard = small_convnet()
    soft = copy.deepcopy(hard)
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    train_classifier(hard, x, y, epochs=1, batch_size=64, augmentation=DSA_STRATEGY, seed=3)
    train_classifier(soft, x, one_hot, epochs=1, batch_size=64, augmentation=DSA_STRATEGY, seed=3)
    for (name, a), (_, b) in zip(hard.named_parameters(), soft.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    with torch.no_grad():
        assert torch.allclose(hard.eval()(x_test[:64]), soft.eval()(x_test[:64]), atol=1e-4)


def test_same_seed_same_model(fashion):
    (x, y), _ = fashion
    a, b = small_convnet(), small_convnet()
    train_classifier(a, x[:64], y[:64], epochs=2, batch_size=16, augmentation=DSA_STRATEGY, seed=1)
    train_classifier(b, x[:64], y[:64], epochs=2, batch_size=16, augmentation=DSA_STRATEGY, seed=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("schedule, after", [("halve", 0.05), ("tenth", 0.01),
                                             ("constant", 0.1)])
def test_lr_is_stepped_after_half_the_epochs(sgd_rates, schedule, after):
    model = build_model("mlp", 1, 3, (2, 2), width=4)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    train_classifier(model, x, y, epochs=6, lr=0.1, batch_size=4, lr_schedule=schedule)
    assert sgd_rates == pytest.approx([0.1] * 4 + [after] * 2)


def test_bad_inputs_are_refused():
    model = build_model("mlp", 1, 3, (2, 2), width=4)
    x = torch.randn(4, 1, 2, 2)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_classifier(model, x, torch.zeros(4, dtype=torch.int64), 1, lr_schedule="cosine")
    with pytest.raises(ValueError, match="int64"):
        train_classifier(model, x, torch.zeros(4, dtype=torch.int32), epochs=1)
    with pytest.raises(ValueError, match="int64"):
        accuracy(model, x, torch.zeros(4, 3))

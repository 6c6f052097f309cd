"""The baselines beside EAD (ead_dist/methods): each makes a set that evaluate accepts, DM's and
DC's losses and herding's picks match hand computations, a resumed DM or DC run ends where an
uninterrupted one does, and the method is part of the distill fingerprint."""

import math
import os
import shutil

import pytest
import torch

from conftest import tiny_config
from ead_dist import storage
from ead_dist.coordinator import DivergedError
from ead_dist.fingerprint import StaleRunError, inputs, stage_fields
from ead_dist.methods.dc import GradientMatching, matching_distance
from ead_dist.methods.dm import DistributionMatching, distribution_matching_loss
from ead_dist.methods.herding import herding_indices, herding_selection
from ead_dist.models import build_model
from ead_dist.stages.distill import distill, state_url
from ead_dist.stages.evaluate import run_evaluate
from ead_dist.stages.experts import run_experts
from ead_dist.synthetic import hard_labelled, load_synthetic

BASE = {"experts.count": 1, "experts.train_samples": 256, "distill.iterations": 4,
        "distill.save_every": 2, "distill.real_batch_size": 16, "distill.outer_loop": 2,
        "distill.inner_loop": 1, "distill.threads": 1, "evaluate.epochs": 2}


@pytest.fixture(scope="module")
def prepared(small_fashion_mnist, tmp_path_factory):
    """A run with its expert trained; tests copy it and distill in the copy."""
    run = str(tmp_path_factory.mktemp("methods") / "base")
    run_experts(tiny_config(run, small_fashion_mnist, BASE), use_ray=False)
    return run


def _copy(prepared, small_fashion_mnist, tmp_path, name, **overrides):
    run = str(tmp_path / name)
    shutil.copytree(prepared, run)
    return tiny_config(run, small_fashion_mnist, dict(BASE, **overrides))


@pytest.mark.parametrize("method", ["random", "herding", "dm", "dc"])
def test_each_method_makes_a_hard_labelled_set_that_evaluate_accepts(
        prepared, small_fashion_mnist, tmp_path, method):
    from ead_dist.data.arrays import load_split

    config = _copy(prepared, small_fashion_mnist, tmp_path, method,
                   **{"distill.method": method})
    summary = distill(config)
    images, labels, classes, metadata = load_synthetic(summary["synthetic"])
    assert images.shape == (20, 1, 28, 28) and metadata["method"] == method
    assert torch.bincount(classes, minlength=10).tolist() == [2] * 10
    assert torch.equal(labels, torch.nn.functional.one_hot(classes, 10).float())
    assert summary["method"] == method
    assert summary["reads_real_data_in_loop"] == (method in ("dm", "dc"))
    assert summary["peak_memory_mb"] > 0 and summary["seconds"] >= 0
    init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
    if method in ("dm", "dc"):
        assert summary["iterations"] == 4 and summary["seconds_per_iteration"] > 0
        assert summary["image_change"] > 0 and torch.equal(init["classes"], classes)
    else:
        assert summary["iterations"] == 0 and summary["seconds_per_iteration"] is None
        train_images, train_labels, _ = load_split(small_fashion_mnist, "train")
        for image, label in zip(images, classes):  # real training images of their class
            same = (train_images == image).flatten(1).all(1)
            assert same.any() and (train_labels[same] == label).all()
    if method == "random":
        assert torch.equal(images, init["images"])
    report = run_evaluate(config, use_ray=False)
    assert set(report["results"]) == {"synthetic", "init", "random_real"}
    assert 0 <= report["results"]["synthetic"]["convnet"]["mean"] <= 1


def test_dm_loss_is_zero_when_the_synthetic_batch_is_the_real_batch():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(6, 1, 12, 12, generator=generator)
    classes = torch.tensor([0, 0, 0, 1, 1, 1])

    def make():
        return build_model("convnet", 1, 2, (12, 12), width=8, depth=2)

    def dm(images):
        # The real batch of each class is all 3 of its images, in a shuffled order, and the same
        # DSA draw transforms both sides; only a mismatch can make the loss positive.
        return DistributionMatching(make, hard_labelled(images, classes, 2), real, classes,
                                    real_batch_size=3,
                                    augmentation="color_crop_cutout_scale_rotate")

    for iteration in range(4):
        assert float(dm(real.clone()).loss(iteration).detach()) == pytest.approx(0.0, abs=1e-9)
    moved = real.clone()
    moved[0] += 0.5
    assert float(dm(moved).loss(0).detach()) > 1e-4
    e = torch.randn(5, 3, generator=generator)
    assert float(distribution_matching_loss(e, e[torch.randperm(5)])) == pytest.approx(0, abs=1e-9)
    assert float(distribution_matching_loss(e, e + 1)) == pytest.approx(3.0)


def test_dc_distance_is_zero_for_identical_gradients_and_matches_a_hand_computation():
    # A conv weight [2, 1, 2, 1], a linear weight [2, 2] and a bias [2].
    g_real = [torch.tensor([1.0, 0.0, 1.0, 1.0]).view(2, 1, 2, 1),
              torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0])]
    g_syn = [torch.tensor([0.0, 1.0, 2.0, 2.0]).view(2, 1, 2, 1),
             torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([0.0, 1.0])]
    assert float(matching_distance(g_real, g_real)) == pytest.approx(0.0, abs=1e-6)
    # Per output channel (row): conv rows [1,0]/[0,1] -> 1 - 0, [1,1]/[2,2] -> 1 - 1; linear
    # rows [1,0]/[1,1] -> 1 - 1/sqrt(2), [0,1]/[0,2] -> 0; the bias is left out. Read by
    # columns the linear layer would give 1 - 2/sqrt(5), and with the bias 2 more.
    expected = 1.0 + (1 - 1 / math.sqrt(2))
    assert float(matching_distance(g_syn, g_real)) == pytest.approx(expected, abs=1e-6)
    assert float(matching_distance(g_real, g_syn)) == pytest.approx(expected, abs=1e-6)


def test_dc_matching_loss_vanishes_when_the_synthetic_set_is_the_real_batch():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(6, 1, 12, 12, generator=generator)
    classes = torch.tensor([0, 0, 0, 1, 1, 1])

    def make():
        return build_model("convnet", 1, 2, (12, 12), width=8, depth=1)

    def dc(images):
        return GradientMatching(make, hard_labelled(images, classes, 2), real, classes,
                                outer_loop=1, inner_loop=1, real_batch_size=3,
                                augmentation="color_crop_scale_rotate")

    torch.manual_seed(0)
    network = make()
    same = dc(real.clone()).matching_loss(network, torch.Generator().manual_seed(0))
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-4)
    moved = real.clone()
    moved[4] += 1.0
    changed = dc(moved)
    loss = changed.matching_loss(network, torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) > 1e-3
    # The synthetic side carries the graph: the images get a gradient.
    assert changed.descent.images.grad.abs().sum() > 0


def test_herding_picks_what_a_hand_computation_says():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    # t=1: closest to 3.25 is 2. t=2: (2 + x) / 2 nearest 3.25 wants x = 4.5 -> 1 (0 and 10 are
    # farther). t=3: (3 + x) / 3 wants x = 6.75 -> 10, where nearest-to-the-mean would take 0.
    assert herding_indices(points, 3).tolist() == [2, 1, 3]
    assert sorted(herding_indices(points, 4).tolist()) == [0, 1, 2, 3]
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.1]])
    # mean (1, 1.02): the centre point first, then (1.1 + y) / 2 wants y = 0.94 -> a corner at
    # y = 0 first in index order, (0, 0).
    assert herding_indices(square, 2).tolist() == [4, 0]
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    embeddings = torch.tensor([[0.0], [5.0], [1.0], [6.0], [2.0], [7.0], [10.0], [9.0]])
    # Class 0 holds rows 1, 3, 5, 7 (5, 6, 7, 9: mean 6.75 -> 7, row 5); class 1 rows 0, 2, 4, 6.
    assert herding_selection(embeddings, labels, 1, 2).tolist() == [5, 4]


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(prepared, small_fashion_mnist,
                                                             tmp_path, method):
    whole = _copy(prepared, small_fashion_mnist, tmp_path, "whole", **{"distill.method": method})
    distill(whole)
    broken = _copy(prepared, small_fashion_mnist, tmp_path, "broken",
                   **{"distill.method": method})
    distill(broken)
    # Interrupted after iteration 2: the later state and the result were never published.
    os.unlink(state_url(broken.run, 4))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    result = distill(broken)
    assert result["resumed_at"] == 2 and result["iterations_run"] == 2
    state, _ = storage.load_tensors(state_url(broken.run, 2))
    assert "momentum" in state  # SGD's momentum is part of what resumes
    a, _ = storage.load_tensors(storage.join(whole.run, "synthetic.safetensors"))
    b, _ = storage.load_tensors(storage.join(broken.run, "synthetic.safetensors"))
    init, _ = storage.load_tensors(storage.join(whole.run, "distill", "init.safetensors"))
    assert not torch.equal(a["images"], init["images"])
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_divergence_stops_with_the_images_as_they_were(method):
    real = torch.full((4, 1, 12, 12), float("nan"))
    classes = torch.tensor([0, 0, 1, 1])
    start = torch.randn(4, 1, 12, 12)

    def make():
        return build_model("convnet", 1, 2, (12, 12), width=4, depth=1)

    cls = DistributionMatching if method == "dm" else GradientMatching
    extra = {} if method == "dm" else {"outer_loop": 2, "inner_loop": 1}
    optimiser = cls(make, hard_labelled(start.clone(), classes, 2), real, classes, **extra)
    with pytest.raises(DivergedError, match=f"iteration 3: the {method} loss"):
        optimiser.step(3)
    assert torch.equal(optimiser.synthetic.images, start)


def test_the_method_is_part_of_the_distill_fingerprint(prepared, small_fashion_mnist, tmp_path):
    ead = tiny_config("runs/x", small_fashion_mnist, BASE)
    dm = tiny_config("runs/x", small_fashion_mnist, dict(BASE, **{"distill.method": "dm"}))
    assert ead.distill.method == "ead"
    fields = stage_fields(dm, "distill", "sha256:x")
    assert fields["distill.method"] == "dm"
    assert stage_fields(ead, "distill", "sha256:x")["distill.method"] == "ead"
    # Baselines read no real terms: realgrad is not among their inputs.
    assert "realgrad" in inputs(ead, "distill") and "realgrad" not in inputs(dm, "distill")
    assert not any(k.startswith("realgrad.") for k in fields)
    # A finished random set is never handed back to a config that asks for DM.
    config = _copy(prepared, small_fashion_mnist, tmp_path, "stale",
                   **{"distill.method": "random"})
    distill(config)
    changed = tiny_config(config.run, small_fashion_mnist,
                          dict(BASE, **{"distill.method": "dm"}))
    with pytest.raises(StaleRunError, match="distill.method 'random' -> 'dm'"):
        distill(changed)


def test_an_unknown_method_is_refused_by_name(small_fashion_mnist):
    from ead_dist.config import ConfigError

    with pytest.raises(ConfigError, match="distill.method must be one of"):
        tiny_config("runs/x", small_fashion_mnist, {"distill.method": "mtt"})

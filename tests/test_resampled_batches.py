"""Importance-resampled real batches for weighted DM and DC (``distill.weighted_batches:
resample``): draws in proportion to the weights, zero-weight samples never drawn, the realgrad
pass's cached means equal the in-loop ones (1 and 2 workers), and the setting is refused where
nothing reads it and is part of the fingerprints."""

import shutil

import pytest
import torch

from conftest import tiny_config
from ead_dist.config import ConfigError
from ead_dist.fingerprint import stage_fields
from ead_dist.methods.dm import DistributionMatching, InLoopRealMeans, draw_iteration
from ead_dist.methods.image_sgd import real_indices, resampled_positions
from ead_dist.models import build_model
from ead_dist.stages.dm_real import build_dm_plan, class_members, class_sums, read_local
from ead_dist.stages.experts import run_experts
from ead_dist.synthetic import hard_labelled

DM = {"experts.count": 1, "experts.train_samples": 256, "distill.method": "dm",
      "distill.dm_real": "realgrad", "distill.iterations": 3, "distill.save_every": 3,
      "distill.real_batch_size": 16, "distill.threads": 1, "realgrad.workers": 2,
      "model.width": 8, "model.depth": 2, "weights.method": "kde",
      "distill.weighted_batches": "resample"}


def make_network():
    return build_model("convnet", 1, 2, (28, 28), width=8, depth=2)


def test_resampled_positions_follow_the_weights_and_never_draw_a_zero_weight():
    weights = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    picks = resampled_positions(weights, 4000, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {2, 5}
    assert abs(float((picks == 5).double().mean()) - 0.75) < 0.03
    members = torch.tensor([10, 11, 12, 13, 14, 15])
    drawn = real_indices(members, 50, torch.Generator().manual_seed(1), weights)
    assert len(drawn) == 50 and set(drawn.tolist()) <= {12, 15}  # with replacement, past |class|
    for bad in (torch.zeros(3), torch.tensor([1.0, -1.0]), torch.zeros(0)):
        with pytest.raises(ValueError, match="non-negative weights with a positive total"):
            resampled_positions(bad, 4, torch.Generator().manual_seed(0))


def test_resampled_dm_means_are_plain_means_of_weighted_draws_and_keep_the_loops_draws():
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 28, 28), torch.tensor([0] * 6 + [1] * 6)
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0] * 2)  # members 1 and 4 of each class
    real = InLoopRealMeans(images, labels, 2, weights, resample=True)
    draws = draw_iteration(make_network, 3, 0, real.class_sizes, 8, "color_crop_cutout",
                           (28, 28), "cpu", True, real.class_weights)
    assert all(set(p.tolist()) <= {1, 4} and len(p) == 8 for p in draws.picks)
    means = real(0, draws)
    from ead_dist.methods.dm import augmented
    from ead_dist.models.embedding import embed

    for c in (0, 1):
        rows = torch.arange(6 * c, 6 * c + 6)[draws.picks[c]]
        with torch.no_grad():
            by_hand = embed(draws.network, augmented(images[rows], draws.params[c])).mean(0)
        assert torch.allclose(means[c], by_hand, atol=1e-5)
    # Zero-weight images are never read: changing them changes nothing.
    changed = images.clone()
    changed[weights == 0] = torch.randn(int((weights == 0).sum()), 1, 28, 28)
    other = InLoopRealMeans(changed, labels, 2, weights, resample=True)
    assert torch.allclose(other(0, draws), means)
    # A loop without the weights (cached means) replays the same network and DSA draws.
    blind = draw_iteration(make_network, 3, 0, real.class_sizes, 8, "color_crop_cutout",
                           (28, 28), "cpu", True)
    assert blind.picks == [None, None]
    for a, b in zip(blind.network.parameters(), draws.network.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(blind.params, draws.params):
        assert p.ops == q.ops
        for name in ("brightness", "saturation", "contrast", "shift", "cutout_center"):
            a, b = getattr(p, name), getattr(q, name)
            assert (a is None and b is None) or torch.equal(a, b)
    # The weighted-mean DM draws its batches uniformly: zero-weight images are drawn there.
    mean_draws = draw_iteration(make_network, 3, 0, real.class_sizes, 8, None, (28, 28), "cpu")
    assert any(not set(p.tolist()) <= {1, 4} for p in mean_draws.picks)
    with pytest.raises(ValueError, match="resampled real batches need the real weights"):
        InLoopRealMeans(images, labels, 2, resample=True)


def test_resampled_dc_reads_only_what_the_weights_draw():
    from ead_dist.methods.dc import GradientMatching
    from ead_dist.methods.image_sgd import fresh_network, iteration_generator

    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 28, 28), torch.tensor([0] * 6 + [1] * 6)
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0] * 2)
    start = hard_labelled(torch.randn(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), 2)

    def loss(real_images, resample):
        dc = GradientMatching(make_network, start, real_images, labels, outer_loop=1,
                              inner_loop=1, real_batch_size=8, real_weights=weights,
                              resample=resample)
        network = fresh_network(make_network, iteration_generator(0, 0), "cpu")
        return float(dc.matching_loss(network, torch.Generator().manual_seed(1)).detach())

    changed = images.clone()
    changed[weights == 0] = torch.randn(int((weights == 0).sum()), 1, 28, 28)
    assert loss(changed, True) == pytest.approx(loss(images, True), rel=1e-6)
    # The same weights, drawn uniformly and averaged with them: another loss.
    assert abs(loss(images, True) - loss(images, False)) > 1e-4


@pytest.fixture(scope="module")
def prepared(small_fashion_mnist, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("resampled") / "base")
    run_experts(tiny_config(run, small_fashion_mnist, DM), use_ray=False)
    return run


def test_the_realgrad_pass_resamples_as_the_loop_does_over_one_and_two_workers(
        prepared, small_fashion_mnist, tmp_path):
    run = str(tmp_path / "pass")
    shutil.copytree(prepared, run)
    config = tiny_config(run, small_fashion_mnist, DM)
    plan = build_dm_plan(config)
    assert plan["resampled"] is True
    weights = torch.rand(600, generator=torch.Generator().manual_seed(0))
    weights[weights < 0.5] = 0.0  # about half the samples can never be drawn
    parts = [read_local(plan, rank, 2) for rank in (0, 1)]
    members = class_members(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                            10, 600)
    two = [class_sums(plan, members, keys, images, weights, "cpu") for keys, _, images in parts]
    keys, labels, images = read_local(plan, 0, 1)
    one = class_sums(plan, members, keys, images, weights, "cpu")
    assert torch.equal(one["mass"], torch.full((3, 10), 16.0, dtype=torch.float64))
    assert torch.equal(two[0]["mass"] + two[1]["mass"], one["mass"])
    assert torch.allclose(two[0]["sums"] + two[1]["sums"], one["sums"], rtol=1e-4, atol=1e-4)

    from ead_dist.data.meta import read_meta
    from ead_dist.stages.baselines import _network_factory

    order = torch.argsort(keys)
    real = InLoopRealMeans(images[order], labels[order], 10, weights, resample=True)
    start = hard_labelled(torch.zeros(10, 1, 28, 28), torch.arange(10), 10)
    dm = DistributionMatching(_network_factory(config, read_meta(small_fashion_mnist)), start,
                              real_means=real, real_batch_size=16,
                              augmentation=plan["augmentation"], seed=0)
    for i in range(3):
        assert torch.allclose(one["sums"][i] / 16, real(i, dm.draws(i)), rtol=1e-4, atol=1e-5)


def test_resampling_is_refused_where_unread_and_fingerprinted_where_read(small_fashion_mnist):
    config = tiny_config("runs/x", small_fashion_mnist, DM)
    assert stage_fields(config, "realgrad", "sha256:x")["distill.weighted_batches"] == "resample"
    assert stage_fields(config, "distill", "sha256:x")["distill.weighted_batches"] == "resample"
    with pytest.raises(ConfigError, match="not distill.method 'ead'"):
        tiny_config("runs/x", small_fashion_mnist, {"weights.method": "kde",
                                                    "distill.weighted_batches": "resample"})
    with pytest.raises(ConfigError, match="weights.method is none"):
        tiny_config("runs/x", small_fashion_mnist, dict(DM, **{"weights.method": "none"}))

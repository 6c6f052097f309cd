"""DM's real side computed in the realgrad pass (ead_dist/stages/dm_real.py): the cached class
means equal what the in-loop DM embeds, with and without weights, for 1 and 2 workers (Ray
Train, all-reduce); a DM run from the cache ends where the in-loop run does while its loop
reads no real data; the DM draws are part of realgrad's fingerprint."""

import shutil

import pytest
import torch

from conftest import tiny_config
from ead_dist.config import ConfigError
from ead_dist.data.arrays import load_split
from ead_dist.fingerprint import StaleRunError, inputs, stage_fields
from ead_dist.methods.dm import CachedRealMeans, DistributionMatching, InLoopRealMeans
from ead_dist.run import run_stages
from ead_dist.stages.distill import distill
from ead_dist.stages.dm_real import build_dm_plan, class_members, class_sums, read_local
from ead_dist.stages.dm_real import load_dm_means, run_dm_means
from ead_dist.stages.experts import run_experts
from ead_dist.synthetic import hard_labelled, load_synthetic

DM = {"experts.count": 1, "experts.train_samples": 256, "distill.method": "dm",
      "distill.dm_real": "realgrad", "distill.iterations": 3, "distill.save_every": 3,
      "distill.real_batch_size": 16, "distill.threads": 1, "realgrad.workers": 2,
      "model.width": 8, "model.depth": 2}


@pytest.fixture(scope="module")
def prepared(small_fashion_mnist, tmp_path_factory):
    """A run with its expert trained (DM needs none, but the initial set's labels do)."""
    run = str(tmp_path_factory.mktemp("dm_real") / "base")
    run_experts(tiny_config(run, small_fashion_mnist, DM), use_ray=False)
    return run


def _config(prepared, data, tmp_path, name, **overrides):
    run = str(tmp_path / name)
    shutil.copytree(prepared, run)
    return tiny_config(run, data, dict(DM, **overrides))


def _in_loop_means(config, data, iterations):
    """The means the in-loop DM embeds at each iteration, [I, C, d]."""
    from ead_dist.stages.baselines import _network_factory
    from ead_dist.data.meta import read_meta

    meta = read_meta(data)
    images, labels, _ = load_split(data, "train", meta=meta)
    real = InLoopRealMeans(images, labels, meta.num_classes)
    strategy = build_dm_plan(config)["augmentation"]
    start = hard_labelled(torch.zeros(meta.num_classes, *meta.image_shape),
                          torch.arange(meta.num_classes), meta.num_classes)
    dm = DistributionMatching(_network_factory(config, meta), start, real_means=real,
                              real_batch_size=config.distill.real_batch_size,
                              augmentation=strategy,
                              seed=config.distill.seed)
    return torch.stack([real(i, dm.draws(i)) for i in range(iterations)])


def test_cached_means_equal_the_in_loop_means_and_sum_over_workers(
        prepared, small_fashion_mnist, tmp_path):
    config = _config(prepared, small_fashion_mnist, tmp_path, "one")
    summary = run_dm_means(config, use_ray=False)
    means, class_sizes = load_dm_means(config)
    assert summary["iterations"] == 3 and len(class_sizes) == 10 and sum(class_sizes) == 600
    expected = _in_loop_means(config, small_fashion_mnist, 3)
    assert means.shape == expected.shape
    assert torch.allclose(means, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(means[0], means[1], rtol=1e-2)  # a fresh network per iteration
    # Two workers' sums (shards 0, 2 and shard 1) add up to one worker's.
    plan = build_dm_plan(config)
    parts = [read_local(plan, rank, 2) for rank in (0, 1)]
    members = class_members(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                            10, 600)
    sums = [class_sums(plan, members, keys, images, None, "cpu") for keys, _, images in parts]
    all_keys, _, all_images = read_local(plan, 0, 1)
    one = class_sums(plan, members, all_keys, all_images, None, "cpu")
    assert sums[0]["mass"].sum() > 0 and sums[1]["mass"].sum() > 0
    assert torch.equal(sums[0]["mass"] + sums[1]["mass"], one["mass"])
    assert torch.allclose(sums[0]["sums"] + sums[1]["sums"], one["sums"], rtol=1e-4, atol=1e-4)


def test_weighted_cached_means_are_the_weighted_in_loop_means(prepared, small_fashion_mnist,
                                                              tmp_path):
    config = _config(prepared, small_fashion_mnist, tmp_path, "weighted")
    plan = build_dm_plan(config)
    keys, labels, images = read_local(plan, 0, 1)
    members = class_members(keys, labels, 10, 600)
    weights = torch.rand(600, generator=torch.Generator().manual_seed(0)) + 0.1
    weighted = class_sums(plan, members, keys, images, weights, "cpu")
    plain = class_sums(plan, members, keys, images, None, "cpu")
    from ead_dist.data.meta import read_meta
    from ead_dist.stages.baselines import _network_factory

    meta = read_meta(small_fashion_mnist)
    order = torch.argsort(keys)
    real = InLoopRealMeans(images[order], labels[order], 10, weights)
    start = hard_labelled(torch.zeros(10, 1, 28, 28), torch.arange(10), 10)
    dm = DistributionMatching(_network_factory(config, meta), start, real_means=real,
                              real_batch_size=16, augmentation=plan["augmentation"], seed=0)
    expected = real(2, dm.draws(2))
    got = weighted["sums"][2] / weighted["mass"][2].unsqueeze(1).float()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain["sums"][2] / plain["mass"][2].unsqueeze(1).float(),
                              rtol=1e-3)


def test_dm_from_the_realgrad_pass_ends_where_the_in_loop_dm_does(
        prepared, small_fashion_mnist, tmp_path, ray_session):
    cached = _config(prepared, small_fashion_mnist, tmp_path, "cached")
    in_loop = _config(prepared, small_fashion_mnist, tmp_path, "loop",
                      **{"distill.dm_real": "loop"})
    summary = run_stages(cached, ("realgrad", "distill"))  # realgrad on 2 Ray Train workers
    assert summary["realgrad"]["workers"] == 2
    assert summary["distill"]["reads_real_data_in_loop"] is False
    reference = distill(in_loop)
    assert reference["reads_real_data_in_loop"] is True
    a = load_synthetic(summary["distill"]["synthetic"])[0]
    b = load_synthetic(reference["synthetic"])[0]
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert summary["distill"]["image_change"] > 1e-3  # DM moved the images, alike both ways


def test_the_dm_draws_are_in_realgrads_fingerprint_and_misuse_is_refused(
        prepared, small_fashion_mnist, tmp_path):
    config = _config(prepared, small_fashion_mnist, tmp_path, "fp")
    fields = stage_fields(config, "realgrad", "sha256:x")
    assert fields["distill.iterations"] == 3 and fields["distill.real_batch_size"] == 16
    assert "realgrad" in inputs(config, "distill")
    loop = tiny_config("runs/x", small_fashion_mnist, dict(DM, **{"distill.dm_real": "loop"}))
    assert "realgrad" not in inputs(loop, "distill")
    run_dm_means(config, use_ray=False)
    longer = tiny_config(config.run, small_fashion_mnist, dict(DM, **{"distill.iterations": 5}))
    with pytest.raises(StaleRunError, match="distill.iterations 3 -> 5"):
        run_dm_means(longer, use_ray=False)
    with pytest.raises(ConfigError, match="distill.dm_real 'realgrad' is for distill.method dm"):
        tiny_config("runs/x", small_fashion_mnist, dict(DM, **{"distill.method": "dc"}))
    with pytest.raises(ConfigError, match="must not use batch norm"):
        tiny_config("runs/x", small_fashion_mnist, dict(DM, **{"model.norm": "batchnorm"}))
    with pytest.raises(ValueError, match="cover 3 iterations"):
        CachedRealMeans(torch.zeros(3, 10, 4), [60] * 10)(3, None)

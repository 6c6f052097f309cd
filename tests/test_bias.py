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


# --- per-sample weights in the real terms -------------------------------------------------

import torch.nn.functional as F  # noqa: E402

from conftest import tiny_config  # noqa: E402
from ead_dist.data.arrays import load_split  # noqa: E402
from ead_dist.effect import loss_gradient, parameters_of  # noqa: E402
from ead_dist.models import build_model  # noqa: E402
from ead_dist.real_terms import grouped_gradient_sums  # noqa: E402
from ead_dist.weights import kde_weights  # noqa: E402

OVERRIDES = {"realgrad.real_samples": 200, "realgrad.p_batches": 2, "realgrad.p_batch_size": 20,
             "realgrad.checkpoints": 2, "experts.count": 1, "experts.train_samples": 256,
             "weights.method": "kde", "weights.sample": 30}


def weighted_loss(weights):
    """The weighted mean cross-entropy of a batch whose per-sample weights are ``weights``."""
    def loss(logits, labels):
        w = weights.to(logits.dtype)
        return (w * F.cross_entropy(logits, labels, reduction="none")).sum() / w.sum()
    return loss


def close(a, b, tolerance=1e-4):
    return (a - b).abs().max() <= tolerance * b.abs().max()


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = build_model("convnet", 1, 10, (28, 28), width=8, depth=2)
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    groups = torch.randint(-1, 3, (24,))
    return model, parameters_of(model), x, y, groups


def test_weighted_gradient_sums_equal_the_explicit_weighted_sums():
    model, theta, x, y, groups = tiny_problem()
    w = torch.rand(24) * 3
    sums, totals = grouped_gradient_sums(model, theta, x, y, groups, 3, w)
    for j in range(3):
        members = groups == j
        # sum_i w_i grad l_i = (sum_i w_i) * grad of the weighted mean loss
        expected = loss_gradient(model, theta, weighted_loss(w[members]), x[members],
                                 y[members]) * w[members].sum()
        assert close(sums[j], expected)
        assert abs(float(totals[j]) - float(w[members].double().sum())) < 1e-9
    # Not the unweighted sums: the weights matter.
    plain, counts = grouped_gradient_sums(model, theta, x, y, groups, 3)
    assert not close(sums[0], plain[0], 1e-2)


def test_uniform_weights_reproduce_the_unweighted_sums():
    model, theta, x, y, groups = tiny_problem(1)
    plain, counts = grouped_gradient_sums(model, theta, x, y, groups, 3)
    weighted, totals = grouped_gradient_sums(model, theta, x, y, groups, 3, torch.ones(24))
    assert torch.equal(weighted, plain)
    assert torch.equal(totals, counts.double())


@pytest.fixture(scope="module")
def experts_run(small_fashion_mnist, tmp_path_factory):
    from ead_dist.stages.experts import run_experts

    run = str(tmp_path_factory.mktemp("bias_realgrad") / "base")
    run_experts(tiny_config(run, small_fashion_mnist, OVERRIDES), use_ray=False)
    return run


def _config(experts_run, data_url, tmp_path, name, **changes):
    import shutil

    run = str(tmp_path / name)
    shutil.copytree(storage.join(experts_run, "experts"), storage.join(run, "experts"))
    return tiny_config(run, data_url, dict(OVERRIDES, **changes))


def _terms(config):
    from ead_dist.stages.realgrad import realgrad_url

    index = storage.read_json(storage.join(realgrad_url(config.run), "index.json"))
    return [storage.load_tensors(storage.join(realgrad_url(config.run), c["file"]))[0]
            for c in index["checkpoints"]]


def test_weighted_real_terms_equal_the_weighted_means_computed_directly(
        experts_run, small_fashion_mnist, tmp_path):
    from ead_dist.stages.realgrad import build_plan, run_realgrad
    from ead_dist.stages.weights import weights_url

    config = _config(experts_run, small_fashion_mnist, tmp_path, "kde")
    index = run_realgrad(config, use_ray=False)
    assert index["weights"] == "kde"
    weights = storage.load_tensors(weights_url(config.run))[0]["weights"]
    images, labels, _ = load_split(small_fashion_mnist, "train")
    assert weights.shape == (len(labels),) and weights.std() > 0.01  # not uniform
    plan = build_plan(config)
    model = build_model("convnet", 1, 10, (28, 28), **config.model.options_for("convnet"))
    for checkpoint, terms in zip(plan["checkpoints"], _terms(config)):
        theta, _ = storage.load_tensors(checkpoint["url"])
        d = torch.tensor(plan["d_sample"])
        g_D = loss_gradient(model, theta, weighted_loss(weights[d]), images[d], labels[d])
        assert close(terms["g_D"], g_D)
        unweighted = loss_gradient(model, theta, F.cross_entropy, images[d], labels[d])
        assert not close(terms["g_D"], unweighted, 1e-3)
        for k, batch in enumerate(plan["p_batches"]):
            b = torch.tensor(batch)
            g_P = loss_gradient(model, theta, weighted_loss(weights[b]), images[b], labels[b])
            assert close(terms["g_P"][k], g_P)
            assert close(terms["real_dots"][k], torch.dot(g_P, g_D))
        c = 3
        members = d[labels[d] == c]
        g_Dc = loss_gradient(model, theta, weighted_loss(weights[members]), images[members],
                             labels[members])
        assert close(terms["g_D_classes"][c], g_Dc)
        assert abs(float(terms["d_class_weights"][c]) - float(weights[members].sum())) < 1e-4


def test_uniform_weights_reproduce_the_unweighted_real_terms(experts_run, small_fashion_mnist,
                                                             tmp_path):
    from ead_dist.stages.realgrad import (
        build_plan,
        finalise,
        partial_sums,
        realgrad_url,
        term_file,
    )

    config = _config(experts_run, small_fashion_mnist, tmp_path, "uniform")
    plan = build_plan(config)
    ones = storage.join(config.run, "ones.safetensors")
    storage.save_tensors(ones, {"weights": torch.ones(600)}, {})
    results = []
    for name, weights in (("plain", None), ("ones", ones)):
        run_plan = dict(plan, weights=weights, run=storage.join(config.run, name))
        finalise(run_plan, partial_sums(run_plan, 0, 1, [0, 1]), [0, 1])
        results.append([storage.load_tensors(storage.join(realgrad_url(run_plan["run"]),
                                                          term_file(i)))[0] for i in (0, 1)])
    for plain, uniform in zip(*results):
        for name in plain:
            assert torch.equal(plain[name], uniform[name]), name
        assert set(uniform) - set(plain) == {"d_class_weights", "p_class_weights"}


# --- kernel-density weights ---------------------------------------------------------------


def test_kde_weights_favour_outliers_and_have_mean_one_per_class():
    generator = torch.Generator().manual_seed(0)
    cluster = torch.randn(40, 2, generator=generator) * 0.1
    outliers = torch.tensor([[3.0, 3.0], [-3.0, 2.0], [2.5, -3.0]])
    class_0 = torch.cat([cluster, outliers])
    class_1 = torch.randn(20, 2, generator=generator) * 0.1 + 10  # another class, no outliers
    embeddings, labels = torch.cat([class_0, class_1]), torch.tensor([0] * 43 + [1] * 20)
    weights, bandwidths = kde_weights(embeddings, labels, 2)
    assert weights[40:43].min() > 5 * weights[:40].max()  # every outlier above every member
    for c in (0, 1):
        assert abs(float(weights[labels == c].mean()) - 1) < 1e-5
    assert len(bandwidths) == 2 and bandwidths[0] > bandwidths[1]
    # A higher temperature flattens the weights; a reference sample gives the same ordering.
    flat, _ = kde_weights(embeddings, labels, 2, temperature=4.0)
    assert flat[40:43].max() < weights[40:43].max()
    sampled, _ = kde_weights(embeddings, labels, 2, sample=15, seed=1)
    assert sampled[40:43].min() > sampled[:40].max()


# --- DM with weights ----------------------------------------------------------------------


def test_streamed_weights_equal_the_kde_weights_of_the_embeddings_in_memory(
        experts_run, small_fashion_mnist, tmp_path):
    """The stage's three passes over the shards give kde_weights of the whole split at once."""
    from ead_dist.models.embedding import embed
    from ead_dist.stages.experts import final_expert
    from ead_dist.stages.weights import ensure_weights, load_weights

    config = _config(experts_run, small_fashion_mnist, tmp_path, "streamed")
    streamed = load_weights(ensure_weights(config, use_ray=False))
    meta = read_meta(small_fashion_mnist)
    images, labels, _ = load_split(small_fashion_mnist, "train")
    with torch.no_grad():
        embeddings = embed(final_expert(config, meta), images)
    expected, _ = kde_weights(embeddings, labels, 10, sample=30, seed=0)
    assert streamed.std() > 0.01 and torch.allclose(streamed, expected, rtol=1e-4, atol=1e-5)
    # a reference as large as every class: two passes over the shards, the same weights
    whole = _config(experts_run, small_fashion_mnist, tmp_path, "whole",
                    **{"weights.sample": 10_000})
    url = ensure_weights(whole, use_ray=False)
    assert storage.load_metadata(url)["passes"] == 2
    assert storage.load_metadata(ensure_weights(config, use_ray=False))["passes"] == 3
    expected, _ = kde_weights(embeddings, labels, 10, sample=None)
    assert torch.allclose(load_weights(url), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.cluster
def test_weights_from_two_ray_tasks_equal_the_weights_of_one_process(
        experts_run, small_fashion_mnist, tmp_path, ray_session):
    from ead_dist.stages.weights import ensure_weights, load_weights

    one = _config(experts_run, small_fashion_mnist, tmp_path, "weights-one")
    two = _config(experts_run, small_fashion_mnist, tmp_path, "weights-two",
                  **{"realgrad.workers": 2})
    expected = load_weights(ensure_weights(one, use_ray=False))
    url = ensure_weights(two, use_ray=True)
    assert storage.load_metadata(url)["tasks"] == 2  # 3 shards dealt to 2 tasks
    got = load_weights(url)
    assert expected.std() > 0.01 and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_weighted_dm_loss_is_the_weighted_mean_embedding_distance():
    from ead_dist.methods.dm import DistributionMatching, distribution_matching_loss
    from ead_dist.methods.image_sgd import fresh_network, iteration_generator
    from ead_dist.models.embedding import embed
    from ead_dist.synthetic import hard_labelled

    real = torch.randn(5, 4)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5])
    target = (w[:, None] * real).sum(0) / w.sum()
    synthetic = torch.randn(2, 4)
    expected = ((target - synthetic.mean(0)) ** 2).sum()
    assert torch.allclose(distribution_matching_loss(real, synthetic, w), expected)
    assert not torch.allclose(distribution_matching_loss(real, synthetic), expected)

    def make():
        return build_model("convnet", 1, 2, (28, 28), width=8, depth=2)

    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 28, 28), torch.tensor([0] * 6 + [1] * 6)
    weights = torch.rand(12) + 0.1
    start = hard_labelled(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), 2)
    dm = DistributionMatching(make, start, images, labels, real_batch_size=50, seed=3,
                              real_weights=weights)
    network = fresh_network(make, iteration_generator(3, 0), "cpu")
    with torch.no_grad():
        psi_real, psi_s = embed(network, images), embed(network, start.images)
    by_hand = sum(((weights[c * 6:(c + 1) * 6, None] * psi_real[c * 6:(c + 1) * 6]).sum(0)
                   / weights[c * 6:(c + 1) * 6].sum() - psi_s[c]).pow(2).sum() for c in (0, 1))
    assert torch.allclose(dm.loss(0).detach(), by_hand, rtol=1e-5)


def test_weighted_dc_matches_the_gradient_of_the_weighted_real_loss():
    from ead_dist.methods.dc import GradientMatching, matching_distance
    from ead_dist.methods.image_sgd import fresh_network, iteration_generator
    from ead_dist.synthetic import hard_labelled

    def make():
        return build_model("convnet", 1, 2, (28, 28), width=8, depth=2)

    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 28, 28), torch.tensor([0] * 6 + [1] * 6)
    weights = torch.rand(12) + 0.1
    start = hard_labelled(torch.randn(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), 2)

    def loss(real_weights):
        dc = GradientMatching(make, start, images, labels, outer_loop=1, inner_loop=1,
                              real_batch_size=50, real_weights=real_weights)
        network = fresh_network(make, iteration_generator(0, 0), "cpu")
        return float(dc.matching_loss(network, torch.Generator().manual_seed(1)).detach()), network

    weighted, network = loss(weights)
    parameters = list(network.parameters())
    by_hand = 0.0
    for c in (0, 1):
        real, w = images[labels == c], weights[labels == c]
        ce = F.cross_entropy(network(real), torch.full((6,), c), reduction="none")
        g_real = torch.autograd.grad((w * ce).sum() / w.sum(), parameters)
        g_synthetic = torch.autograd.grad(
            F.cross_entropy(network(start.images[start.classes == c]), torch.full((2,), c)),
            parameters)
        by_hand += float(matching_distance(list(g_synthetic), list(g_real)))
    assert abs(weighted - by_hand) < 1e-4 * max(1.0, abs(by_hand))
    plain, _ = loss(None)
    assert abs(plain - weighted) > 1e-3  # the weights change what is matched
    uniform, _ = loss(torch.ones(12))
    assert abs(uniform - plain) < 1e-5


# --- fingerprints -------------------------------------------------------------------------


def test_weight_settings_are_in_the_fingerprints_of_the_stages_that_use_them(small_fashion_mnist,
                                                                             tmp_path):
    from ead_dist.fingerprint import differences, stage_fields

    def fields(stage, **changes):
        config = tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                             dict(OVERRIDES, **changes))
        return stage_fields(config, stage, "sha256:x")

    base = fields("realgrad")
    for field, value in (("weights.temperature", 2.0), ("weights.bandwidth", 0.5),
                         ("weights.sample", 7), ("weights.method", "none")):
        assert differences(base, fields("realgrad", **{field: value})), field
        assert differences(fields("distill"), fields("distill", **{field: value})), field
    assert not differences(base, fields("realgrad", **{"weights.batch_size": 7}))
    for method in ("dm", "dc"):
        baseline = fields("distill", **{"distill.method": method})
        assert differences(baseline, fields("distill", **{"distill.method": method,
                                                          "weights.temperature": 3.0})), method
    # Weights off: their other settings change nothing; an old record without them still fits.
    off = fields("realgrad", **{"weights.method": "none"})
    assert not differences(off, fields("realgrad", **{"weights.method": "none",
                                                      "weights.temperature": 3.0}))
    assert not differences({k: v for k, v in off.items() if not k.startswith("weights.")}, off)


def test_methods_that_ignore_weights_refuse_them(small_fashion_mnist, tmp_path):
    from ead_dist.config import ConfigError

    with pytest.raises(ConfigError, match="weights.method"):
        tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                    dict(OVERRIDES, **{"distill.method": "herding"}))


@pytest.mark.cluster
def test_two_ray_train_workers_give_the_single_process_weighted_terms(
        experts_run, small_fashion_mnist, tmp_path, ray_session):
    from ead_dist.stages.realgrad import run_realgrad

    reference = _config(experts_run, small_fashion_mnist, tmp_path, "one")
    run_realgrad(reference, use_ray=False)
    config = _config(experts_run, small_fashion_mnist, tmp_path, "two",
                     **{"realgrad.workers": 2})
    assert run_realgrad(config, use_ray=True)["workers"] == 2
    for expected, got in zip(_terms(reference), _terms(config)):
        assert set(expected) == set(got) and "d_class_weights" in got
        for name in expected:
            if expected[name].is_floating_point():
                # float32 sums of non-integer weights in another order: measured 1.9e-5
                assert close(got[name], expected[name]), name
            else:
                assert torch.equal(got[name], expected[name]), name


def test_a_new_temperature_reweights_the_recorded_densities_without_a_pass(
        experts_run, small_fashion_mnist, tmp_path, monkeypatch):
    from ead_dist.models.embedding import embed
    from ead_dist.stages import weights as weights_stage
    from ead_dist.stages.experts import final_expert

    config = _config(experts_run, small_fashion_mnist, tmp_path, "temperature")
    url = weights_stage.ensure_weights(config, use_ray=False)
    assert storage.load_metadata(url)["settings"]["weights.temperature"] == 1.0

    def no_pass(*args, **kwargs):
        raise AssertionError("a temperature change must not read the shards again")

    monkeypatch.setattr(weights_stage, "map_over_shards", no_pass)
    colder = tiny_config(config.run, small_fashion_mnist,
                         dict(OVERRIDES, **{"weights.temperature": 0.5}))
    assert weights_stage.ensure_weights(colder, use_ray=False) == url
    meta = read_meta(small_fashion_mnist)
    assert storage.load_metadata(url)["settings"]["weights.temperature"] == 0.5
    images, labels, _ = load_split(small_fashion_mnist, "train")
    with torch.no_grad():
        embeddings = embed(final_expert(config, meta), images)
    expected, _ = kde_weights(embeddings, labels, 10, sample=30, seed=0, temperature=0.5)
    got = weights_stage.load_weights(url)
    assert got.std() > 0.01 and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # any other setting still needs the passes over the shards
    other = tiny_config(config.run, small_fashion_mnist,
                        dict(OVERRIDES, **{"weights.temperature": 0.5, "weights.sample": 20}))
    with pytest.raises(AssertionError, match="must not read the shards"):
        weights_stage.ensure_weights(other, use_ray=False)

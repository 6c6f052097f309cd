from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from ead_dist.augment import (
    DSA_STRATEGY,
    DSA_STRATEGY_DIGITS,
    OPS,
    apply_augmentation,
    augment,
    dsa_strategy,
    parse_strategy,
    sample_augmentation,
)
from ead_dist.models import build_model

SIZE = (16, 16)


def images(n, seed=0, channels=3):
    return torch.randn(n, channels, *SIZE, generator=torch.Generator().manual_seed(seed))


def draw(strategy, n, seed=0, **kwargs):
    return sample_augmentation(strategy, n, torch.Generator().manual_seed(seed), SIZE, **kwargs)


@pytest.mark.parametrize("strategy", [DSA_STRATEGY, *OPS])
def test_same_seed_same_output(strategy):
    x = images(8)
    a = augment(x, strategy, torch.Generator().manual_seed(3))
    b = augment(x, strategy, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_all_ops_together_are_deterministic():
    x = images(8)
    a = augment(x, DSA_STRATEGY, torch.Generator().manual_seed(1), single=False)
    b = augment(x, DSA_STRATEGY, torch.Generator().manual_seed(1), single=False)
    assert torch.equal(a, b)


def test_single_mode_draws_one_op_and_color_draws_three_values():
    params = draw(DSA_STRATEGY, 4)
    assert len(params.ops) == 1
    seen = {draw(DSA_STRATEGY, 4, seed=s).ops[0] for s in range(60)}
    assert seen == set(OPS)
    color = draw("color", 4)
    assert color.brightness.shape == color.saturation.shape == color.contrast.shape == (4,)


@pytest.mark.parametrize("op", OPS)
def test_siamese_per_sample_concat_equals_separate(op):
    """Per-sample params on a concatenated batch = the same rows applied to each part."""
    real, synthetic = images(5, seed=1), images(3, seed=2)
    params = draw(op, 8, seed=4)
    together = apply_augmentation(torch.cat([real, synthetic]), params)
    first = draw(op, 8, seed=4)
    split = {k: v[:5] for k, v in vars(first).items() if isinstance(v, torch.Tensor)}
    rest = {k: v[5:] for k, v in vars(first).items() if isinstance(v, torch.Tensor)}
    alone_real = apply_augmentation(real, replace(first, **split))
    alone_synthetic = apply_augmentation(synthetic, replace(first, **rest))
    assert torch.allclose(together[:5], alone_real, atol=1e-6)
    assert torch.allclose(together[5:], alone_synthetic, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_siamese_batch_shared_params_fit_any_batch_size(op):
    """per_sample=False: one draw transforms real and synthetic batches of any sizes alike."""
    real, synthetic = images(6, seed=1), images(2, seed=2)
    params = draw(op, 0, seed=5, per_sample=False)
    together = apply_augmentation(torch.cat([real, synthetic]), params)
    assert torch.allclose(together[:6], apply_augmentation(real, params), atol=1e-6)
    assert torch.allclose(together[6:], apply_augmentation(synthetic, params), atol=1e-6)
    # Same image in both batches, same output.
    both = apply_augmentation(torch.cat([real[:1], real[:1]]), params)
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("op", OPS)
def test_gradient_flows_to_images(op):
    x = images(4).requires_grad_(True)
    out = apply_augmentation(x, draw(op, 4, seed=2))
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_coordinator_pass_through_augmentation():
    """d/dS < v, grad_theta L(aug(S), theta) >: the synthetic term with DSA inside."""
    torch.manual_seed(0)
    model = build_model("convnet", 3, 10, SIZE, width=8, depth=2)
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    synthetic = images(4).requires_grad_(True)
    shared = draw(DSA_STRATEGY, 0, seed=7, per_sample=False, single=False)
    logits = functional_call(model, params, (apply_augmentation(synthetic, shared),))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
    inner = sum((g * torch.randn_like(g)).sum() for g in grads)
    (g_S,) = torch.autograd.grad(inner, synthetic)
    assert torch.isfinite(g_S).all() and g_S.abs().sum() > 0


def test_flip_twice_is_identity():
    x = images(16)
    params = draw("flip", 16, seed=0)
    assert params.flip.any() and not params.flip.all()
    once = apply_augmentation(x, params)
    assert not torch.equal(once, x)
    assert torch.equal(apply_augmentation(once, params), x)


@pytest.mark.parametrize("op", ["crop", "scale", "rotate", "cutout"])
@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (5, 3, 32, 32), (2, 3, 17, 23)])
def test_geometry_keeps_shape(op, shape):
    x = torch.randn(*shape)
    out = augment(x, op, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_crop_is_a_zero_filled_translation():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    params = draw("crop", 1)
    params = replace(params, image_size=(4, 4), shift=torch.tensor([[1, -1]]))
    out = apply_augmentation(x, params)[0, 0]
    assert torch.equal(out[:3, 1:], x[0, 0, 1:, :3])
    assert (out[3] == 0).all() and (out[:, 0] == 0).all()


def test_cutout_zeroes_a_half_side_square():
    x = torch.ones(1, 1, 16, 16)
    params = draw("cutout", 1)
    params = replace(params, cutout_center=torch.tensor([[8, 8]]))
    out = apply_augmentation(x, params)
    assert (out == 0).sum() == 8 * 8


def test_identity_geometry_is_exact_enough():
    """Scale 1 and rotation 0 reproduce the image (grid_sample on pixel centres)."""
    x = images(2)
    base = draw("scale", 2)
    same = apply_augmentation(x, replace(base, scale=torch.ones(1, 2)))
    assert torch.allclose(same, x, atol=1e-5)
    base = draw("rotate", 2)
    same = apply_augmentation(x, replace(base, rotate=torch.zeros(1)))
    assert torch.allclose(same, x, atol=1e-5)


def test_digit_strategy_has_no_flip():
    assert "flip" not in parse_strategy(DSA_STRATEGY_DIGITS)
    assert "flip" in parse_strategy(DSA_STRATEGY)
    assert dsa_strategy("MNIST") == DSA_STRATEGY_DIGITS
    assert dsa_strategy("fashion-mnist") == DSA_STRATEGY


def test_none_strategy_is_identity_and_unknown_op_is_named():
    x = images(2)
    assert torch.equal(augment(x, "none", torch.Generator()), x)
    assert torch.equal(augment(x, None, torch.Generator()), x)
    with pytest.raises(ValueError, match="'blur'"):
        parse_strategy("color_blur")


def test_params_for_another_size_are_refused():
    params = draw("crop", 4)
    with pytest.raises(ValueError, match="rows"):
        apply_augmentation(images(3), params)
    with pytest.raises(ValueError, match="image_size"):
        apply_augmentation(torch.randn(4, 3, 8, 8), params)

"""The finite-step effect: the unrolled student is plain SGD, the memory-constant backward
equals backpropagation through the unrolled steps, and the loss is MTT's normalised distance."""

import pytest
import torch
from torch import nn

from ead_dist.augment import augment
from ead_dist.effect import parameters_of
from ead_dist.models import build_model
from ead_dist.unroll import (
    classification_loss,
    student_batches,
    student_end,
    trajectory_distance,
    trajectory_loss_and_grads,
    unrolled_sgd,
)


def _linear():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_unrolled_student_equals_two_hand_computed_sgd_steps():
    """Softmax regression: grad_W = (softmax(Wx + b) - y) x^T / n, grad_b = mean(softmax - y)."""
    model = _linear()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, generator=g), torch.softmax(torch.randn(4, 2, generator=g), 1)
    lr = torch.tensor(0.3)
    theta = parameters_of(model)
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    end = unrolled_sgd(model, theta, x, y, lr, batches)

    W, b = theta["weight"].clone(), theta["bias"].clone()
    for batch in batches:
        xb, yb = x[batch], y[batch]
        residual = (torch.softmax(xb @ W.T + b, dim=1) - yb) / len(batch)
        W, b = W - lr * residual.T @ xb, b - lr * residual.sum(0)
    assert torch.allclose(end["weight"], W, atol=1e-6)
    assert torch.allclose(end["bias"], b, atol=1e-6)
    values = student_end(model, theta, x, y, lr, batches)  # the same steps, no graph
    assert not values["weight"].requires_grad
    assert torch.allclose(values["weight"], W, atol=1e-6)
    assert torch.allclose(values["bias"], b, atol=1e-6)


def test_trajectory_distance_is_normalised_by_the_expert_span():
    start = {"w": torch.zeros(3)}
    target = {"w": torch.tensor([1.0, 2.0, 2.0])}
    assert trajectory_distance(start, start, target) == pytest.approx(1.0)
    assert trajectory_distance(target, start, target) == pytest.approx(0.0)
    halfway = {"w": torch.tensor([0.5, 1.0, 1.0])}
    assert trajectory_distance(halfway, start, target) == pytest.approx(0.25)


def test_student_batches_cover_s_once_per_pass():
    g = torch.Generator().manual_seed(0)
    batches = student_batches(10, 5, 5, g)
    assert len(batches) == 5 and all(len(b) == 5 for b in batches)
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(10))
    assert all(b.tolist() == list(range(10)) for b in student_batches(10, 3, None, g))


@pytest.mark.parametrize("with_augmentation", [False, True])
def test_memory_constant_backward_equals_backprop_through_the_unroll(with_augmentation):
    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    theta = parameters_of(model)
    target = {k: v + 0.05 * torch.randn_like(v) for k, v in theta.items()}
    g = torch.Generator().manual_seed(2)
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64).float()
    logits = torch.randn(6, 3, generator=g)
    batches = student_batches(6, 4, 3, g)
    draw = None
    if with_augmentation:
        def draw(x, step):
            return augment(x, "color_crop_cutout_scale_rotate", torch.Generator().manual_seed(step))

    def leaves():
        return (images.clone().requires_grad_(True), logits.clone().requires_grad_(True),
                torch.tensor(0.05, requires_grad=True))

    x1, l1, lr1 = leaves()
    end = unrolled_sgd(model, theta, x1, torch.softmax(l1, 1), lr1, batches, draw)
    loss1 = trajectory_distance(end, theta, target)
    loss1.backward()

    x2, l2, lr2 = leaves()
    y2 = torch.softmax(l2, 1)
    targets = y2.detach().requires_grad_(True)
    loss2, (g_x, g_y, g_lr) = trajectory_loss_and_grads(model, theta, target, x2, targets, lr2,
                                                        batches, draw)
    y2.backward(g_y)
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-5)
    assert torch.allclose(g_x, x1.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(l2.grad, l1.grad, rtol=1e-4, atol=1e-7)
    assert g_lr.item() == pytest.approx(lr1.grad.item(), rel=1e-4)
    assert x1.grad.abs().sum() > 0 and l1.grad.abs().sum() > 0


def test_memory_constant_backward_reaches_tensors_the_step_loss_closes_over():
    """Image-text's learned similarity enters the student only through its step loss: the
    rebuilt steps must still pull its gradient back, as backpropagation does."""
    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    theta = parameters_of(model)
    target = {k: v + 0.05 * torch.randn_like(v) for k, v in theta.items()}
    images = torch.randn(6, 1, 8, 8)
    y = torch.softmax(torch.randn(6, 3), 1)
    batches = [torch.arange(6)] * 3
    lr = torch.tensor(0.05)

    def weighted(weights):
        def step_loss(model, params, x, targets):
            return (weights * classification_loss(model, params, x, targets)).sum()
        return step_loss

    full = torch.tensor([0.7, 0.6], requires_grad=True)
    end = unrolled_sgd(model, theta, images, y, lr, batches, step_loss=weighted(full))
    trajectory_distance(end, theta, target).backward()
    rebuilt = torch.tensor([0.7, 0.6], requires_grad=True)
    _, (_, _, _, g_rebuilt) = trajectory_loss_and_grads(
        model, theta, target, images, y, lr, batches, step_loss=weighted(rebuilt),
        closed_over=[rebuilt])
    assert full.grad.abs().sum() > 0
    assert torch.allclose(g_rebuilt, full.grad, rtol=1e-4, atol=1e-8)


def test_grads_are_none_for_inputs_that_are_not_learned():
    model = _linear()
    theta = parameters_of(model)
    target = {k: v + 0.1 for k, v in theta.items()}
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.softmax(torch.randn(4, 2), 1)
    loss, (g_x, g_y, g_lr) = trajectory_loss_and_grads(model, theta, target, x, y,
                                                       torch.tensor(0.1), [torch.arange(4)])
    assert g_x is not None and g_y is None and g_lr is None and loss > 0


@pytest.mark.parametrize("objective", ["matching", "trajectory"])
def test_objective_value_is_the_loss_the_step_of_that_iteration_takes(objective):
    """Same draws, same S: the value without an update equals the loss step() reports; other
    terms or segments give another value, and the fitted ones stay in place."""
    from ead_dist.coordinator import Coordinator, RealTerms, Segment, StudentSettings
    from ead_dist.synthetic import SyntheticSet

    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=1)
    thetas = [parameters_of(build_model("convnet", 1, 3, (8, 8), width=4, depth=1))
              for _ in range(3)]
    size = sum(v.numel() for v in thetas[0].values())

    def terms(theta):
        return RealTerms(theta=theta, lr=0.01, g_D=torch.randn(size), g_P=torch.randn(2, size),
                         real_dots=torch.randn(2))

    def near(theta):  # a target a short way off, so that the student's steps matter
        return {k: v + 0.01 * torch.randn_like(v) for k, v in theta.items()}

    fitted = {"terms": [terms(thetas[0])], "segments": [Segment(thetas[0], near(thetas[0]))]}
    other = {"terms": [terms(thetas[2])], "segments": [Segment(thetas[2], near(thetas[2]))]}
    kind = "segments" if objective == "trajectory" else "terms"
    synthetic = SyntheticSet(torch.randn(6, 1, 8, 8), torch.randn(6, 3),
                             torch.tensor([0, 0, 1, 1, 2, 2]))
    coordinator = Coordinator(model, synthetic, objective=objective,
                              student=StudentSettings(steps=2, batch_size=3, initial_lr=0.1),
                              augmentation="color_crop", **{kind: fitted[kind]})
    value = coordinator.objective_value(range(5, 6))
    elsewhere = coordinator.objective_value(range(5, 6), **{kind: other[kind]})
    assert getattr(coordinator, kind) is fitted[kind]
    assert coordinator.step(5) == pytest.approx(value, rel=1e-5)
    assert elsewhere != pytest.approx(value, rel=1e-3)

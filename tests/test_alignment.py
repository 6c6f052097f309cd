import pytest
import torch

from ead_dist.alignment import (
    class_matching_loss,
    ead_loss,
    matching_loss,
    per_class_effect_loss,
    real_coefficient,
)
from ead_dist.effect import cross_entropy, loss_gradient, parameters_of


def test_scalar_loss_derived_and_paper():
    g_S, g_P, g_D = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([3.0, 1.0])
    dot = torch.dot(g_P, g_D)  # 0.5
    derived = ead_loss([g_S, g_S], [g_P, g_P], [dot, dot], [0.1, 0.2])
    assert derived.item() == pytest.approx(abs(0.3 * (-1.5 - 0.5)))
    paper = ead_loss([g_S], [g_P], [dot], [1.0], coefficient="paper", real_size=6000,
                     synthetic_size=100)
    assert real_coefficient("paper", 6000, 100) == pytest.approx(2 - 60)
    assert paper.item() == pytest.approx(abs(-1.5 - (2 - 60) * 0.5))
    with pytest.raises(ValueError, match="coefficient"):
        real_coefficient("other", 1, 1)


def test_vector_objectives_vanish_exactly_when_effects_do():
    g_D = torch.randn(5)
    assert matching_loss(g_D.clone(), g_D) == 0
    assert matching_loss(g_D + 1, g_D).item() == pytest.approx(5.0)
    g_P_classes = torch.randn(3, 5)
    dots = g_P_classes @ g_D
    assert per_class_effect_loss(g_D, g_P_classes, dots).item() == pytest.approx(0.0, abs=1e-10)
    v = torch.randn(5)
    assert per_class_effect_loss(g_D + v, g_P_classes, dots).item() == pytest.approx(
        ((g_P_classes @ v) ** 2).sum().item(), rel=1e-5)
    classes = torch.randn(3, 5)
    assert class_matching_loss(classes, classes) == 0


def test_gradient_of_the_ead_loss_wrt_images_and_labels_is_exact():
    """d/dS of | eta (< g_P, g_S > - < g_P, g_D >) | and of || g_S - g_D ||^2, by gradcheck."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    theta = parameters_of(model)
    real_x, real_y = torch.randn(10, 1, 3, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    g_D = loss_gradient(model, theta, cross_entropy, real_x, real_y)
    g_P = loss_gradient(model, theta, cross_entropy, real_x[:4], real_y[:4])
    images = torch.randn(3, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def scalar(images, logits):
        g_S = loss_gradient(model, theta, cross_entropy, images, torch.softmax(logits, 1),
                            create_graph=True)
        return ead_loss([g_S], [g_P], [torch.dot(g_P, g_D)], [0.01])

    def matching(images, logits):
        g_S = loss_gradient(model, theta, cross_entropy, images, torch.softmax(logits, 1),
                            create_graph=True)
        return matching_loss(g_S, g_D)

    assert torch.autograd.gradcheck(scalar, (images, logits))
    assert torch.autograd.gradcheck(matching, (images, logits))


LAYOUT = [("conv.weight", (2, 1, 2)), ("conv.bias", (2,)), ("head.weight", (1, 2)),
          ("head.bias", (1,))]


def test_gradient_distance_l2_is_matching_and_skips_head_and_biases_on_request():
    from ead_dist.alignment import gradient_distance

    g_D = torch.zeros(9)
    g_S = torch.arange(1.0, 10.0)
    assert gradient_distance(g_S, g_D, LAYOUT) == matching_loss(g_S, g_D)
    # Only conv.weight (entries 1..4) remains.
    assert gradient_distance(g_S, g_D, LAYOUT, "l2", skip_head_and_biases=True) == 1 + 4 + 9 + 16
    assert gradient_distance(g_S, g_D, LAYOUT, "layer_l1", skip_head_and_biases=True) == 10
    assert gradient_distance(g_S, g_D, LAYOUT, "layer_l1") == 45


def test_layer_cosine_is_per_output_channel_and_ignores_scale_and_biases():
    from ead_dist.alignment import gradient_distance

    g_D = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 1.0, 1.0, 7.0])
    # Each output channel of each weight scaled by its own positive factor; biases changed.
    g_S = torch.tensor([3.0, 0.0, 0.0, 0.5, -1.0, 2.0, 4.0, 4.0, -3.0])
    assert gradient_distance(g_S, g_D, LAYOUT, "layer_cosine").item() == pytest.approx(0.0,
                                                                                       abs=1e-6)
    # Channel 0 of conv turned orthogonal: a distance of exactly 1 for that channel.
    g_S[0], g_S[1] = 0.0, 2.0
    assert gradient_distance(g_S, g_D, LAYOUT, "layer_cosine").item() == pytest.approx(1.0)
    # Batched per class: [C, n] sums the classes.
    both = gradient_distance(torch.stack([g_S, g_S]), torch.stack([g_D, g_D]), LAYOUT,
                             "layer_cosine")
    assert both.item() == pytest.approx(2.0)

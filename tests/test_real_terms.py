import torch

from ead_dist.effect import cross_entropy, loss_gradient, parameters_of
from ead_dist.models import build_model
from ead_dist.real_terms import class_means, grouped_gradient_sums


def test_grouped_sums_equal_per_sample_gradient_sums():
    torch.manual_seed(0)
    model = build_model("convnet", 1, 4, (8, 8), width=4, depth=1).double()
    params = parameters_of(model)
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    groups = torch.tensor([0, 2, -1, 1] * 5)
    sums, counts = grouped_gradient_sums(model, params, x, y, groups, 3)
    for j in range(3):
        members = (groups == j).nonzero().flatten()
        expected = sum(loss_gradient(model, params, cross_entropy, x[i:i + 1], y[i:i + 1])
                       for i in members.tolist())
        assert torch.allclose(sums[j], expected, rtol=1e-10, atol=1e-12)
        assert counts[j] == len(members)
    means, overall = class_means(sums, counts)
    kept = groups >= 0
    assert torch.allclose(overall, loss_gradient(model, params, cross_entropy, x[kept], y[kept]),
                          rtol=1e-10, atol=1e-12)
    assert torch.allclose(means[1], sums[1] / counts[1])

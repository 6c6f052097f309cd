import pytest
import torch
from torch.func import functional_call

from ead_dist.models import MODEL_NAMES, build_model

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
# Small widths keep the double-backward checks fast; the shape tests build the defaults.
SMALL = {"convnet": {"width": 16}, "mlp": {"width": 32}}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_shape(name, shape):
    channels, height, width = shape
    torch.manual_seed(0)
    model = build_model(name, channels, 10, (height, width))
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
def test_convnet_norms(norm):
    model = build_model("convnet", 3, 7, (32, 32), width=8, norm=norm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    "name,options",
    [
        ("convnet", SMALL["convnet"]),
        ("mlp", SMALL["mlp"]),
        ("resnet18", {"norm": "instancenorm"}),
        ("resnet18", {"norm": "batchnorm"}),
    ],
    ids=["convnet", "mlp", "resnet18-instancenorm", "resnet18-batchnorm"],
)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_functional_call_double_backward(name, options, shape):
    """The coordinator's pass: d/dx < v, grad_theta L(x, theta) > through functional_call."""
    torch.manual_seed(0)
    model = build_model(name, shape[0], 10, shape[1:], **options)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    x = torch.randn(4, *shape, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
    directions = [torch.randn_like(g) for g in grads]
    inner = sum((g * v).sum() for g, v in zip(grads, directions))
    (g_x,) = torch.autograd.grad(inner, x)
    assert g_x.shape == x.shape
    assert torch.isfinite(g_x).all()
    assert g_x.abs().sum() > 0


def test_convnet3_parameter_count():
    width, classes, channels = 128, 10, 1
    conv = lambda c_in: c_in * width * 3 * 3 + width  # noqa: E731  weights + bias
    norm = 2 * width  # GroupNorm affine: weight + bias per channel
    side = ((28 // 2) // 2) // 2  # 28 -> 14 -> 7 -> 3
    head = width * side * side * classes + classes
    expected = conv(channels) + 2 * conv(width) + 3 * norm + head
    assert expected == 308_746
    model = build_model("convnet", channels, classes, (28, 28))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_convnet_literature_padding_for_28px():
    """first_padding=3 is DC/MTT's 28 -> 32 stem: 128 x 4 x 4 features into the head."""
    model = build_model("convnet", 1, 10, (28, 28), first_padding=3)
    assert model.head.in_features == 128 * 4 * 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_small_image_stem():
    model = build_model("resnet18", 1, 10, (28, 28))
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert not any(m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))


def test_unknown_model_names_it():
    with pytest.raises(ValueError, match="'vgg11'"):
        build_model("vgg11", 3, 10, (32, 32))


@pytest.mark.parametrize(
    "name,options,field",
    [
        ("convnet", {"widht": 64}, "widht"),
        ("convnet", {"norm": "layernorm"}, "norm"),
        ("convnet", {"depth": 0}, "depth"),
        ("convnet", {"depth": 6}, "depth"),
        ("mlp", {"norm": "batchnorm"}, "norm"),
        ("resnet18", {"norm": "none"}, "norm"),
    ],
)
def test_bad_options_name_the_option(name, options, field):
    with pytest.raises(ValueError, match=field):
        build_model(name, 1, 10, (28, 28), **options)

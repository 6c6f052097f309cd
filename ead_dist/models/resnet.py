"""ResNet-18: torchvision's network with a stem for small (28-64 px) images."""

from __future__ import annotations

import torchvision
from torch import nn

RESNET_NORMS = ("batchnorm", "instancenorm")


def _instance_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(channels, channels, affine=True)


def resnet18(
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    norm: str = "batchnorm",
) -> nn.Module:
    """torchvision resnet18 with a 3x3 stride-1 first conv and no max pool (CIFAR-style stem).

    norm="batchnorm" (default) is the network the cross-architecture tables report. BatchNorm in
    train mode mixes the samples of a batch and updates running statistics as a side effect of
    every forward, so under torch.func.functional_call the buffers of the module (not of the
    params dict) are updated, and per-sample gradients (vmap) are not defined; in eval mode it
    uses running statistics that a checkpoint must carry. Double backward works in either mode.
    Where those matter (checkpoints differentiated by the coordinator), use "instancenorm"
    (GroupNorm with one group per channel: per-sample, no buffers).

    image_size is accepted for a uniform constructor; the adaptive pool makes any size >= 1 work.
    """
    if norm == "batchnorm":
        norm_factory = nn.BatchNorm2d
    elif norm == "instancenorm":
        norm_factory = _instance_norm
    else:
        raise ValueError(f"norm must be one of {RESNET_NORMS}, got {norm!r}")
    model = torchvision.models.resnet18(
        weights=None, num_classes=num_classes, norm_layer=norm_factory
    )
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    # torchvision's ReLUs are in place; out-of-place keeps every saved activation intact for
    # double backward.
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model

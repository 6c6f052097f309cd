"""ConvNet-D, the evaluation network of the dataset-distillation literature (DC, DSA, DM, MTT)."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("instancenorm", "batchnorm", "none")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation after each conv, by the literature's name for it.

    "instancenorm" is GroupNorm with one group per channel, as the DC code builds it: the same
    statistics as InstanceNorm2d, with a learned per-channel affine and no running buffers.
    """
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _require_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class ConvNet(nn.Module):
    """depth x [3x3 conv (width) -> norm -> ReLU -> 2x2 average pool], flatten, linear head.

    Defaults are ConvNet-3 as the literature evaluates it: width 128, instance norm.
    The ReLU is not in place, so the coordinator can take double backward through it.

    first_padding is the first conv's padding. The DC/MTT code pads it by 3 for single-channel
    28x28 data (28 -> 32 -> 16 -> 8 -> 4, 2048 features at width 128); the default 1 gives
    28 -> 14 -> 7 -> 3 (1152 features). Use 3 to reproduce published MNIST-family numbers exactly.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        *,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        first_padding: int = 1,
    ):
        super().__init__()
        _require_int("width", width, 1)
        _require_int("depth", depth, 1)
        _require_int("first_padding", first_padding, 0)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

        height, width_px = image_size
        layers: list[nn.Module] = []
        in_channels = channels
        for d in range(depth):
            padding = first_padding if d == 0 else 1
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
                norm_layer(norm, width),
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = width
            height = (height + 2 * padding - 2) // 2
            width_px = (width_px + 2 * padding - 2) // 2
            if height < 1 or width_px < 1:
                raise ValueError(
                    f"depth {depth} is too deep for image_size {tuple(image_size)}: "
                    f"the feature map is empty after block {d + 1}"
                )
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * height * width_px, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

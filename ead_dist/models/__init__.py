"""Classifier networks, built by name: `build_model(name, channels, num_classes, image_size)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ead_dist.models.convnet import ConvNet
from ead_dist.models.mlp import MLP
from ead_dist.models.resnet import resnet18

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
    "mlp": MLP,
    "resnet18": resnet18,
}
MODEL_NAMES = tuple(_FACTORIES)


def _option_names(factory: Callable[..., nn.Module]) -> tuple[str, ...]:
    parameters = inspect.signature(factory).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    **options,
) -> nn.Module:
    """A freshly initialised classifier taking [B, channels, H, W] and returning logits [B, K].

    options are the model's own keyword arguments (convnet: width, depth, norm, first_padding;
    mlp: width, depth; resnet18: norm). Unknown names and options raise ValueError naming them.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    factory = _FACTORIES[name]
    allowed = _option_names(factory)
    for option in options:
        if option not in allowed:
            raise ValueError(
                f"unknown option {option!r} for model {name!r}; expected one of {allowed}"
            )
    for field, value in (("channels", channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    image_size = tuple(image_size)
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(
            f"image_size must be (height, width) of positive integers, got {image_size!r}"
        )
    return factory(channels, num_classes, image_size, **options)


__all__ = ["MODEL_NAMES", "build_model", "ConvNet", "MLP", "resnet18"]

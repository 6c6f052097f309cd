"""The embedding of a classifier: the features its head sees (the input of its last Linear)."""

from __future__ import annotations

import torch
from torch import nn


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features [B, d] of any model built by ``build_model`` (ConvNet's flattened
    conv features, MLP's last hidden layer, ResNet's pooled features)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]

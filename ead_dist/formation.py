"""Multi-formation (IDC, Kim et al. 2022): each stored synthetic image holds f x f smaller ones.

With factor f a stored image of H x W pixels is cut into an f x f grid of (H/f) x (W/f) blocks,
and each block, upsampled back to H x W, is one training image. The storage budget (IPC stored
images per class) buys f^2 times as many training images at 1/f the resolution; at low IPC that
trade wins (IDC's figures). ``decode`` is differentiable, so every objective fits the stored
pixels through it. Pure tensor maths, no I/O.

Order: stored image i decodes to training images i*f^2 .. i*f^2 + f^2 - 1, its blocks in
row-major order; ``encode`` tiles consecutive groups of f^2 images the same way, so
``decode(encode(x))`` is ``x`` at 1/f the resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_factor(image_size: tuple[int, int], factor: int) -> None:
    height, width = image_size
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"formation factor {factor} must divide the image size "
                         f"{height} x {width}")


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, C, H, W] stored images -> [N * factor^2, C, H, W] training images."""
    if factor == 1:
        return images
    n, channels, height, width = images.shape
    check_factor((height, width), factor)
    h, w = height // factor, width // factor
    blocks = images.reshape(n, channels, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(n * factor * factor, channels, h, w)
    return F.interpolate(blocks, size=(height, width), mode="bilinear", align_corners=False)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N * factor^2, C, H, W] images -> [N, C, H, W]: each group of factor^2 consecutive
    images, each averaged down to (H/factor) x (W/factor), tiled row-major into one image."""
    if factor == 1:
        return images
    count, channels, height, width = images.shape
    check_factor((height, width), factor)
    if count % (factor * factor):
        raise ValueError(f"{count} images do not fill stored images of {factor * factor} each")
    small = F.avg_pool2d(images, factor)  # [N f^2, C, h, w]
    h, w = small.shape[-2:]
    grid = small.reshape(count // factor ** 2, factor, factor, channels, h, w)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(count // factor ** 2, channels, height, width)


def factor_of(stored: int, training: int) -> int:
    """The factor f with ``training`` = ``stored`` * f^2 (a set's label rows per stored image)."""
    ratio, remainder = divmod(training, stored) if stored else (0, 1)
    factor = round(ratio ** 0.5)
    if remainder or factor * factor != ratio:
        raise ValueError(f"{training} labels are not a square multiple of {stored} images")
    return factor

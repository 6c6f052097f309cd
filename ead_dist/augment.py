"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen, ICML 2021).

Sampling and applying are separate, so one draw of parameters can transform two batches the
same way (the "siamese" part: a real and a synthetic batch see one augmentation). Every
transform is differentiable with respect to the images: colour is arithmetic, crop (a
translation with zero fill) and cutout are a gather and a mask, scale and rotate go through
`affine_grid`/`grid_sample`.

Behaviour, as in DSA's published code (`ParamDiffAug`, `aug_mode='S'`):
- One op is drawn uniformly from the strategy per call ("single" mode); "color" applies
  brightness, saturation and contrast in that order. `single=False` applies every op of the
  strategy in sequence (DSA's 'M' mode).
- Magnitudes are DSA's: brightness +-0.5, saturation x[0, 2), contrast x[0.5, 1.5), crop shift
  up to 1/8 of the side, cutout of half the side, flip with probability 1/2, scale x[1/1.2, 1.2)
  per axis, rotation +-15 degrees.
- DSA draws one value per sample when it augments for training a network (its seed -1), and
  one value for the whole batch when it augments the real and synthetic batches of a
  distillation step with a shared seed ("batchmode"). Here `per_sample=True` draws [B] values
  and `per_sample=False` draws one, which broadcasts to a batch of any size, so a synthetic and
  a real batch of different sizes can share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# A flipped digit is another glyph (or none), so DSA drops flip on digit datasets.
DSA_STRATEGY_DIGITS = "color_crop_cutout_scale_rotate"
DIGIT_DATASETS = frozenset({"mnist", "svhn", "usps"})

# Ops that change what an image-text pair's caption says ("at the top left", "a red bag"), so
# image_text.augmentation refuses them.
CAPTION_CHANGING_OPS = frozenset({"flip", "color"})

BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_PAD = 0.125
CUTOUT = 0.5
FLIP_PROBABILITY = 0.5
SCALE = 1.2
ROTATE_DEGREES = 15.0


def dsa_strategy(dataset: str) -> str:
    """The published DSA strategy for a dataset: all ops, without flip for digits."""
    return DSA_STRATEGY_DIGITS if dataset.lower() in DIGIT_DATASETS else DSA_STRATEGY


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """"color_crop" -> ("color", "crop"); None, "" and "none" are the empty strategy."""
    if strategy is None or strategy.lower() in ("", "none"):
        return ()
    ops = tuple(strategy.split("_"))
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown augmentation {op!r} in strategy {strategy!r}; ops are {OPS}")
    return ops


@dataclass(frozen=True)
class AugmentParams:
    """One draw of augmentation parameters: the ops to apply, in order, and their values.

    Each tensor has a leading dimension of B (per sample) or 1 (shared by the batch); fields of
    ops not drawn are None. Values are the applied quantities, not raw uniforms.
    """

    ops: tuple[str, ...]
    image_size: tuple[int, int]
    brightness: torch.Tensor | None = None  # [B] added to every pixel
    saturation: torch.Tensor | None = None  # [B] factor on the deviation from the channel mean
    contrast: torch.Tensor | None = None  # [B] factor on the deviation from the image mean
    shift: torch.Tensor | None = None  # [B, 2] int64 translation in pixels (rows, cols)
    cutout_center: torch.Tensor | None = None  # [B, 2] int64 (row, col)
    flip: torch.Tensor | None = None  # [B] bool, mirror left-right
    scale: torch.Tensor | None = None  # [B, 2] (x, y) factors of the sampling grid
    rotate: torch.Tensor | None = None  # [B] angle in radians

    def to(self, device: torch.device | str) -> AugmentParams:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def _randint(n: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Integers in [low, high), shape [n]."""
    return torch.randint(low, high, (n,), generator=generator, device=generator.device)


def crop_shift_limit(size: int) -> int:
    return int(size * CROP_PAD + 0.5)


def cutout_length(size: int) -> int:
    return int(size * CUTOUT + 0.5)


def sample_augmentation(
    strategy: str | None,
    batch_size: int,
    generator: torch.Generator,
    image_size: tuple[int, int],
    device: torch.device | str | None = None,
    *,
    per_sample: bool = True,
    single: bool = True,
) -> AugmentParams:
    """Draw DSA parameters for a batch of images of image_size (H, W).

    Draws on the generator's device, so a CPU generator gives the same parameters whatever the
    images' device, then moves them to `device`. per_sample=False draws one value per op for
    the whole batch (batch_size is then ignored); single=False applies every op of the strategy.
    """
    ops = parse_strategy(strategy)
    height, width = (int(s) for s in image_size)
    n = batch_size if per_sample else 1
    if ops and single:
        ops = (ops[int(_randint(1, 0, len(ops), generator))],)
    values: dict[str, torch.Tensor] = {}
    for op in ops:
        if op == "color":
            values["brightness"] = (_uniform(n, 0.0, 1.0, generator) - 0.5) * BRIGHTNESS
            values["saturation"] = _uniform(n, 0.0, 1.0, generator) * SATURATION
            values["contrast"] = _uniform(n, 0.0, 1.0, generator) + CONTRAST
        elif op == "crop":
            dy, dx = crop_shift_limit(height), crop_shift_limit(width)
            values["shift"] = torch.stack(
                [_randint(n, -dy, dy + 1, generator), _randint(n, -dx, dx + 1, generator)], dim=1
            )
        elif op == "cutout":
            # DSA's centre range: an even-sized hole may also centre one past the last pixel.
            ly, lx = cutout_length(height), cutout_length(width)
            values["cutout_center"] = torch.stack(
                [
                    _randint(n, 0, height + (1 - ly % 2), generator),
                    _randint(n, 0, width + (1 - lx % 2), generator),
                ],
                dim=1,
            )
        elif op == "flip":
            values["flip"] = _uniform(n, 0.0, 1.0, generator) < FLIP_PROBABILITY
        elif op == "scale":
            values["scale"] = torch.stack(
                [_uniform(n, 1.0 / SCALE, SCALE, generator) for _ in range(2)], dim=1
            )
        elif op == "rotate":
            limit = math.radians(ROTATE_DEGREES)
            values["rotate"] = _uniform(n, -limit, limit, generator)
    params = AugmentParams(ops=ops, image_size=(height, width), **values)
    return params.to(device) if device is not None else params


def _per_image(value: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if value.shape[0] not in (1, n):
        raise ValueError(
            f"augmentation parameter {name!r} has {value.shape[0]} rows for {n} images"
        )
    return value.expand(n, *value.shape[1:])


def _view4(value: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return value.to(images.dtype).view(-1, 1, 1, 1)


def _color(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    images = images + _view4(p.brightness, images)
    channel_mean = images.mean(dim=1, keepdim=True)
    images = (images - channel_mean) * _view4(p.saturation, images) + channel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * _view4(p.contrast, images) + image_mean


def _crop(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Translate by whole pixels, filling with zeros: output[i, j] = input[i + dy, j + dx]."""
    n, c, h, w = images.shape
    shift = _per_image(p.shift, n, "shift")
    # One zero border; indices outside the image are clamped onto it.
    padded = F.pad(images, (1, 1, 1, 1))
    rows = (torch.arange(h, device=images.device) + shift[:, :1] + 1).clamp(0, h + 1)  # [n, h]
    cols = (torch.arange(w, device=images.device) + shift[:, 1:] + 1).clamp(0, w + 1)  # [n, w]
    padded = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2))
    return padded.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _cutout(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    n, _, h, w = images.shape
    center = _per_image(p.cutout_center, n, "cutout_center")
    ly, lx = cutout_length(h), cutout_length(w)
    top = center[:, :1] - ly // 2
    left = center[:, 1:] - lx // 2
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top) & (rows < top + ly)  # [n, h]
    in_cols = (cols >= left) & (cols < left + lx)  # [n, w]
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return images * (~hole).to(images.dtype).unsqueeze(1)


def _flip(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    flip = _per_image(p.flip, images.shape[0], "flip").view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(3), images)


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    scale = _per_image(p.scale, images.shape[0], "scale")
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=scale.dtype)
    theta[:, 0, 0] = scale[:, 0]
    theta[:, 1, 1] = scale[:, 1]
    return _warp(images, theta)


def _rotate(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    angle = _per_image(p.rotate, images.shape[0], "rotate")
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(images, theta)


_APPLY = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


def apply_augmentation(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Transform images [N, C, H, W] by params; differentiable with respect to images."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != params.image_size:
        raise ValueError(
            f"params were drawn for image_size {params.image_size}, "
            f"images are {tuple(images.shape[-2:])}"
        )
    for op in params.ops:
        images = _APPLY[op](images, params)
    return images


def augment(
    images: torch.Tensor,
    strategy: str | None,
    generator: torch.Generator,
    *,
    per_sample: bool = True,
    single: bool = True,
) -> torch.Tensor:
    """Draw parameters for this batch and apply them (the non-siamese use, e.g. evaluation)."""
    params = sample_augmentation(
        strategy,
        images.shape[0],
        generator,
        tuple(images.shape[-2:]),
        images.device,
        per_sample=per_sample,
        single=single,
    )
    return apply_augmentation(images, params)

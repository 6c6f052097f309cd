"""Decode one image and fit it to the dataset's channels and resolution, as torchvision would.

Any 8-bit PIL mode is accepted and converted (``L`` for 1 channel, ``RGB`` for 3; alpha is
dropped, as torchvision's ImageFolder loader drops it). The shorter side is resized to ``size``
(bilinear, torchvision's ``Resize(size)``) and the centre ``size`` x ``size`` square kept
(``CenterCrop(size)``). Every failure is a :class:`FormatError` naming the image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .formats import FormatError

MODE_OF_CHANNELS = {1: "L", 3: "RGB"}
# 8-bit modes whose conversion to L or RGB keeps the picture. 16-bit and float modes (I, I;16,
# F) would be clipped to 8 bits without a scale we could know, so they are refused.
SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                   "YCbCr", "LAB", "HSV")


def decode(data: bytes, where: str) -> Image.Image:
    """The fully decoded image in ``data`` (truncated files fail here, not later)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise FormatError(f"{where}: cannot decode image: {error}") from error
    return image


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``, torchvision's rounding (truncation)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def fit(image: Image.Image, size: int, channels: int, where: str,
        allow_upscale: bool = False) -> np.ndarray:
    """uint8 [size, size, channels] pixels of ``image``, converted, resized, centre-cropped."""
    if image.mode not in SUPPORTED_MODES:
        raise FormatError(f"{where}: unsupported image mode {image.mode} (8-bit modes only: "
                          f"{', '.join(SUPPORTED_MODES)})")
    if min(image.size) < size and not allow_upscale:
        raise FormatError(f"{where}: image is {image.width}x{image.height}, smaller than "
                          f"{size} on its shorter side (allow upscaling to take it)")
    converted = image.convert(MODE_OF_CHANNELS[channels])
    width, height = resized_shape(converted.width, converted.height, size)
    if (width, height) != converted.size:
        converted = converted.resize((width, height), Image.BILINEAR)
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    pixels = np.asarray(converted.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return pixels.reshape(size, size, channels)


def load_fitted(data: bytes, size: int, channels: int, where: str,
                allow_upscale: bool = False) -> np.ndarray:
    """:func:`fit` of the image encoded in ``data``."""
    return fit(decode(data, where), size, channels, where, allow_upscale)

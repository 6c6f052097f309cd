"""``ead-dist export RUN --format F --out DIR``: the synthetic set in formats other tools read,
its images with the normalisation undone and its soft labels beside them.

- ``imagefolder``: ``DIR/<class name>/<index>.png`` (torchvision's ImageFolder layout, by the
  class each image was initialised from) and ``DIR/labels.json``: the class names, the folder
  of each class and each file's soft-label vector.
- ``webdataset``: ``DIR/shard-NNNNNN.tar`` of ``KEY.png``, ``KEY.cls`` (the initial class) and
  ``KEY.json`` (``soft_label`` and ``class_name``).
- ``npz``: ``DIR/synthetic.npz`` with ``images`` float32 [N, C, H, W] in [0, 1], ``labels``
  [N, K] probabilities, ``classes`` [N] and ``class_names``.

PNGs are uint8, grayscale or RGB by channel count. The export is built in a hidden folder beside
DIR and renamed to DIR when complete, so DIR holds a whole export or nothing. RUN may be any
storage URL; DIR is a local folder that does not exist yet or is empty.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np
import torch
import webdataset as wds

from . import storage
from .data.arrays import unnormalise
from .data.shards import encode_png, sample_key, shard_name
from .synthetic import class_names, load_synthetic

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "webdataset", "npz")
SHARD_SIZE = 10_000  # samples per tar, as ingest writes them
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ExportError(ValueError):
    """The export cannot be written; the message names the folder or the reason."""


def folder_names(names: list[str]) -> list[str]:
    """A folder name for each class: its name with path separators replaced (Fashion-MNIST has
    'T-shirt/top'), made unique by the class index where two would collide."""
    folders: list[str] = []
    for index, name in enumerate(names):
        folder = re.sub(r"[/\\\x00]", "_", name).strip() or f"class_{index}"
        if folder in (".", "..") or folder in folders:
            folder = f"{folder}_{index}"
        folders.append(folder)
    return folders


def png_pixels(pixels: torch.Tensor) -> np.ndarray:
    """uint8 [N, H, W, C] of float [N, C, H, W] pixels in [0, 1], rounded to the nearest level."""
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_imagefolder(directory: str, pixels: torch.Tensor, labels: torch.Tensor,
                      classes: torch.Tensor, names: list[str]) -> None:
    folders = folder_names(names)
    soft_labels = {}
    for index, (image, c) in enumerate(zip(png_pixels(pixels), classes.tolist())):
        relative = f"{folders[c]}/{index:06d}.png"
        os.makedirs(os.path.join(directory, folders[c]), exist_ok=True)
        with open(os.path.join(directory, relative), "wb") as f:
            f.write(encode_png(image))
        soft_labels[relative] = labels[index].tolist()
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"class_names": names, "folders": folders, "soft_labels": soft_labels}, f)


def write_webdataset(directory: str, pixels: torch.Tensor, labels: torch.Tensor,
                     classes: torch.Tensor, names: list[str]) -> None:
    images = png_pixels(pixels)
    for shard, start in enumerate(range(0, len(images), SHARD_SIZE)):
        with open(os.path.join(directory, shard_name(shard)), "wb") as f, \
                wds.TarWriter(f) as writer:
            for index in range(start, min(start + SHARD_SIZE, len(images))):
                c = int(classes[index])
                writer.write({
                    "__key__": sample_key(index),
                    "png": encode_png(images[index]),
                    "cls": str(c).encode(),
                    "json": json.dumps({"soft_label": labels[index].tolist(),
                                        "class_name": names[c]}).encode(),
                })


def write_npz(directory: str, pixels: torch.Tensor, labels: torch.Tensor,
              classes: torch.Tensor, names: list[str]) -> None:
    # class_names as a fixed-width unicode array, so np.load needs no pickle to read it.
    np.savez(os.path.join(directory, "synthetic.npz"), images=pixels.numpy(),
             labels=labels.numpy(), classes=classes.numpy(), class_names=np.array(names))


WRITERS = {"imagefolder": write_imagefolder, "webdataset": write_webdataset, "npz": write_npz}


def _check_out(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        raise ExportError(f"export writes to a local folder, not {out}; copy the folder there "
                          f"afterwards")
    out = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} already exists and is not an empty folder: give a new --out")
    return out


def export_run(run_url: str, format_name: str, out: str, data_url: str | None = None) -> str:
    """Write RUN's synthetic set to the local folder ``out`` in ``format_name``; returns ``out``."""
    if format_name not in WRITERS:
        raise ExportError(f"unknown export format {format_name!r}; one of {FORMATS}")
    out = _check_out(out)
    synthetic_url = storage.join(run_url, "synthetic.safetensors")
    if not storage.exists(synthetic_url):
        raise storage.StorageError(f"{synthetic_url} does not exist: run the distill stage "
                                   f"first (ead-dist distill CONFIG)")
    images, labels, classes, metadata = load_synthetic(synthetic_url)
    if "mean" not in metadata or "std" not in metadata:
        raise ExportError(f"{synthetic_url}: metadata has no mean and std to undo the "
                          f"normalisation with")
    if images.shape[1] not in (1, 3):
        raise ExportError(f"{synthetic_url}: images have {images.shape[1]} channels; PNG "
                          f"export takes 1 (grayscale) or 3 (RGB)")
    names = class_names(metadata, labels.shape[1], data_url)
    pixels = unnormalise(images, metadata["mean"], metadata["std"])

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        WRITERS[format_name](partial, pixels, labels, classes, names)
        os.chmod(partial, 0o777 & ~_UMASK)  # mkdtemp makes 0700; publish as mkdir would
        try:
            os.replace(partial, out)  # replaces an empty folder; fails on a non-empty one
        except OSError as error:
            raise ExportError(f"cannot move the finished export to {out}: {error}") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("export: %d images as %s in %s", len(images), format_name, out)
    return out

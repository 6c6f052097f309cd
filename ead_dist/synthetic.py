"""The synthetic set S: learnable images and label logits, its initialisation and file format.

``synthetic.safetensors`` (docs/design.md section 3): ``images`` float32 [N, C, H, W] in the model's
normalised input space, ``labels`` float32 [N, K] probabilities (rows sum to 1), ``classes``
int64 [N]; metadata dataset, method, ipc, num_classes, mean, std, config. A set distilled with
multi-formation (``distill.formation`` f > 1, ``ead_dist.formation``) stores IPC images per class
as ``stored_images`` and, as ``images``, the N = stored * f^2 training images they decode to, so
every reader trains on it unchanged; its metadata records ``formation``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from . import storage
from .data.meta import MetaError, read_meta
from .formation import decode, encode, factor_of

log = logging.getLogger(__name__)


@dataclass
class SyntheticSet:
    """Stored images and, per training image they decode to, label logits and classes (one
    training image per stored image unless ``formation`` > 1, read from the shapes)."""

    images: torch.Tensor  # [N, C, H, W] stored, normalised
    label_logits: torch.Tensor  # [N * formation^2, K]; labels are softmax(label_logits)
    classes: torch.Tensor  # [N * formation^2] int64, the class each image was initialised from

    @property
    def formation(self) -> int:
        return factor_of(len(self.images), len(self.label_logits))

    @property
    def labels(self) -> torch.Tensor:
        return torch.softmax(self.label_logits, dim=1)

    @property
    def training_images(self) -> torch.Tensor:
        return decode(self.images, self.formation)

    def indices_of_class(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.classes == c).flatten()


def class_balanced_indices(labels: torch.Tensor, per_class: int, num_classes: int,
                           generator: torch.Generator) -> torch.Tensor:
    """``per_class`` random indices of each class (class-major order)."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} samples, fewer than ipc={per_class}")
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks)


def correctly_classified_first(labels: torch.Tensor, predicted: torch.Tensor, per_class: int,
                               num_classes: int) -> torch.Tensor:
    """Indices of ``per_class`` samples of each class (class-major), preferring those the teacher
    predicts correctly (DATM's initialisation) in their given order, topped up with the others
    when a class has too few."""
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        correct = members[predicted[members] == c]
        wrong = members[predicted[members] != c]
        chosen = torch.cat([correct, wrong])[:per_class]
        if len(chosen) < per_class:
            raise ValueError(f"class {c} has {len(members)} samples, fewer than ipc={per_class}")
        picks.append(chosen)
    return torch.cat(picks)


def initial_set(images: torch.Tensor, labels: torch.Tensor, ipc: int, num_classes: int,
                teacher_logits_fn, temperature: float, seed: int,
                formation: int = 1) -> SyntheticSet:
    """Class-balanced real images with soft labels softmax(teacher logits / temperature); with
    ``formation`` f, ipc * f^2 real images per class tiled f^2 to a stored image, each labelled
    as the training image it decodes to."""
    chosen = class_balanced_indices(labels, ipc * formation ** 2, num_classes,
                                    torch.Generator().manual_seed(seed))
    stored = encode(images[chosen].clone(), formation)
    with torch.no_grad():
        logits = teacher_logits_fn(decode(stored, formation)) / temperature
    return SyntheticSet(images=stored, label_logits=logits.detach().clone(),
                        classes=labels[chosen])


HARD_LOGIT_GAP = 1e4


def hard_labelled(images: torch.Tensor, classes: torch.Tensor, num_classes: int) -> SyntheticSet:
    """A set with one-hot labels: logits 0 for the class and HARD_LOGIT_GAP below elsewhere,
    whose softmax is exactly one-hot in float32 (the baselines' hard labels)."""
    logits = torch.full((len(classes), num_classes), -HARD_LOGIT_GAP)
    logits[torch.arange(len(classes)), classes] = 0.0
    return SyntheticSet(images=images, label_logits=logits, classes=classes)


def synthetic_from_state(tensors: dict[str, torch.Tensor], num_classes: int) -> SyntheticSet:
    """The set a distill state (``RUN/distill/state-*.safetensors``) or the initial set
    (``RUN/distill/init.safetensors``) holds: the coordinator's stored images and label logits,
    or a baseline's images with their hard labels."""
    if "label_logits" in tensors:
        return SyntheticSet(tensors.get("stored_images", tensors["images"]),
                            tensors["label_logits"], tensors["classes"])
    return hard_labelled(tensors["images"], tensors["classes"], num_classes)


def set_tensors(synthetic: SyntheticSet) -> dict[str, torch.Tensor]:
    """The file's tensors: the training images with their labels and classes, and with
    multi-formation the stored images they decode from."""
    tensors = {"images": synthetic.training_images, "labels": synthetic.labels,
               "classes": synthetic.classes}
    if synthetic.formation > 1:
        tensors["stored_images"] = synthetic.images
    return tensors


def save_synthetic(url: str, synthetic: SyntheticSet, metadata: dict) -> None:
    storage.save_tensors(url, set_tensors(synthetic), metadata)


def load_synthetic(url: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(images, label probabilities, classes, metadata) of a ``synthetic.safetensors``."""
    tensors, metadata = storage.load_tensors(url)
    for name in ("images", "labels", "classes"):
        if name not in tensors:
            raise storage.StorageError(f"{url}: missing tensor {name!r}")
    images, labels = tensors["images"], tensors["labels"]
    if images.dim() != 4 or labels.dim() != 2 or len(images) != len(labels):
        raise storage.StorageError(f"{url}: images {tuple(images.shape)} and labels "
                                   f"{tuple(labels.shape)} do not form a set")
    return images, labels, tensors["classes"], metadata


def class_names(metadata: dict, num_classes: int, data_url: str | None = None) -> list[str]:
    """Names of a synthetic set's classes, from ``DATA/meta.json`` (``data_url``, else the
    ``data.url`` its recorded config names) when that is reachable and describes the set's
    dataset; else ``class_<i>``."""
    fallback = [f"class_{i}" for i in range(num_classes)]
    url = data_url or _recorded_data_url(metadata)
    if not url:
        log.info("no DATA URL given or recorded; naming classes class_<i>")
        return fallback
    try:
        meta = read_meta(url)
    except (MetaError, storage.StorageError) as error:
        log.info("no class names (%s); naming classes class_<i>", error)
        return fallback
    if meta.name != metadata.get("dataset") or meta.num_classes != num_classes:
        log.warning("%s describes %s with %d classes, not this set's %s with %d; naming classes "
                    "class_<i>", url, meta.name, meta.num_classes, metadata.get("dataset"),
                    num_classes)
        return fallback
    return list(meta.classes)


def _recorded_data_url(metadata: dict) -> str | None:
    config = metadata.get("config")
    try:
        config = json.loads(config) if isinstance(config, str) else config
        return config["data"]["url"] or None
    except (TypeError, KeyError, json.JSONDecodeError):
        return None

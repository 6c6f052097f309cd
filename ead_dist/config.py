"""The run configuration: one typed dataclass tree, loaded from YAML and validated at load time.

Errors name the file and the dotted field (``distill.ipc``). Every field has a default, so a
YAML file states only what differs; ``pipelines/*.yaml`` are the maintained settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    # raw files (ingest); "" finds Debian's Fashion-MNIST, else the Makefile's download in
    # data/raw (ead_dist/data/formats/idx.py)
    source: str = ""
    url: str = "data/fashion_mnist"  # where the shards and meta.json live (DATA)
    shard_size: int = 10_000
    image_size: int = 64  # image-text only: images are centre-cropped and resized to this


@dataclass
class ModelConfig:
    name: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    first_padding: int = 1  # 3 reproduces the DC/MTT ConvNet on 28x28 single-channel data

    def options_for(self, name: str) -> dict:
        """Keyword options for model ``name``: this section describes the ConvNet that experts
        and the coordinator use; the other architectures (evaluation only) keep their defaults."""
        if name != "convnet":
            return {}
        return {"width": self.width, "depth": self.depth, "norm": self.norm,
                "first_padding": self.first_padding}


@dataclass
class ExpertsConfig:
    count: int = 2
    epochs: int = 2
    lr: float = 0.01
    batch_size: int = 256
    save_every: int = 50  # SGD steps between recorded checkpoints
    train_samples: Optional[int] = None  # train each expert on a random subset of D
    augmentation: str = "none"  # none | dsa
    seed: int = 0


@dataclass
class RealgradConfig:
    workers: int = 1
    checkpoints: int = 8  # checkpoints chosen (evenly) from all experts' trajectories
    real_samples: Optional[int] = 10_000  # size of the sample of D behind g_D; None = all of D
    p_batches: int = 8  # K: the bank of P-batch gradients per checkpoint
    p_batch_size: int = 256
    batch_size: int = 500  # forward/backward chunk
    class_terms: bool = True  # per-class g_D and g_P (class-wise objectives)
    # Checkpoints per pass over the shards; each pass holds (and then publishes) the sums of
    # this many checkpoints only, which bounds a worker's memory (README: realgrad memory).
    # null: all selected checkpoints in one pass.
    chunk: Optional[int] = None
    dtype: str = "float32"  # how the terms are stored: float32 | float16 (half the bytes)
    seed: int = 0


@dataclass
class WeightsConfig:
    """Per-sample weights of the real data (ead_dist/weights.py): the real terms (EAD) and DM's
    real class means become weighted means."""
    method: str = "none"  # none | kde (down-weight dense regions of the expert's features)
    bandwidth: Optional[float] = None  # Gaussian kernel width; null: the median pairwise distance
    temperature: float = 1.0  # w ~ density^(-1/temperature)
    sample: int = 10_000  # reference samples per class for the density
    seed: int = 0  # draws the reference sample
    batch_size: int = 500  # embedding batch (speed only)


@dataclass
class DistillConfig:
    # ead: the coordinator (below); random | herding | dm | dc: baselines (ead_dist/methods).
    method: str = "ead"
    ipc: int = 10
    iterations: int = 300
    objective: str = "matching"  # see ead_dist.effect.OBJECTIVES
    coefficient: str = "derived"  # derived | paper (scalar objective only)
    lr_images: float = 0.01
    lr_labels: float = 0.01
    learn_labels: bool = True
    label_temperature: float = 1.0
    # Initial soft labels from expert 0 or from the mean logits of every expert; initial images
    # drawn at random per class or, first, among those the teachers classify correctly (DATM).
    label_init: str = "first_expert"  # first_expert | ensemble
    init_images: str = "random"  # random | correct
    checkpoints_per_iteration: int = 1  # t_m
    augmentation: str = "none"  # none | dsa (applied to S inside the synthetic term)
    # matching and class_matching: l2 | layer_cosine (DC) | layer_l1 (IDC); optionally without
    # the classifier head and 1-D parameters, and relative to the real gradient's size.
    distance: str = "l2"
    skip_head_and_biases: bool = False
    normalise: bool = False
    # objective: trajectory. The student takes student_steps SGD steps on S from an expert's
    # checkpoint t (t <= max_start, in recorded checkpoints; null: any) and should land on the
    # expert's checkpoint t + expert_span. Its step size starts at student_lr (null: the
    # experts' lr) and is learned by Adam at lr_student_lr.
    student_steps: int = 10
    student_batch_size: Optional[int] = None  # null: all of S at every student step
    expert_span: int = 2
    max_start: Optional[int] = None
    student_lr: Optional[float] = None
    lr_student_lr: float = 1e-4
    unroll: str = "full"  # full | recompute (memory constant in student_steps)
    save_every: int = 100
    seed: int = 0
    threads: Optional[int] = None  # torch threads of the coordinator; None: the cores it may use
    # dm and dc: SGD (momentum 0.5) on the images at baseline_lr_images (null: DM's 1.0, DC's
    # 0.1), real_batch_size real images per class; dc's network trains at lr_net, and its
    # outer_loop / inner_loop (null: DC's values for the ipc) per iteration.
    baseline_lr_images: Optional[float] = None
    real_batch_size: int = 256
    lr_net: float = 0.01
    outer_loop: Optional[int] = None
    inner_loop: Optional[int] = None


@dataclass
class EvaluateConfig:
    models: list[str] = field(default_factory=lambda: ["convnet"])
    runs: int = 3
    epochs: int = 300
    lr: float = 0.01
    batch_size: int = 256
    augmentation: str = "dsa"  # none | dsa
    baselines: list[str] = field(default_factory=lambda: ["random_real", "init"])
    test_samples: Optional[int] = None  # evaluate on the first N test images; None = all


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start Ray on this machine
    num_cpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = None
    # One GPU per expert, realgrad worker (nccl all-reduce), coordinator and evaluation run.
    # None: use GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = None
    # Experts and evaluation runs that share one GPU (each takes 1/n of it). Realgrad workers
    # all-reduce over NCCL, which wants one GPU per rank: they are capped at the GPU count.
    runs_per_gpu: int = 1
    # false: every stage in this one process, without Ray (a GPU box with no Ray installed).
    enabled: bool = True
    # Retries after system failures (a worker process, actor or node lost). The project's own
    # errors (ShardError, ConfigError, ...) are never retried by tasks and actors (Ray retries
    # exceptions only with retry_exceptions, left False); see runtime.retry_options.
    task_retries: int = 3  # evaluation runs and the coordinator task; expert actor calls
    actor_restarts: int = 3  # a restarted expert actor resumes from its last checkpoint
    train_failures: int = 2  # realgrad: Ray Train worker-group restarts (any worker error)


@dataclass
class StorageConfig:
    s3_endpoint_url: Optional[str] = None  # else AWS_ENDPOINT_URL; credentials from env only
    # S3 calls retry throttling, 5xx and dropped connections with exponential backoff
    # (botocore's adaptive mode) this many times; a missing bucket or denied access fails at once.
    retries: int = 10
    connect_timeout: float = 10.0  # seconds


@dataclass
class ImageTextConfig:
    """The image-text path (data.dataset: cc3m); the other sections' experts, distill and
    evaluate settings apply as for classification (distill.ipc is unused: ``pairs`` is N)."""

    model: str = "clip-tiny"  # ead_dist/models/dual_encoder.py's small configs or an open_clip name
    pretrained: Optional[str] = None  # an open_clip pretrained tag (weights on the user's machine)
    context_length: int = 32  # caption tokens
    held_out: float = 0.05  # fraction of keys, by hash, held out for retrieval evaluation
    max_broken_samples: Optional[int] = 100  # more skipped samples stop the run; null: never
    train_pairs: Optional[int] = None  # pairs held in memory by experts and baselines; null: all
    test_pairs: int = 1000  # held-out pairs that recall is measured on
    pairs: int = 100  # N, the synthetic pairs
    lr_text: float = 0.001  # Adam's step on the synthetic captions' token embeddings (~0.02)


IMAGE_TEXT_DATASETS = ("cc3m",)


@dataclass
class RunConfig:
    name: str = "run"
    run: str = "runs/run"  # RUN: every stage output lives under this URL
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    realgrad: RealgradConfig = field(default_factory=RealgradConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    image_text: ImageTextConfig = field(default_factory=ImageTextConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


CHOICES = {
    "distill.method": ("ead", "random", "herding", "dm", "dc"),
    "model.norm": ("instancenorm", "batchnorm", "none"),
    "experts.augmentation": ("none", "dsa"),
    "distill.coefficient": ("derived", "paper"),
    "distill.augmentation": ("none", "dsa"),
    "distill.unroll": ("full", "recompute"),
    "distill.label_init": ("first_expert", "ensemble"),
    "distill.init_images": ("random", "correct"),
    "distill.distance": ("l2", "layer_cosine", "layer_l1"),
    "evaluate.augmentation": ("none", "dsa"),
    "realgrad.dtype": ("float32", "float16"),
    "weights.method": ("none", "kde"),
}
# The methods that use per-sample weights (weights.method other than none).
WEIGHTED_METHODS = ("ead", "dm")
POSITIVE = (
    "data.shard_size", "experts.count", "experts.epochs", "experts.lr", "experts.batch_size",
    "experts.save_every", "realgrad.workers", "realgrad.checkpoints", "realgrad.p_batches",
    "realgrad.p_batch_size", "realgrad.batch_size", "distill.ipc", "distill.save_every",
    "distill.checkpoints_per_iteration", "distill.label_temperature", "distill.student_steps",
    "distill.expert_span", "distill.lr_student_lr", "distill.real_batch_size",
    "distill.lr_net", "evaluate.runs",
    "evaluate.epochs", "evaluate.lr", "evaluate.batch_size", "ray.runs_per_gpu",
    "storage.connect_timeout", "weights.temperature", "weights.sample", "weights.batch_size",
    "image_text.context_length", "image_text.test_pairs", "image_text.pairs",
    "image_text.lr_text",
)

OPTIONAL_POSITIVE = ("distill.student_batch_size", "distill.student_lr", "realgrad.chunk",
                     "distill.baseline_lr_images", "distill.outer_loop", "distill.inner_loop",
                     "weights.bandwidth", "image_text.train_pairs")
NON_NEGATIVE = ("ray.task_retries", "ray.actor_restarts", "ray.train_failures",
                "storage.retries")


# A decimal number, optionally in scientific notation. PyYAML (YAML 1.1) reads ``1e-3`` and
# ``1e3`` as strings, since its float pattern needs a dot; nan and inf are not wanted anyway.
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(value: Any, annotation: type) -> Any:
    """``value`` as an ``annotation`` (int or float) when it is that number exactly: a decimal
    string such as ``1e-3``, an int for a float field, an integral float or string for an int
    field. Anything else comes back unchanged, for the type check to refuse by name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        exact = Decimal(value.strip())
    elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        exact = Decimal(value)
    else:
        return value
    if annotation is float:
        return float(exact) if math.isfinite(float(exact)) else value
    return int(exact) if exact == exact.to_integral_value() else value


def _convert(value: Any, annotation: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _convert(value, options[0], where, source)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
        return _build(annotation, value, where + ".", source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if annotation in (int, float):
        value = _number(value, annotation)
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{source}: {where} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field {prefix}{unknown[0]} (known: "
                          f"{', '.join(sorted(names))})")
    values = {k: _convert(v, hints[k], prefix + k, source) for k, v in raw.items()}
    return cls(**values)


def _lookup(config: RunConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: RunConfig, source: str) -> RunConfig:
    from .alignment import OBJECTIVES
    from .models import MODEL_NAMES

    for dotted, allowed in CHOICES.items():
        if _lookup(config, dotted) not in allowed:
            raise ConfigError(f"{source}: {dotted} must be one of {allowed}, got "
                              f"{_lookup(config, dotted)!r}")
    for dotted in POSITIVE:
        if not _lookup(config, dotted) > 0:
            raise ConfigError(f"{source}: {dotted} must be positive, got {_lookup(config, dotted)}")
    for dotted in OPTIONAL_POSITIVE:
        value = _lookup(config, dotted)
        if value is not None and not value > 0:
            raise ConfigError(f"{source}: {dotted} must be positive or null, got {value}")
    for dotted in NON_NEGATIVE:
        if _lookup(config, dotted) < 0:
            raise ConfigError(f"{source}: {dotted} must be >= 0, got {_lookup(config, dotted)}")
    if config.distill.max_start is not None and config.distill.max_start < 0:
        raise ConfigError(f"{source}: distill.max_start must be >= 0 or null, got "
                          f"{config.distill.max_start}")
    if config.distill.objective in ("class_matching", "per_class_effect") and \
            not config.realgrad.class_terms:
        raise ConfigError(f"{source}: distill.objective {config.distill.objective!r} needs "
                          f"per-class real terms: set realgrad.class_terms: true")
    if config.weights.method != "none" and config.distill.method not in WEIGHTED_METHODS:
        raise ConfigError(f"{source}: weights.method {config.weights.method!r} is used by "
                          f"distill.method {' and '.join(WEIGHTED_METHODS)} only, not "
                          f"{config.distill.method!r}: set weights.method: none")
    if config.distill.objective not in OBJECTIVES:
        raise ConfigError(f"{source}: distill.objective must be one of {tuple(OBJECTIVES)}, got "
                          f"{config.distill.objective!r}")
    for i, name in enumerate([config.model.name, *config.evaluate.models]):
        if name not in MODEL_NAMES:
            where = "model.name" if i == 0 else f"evaluate.models[{i - 1}]"
            raise ConfigError(f"{source}: {where} must be one of {MODEL_NAMES}, got {name!r}")
    if not 0 < config.image_text.held_out < 1:
        raise ConfigError(f"{source}: image_text.held_out must be between 0 and 1, got "
                          f"{config.image_text.held_out}")
    for i, name in enumerate(config.evaluate.baselines):
        if name not in ("random_real", "init"):
            raise ConfigError(f"{source}: evaluate.baselines[{i}] must be random_real or init, "
                              f"got {name!r}")
    return config


def parse_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Build and validate; local paths become absolute, since Ray workers run elsewhere."""
    from .storage import absolute

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    config = validate(_build(RunConfig, raw, "", source), source)
    config.run = absolute(config.run)
    config.data.url = absolute(config.data.url)
    config.data.source = absolute(config.data.source)
    return config


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load ``path`` (YAML), apply ``a.b=value`` overrides (YAML-typed), validate.

    ``env:NAME`` reads the YAML text from the environment variable NAME instead: how
    ``ead-dist submit`` ships a config from outside the checkout with a job."""
    try:
        if path.startswith("env:"):
            text = os.environ.get(path[4:])
            if text is None:
                raise ConfigError(f"config {path}: the environment variable {path[4:]} is unset")
            raw = yaml.safe_load(text)
        else:
            with open(path) as f:
                raw = yaml.safe_load(f)
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} does not exist") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for override in overrides or []:
        _apply_override(raw, override, path)
    return parse_config(raw, path)


def _apply_override(raw: dict, override: str, source: str) -> None:
    """Set one ``section.field=value`` (the value read as YAML) in the raw tree. Every part of
    the path must name a field of the config tree, and only the last may be a value."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override}: the value is not valid YAML: {error}") from error
    parts = dotted.split(".")
    section, node = RunConfig, raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        hints = typing.get_type_hints(section)
        if part not in hints:
            raise ConfigError(f"{source}: unknown field {where} in --set {override} (known: "
                              f"{', '.join(sorted(hints))})")
        if depth == len(parts) - 1:
            node[part] = value
        elif not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"{source}: {where} is a value, not a section, in --set {override}")
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {where} must be a mapping, got {node!r}")
            section = hints[part]

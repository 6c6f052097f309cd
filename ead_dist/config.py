"""The run configuration: one typed tree of pydantic models, validated when it is loaded.

Errors name the file and the dotted field (``distill.ipc``), all of them at once. Every field
has a default, so a YAML file states only what differs; ``pipelines/*.yaml`` are the
maintained settings. A section is one :class:`Section` subclass and one field of
:class:`RunConfig`; loading, overrides and error messages follow the tree by themselves.
"""

from __future__ import annotations

import json
import math
import os
import re
from decimal import Decimal
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from annotated_types import Ge, Gt, Lt, MinLen
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict,
                      ValidationError, field_validator, model_validator)

from . import strict_yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


# A decimal number, optionally in scientific notation. PyYAML (YAML 1.1) reads ``1e-3`` and
# ``1e3`` as strings, since its float pattern needs a dot; nan and inf are not wanted anyway.
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _exact_number(kind: type) -> BeforeValidator:
    """Before the strict type check: ``value`` as a ``kind`` (int or float) when it is that
    number exactly (a decimal string such as ``1e-3``, an int for a float field, an integral
    float or string for an int field). Anything else passes unchanged, for the check to refuse."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            exact = Decimal(value.strip())
        elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            exact = Decimal(value)
        else:
            return value
        if kind is float:
            return float(exact) if math.isfinite(float(exact)) else value
        return int(exact) if exact == exact.to_integral_value() else value

    return BeforeValidator(convert)


# Scalars are strict (``true`` is no number, ``3`` no string) apart from exact numbers above.
Int = Annotated[int, _exact_number(int), Strict()]
Float = Annotated[float, _exact_number(float), Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
PositiveInt = Annotated[Int, Gt(0)]
PositiveFloat = Annotated[Float, Gt(0)]
NonNegativeInt = Annotated[Int, Ge(0)]
Seed = NonNegativeInt  # numpy's generators refuse negative seeds
Augmentation = Literal["none", "dsa"]


def _one_of(allowed: Callable[[], tuple[str, ...]]) -> AfterValidator:
    """A name from a registry that imports torch, so it is looked up only when validating."""

    def check(value: str) -> str:
        names = allowed()
        if value not in names:
            choices = ", ".join(repr(name) for name in names[:-1]) + f" or {names[-1]!r}"
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value

    return AfterValidator(check)


def _model_names() -> tuple[str, ...]:
    from .models import MODEL_NAMES

    return MODEL_NAMES


def _objectives() -> tuple[str, ...]:
    from .alignment import OBJECTIVES

    return OBJECTIVES


ModelName = Annotated[Str, _one_of(_model_names)]
Objective = Annotated[Str, _one_of(_objectives)]


class Section(BaseModel):
    """One section of the tree: unknown keys are errors, floats are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(Section):
    dataset: Str = "fashion_mnist"
    # raw files (ingest); "" finds Debian's Fashion-MNIST, else the Makefile's download in
    # data/raw (ead_dist/data/formats/idx.py)
    source: Str = ""
    url: Str = "data/fashion_mnist"  # where the shards and meta.json live (DATA)
    shard_size: PositiveInt = 10_000
    image_size: PositiveInt = 64  # image-text only: images are centre-cropped and resized to this


class ModelConfig(Section):
    name: ModelName = "convnet"
    width: PositiveInt = 128
    depth: PositiveInt = 3
    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"
    first_padding: NonNegativeInt = 1  # 3 reproduces the DC/MTT ConvNet on 28x28 1-channel data

    def options_for(self, name: str) -> dict:
        """Keyword options for model ``name``: this section describes the ConvNet that experts
        and the coordinator use; the other architectures (evaluation only) keep their defaults."""
        if name != "convnet":
            return {}
        return {"width": self.width, "depth": self.depth, "norm": self.norm,
                "first_padding": self.first_padding}


class ExpertsConfig(Section):
    count: PositiveInt = 2
    epochs: PositiveInt = 2
    lr: PositiveFloat = 0.01
    batch_size: PositiveInt = 256
    save_every: PositiveInt = 50  # SGD steps between recorded checkpoints
    train_samples: Optional[PositiveInt] = None  # a random subset of D per expert; null: all
    augmentation: Augmentation = "none"
    seed: Seed = 0


class RealgradConfig(Section):
    workers: PositiveInt = 1
    checkpoints: PositiveInt = 8  # checkpoints chosen (evenly) from all experts' trajectories
    real_samples: Optional[PositiveInt] = 10_000  # the sample of D behind g_D; null: all of D
    p_batches: PositiveInt = 8  # K: the bank of P-batch gradients per checkpoint
    p_batch_size: PositiveInt = 256
    batch_size: PositiveInt = 500  # forward/backward chunk
    class_terms: Bool = True  # per-class g_D and g_P (class-wise objectives)
    # Checkpoints per pass over the shards; each pass holds (and then publishes) the sums of
    # this many checkpoints only, which bounds a worker's memory (README: realgrad memory).
    # null: all selected checkpoints in one pass.
    chunk: Optional[PositiveInt] = None
    dtype: Literal["float32", "float16"] = "float32"  # how the terms are stored
    seed: Seed = 0


class WeightsConfig(Section):
    """Per-sample weights of the real data (ead_dist/weights.py): the real terms (EAD) and DM's
    real class means become weighted means."""
    method: Literal["none", "kde"] = "none"  # kde: down-weight dense regions of the features
    bandwidth: Optional[PositiveFloat] = None  # Gaussian kernel width; null: the median distance
    temperature: PositiveFloat = 1.0  # w ~ density^(-1/temperature)
    sample: PositiveInt = 10_000  # reference samples per class for the density
    seed: Seed = 0  # draws the reference sample
    batch_size: PositiveInt = 500  # embedding batch (speed only)


class DistillConfig(Section):
    # ead: the coordinator (below); random | herding | dm | dc: baselines (ead_dist/methods).
    method: Literal["ead", "random", "herding", "dm", "dc"] = "ead"
    ipc: PositiveInt = 10
    iterations: PositiveInt = 300
    objective: Objective = "matching"  # see ead_dist.alignment
    coefficient: Literal["derived", "paper"] = "derived"  # paper: scalar objective only
    lr_images: PositiveFloat = 0.01
    lr_labels: PositiveFloat = 0.01
    learn_labels: Bool = True
    label_temperature: PositiveFloat = 1.0
    # Initial soft labels from expert 0 or from the mean logits of every expert; initial images
    # drawn at random per class or, first, among those the teachers classify correctly (DATM).
    label_init: Literal["first_expert", "ensemble"] = "first_expert"
    init_images: Literal["random", "correct"] = "random"
    checkpoints_per_iteration: PositiveInt = 1  # t_m
    # Multi-formation (IDC): each of the ipc stored images per class holds formation^2 training
    # images at 1/formation the resolution (ead_dist/formation.py); 1: plain images.
    formation: PositiveInt = 1
    augmentation: Augmentation = "none"  # applied to S inside the synthetic term
    # matching and class_matching: l2 | layer_cosine (DC) | layer_l1 (IDC); optionally without
    # the classifier head and 1-D parameters, and relative to the real gradient's size.
    distance: Literal["l2", "layer_cosine", "layer_l1"] = "l2"
    skip_head_and_biases: Bool = False
    normalise: Bool = False
    # objective: trajectory. The student takes student_steps SGD steps on S from an expert's
    # checkpoint t (min_start <= t <= max_start, in recorded checkpoints; max_start null: any
    # with a target; DATM's trajectory range) and should land on the expert's checkpoint
    # t + expert_span. Its step size starts at student_lr (null: the experts' lr) and is
    # learned by Adam at lr_student_lr.
    student_steps: PositiveInt = 10
    student_batch_size: Optional[PositiveInt] = None  # null: all of S at every student step
    expert_span: PositiveInt = 2
    min_start: NonNegativeInt = 0
    max_start: Optional[NonNegativeInt] = None
    student_lr: Optional[PositiveFloat] = None
    lr_student_lr: PositiveFloat = 1e-4
    unroll: Literal["full", "recompute"] = "full"  # recompute: memory constant in student_steps
    # The last held_out_experts experts are left out of what the coordinator fits (their real
    # terms or segments, and the initial labels); at the end the objective on them beside the
    # objective on the fitted ones tells how far S generalises to networks it never saw.
    held_out_experts: NonNegativeInt = 0
    save_every: PositiveInt = 100
    seed: Seed = 0
    threads: Optional[PositiveInt] = None  # torch threads of the coordinator; null: its cores
    # dm and dc: SGD (momentum 0.5) on the images at baseline_lr_images (null: DM's 1.0, DC's
    # 0.1), real_batch_size real images per class; dc's network trains at lr_net, and its
    # outer_loop / inner_loop (null: DC's values for the ipc) per iteration.
    baseline_lr_images: Optional[PositiveFloat] = None
    real_batch_size: PositiveInt = 256
    # dm: its real class means embedded in the loop from the split in memory (loop), or
    # computed for every iteration in the realgrad pass over the shards (realgrad), after which
    # the loop reads no real data (ead_dist/stages/dm_real.py)
    dm_real: Literal["loop", "realgrad"] = "loop"
    # dm and dc with weights.method on: each class's real batch is drawn uniformly and averaged
    # with the weights (mean), or drawn with replacement in proportion to the weights and
    # averaged plainly (resample: importance resampling; the same expectation, every drawn
    # sample counting when a few samples hold most of the weight).
    weighted_batches: Literal["mean", "resample"] = "mean"
    lr_net: PositiveFloat = 0.01
    outer_loop: Optional[PositiveInt] = None
    inner_loop: Optional[PositiveInt] = None


class EvaluateConfig(Section):
    models: Annotated[list[ModelName], MinLen(1)] = Field(default_factory=lambda: ["convnet"])
    runs: PositiveInt = 3
    epochs: PositiveInt = 300
    # learned: the student step size the trajectory objective learned (MTT evaluates with it),
    # recorded in the set's metadata; every set of the run is then trained at that lr.
    lr: Union[PositiveFloat, Literal["learned"]] = 0.01
    # What the lr becomes after epochs // 2 + 1 epochs: halve (this project's protocol so far),
    # tenth (DC's, DSA's and MTT's published evaluation code), constant.
    lr_schedule: Literal["halve", "tenth", "constant"] = "halve"
    batch_size: PositiveInt = 256
    augmentation: Augmentation = "dsa"
    baselines: list[Literal["random_real", "init"]] = Field(
        default_factory=lambda: ["random_real", "init"])
    test_samples: Optional[PositiveInt] = None  # the first N test images; null: all

    @field_validator("models", "baselines")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        return names


class RayConfig(Section):
    address: Optional[Str] = None  # null: start Ray on this machine
    num_cpus: Optional[PositiveInt] = None  # null: every core
    object_store_memory_mb: Optional[PositiveInt] = None
    # One GPU per expert, realgrad worker (nccl all-reduce), coordinator and evaluation run.
    # null: use GPUs when the Ray cluster has any.
    use_gpu: Optional[Bool] = None
    # Experts and evaluation runs that share one GPU (each takes 1/n of it). Realgrad workers
    # all-reduce over NCCL, which wants one GPU per rank: they are capped at the GPU count.
    runs_per_gpu: PositiveInt = 1
    # false: every stage in this one process, without Ray (a GPU box with no Ray installed).
    enabled: Bool = True
    # Retries after system failures (a worker process, actor or node lost). The project's own
    # errors (ShardError, ConfigError, ...) are never retried by tasks and actors (Ray retries
    # exceptions only with retry_exceptions, left False); see runtime.retry_options.
    task_retries: NonNegativeInt = 3  # evaluation runs and the coordinator task; expert calls
    actor_restarts: NonNegativeInt = 3  # a restarted expert actor resumes from its checkpoint
    train_failures: NonNegativeInt = 2  # realgrad: Ray Train worker-group restarts


class StorageConfig(Section):
    s3_endpoint_url: Optional[Str] = None  # else AWS_ENDPOINT_URL; credentials from env only
    # S3 calls retry throttling, 5xx and dropped connections with exponential backoff
    # (botocore's adaptive mode) this many times; a missing bucket or denied access fails at once.
    retries: NonNegativeInt = 10
    connect_timeout: PositiveFloat = 10.0  # seconds


# --- rules across fields: each returns what is wrong, or None -------------------------------

CLASS_WISE_OBJECTIVES = ("class_matching", "per_class_effect")
WEIGHTED_METHODS = ("ead", "dm", "dc")  # the methods that use per-sample weights


def _class_terms_for_class_wise_objectives(config: RunConfig) -> Optional[str]:
    if config.distill.objective in CLASS_WISE_OBJECTIVES and not config.realgrad.class_terms:
        return (f"distill.objective {config.distill.objective!r} needs per-class real terms: "
                "set realgrad.class_terms: true")
    return None


def _weights_only_where_they_are_used(config: RunConfig) -> Optional[str]:
    from .alignment import REAL_TERM_OBJECTIVES

    if config.weights.method == "none":
        return None
    if config.distill.method not in WEIGHTED_METHODS:
        return (f"weights.method {config.weights.method!r} is used by distill.method "
                f"{', '.join(WEIGHTED_METHODS[:-1])} and {WEIGHTED_METHODS[-1]} only, not {config.distill.method!r}: set "
                "weights.method: none")
    if config.distill.method == "ead" and config.distill.objective not in REAL_TERM_OBJECTIVES:
        return (f"weights.method {config.weights.method!r} weights the real terms, which "
                f"distill.objective {config.distill.objective!r} does not read: set "
                "weights.method: none")
    return None


def _resampled_batches_only_for_weighted_dm_and_dc(config: RunConfig) -> Optional[str]:
    if config.distill.weighted_batches == "mean":
        return None
    if config.distill.method not in ("dm", "dc"):
        return (f"distill.weighted_batches 'resample' draws DM's and DC's real batches, not "
                f"distill.method {config.distill.method!r}'s: set distill.weighted_batches: mean")
    if config.weights.method == "none":
        return ("distill.weighted_batches 'resample' draws the real batches in proportion to "
                "the weights, and weights.method is none: set weights.method (kde) or "
                "distill.weighted_batches: mean")
    return None


def _paper_coefficient_only_for_scalar(config: RunConfig) -> Optional[str]:
    if config.distill.coefficient == "paper" and config.distill.objective != "scalar":
        return (f"distill.coefficient 'paper' weights the scalar objective only, not "
                f"distill.objective {config.distill.objective!r}: set distill.coefficient: "
                "derived")
    return None


def _dm_means_in_realgrad_only_for_dm_without_batch_norm(config: RunConfig) -> Optional[str]:
    if config.distill.dm_real != "realgrad":
        return None
    if config.distill.method != "dm":
        return (f"distill.dm_real 'realgrad' is for distill.method dm, not "
                f"{config.distill.method!r}: set distill.dm_real: loop")
    if config.model.name.startswith("resnet") or (config.model.name == "convnet"
                                                  and config.model.norm == "batchnorm"):
        return ("distill.dm_real 'realgrad' embeds each real sample apart from its batch, so "
                "the model must not use batch norm: use model.norm instancenorm or none "
                "(convnet), or model.name mlp")
    return None


def _no_expert_subset_of_a_stream(config: RunConfig) -> Optional[str]:
    if config.image_text.expert_data != "stream" or config.experts.train_samples is None:
        return None
    return ("experts.train_samples draws a subset of pairs held in memory; experts that stream "
            "(image_text.expert_data: stream) read all of the train split: set "
            "experts.train_samples: null (image_text.train_pairs sets their epoch length)")


def _pairs_have_no_classes(config: RunConfig) -> Optional[str]:
    """Image-text distillation is EAD with an objective that needs no classes, unweighted."""
    from .alignment import PAIR_OBJECTIVES

    if config.data.dataset not in IMAGE_TEXT_DATASETS:
        return None
    dataset = config.data.dataset
    if config.distill.method != "ead":
        return (f"distill.method {config.distill.method!r} is not available for image-text data "
                f"(data.dataset {dataset!r}): set distill.method: ead")
    if config.distill.objective not in PAIR_OBJECTIVES:
        choices = ", ".join(PAIR_OBJECTIVES[:-1]) + f" or {PAIR_OBJECTIVES[-1]}"
        return (f"distill.objective {config.distill.objective!r} is not available for "
                f"image-text data (data.dataset {dataset!r}), whose pairs have no classes: "
                f"use {choices}")
    if config.weights.method != "none":
        return (f"weights.method {config.weights.method!r} is not available for image-text data "
                f"(data.dataset {dataset!r}): set weights.method: none")
    return None


def _experts_left_to_fit(config: RunConfig) -> Optional[str]:
    if config.distill.held_out_experts < config.experts.count:
        return None
    return (f"distill.held_out_experts {config.distill.held_out_experts} leaves none of the "
            f"{config.experts.count} experts (experts.count) to fit: hold out fewer")


def _learned_lr_only_after_the_trajectory_objective(config: RunConfig) -> Optional[str]:
    if config.evaluate.lr != "learned":
        return None
    if config.data.dataset in IMAGE_TEXT_DATASETS:
        return ("evaluate.lr 'learned' is the step size of the trajectory objective's SGD "
                "student; image-text evaluation trains with Adam: set evaluate.lr to a number")
    if config.distill.method != "ead" or config.distill.objective != "trajectory":
        return (f"evaluate.lr 'learned' is the student step size the trajectory objective "
                f"learns, and distill.method {config.distill.method!r} with distill.objective "
                f"{config.distill.objective!r} learns none: set evaluate.lr to a number, or "
                f"distill.objective: trajectory")
    return None


def _formation_only_for_classification(config: RunConfig) -> Optional[str]:
    if config.distill.formation == 1:
        return None
    if config.data.dataset in IMAGE_TEXT_DATASETS:
        return (f"distill.formation {config.distill.formation}: multi-formation is for "
                f"classification sets; set distill.formation: 1 for image-text data")
    return None


def _learned_similarity_on_whole_pair_sets(config: RunConfig) -> Optional[str]:
    kind = config.image_text.similarity
    if kind == "identity":
        return None
    if config.data.dataset not in IMAGE_TEXT_DATASETS:
        return (f"image_text.similarity {kind!r} is for image-text data, not data.dataset "
                f"{config.data.dataset!r}: set image_text.similarity: identity")
    batch = config.distill.student_batch_size
    if config.distill.objective == "trajectory" and batch is not None \
            and batch < config.image_text.pairs:
        return (f"image_text.similarity {kind!r} is read whole by every student step: "
                f"distill.student_batch_size {batch} is below image_text.pairs "
                f"{config.image_text.pairs}; set it to null")
    return None


def _caption_preserving_augmentation(config: RunConfig) -> Optional[str]:
    strategy = config.image_text.augmentation
    if config.data.dataset in IMAGE_TEXT_DATASETS:
        classification = [f"{section}.augmentation" for section in ("experts", "distill")
                          if getattr(config, section).augmentation != "none"]
        if classification:  # evaluate's defaults to dsa, so it is left unread rather than refused
            return (f"{' and '.join(classification)} are not read for image-text data: set "
                    f"image_text.augmentation (caption-preserving ops, e.g. crop_scale) instead")
    if strategy is None:
        return None
    if config.data.dataset not in IMAGE_TEXT_DATASETS:
        return (f"image_text.augmentation {strategy!r} is for image-text data, not data.dataset "
                f"{config.data.dataset!r}; classification uses experts/distill/evaluate."
                "augmentation")
    from .augment import CAPTION_CHANGING_OPS, OPS, parse_strategy  # imports torch

    try:
        ops = parse_strategy(strategy)
    except ValueError as error:
        return f"image_text.augmentation: {error}"
    changing = [op for op in ops if op in CAPTION_CHANGING_OPS]
    if changing:
        verb = "changes" if len(changing) == 1 else "change"
        return (f"image_text.augmentation {strategy!r}: {' and '.join(changing)} {verb} what a "
                f"caption says (left and right, colours); use ops among "
                f"{[op for op in OPS if op not in CAPTION_CHANGING_OPS]}")
    return None


def _start_range_in_order(config: RunConfig) -> Optional[str]:
    d = config.distill
    if d.max_start is not None and d.min_start > d.max_start:
        return (f"distill.min_start {d.min_start} is past distill.max_start {d.max_start}: the "
                f"student would have no checkpoint to start from")
    return None


RULES: tuple[Callable[[RunConfig], Optional[str]], ...] = (
    _caption_preserving_augmentation,
    _learned_similarity_on_whole_pair_sets,
    _pairs_have_no_classes,
    _class_terms_for_class_wise_objectives,
    _weights_only_where_they_are_used,
    _resampled_batches_only_for_weighted_dm_and_dc,
    _paper_coefficient_only_for_scalar,
    _dm_means_in_realgrad_only_for_dm_without_batch_norm,
    _no_expert_subset_of_a_stream,
    _learned_lr_only_after_the_trajectory_objective,
    _start_range_in_order,
    _experts_left_to_fit,
    _formation_only_for_classification,
)


class ImageTextConfig(Section):
    """The image-text path (data.dataset: cc3m); the other sections' experts, distill and
    evaluate settings apply as for classification (distill.ipc is unused: ``pairs`` is N)."""
    model: Str = "clip-tiny"  # ead_dist/models/dual_encoder.py's small configs or an open_clip name
    pretrained: Optional[Str] = None  # an open_clip pretrained tag (weights on the user's machine)
    context_length: PositiveInt = 32  # caption tokens
    held_out: Annotated[Float, Gt(0), Lt(1)] = 0.05  # fraction of keys, by hash, held out
    max_broken_samples: Optional[NonNegativeInt] = 100  # more skipped stop the run; null: never
    train_pairs: Optional[PositiveInt] = None  # pairs experts and baselines hold; null: all
    # memory: each expert holds train_pairs decoded pairs (exact resume). stream: experts read
    # their batches from the shards (resampled, shuffled in a buffer of stream_buffer pairs,
    # open_clip's way) and hold one buffer, so all of CC3M fits; an epoch is train_pairs
    # pairs (null: the train split's size), and a resumed expert draws a fresh order.
    expert_data: Literal["memory", "stream"] = "memory"
    stream_buffer: PositiveInt = 1000
    test_pairs: PositiveInt = 1000  # held-out pairs that recall is measured on
    pairs: PositiveInt = 100  # N, the synthetic pairs
    # Learn the synthetic captions' token embeddings (MTT-VL, LoRS) or keep the real captions
    # they start from. Learned captions leave the token table's rows, which a text tower trained
    # from scratch never reads again at test time: on the caption scenes at N = 500 they cost
    # 13 to 15 points of recall@5 against fixed ones (README, "Image-text"). True here, as runs
    # made before this field learned them; the shipped image-text pipelines set false.
    learn_captions: Bool = True
    lr_text: PositiveFloat = 0.001  # Adam's step on the synthetic captions' token embeddings
    # The targets of S's contrastive loss: identity (pair i matches caption i only, CLIP's),
    # learned (LoRS: an [N, N] matrix, starting at the identity, learned beside the pairs and
    # stored in the set; students then train on all of S at every step) or low_rank (LoRS's
    # low-rank form, diag(d) + L R^T with L, R of similarity_rank columns: N (2 rank + 1)
    # numbers learned and stored instead of N^2; ead_dist/similarity.py).
    similarity: Literal["identity", "learned", "low_rank"] = "identity"
    similarity_rank: PositiveInt = 10  # columns of L and R with similarity: low_rank
    lr_similarity: PositiveFloat = 0.01  # Adam's step on the learned similarity's parameters
    # DSA ops that keep a caption true ("crop_scale": shifts of up to 1/8 of the side and
    # scaling by up to 1.2), drawn per image and applied alike to the experts' batches, the
    # coordinator's synthetic images and every evaluation run, so the three agree. flip and
    # color are refused: they change what a caption says (left and right, colours). The
    # classification fields experts/distill/evaluate.augmentation do not apply to pairs.
    augmentation: Optional[Str] = None


IMAGE_TEXT_DATASETS = ("cc3m",)


class RunConfig(Section):
    name: Str = "run"
    run: Str = "runs/run"  # RUN: every stage output lives under this URL
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    realgrad: RealgradConfig = Field(default_factory=RealgradConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    image_text: ImageTextConfig = Field(default_factory=ImageTextConfig)

    @model_validator(mode="after")
    def _rules_across_fields(self) -> RunConfig:
        broken = [message for rule in RULES if (message := rule(self))]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


# --- loading ---------------------------------------------------------------------------------


def _section_of(dotted: tuple) -> Optional[type[BaseModel]]:
    """The model class at a location of the tree (None past a value)."""
    model: Any = RunConfig
    for part in dotted:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _dotted(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_TYPE_NAMES = {"int": "int", "float": "float", "string": "str", "bool": "bool"}


def _describe(error: dict) -> str:
    """One pydantic error as the user reads it: the dotted field, what it must be, the value."""
    # Literal choices and list items add a location of their own; the user wrote the field.
    location = tuple(part for part in error["loc"] if not str(part).startswith(("literal[",
                                                                                "function-")))
    where, kind, value = _dotted(location), error["type"], error.get("input")
    context = error.get("ctx", {})
    if kind == "extra_forbidden":
        known = _section_of(location[:-1]).model_fields
        return f"unknown field {where} (known: {', '.join(sorted(known))})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where or 'the top level'} must be a mapping, got {value!r}"
    if kind == "list_type":
        return f"{where} must be a list, got {value!r}"
    if kind == "too_short":
        return f"{where} must not be empty"
    if kind == "literal_error":
        return f"{where} must be one of {context['expected']}, got {value!r}"
    if kind == "greater_than":
        bound = context["gt"]
        return f"{where} must be {'positive' if bound == 0 else f'> {bound}'}, got {value!r}"
    if kind == "greater_than_equal":
        return f"{where} must be >= {context['ge']}, got {value!r}"
    if kind == "value_error":
        message = str(context.get("error", error["msg"]))
        return f"{where} {message}" if where else message
    if kind == "finite_number":
        return f"{where} must be a finite number, got {value!r}"
    scalar = kind.split("_")[0]
    if scalar in _TYPE_NAMES:  # int_type, int_from_float, float_parsing, string_type, ...
        return f"{where} must be {_TYPE_NAMES[scalar]}, got {value!r}"
    return f"{where}: {error['msg']}, got {value!r}"


def _describe_all(error: ValidationError) -> str:
    seen: list[str] = []
    for each in error.errors():
        message = _describe(each)
        if message not in seen:
            seen.append(message)
    return "; ".join(seen)


def parse_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Build and validate; local paths become absolute, since Ray workers run elsewhere."""
    from .storage import absolute

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe_all(error)}") from None
    config.run = absolute(config.run)
    config.data.url = absolute(config.data.url)
    config.data.source = absolute(config.data.source)
    return config


def _read_yaml(text: str, where: str) -> Any:
    try:
        return strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as error:
        raise ConfigError(f"{where}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load ``path`` (YAML), apply ``a.b=value`` overrides (YAML-typed), validate.

    ``env:NAME`` reads the YAML text from the environment variable NAME instead: how
    ``ead-dist submit`` ships a config from outside the checkout with a job."""
    if path.startswith("env:"):
        text = os.environ.get(path[4:])
        if text is None:
            raise ConfigError(f"config {path}: the environment variable {path[4:]} is unset")
    else:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        except (IsADirectoryError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not a YAML text file: {error}") from error
    raw = _read_yaml(text, path)
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
    value = _read_yaml(text, f"{source}: --set {override}: the value")
    parts = dotted.split(".")
    section: type[BaseModel] = RunConfig
    node = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if part not in section.model_fields:
            raise ConfigError(f"{source}: unknown field {where} in --set {override} (known: "
                              f"{', '.join(sorted(section.model_fields))})")
        if depth == len(parts) - 1:
            node[part] = value
            return
        child = _section_of(tuple(parts[: depth + 1]))
        if child is None:
            raise ConfigError(f"{source}: {where} is a value, not a section, in --set {override}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {node!r}")
        section = child

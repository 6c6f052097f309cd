"""Distill stage for image-text: N pairs of pixel images and learnable caption embeddings.

The synthetic set is N pairs (MTT-VL / LoRS style): images in the model's normalised pixel
space and captions as continuous token embeddings [N, L, W] fed to the text tower in place of
looked-up tokens. It starts from N random train pairs (their captions embedded with the fixed
token table, ``models/dual_encoder.TokenTable``) and is learnt by the classification path's
:class:`~ead_dist.coordinator.Coordinator` with the ``trajectory`` objective (a student dual
encoder takes SGD steps on S's contrastive loss from an expert checkpoint and should land on
the expert's later checkpoint) or a one-step objective, ``matching`` or ``scalar``: g_S, the
gradient of S's contrastive loss at a sampled checkpoint, against realgrad's contrastive real
terms (``stages/pair_realgrad.py``). Class-wise objectives need classes, which pairs lack.
Resume (``RUN/distill/state-*.safetensors``), divergence
handling and the per-iteration randomness are the coordinator's and ``iterate``'s.

Files: ``RUN/distill/init.safetensors`` (the ``init`` baseline) and ``RUN/synthetic.safetensors``
hold ``images`` float32 [N, 3, S, S], ``text_embeddings`` float32 [N, L, W], ``tokens`` int64
[N, L] (the real captions they started from) and, with ``image_text.similarity: learned``
(LoRS), ``similarity`` float32 [N, N]: the targets of the pairs' contrastive loss, learned
from the identity beside them (the result only; ``init`` has none), or with ``low_rank`` its
factors ``similarity_diagonal`` [N], ``similarity_left`` and ``similarity_right`` [N, rank]
(``max(diag(d) + L R^T, 0)``, ead_dist/similarity.py); metadata ``dataset``,
``method``, ``pairs``, ``model``, ``pretrained``, ``tokenizer``, ``context_length``,
``token_table_seed``, ``mean``, ``std``, ``config``: what the embeddings belong to.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import storage
from ..alignment import PAIR_OBJECTIVES
from ..config import ConfigError, RunConfig
from ..coordinator import Coordinator, StudentSettings
from ..data.meta import read_meta
from ..data.pairs import ShardMap, sample_pairs
from ..data.reservoir import TooFewSamplesError
from ..measure import peak_memory_mb
from ..models.dual_encoder import TOKEN_TABLE_SEED, tokenizer_name
from ..runtime import compute_device, map_over_shards
from ..similarity import (FullSimilarity, LearnedSimilarity, LowRankSimilarity,
                          similarity_from_tensors)
from ..synthetic import SyntheticSet
from .distill import iterate, load_real_terms, load_segments
from .pair_experts import pair_model

log = logging.getLogger(__name__)


def pair_loss(model: nn.Module, params: dict[str, Tensor], images: Tensor,
              text_embeddings: Tensor, similarity: Optional[Tensor] = None) -> Tensor:
    """The student's step loss: the dual encoder's contrastive loss at ``params`` (against
    the learned ``similarity`` when given, the identity otherwise).

    Attention runs as plain math: the fused CPU kernels have no double backward, which the
    unrolled student steps need."""
    with sdpa_kernel(SDPBackend.MATH):
        return functional_call(model, params, (images, text_embeddings),
                               {"similarity": similarity})


def pair_metadata(config: RunConfig, meta, method: str) -> dict:
    settings = config.image_text
    return {"dataset": meta.name, "method": method, "pairs": settings.pairs,
            "model": settings.model, "pretrained": settings.pretrained,
            "tokenizer": tokenizer_name(settings.model),
            "context_length": settings.context_length,
            "token_table_seed": None if settings.pretrained else TOKEN_TABLE_SEED,
            "mean": meta.mean, "std": meta.std, "config": config.to_json()}


def random_pairs(config: RunConfig, count: int, seed: int, meta) -> tuple[Tensor, Tensor]:
    """``count`` train pairs drawn (seeded) from the first ``image_text.train_pairs`` (all
    without it), streamed: holds ``count`` pairs, never the train split; with Ray on, each
    shard's part of the draw is a Ray task (the same draw either way). Images and token ids."""
    try:
        pairs = sample_pairs(config.data.url, config.image_text, "train", count, seed,
                             limit=config.image_text.train_pairs, meta=meta,
                             map_shards=shard_map(config))
    except TooFewSamplesError as error:
        raise ConfigError(f"image_text.pairs {count} exceeds the train pairs: {error}") from None
    return pairs.images, pairs.tokens


def shard_map(config: RunConfig) -> ShardMap:
    """Per-shard calls as Ray tasks (one CPU each, the run's storage settings) when Ray is on
    and running (in the driver, or in the distill task), else in this process."""
    use_ray = False
    if config.ray.enabled:
        import ray

        use_ray = ray.is_initialized()
    stage = {"shard_split_count": "count train pairs", "shard_pairs_at": "decode drawn pairs"}
    return lambda function, calls: map_over_shards(
        config, use_ray, _shard_call, [(function, call) for call in calls],
        desc=stage.get(function.__name__, function.__name__))


def _shard_call(config: RunConfig, call: tuple) -> object:
    storage.apply_settings(config.storage)  # as a Ray task: the driver's settings do not reach it
    function, arguments = call
    return function(*arguments)


def save_pairs(url: str, images: Tensor, text_embeddings: Tensor, tokens: Tensor,
               metadata: dict, similarity: Optional[dict[str, Tensor]] = None) -> None:
    """``similarity``: a learned similarity's tensors (``LearnedSimilarity.tensors()``)."""
    tensors = {"images": images, "text_embeddings": text_embeddings, "tokens": tokens,
               **{name: value.detach().cpu() for name, value in (similarity or {}).items()}}
    storage.save_tensors(url, tensors, metadata)


class PairSet(NamedTuple):
    images: Tensor  # [N, 3, S, S]
    text: Tensor  # [N, L, W] caption token embeddings
    metadata: dict
    similarity: Optional[Tensor] = None  # [N, N] learned contrastive targets; None: identity


def load_pair_set(url: str) -> PairSet:
    """A pair set file: its images, caption embeddings, metadata and learned similarity."""
    tensors, metadata = storage.load_tensors(url)
    for name in ("images", "text_embeddings"):
        if name not in tensors:
            raise storage.StorageError(f"{url}: missing tensor {name!r} (not an image-text set)")
    images, text = tensors["images"], tensors["text_embeddings"]
    if images.dim() != 4 or text.dim() != 3 or len(images) != len(text):
        raise storage.StorageError(f"{url}: images {tuple(images.shape)} and text_embeddings "
                                   f"{tuple(text.shape)} do not form a set of pairs")
    similarity = similarity_from_tensors(tensors)
    if similarity is not None and tuple(similarity.shape) != (len(images), len(images)):
        raise storage.StorageError(f"{url}: similarity {tuple(similarity.shape)} is not "
                                   f"[{len(images)}, {len(images)}] for its {len(images)} pairs")
    return PairSet(images, text, metadata, similarity)


def initialise_pairs(config: RunConfig, model: nn.Module, meta) -> tuple[Tensor, Tensor, Tensor]:
    """The initial pairs, published once as ``RUN/distill/init.safetensors``."""
    url = storage.join(config.run, "distill", "init.safetensors")
    if storage.exists(url):
        tensors, _ = storage.load_tensors(url)
        return tensors["images"], tensors["text_embeddings"], tensors["tokens"]
    images, tokens = random_pairs(config, config.image_text.pairs, config.distill.seed, meta)
    with torch.no_grad():
        text = model.embed_tokens(tokens)
    save_pairs(url, images, text, tokens, pair_metadata(config, meta, "init"))
    return images, text, tokens


def initial_similarity(config: RunConfig, pairs: int,
                       device: torch.device | str) -> Optional[LearnedSimilarity]:
    """The configured learned similarity at the identity, or None for CLIP's own targets."""
    kind = config.image_text.similarity
    if kind == "learned":
        return FullSimilarity.identity(pairs, device)
    if kind == "low_rank":
        return LowRankSimilarity.identity(pairs, config.image_text.similarity_rank,
                                          seed=config.distill.seed, device=device)
    return None


def _coordinator(config: RunConfig, model: nn.Module, synthetic: SyntheticSet,
                 device: torch.device | str) -> tuple[Coordinator, dict]:
    """The coordinator of the configured objective: ``trajectory`` against the experts'
    segments, ``matching`` or ``scalar`` against realgrad's contrastive real terms
    (stages/pair_realgrad.py); and what the summary records about them."""
    settings = config.distill
    common = dict(lr_images=settings.lr_images, lr_labels=config.image_text.lr_text,
                  learn_labels=config.image_text.learn_captions, seed=settings.seed, device=device,
                  step_loss=pair_loss,
                  soft_labels=False,
                  similarity=initial_similarity(config, len(synthetic.classes), device),
                  lr_similarity=config.image_text.lr_similarity,
                  augmentation=config.image_text.augmentation)
    if settings.objective == "trajectory":
        segments = load_segments(config.run, settings.expert_span, settings.max_start, device,
                                 min_start=settings.min_start)
        student = StudentSettings(
            steps=settings.student_steps, batch_size=settings.student_batch_size,
            initial_lr=settings.student_lr or config.experts.lr, lr_lr=settings.lr_student_lr,
            recompute=settings.unroll == "recompute")
        return (Coordinator(model, synthetic, objective="trajectory", segments=segments,
                            student=student, **common),
                {"segments": len(segments)})
    terms, index = load_real_terms(config.run, device)
    coordinator = Coordinator(
        model, synthetic, objective=settings.objective, terms=terms,
        coefficient=settings.coefficient, real_size=index["train_pairs"],
        checkpoints_per_iteration=settings.checkpoints_per_iteration,
        distance=settings.distance, skip_head_and_biases=settings.skip_head_and_biases,
        normalise=settings.normalise, **common)
    return coordinator, {"checkpoints": len(terms), "real_samples": index["real_samples"]}


def check_pair_objective(config: RunConfig) -> None:
    """Refuse a method or objective that pairs cannot run (one set on a loaded config, past
    its validation)."""
    settings = config.distill
    if settings.method != "ead" or settings.objective not in PAIR_OBJECTIVES:
        raise ConfigError(f"image-text distillation supports distill.method ead with "
                          f"distill.objective {' or '.join(PAIR_OBJECTIVES)}, got "
                          f"{settings.method!r} with {settings.objective!r}")


def distill_pairs(config: RunConfig) -> dict:
    """Learn the N pairs with the coordinator; publishes ``RUN/synthetic.safetensors``."""
    check_pair_objective(config)
    settings = config.distill
    meta = read_meta(config.data.url)
    device = compute_device(config.ray.use_gpu)
    model = pair_model(config, meta.image_shape[1]).to(device)
    images, text, tokens = initialise_pairs(config, model, meta)
    coordinator, described = _coordinator(
        config, model, SyntheticSet(images, text, torch.arange(len(images))), device)
    losses, start, seconds = iterate(config.run, coordinator, settings.iterations,
                                     settings.save_every,
                                     f"distill pairs ({settings.objective})")
    final = coordinator.synthetic
    done = settings.iterations - start
    out_url = storage.join(config.run, "synthetic.safetensors")
    summary = {
        "method": "ead", "objective": settings.objective, "reads_real_data_in_loop": False,
        "synthetic": out_url, "pairs": len(images), "iterations": settings.iterations,
        "seconds": seconds, "iterations_run": done, "resumed_at": start,
        "seconds_per_iteration": seconds / done if done else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "image_change": float((final.images - images).norm() / images.norm()),
        "text_change": float((final.label_logits - text).norm() / text.norm()),
        **described, "peak_memory_mb": peak_memory_mb(),
    }
    if settings.objective == "trajectory":
        summary["student_lr"] = float(coordinator.student_lr.detach())
    similarity = None
    if coordinator.similarity is not None:
        similarity = coordinator.similarity.tensors()
        targets = coordinator.similarity.targets().detach().cpu()
        summary["similarity_change"] = float((targets - torch.eye(len(targets))).norm()
                                             / len(targets) ** 0.5)
    storage.publish_json(storage.join(config.run, "distill", "summary.json"), summary)
    save_pairs(out_url, final.images, final.label_logits, tokens,
               pair_metadata(config, meta, f"ead-{settings.objective}"), similarity)
    return summary

"""Realgrad for image-text: contrastive real terms over fixed batches of pairs.

A batch's contrastive loss L(b, theta) is not a sum over its pairs (each pair's term depends
on the rest of the batch), so the terms are means over fixed batches of B =
``realgrad.p_batch_size`` pairs, at every selected checkpoint theta_t:

    g_D       = (1 / |B_D|) sum_{b in B_D} grad L(b, theta_t)     the D batches B_D
    g_P[k]    = grad L(P_k, theta_t)                              the K P batches
    real_dots = < g_P[k], g_D >

in the classification files' layout (``RUN/realgrad/ckpt-NNNN.safetensors`` with g_D [n],
g_P [K, n], real_dots [K]; ``d_batches`` and ``p_batches`` count the batches behind them), so
the coordinator's one-step objectives read them unchanged.

Batches. D is the train pairs the experts train on (the first ``image_text.train_pairs`` in
shard order, or all of them when the experts stream). The driver counts D's pairs per shard,
reading the shards without decoding them (by one Ray task per shard when D is the whole train
split), and cuts each shard's run of them into consecutive batches of B (a shard's last B - 1
or fewer are left out): the pool, numbered shard after shard. From it it draws, with
``realgrad.seed``, ``realgrad.real_samples // B`` D batches (every batch when null) and K =
``realgrad.p_batches`` P batches. The plan names a batch by its pool index, never by its keys,
so the driver and the plan every worker receives hold counts per shard and the drawn indices
whatever |D| is (``benchmarks/pair_scaling.py`` measures it). A worker finds a batch's pairs by
their positions in its shard, counted before decoding exactly as the driver counted them, and
decodes only the pairs of planned batches. A batch lies in one shard and a worker reads whole
shards (rank, rank+W, ...), so every batch's gradient is computed whole by one worker, whatever
W: the workers sum their batches' gradients and count them, the sums and counts are
all-reduced, and rank 0 divides (``realgrad.compute_pass``).

Memory per worker, as classification without class terms: 4 * n * chunk * (K + 2) bytes for a
pass of ``realgrad.chunk`` checkpoints (``realgrad.sums_bytes(n, 1, K, False, chunk)``), plus
one batch's activations and the decoded pairs of the batch being filled.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import storage
from ..config import ConfigError, ImageTextConfig, RunConfig
from ..data.arrays import normalise
from ..data.image_text_stream import SkipBroken, image_text_batches
from ..data.meta import read_meta
from ..data.pairs import all_shards, split_counts
from ..models.dual_encoder import build_dual_encoder, tokenize
from ..real_terms import batch_loss_gradient, batch_means
from ..runtime import compute_device, map_over_shards
from .realgrad import planned_checkpoints, publish_terms

log = logging.getLogger(__name__)


def batches_per_shard(counts: list[int], batch_size: int) -> list[int]:
    """The pool of batches: each shard's train pairs, in order, cut into consecutive runs of
    ``batch_size`` (the remainder left out); pool index b counts them shard after shard."""
    return [count // batch_size for count in counts]


def locate(per_shard: list[int], batches: list[int]) -> list[tuple[int, int]]:
    """(shard index, j) of each pool batch in ``batches``: the j-th run of the shard's train
    pairs."""
    first = np.cumsum([0] + per_shard)
    wanted = np.asarray(batches, dtype=np.int64)
    outside = wanted[(wanted < 0) | (wanted >= first[-1])]
    if len(outside):
        raise IndexError(f"batch {int(outside[0])} is outside the pool of {int(first[-1])}")
    shards = np.searchsorted(first, wanted, side="right") - 1
    return [(int(s), int(b - first[s])) for s, b in zip(shards, wanted)]


def draw_batches(pool: int, d_batches: int | None, p_batches: int, seed: int
                 ) -> tuple[list[int], list[int]]:
    """Indices into the pool of the D batches (all with None) and of the K P batches (distinct
    among themselves, drawn from the whole pool as the classification P batches are)."""
    rng = np.random.default_rng(seed)
    d = list(range(pool)) if d_batches is None or d_batches >= pool else \
        np.sort(rng.choice(pool, d_batches, replace=False)).tolist()
    return d, rng.choice(pool, p_batches, replace=False).tolist()


def expert_pairs(settings: ImageTextConfig) -> int | None:
    """How many of the first train pairs the experts train on: ``image_text.train_pairs`` when
    they hold them in memory; all when they stream (train_pairs is then their epoch length)."""
    return None if settings.expert_data == "stream" else settings.train_pairs


def _train_counts(config: RunConfig, shards: list[int], meta) -> list[int]:
    storage.apply_settings(config.storage)  # as a Ray task: the driver's settings do not reach it
    return split_counts(config.data.url, config.image_text, "train", meta=meta, shards=shards)


def count_train_pairs(config: RunConfig, meta, use_ray: bool = False) -> list[int]:
    """D's pairs per shard, in shard order, counted (no key is held): in this process up to the
    first ``train_pairs`` (a prefix of the shards), or, when D is the whole train split and Ray
    is on, by one Ray task per shard."""
    limit = expert_pairs(config.image_text)
    if limit is not None or not use_ray:
        return split_counts(config.data.url, config.image_text, "train", limit, meta)
    shards = [[i] for i in range(len(all_shards(config.data.url, meta)))]
    return [count for part in map_over_shards(config, True, _train_counts, shards, meta,
                                                 desc="count train pairs")
            for count in part]


def build_pair_plan(config: RunConfig, use_ray: bool = False) -> dict:
    """Everything a worker needs, as plain data (it travels to the Ray workers): D's batches as
    counts per shard and pool indices, never their keys, so the plan and the driver stay small
    at any |D| (a worker finds a batch's pairs by their positions in its shard)."""
    settings, realgrad = config.image_text, config.realgrad
    meta = read_meta(config.data.url)
    counts = count_train_pairs(config, meta, use_ray)
    per_shard = batches_per_shard(counts, realgrad.p_batch_size)
    pool = sum(per_shard)
    if pool < realgrad.p_batches:
        raise ConfigError(
            f"realgrad.p_batches {realgrad.p_batches} needs as many batches of "
            f"realgrad.p_batch_size {realgrad.p_batch_size} train pairs within shards; "
            f"{config.data.url} holds {pool} ({sum(counts)} train pairs)")
    wanted = None if realgrad.real_samples is None else \
        max(1, realgrad.real_samples // realgrad.p_batch_size)
    d, p = draw_batches(pool, wanted, realgrad.p_batches, realgrad.seed)
    return {
        "kind": "pairs", "run": config.run, "shards": all_shards(config.data.url, meta),
        "batch_size": realgrad.p_batch_size, "batches_per_shard": per_shard,
        "d_batches": d, "p_batches": p, "train_pairs": sum(counts), "pool": pool,
        "image_size": meta.image_shape[1], "mean": meta.mean, "std": meta.std,
        "held_out": settings.held_out, "max_broken_samples": settings.max_broken_samples,
        "model": settings.model, "pretrained": settings.pretrained,
        "context_length": settings.context_length,
        "checkpoints": planned_checkpoints(config), "dtype": realgrad.dtype,
        "use_gpu": config.ray.use_gpu, "s3_options": storage.options_of(config.storage),
    }


def describe_pair_plan(plan: dict) -> dict:
    """What index.json records about the batches."""
    size = plan["batch_size"]
    return {"real_samples": len(plan["d_batches"]) * size, "d_batches": len(plan["d_batches"]),
            "pool_batches": plan["pool"],
            "p_batches": len(plan["p_batches"]), "p_batch_size": size,
            "train_pairs": plan["train_pairs"], "class_terms": False, "weights": "none"}


def _roles(plan: dict, shards: set[int]) -> dict[tuple[int, int], tuple[bool, list[int]]]:
    """For each planned batch in ``shards``, by (shard, j): (a D batch?, its P indices)."""
    roles: dict[tuple[int, int], tuple[bool, list[int]]] = {}
    for where in locate(plan["batches_per_shard"], plan["d_batches"]):
        if where[0] in shards:
            roles[where] = (True, [])
    for k, where in enumerate(locate(plan["batches_per_shard"], plan["p_batches"])):
        if where[0] in shards:
            roles.setdefault(where, (False, []))[1].append(k)
    return roles


def pair_partial_sums(plan: dict, rank: int, world: int, todo: list[int]
                      ) -> dict[str, torch.Tensor]:
    """This worker's sums of batch gradients over the batches in shards rank, rank+world, ...
    and their counts (additive over workers)."""
    device = compute_device(plan["use_gpu"])
    model = build_dual_encoder(plan["model"], plan["image_size"], plan["context_length"],
                               plan["pretrained"]).to(device)
    thetas = {i: {k: v.to(device) for k, v in storage.load_tensors(
        plan["checkpoints"][i]["url"])[0].items()} for i in todo}
    n = sum(v.numel() for v in next(iter(thetas.values())).values()) if thetas else 0
    num_p = len(plan["p_batches"])
    sums = {i: {"d": torch.zeros(n, device=device), "p": torch.zeros(num_p, n, device=device)}
            for i in todo}
    count_d = torch.zeros(1, dtype=torch.int64)
    count_p = torch.zeros(num_p, dtype=torch.int64)
    mine = list(range(rank, len(plan["shards"]), world))
    roles = _roles(plan, set(mine))
    size = plan["batch_size"]
    pending: dict[tuple[int, int], list[tuple[torch.Tensor, str]]] = {b: [] for b in roles}

    def accumulate(b: tuple[int, int]) -> None:
        images, captions = zip(*pending.pop(b))
        x = normalise(torch.stack(images), plan["mean"], plan["std"]).to(device)
        tokens = tokenize(list(captions), plan["context_length"]).to(device)
        in_d, p_indices = roles[b]
        for i in todo:
            g = batch_loss_gradient(model, thetas[i], (x, tokens))
            if in_d:
                sums[i]["d"] += g
            for k in p_indices:
                sums[i]["p"][k] += g
        count_d[0] += int(in_d)
        for k in p_indices:
            count_p[k] += 1

    log.info("realgrad (pairs) rank %d/%d: %d shards, %d batches, %d checkpoints", rank, world,
             len(mine), len(roles), len(todo))
    handler = SkipBroken(limit=plan["max_broken_samples"])
    shard_index = {plan["shards"][s]: s for s in mine}
    wanted: dict[str, set[int]] = {}
    for shard, j in roles:
        wanted.setdefault(plan["shards"][shard], set()).add(j)
    # A worker with no batch (fewer shards than workers) still takes part in the all-reduce.
    pairs = image_text_batches(
        [plan["shards"][s] for s in mine], image_size=plan["image_size"], handler=handler,
        batch_size=size, wanted=wanted, held_out_fraction=plan["held_out"],
        split="train") if roles else []
    for (url, j), image, caption in pairs:
        b = (shard_index[url], j)
        pending[b].append((image, caption))
        if len(pending[b]) == size:
            accumulate(b)
    for b in [b for b, got in pending.items() if got]:  # short of pairs that did not decode
        log.warning("realgrad (pairs): batch %s (shard, run) has %d of its %d pairs (skipped "
                    "%s)", b, len(pending[b]), size, dict(handler.counts))
        accumulate(b)
    out = {"count_d": count_d, "count_p": count_p}
    for i in todo:
        out[f"{i}_d"], out[f"{i}_p"] = sums[i]["d"], sums[i]["p"]
    # Everything on this worker's device: nccl all-reduces CUDA tensors only.
    return {key: value.to(device) for key, value in out.items()}


def finalise_pairs(plan: dict, reduced: dict[str, torch.Tensor], todo: list[int]) -> None:
    """Batch means and dot products from the reduced sums; publish one file per checkpoint."""
    if int(reduced["count_d"][0]) == 0 or (reduced["count_p"] == 0).any():
        raise ValueError(f"realgrad (pairs): {int(reduced['count_d'][0])} D batches and P "
                         f"batch counts {reduced['count_p'].tolist()} were computed; every "
                         "planned batch should have been read once")
    for i in todo:
        g_D, g_P, real_dots = batch_means(reduced[f"{i}_d"], reduced["count_d"][0],
                                          reduced[f"{i}_p"], reduced["count_p"])
        publish_terms(plan, i, {"g_D": g_D, "g_P": g_P, "real_dots": real_dots,
                                "d_batches": reduced["count_d"], "p_batches": reduced["count_p"]},
                      {"d_batches": int(reduced["count_d"][0]),
                       "p_batch_size": plan["batch_size"]})

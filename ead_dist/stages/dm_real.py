"""DM's real side in the realgrad pass: every iteration's real class means, data-parallel.

With ``distill.method: dm`` and ``distill.dm_real: realgrad`` the realgrad stage runs this
instead of the gradient terms. DM's iteration i draws a fresh network, a real batch per class
and one DSA draw per class (:func:`ead_dist.methods.dm.draw_iteration`), all a function of
(seed, i, class sizes). Here W Ray Train workers each read shards rank, rank+W, ... into
memory, exchange their (key, label) lists so that every worker knows each class's members,
then replay the draws of every iteration and embed the drawn samples they hold. The sums (and
their counts or weight totals) are ``all_reduce``d and rank 0 publishes

    RUN/realgrad/dm_means.safetensors   means [I, C, d] (weighted with weights.method, or
                                        of resampled batches: distill.weighted_batches),
                                        mass [I, C]; metadata: class sizes, iterations, seed

The DM loop then reads this file instead of the training split (``reads_real_data_in_loop``
false). The embedding of a sample must not depend on its batch, so the network may not use
batch norm (the config refuses it). A worker holds its share of the training split and the
sums, 4 * I * C * d bytes; the pass costs what DM's loop spends on its real batches.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Optional

import torch

from .. import storage
from ..augment import dsa_strategy
from ..config import RunConfig
from ..data.arrays import normalise
from ..data.meta import read_meta, shard_counts, shard_urls
from ..data.pipeline import classification_samples
from ..fingerprint import guard, resamples_real_batches
from ..measure import peak_memory_mb
from ..methods.dm import augmented, draw_iteration
from ..models import build_model
from ..models.embedding import embed
from ..progress import progress_bar
from ..runtime import compute_device
from .weights import ensure_weights, load_weights, planned_weights

log = logging.getLogger(__name__)


def dm_means_url(run_url: str) -> str:
    return storage.join(run_url, "realgrad", "dm_means.safetensors")


def build_dm_plan(config: RunConfig) -> dict:
    """Everything a worker needs, as plain data (it travels to the Ray workers)."""
    meta = read_meta(config.data.url)
    return {
        "run": config.run, "shards": shard_urls(config.data.url, meta, "train"),
        "shard_counts": shard_counts(meta, "train"),
        "train_size": meta.splits["train"].size,
        "image_shape": meta.image_shape, "num_classes": meta.num_classes,
        "mean": meta.mean, "std": meta.std,
        "model": config.model.name, "model_options": config.model.options_for(config.model.name),
        "seed": config.distill.seed, "iterations": config.distill.iterations,
        "real_batch_size": config.distill.real_batch_size,
        "augmentation": dsa_strategy(meta.name),  # what the in-loop DM uses (baselines.py)
        "weights": planned_weights(config), "use_gpu": config.ray.use_gpu,
        "resampled": resamples_real_batches(config),
        "s3_options": storage.options_of(config.storage),
    }


def read_local(plan: dict, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This worker's share of the training split: keys [n], labels [n], normalised images."""
    keys, labels, images = [], [], []
    shards = plan["shards"][rank::world]
    for key, image, label in classification_samples(
            shards, image_shape=plan["image_shape"], num_classes=plan["num_classes"],
            split_nodes=False, counts=plan["shard_counts"][rank::world]) if shards else []:
        keys.append(int(key))
        labels.append(label)
        images.append(image)
    if not keys:
        return (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, *plan["image_shape"]))
    return (torch.tensor(keys), torch.tensor(labels),
            normalise(torch.stack(images), plan["mean"], plan["std"]))


def class_members(keys: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  train_size: int) -> list[torch.Tensor]:
    """Each class's sample keys in key order: the rows the in-loop DM draws from."""
    order = torch.argsort(keys)
    keys, labels = keys[order], labels[order]
    if not torch.equal(keys, torch.arange(train_size)):
        raise ValueError(f"the training shards hold keys that are not 0..{train_size - 1} "
                         f"({len(keys)} samples): re-ingest the data")
    return [keys[labels == c] for c in range(num_classes)]


def class_sums(plan: dict, members: list[torch.Tensor], keys: torch.Tensor,
               images: torch.Tensor, weights: Optional[torch.Tensor],
               device: torch.device | str) -> dict[str, torch.Tensor]:
    """Sums of psi over the drawn samples this worker holds, per iteration and class, and their
    mass (counts, or weight totals with weights): additive over workers. Resampled batches
    (``plan["resampled"]``) are drawn in proportion to the weights and summed plainly, a sample
    drawn twice counted twice."""
    classes = plan["num_classes"]
    position = torch.full((plan["train_size"],), -1, dtype=torch.int64)
    position[keys] = torch.arange(len(keys))

    def make() -> torch.nn.Module:
        return build_model(plan["model"], plan["image_shape"][0], classes,
                           tuple(plan["image_shape"][1:]), **plan["model_options"])

    with torch.no_grad():  # the embedding's width, from one blank sample
        width = embed(make(), torch.zeros(1, *plan["image_shape"])).shape[1]
    sums = torch.zeros(plan["iterations"], classes, width)
    mass = torch.zeros(plan["iterations"], classes, dtype=torch.float64)
    images = images.to(device)
    resampled = plan["resampled"]
    class_weights = [weights[m] for m in members] if resampled else None
    progress = progress_bar("realgrad (DM means)", total=plan["iterations"])
    for i in range(plan["iterations"]):
        draws = draw_iteration(make, plan["seed"], i, [len(m) for m in members],
                               plan["real_batch_size"], plan["augmentation"],
                               tuple(plan["image_shape"][1:]), device, resampled, class_weights)
        for c in range(classes):
            mine = position[members[c][draws.picks[c]]]
            mine = mine[mine >= 0]  # the drawn samples held here
            if len(mine) == 0:
                continue
            with torch.no_grad():
                embedded = embed(draws.network, augmented(images[mine.to(device)],
                                                          draws.params[c])).cpu()
            if weights is None or resampled:
                sums[i, c] += embedded.sum(0)
                mass[i, c] += len(mine)
            else:
                w = weights[keys[mine]]
                sums[i, c] += (w.unsqueeze(1) * embedded).sum(0)
                mass[i, c] += float(w.double().sum())
        progress.update(1)
    progress.close()
    return {"sums": sums, "mass": mass}


def publish(plan: dict, reduced: dict[str, torch.Tensor], class_sizes: list[int]) -> None:
    if (reduced["mass"] <= 0).any():
        raise ValueError("a DM real batch had no samples (or zero total weight)")
    means = reduced["sums"] / reduced["mass"].unsqueeze(-1).to(reduced["sums"].dtype)
    storage.save_tensors(dm_means_url(plan["run"]), {"means": means, "mass": reduced["mass"]},
                         {"class_sizes": class_sizes, "iterations": plan["iterations"],
                          "seed": plan["seed"], "real_batch_size": plan["real_batch_size"],
                          "augmentation": plan["augmentation"], "resampled": plan["resampled"],
                          "peak_memory_mb_rank0": peak_memory_mb()})


def worker_means(plan: dict, rank: int, world: int, gather) -> tuple[dict, list[int]]:
    """One worker's part: read its shards, learn every class's members through ``gather``
    (all-gather of a Python object), sum its drawn samples."""
    device = compute_device(plan["use_gpu"])
    keys, labels, images = read_local(plan, rank, world)
    everyone = gather((keys, labels))
    members = class_members(torch.cat([k for k, _ in everyone]),
                            torch.cat([lab for _, lab in everyone]), plan["num_classes"],
                            plan["train_size"])
    part = class_sums(plan, members, keys, images, load_weights(plan["weights"]), device)
    return part, [len(m) for m in members]


def train_loop_per_worker(plan: dict) -> None:
    """Ray Train worker: its sums, all_reduce, rank 0 publishes."""
    import ray.train
    import torch.distributed as dist

    storage.configure(plan["s3_options"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = dist.is_available() and dist.is_initialized()

    def gather(value):
        if not distributed:
            return [value]
        out = [None] * world
        dist.all_gather_object(out, value)
        return out

    part, class_sizes = worker_means(plan, rank, world, gather)
    if distributed:
        for key in sorted(part):
            dist.all_reduce(part[key], op=dist.ReduceOp.SUM)
    if rank == 0:
        publish(plan, part, class_sizes)
    ray.train.report({"iterations": plan["iterations"]})


def run_dm_means(config: RunConfig, use_ray: bool = True) -> dict:
    """Compute DM's real class means for every iteration, unless already on storage."""
    from .realgrad import run_worker_pass

    guard(config, "realgrad")
    url = dm_means_url(config.run)
    if not storage.exists(url):
        started = time.perf_counter()
        ensure_weights(config, use_ray)
        plan = build_dm_plan(config)
        log.info("realgrad: DM real means for %d iterations, %d real per class, %d worker(s)",
                 plan["iterations"], plan["real_batch_size"], config.realgrad.workers)
        if use_ray:
            with tempfile.TemporaryDirectory(prefix="ead-dm-means-") as train_dir:
                run_worker_pass(config, train_loop_per_worker, plan, train_dir, "dm_means")
        else:
            part, class_sizes = worker_means(plan, 0, 1, lambda value: [value])
            publish(plan, part, class_sizes)
        log.info("realgrad: DM real means done in %.1f s", time.perf_counter() - started)
    metadata = storage.load_metadata(url)
    return {"dm_means": url, "iterations": metadata["iterations"],
            "class_sizes": metadata["class_sizes"], "workers": config.realgrad.workers,
            "peak_memory_mb_rank0": metadata.get("peak_memory_mb_rank0")}


def load_dm_means(config: RunConfig) -> tuple[torch.Tensor, list[int]]:
    """The published means [I, C, d] and the class sizes the draws replay with."""
    url = dm_means_url(config.run)
    if not storage.exists(url):
        raise FileNotFoundError(f"{url} is missing: run the realgrad stage first "
                                "(distill.dm_real: realgrad)")
    tensors, metadata = storage.load_tensors(url)
    return tensors["means"], metadata["class_sizes"]

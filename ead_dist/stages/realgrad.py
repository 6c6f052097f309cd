"""Realgrad stage: the real-data terms of the sampled checkpoints, data-parallel over shards.

A Ray Train ``TorchTrainer`` runs W workers. Worker r reads shards r, r+W, ... and, for every
selected checkpoint, sums per-class gradients over its part of the D sample and over its part
of each P batch; the sums and counts are ``all_reduce``d (gloo on CPU, nccl on GPU) and rank 0
forms the means and the scalars < g_P, g_D > and writes one file per checkpoint:

    RUN/realgrad/ckpt-0000.safetensors   g_D [n], g_P [K, n], real_dots [K] = < g_P, g_D >,
                                         and with class terms g_D_classes [C, n],
                                         g_P_classes [K, C, n], real_dots_classes [K, C]
    RUN/realgrad/index.json              written last: the checkpoints, lrs, sample counts

Memory. A worker holds, for each checkpoint of the pass, gradient sums of G rows of n floats
(n parameters): G = C + K*C with class terms, 1 + K without; plus the checkpoint itself. A pass
of ``realgrad.chunk`` checkpoints therefore holds about 4 * n * chunk * (G + 1) bytes
(``sums_bytes``) besides one batch's activations; more checkpoints mean more passes over the
shards, not more memory. Each pass publishes its files, so a killed run redoes one pass at
most. ``realgrad.dtype: float16`` stores the terms in half the bytes (computed in float32).

With ``weights.method`` other than none every sum is weighted by the run's per-sample weights
(``RUN/weights/weights.safetensors``, :mod:`ead_dist.stages.weights`) and divided by the
reduced weight totals, so the terms are weighted means; the file also holds
``d_class_weights`` and ``p_class_weights``.

Which samples form the D sample and the P batches is fixed up front by the driver (from the
seed and the split size), so the result does not depend on W. Nothing here depends on S.

Image-text data run the same pass (``compute_pass``: partial sums, all_reduce, rank 0
publishes) with the contrastive terms of :mod:`ead_dist.stages.pair_realgrad`: means over fixed
batches of pairs rather than over samples, in the same files without class terms.
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import torch

from .. import storage
from ..config import RunConfig
from ..data.arrays import normalise
from ..data.meta import read_meta, shard_counts, shard_urls
from ..data.pipeline import classification_samples
from ..fingerprint import guard
from ..models import build_model
from ..real_terms import class_means, grouped_gradient_sums, safe_counts
from ..measure import peak_memory_mb
from ..progress import progress_bar
from ..runtime import compute_device
from .experts import experts_url, is_image_text
from .weights import ensure_weights, load_weights, planned_weights

log = logging.getLogger(__name__)


def realgrad_url(run_url: str) -> str:
    return storage.join(run_url, "realgrad")


def term_file(index: int) -> str:
    return f"ckpt-{index:04d}.safetensors"


def select_checkpoints(index: dict, count: int) -> list[dict]:
    """``count`` checkpoints spread evenly over all experts' trajectories (expert-major order)."""
    every = [dict(c, expert=e["expert"]) for e in index["experts"] for c in e["checkpoints"]]
    if count >= len(every):
        return every
    picks = np.linspace(0, len(every) - 1, count).round().astype(int)
    return [every[i] for i in sorted(set(picks.tolist()))]


def sample_plan(train_size: int, real_samples: int | None, p_batches: int, p_batch_size: int,
                seed: int) -> tuple[list[int], list[list[int]]]:
    """Indices of the D sample and of the K P batches (disjoint, drawn from all of D)."""
    rng = np.random.default_rng(seed)
    size = train_size if real_samples is None else min(real_samples, train_size)
    d_sample = np.sort(rng.choice(train_size, size, replace=False)).tolist()
    drawn = rng.choice(train_size, min(p_batches * p_batch_size, train_size), replace=False)
    return d_sample, [np.sort(b).tolist() for b in np.array_split(drawn, p_batches)]


def planned_checkpoints(config: RunConfig) -> list[dict]:
    """The selected checkpoints with their URLs and their term files' indices."""
    index = storage.read_json(storage.join(experts_url(config.run), "index.json"))
    checkpoints = select_checkpoints(index, config.realgrad.checkpoints)
    return [dict(c, url=storage.join(experts_url(config.run), c["file"]), index=i)
            for i, c in enumerate(checkpoints)]


def build_plan(config: RunConfig) -> dict:
    """Everything a worker needs, as plain data (it travels to the Ray workers)."""
    meta = read_meta(config.data.url)
    d_sample, p_batches = sample_plan(meta.splits["train"].size, config.realgrad.real_samples,
                                      config.realgrad.p_batches, config.realgrad.p_batch_size,
                                      config.realgrad.seed)
    return {
        "kind": "classification", "run": config.run,
        "shards": shard_urls(config.data.url, meta, "train"),
        "shard_counts": shard_counts(meta, "train"),
        "image_shape": meta.image_shape, "num_classes": meta.num_classes,
        "mean": meta.mean, "std": meta.std,
        "model": config.model.name, "model_options": config.model.options_for(config.model.name),
        "checkpoints": planned_checkpoints(config),
        "d_sample": d_sample, "p_batches": p_batches,
        "batch_size": config.realgrad.batch_size, "class_terms": config.realgrad.class_terms,
        "dtype": config.realgrad.dtype,
        "weights": planned_weights(config),
        "use_gpu": config.ray.use_gpu,
        "s3_options": storage.options_of(config.storage),
    }


def sum_rows(num_classes: int, p_batches: int, class_terms: bool) -> tuple[int, int]:
    """Rows of one checkpoint's D and P gradient sums: per class (and P batch) with class
    terms, else one for D and one per P batch."""
    if class_terms:
        return num_classes, p_batches * num_classes
    return 1, p_batches


def sums_bytes(parameters: int, num_classes: int, p_batches: int, class_terms: bool,
               checkpoints: int) -> int:
    """What a worker's pass over ``checkpoints`` checkpoints holds in float32: their gradient
    sums and the checkpoints themselves (the bound that ``realgrad.chunk`` sets)."""
    d_rows, p_rows = sum_rows(num_classes, p_batches, class_terms)
    return 4 * parameters * checkpoints * (d_rows + p_rows + 1)


def partial_sums(plan: dict, rank: int, world: int, todo: list[int]) -> dict[str, torch.Tensor]:
    """This worker's gradient sums and counts over shards rank, rank+world, ... (additive).

    Counts are always per class (and P batch); the sums per class only with class terms. With
    per-sample weights (``plan["weights"]``) the sums are weighted and ``weight_d`` /
    ``weight_p`` hold the weight totals beside the counts."""
    classes = plan["num_classes"]
    num_p = len(plan["p_batches"])
    class_terms = plan["class_terms"]
    d_rows, p_rows = sum_rows(classes, num_p, class_terms)
    d_group = {i: True for i in plan["d_sample"]}
    p_group = {i: k for k, batch in enumerate(plan["p_batches"]) for i in batch}
    device = compute_device(plan["use_gpu"])
    model = build_model(plan["model"], plan["image_shape"][0], classes,
                        tuple(plan["image_shape"][1:]), **plan["model_options"]).to(device)
    thetas = {i: {k: v.to(device) for k, v in storage.load_tensors(
        plan["checkpoints"][i]["url"])[0].items()} for i in todo}
    n = sum(v.numel() for v in next(iter(thetas.values())).values()) if thetas else 0
    # The sums are accumulated in place: a pass holds one [rows, n] copy per checkpoint.
    sums = {i: {part: torch.zeros(rows, n, device=device)
                for part, rows in (("d", d_rows), ("p", p_rows))} for i in todo}
    counts = {"d": torch.zeros(classes, dtype=torch.int64),
              "p": torch.zeros(num_p * classes, dtype=torch.int64)}
    weights = load_weights(plan.get("weights"))
    totals = {"d": torch.zeros(classes, dtype=torch.float64),
              "p": torch.zeros(num_p * classes, dtype=torch.float64)}

    def accumulate(keys: list[int], images: list[torch.Tensor], labels: list[int]) -> None:
        x = normalise(torch.stack(images), plan["mean"], plan["std"]).to(device)
        y = torch.tensor(labels, device=device)
        in_d = torch.tensor([k in d_group for k in keys], device=device)
        batch_of = torch.tensor([p_group.get(k, -1) for k in keys], device=device)
        p_class = torch.where(batch_of >= 0, batch_of * classes + y, -1)
        if class_terms:
            d_groups, p_groups = torch.where(in_d, y, -1), p_class
        else:
            d_groups, p_groups = torch.where(in_d, 0, -1), batch_of
        w = None if weights is None else weights[torch.tensor(keys)].to(device)
        for i in todo:
            grouped_gradient_sums(model, thetas[i], x, y, d_groups, d_rows, w, out=sums[i]["d"])
            grouped_gradient_sums(model, thetas[i], x, y, p_groups, p_rows, w, out=sums[i]["p"])
        counts["d"] += torch.bincount(y[in_d].cpu(), minlength=classes)
        counts["p"] += torch.bincount(p_class[p_class >= 0].cpu(), minlength=num_p * classes)
        if w is not None:
            w = w.double().cpu()
            totals["d"] += torch.bincount(y[in_d].cpu(), weights=w[in_d.cpu()],
                                          minlength=classes)
            in_p = (p_class >= 0).cpu()
            totals["p"] += torch.bincount(p_class.cpu()[in_p], weights=w[in_p],
                                          minlength=num_p * classes)

    wanted = set(d_group) | set(p_group)
    my_shards = plan["shards"][rank::world]
    log.info("realgrad rank %d/%d: %d shards, %d checkpoints", rank, world, len(my_shards),
             len(todo))
    batch: tuple[list, list, list] = ([], [], [])
    done = 0
    # A worker with no shard (fewer shards than workers) still takes part in the all-reduce.
    samples = classification_samples(
        my_shards, image_shape=plan["image_shape"], num_classes=classes, split_nodes=False,
        select=lambda key: int(key) in wanted, counts=plan["shard_counts"][rank::world],
    ) if my_shards else []
    for key, image, label in samples:
        for part, value in zip(batch, (int(key), image, label)):
            part.append(value)
        if len(batch[0]) == plan["batch_size"]:
            accumulate(*batch)
            done += len(batch[0])
            batch = ([], [], [])
            if done % (20 * plan["batch_size"]) == 0:
                log.info("realgrad rank %d: %d selected samples done", rank, done)
    if batch[0]:
        accumulate(*batch)
    out = {"count_d": counts["d"], "count_p": counts["p"]}
    if weights is not None:
        out.update(weight_d=totals["d"], weight_p=totals["p"])
    for i in todo:
        for part in ("d", "p"):
            out[f"{i}_{part}"] = sums[i][part]
    # Everything on this worker's device: nccl all-reduces CUDA tensors only.
    return {key: value.to(device) for key, value in out.items()}


def finalise(plan: dict, reduced: dict[str, torch.Tensor], todo: list[int]) -> None:
    """Means and dot products from the reduced sums; publish one file per checkpoint.

    Weighted sums are divided by their weight totals (weighted means), unweighted ones by their
    counts."""
    classes, num_p = plan["num_classes"], len(plan["p_batches"])
    p_counts = reduced["count_p"].view(num_p, classes)
    weighted = "weight_d" in reduced
    d_mass = reduced["weight_d"] if weighted else reduced["count_d"]
    p_mass = reduced["weight_p"].view(num_p, classes) if weighted else p_counts
    p_totals = safe_counts(p_mass.sum(1)).unsqueeze(1)
    for i in todo:
        tensors = {"d_class_counts": reduced["count_d"], "p_class_counts": p_counts}
        if weighted:
            tensors.update(d_class_weights=d_mass, p_class_weights=p_mass)
        if plan["class_terms"]:
            g_D_classes, g_D = class_means(reduced[f"{i}_d"], d_mass)
            p_sums = reduced[f"{i}_p"].view(num_p, classes, -1)
            g_P = p_sums.sum(1) / p_totals.to(p_sums.dtype)
            g_P_classes = p_sums / safe_counts(p_mass).unsqueeze(-1).to(p_sums.dtype)
            tensors.update(g_D_classes=g_D_classes, g_P_classes=g_P_classes,
                           real_dots_classes=g_P_classes @ g_D)
        else:
            g_D = reduced[f"{i}_d"][0] / safe_counts(d_mass.sum()).to(reduced[f"{i}_d"].dtype)
            g_P = reduced[f"{i}_p"] / p_totals.to(g_D.dtype)
        tensors.update(g_D=g_D, g_P=g_P, real_dots=g_P @ g_D)
        publish_terms(plan, i, tensors, {"real_count": int(reduced["count_d"].sum()),
                                         "p_counts": p_counts.sum(1).tolist()})


def publish_terms(plan: dict, i: int, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write checkpoint ``i``'s file: its terms (floats stored as ``realgrad.dtype``) and
    metadata naming the checkpoint they were taken at."""
    if plan["dtype"] == "float16":
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    checkpoint = plan["checkpoints"][i]
    storage.save_tensors(
        storage.join(realgrad_url(plan["run"]), term_file(i)), tensors,
        {"checkpoint": checkpoint["url"], "expert": checkpoint["expert"],
         "step": checkpoint["step"], "lr": checkpoint["lr"], **metadata,
         "storage": plan["dtype"], "peak_memory_mb_rank0": peak_memory_mb()},
    )


def _missing(plan: dict) -> list[int]:
    base = realgrad_url(plan["run"])
    return [c["index"] for c in plan["checkpoints"]
            if not storage.exists(storage.join(base, term_file(c["index"])))]


def term_functions(plan: dict):
    """(partial sums, finalise) of the plan's kind of terms: per-sample sums for
    classification, sums over fixed contrastive batches for image-text (pair_realgrad.py)."""
    if plan["kind"] == "pairs":
        from .pair_realgrad import finalise_pairs, pair_partial_sums

        return pair_partial_sums, finalise_pairs
    return partial_sums, finalise


def compute_pass(plan: dict, todo: list[int], rank: int = 0, world: int = 1,
                 reduce=None) -> None:
    """One pass over this rank's shards for the checkpoints ``todo``: its partial sums,
    ``reduce``d in place across ranks (none in one process), published by rank 0."""
    partial, finish = term_functions(plan)
    part = partial(plan, rank, world, todo)
    if reduce is not None:
        for key in sorted(part):  # the same order on every rank
            reduce(part[key])
    if rank == 0:
        finish(plan, {key: value.cpu() for key, value in part.items()}, todo)


def train_loop_per_worker(plan: dict) -> None:
    """Ray Train worker: partial sums, all_reduce, rank 0 publishes."""
    import ray.train
    import torch.distributed as dist

    storage.configure(plan["s3_options"])  # the run's storage settings, not this env's
    context = ray.train.get_context()
    distributed = dist.is_available() and dist.is_initialized()
    compute_pass(plan, plan["todo"], context.get_world_rank(), context.get_world_size(),
                 (lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM)) if distributed else None)
    ray.train.report({"checkpoints_done": len(plan["todo"])})


def _workers(config: RunConfig) -> int:
    """realgrad.workers, capped at the cluster's GPUs when it runs on GPUs (one NCCL rank per
    GPU); the sums do not depend on the number of workers."""
    if not config.ray.use_gpu:
        return config.realgrad.workers
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < config.realgrad.workers:
        log.info("realgrad: %d workers asked, %d GPU(s): using %d", config.realgrad.workers,
                 gpus, max(1, gpus))
    return max(1, min(config.realgrad.workers, gpus))


def check_checkpoints(plan: dict, todo: list[int]) -> None:
    """Read the header of every checkpoint the workers will load, here and now: Ray Train
    restarts its workers after any error (up to ``ray.train_failures`` times), so a bad file
    found there would cost every restart before the user hears of it."""
    for i in todo:
        storage.load_metadata(plan["checkpoints"][i]["url"])


def _train_run_config(config: RunConfig, storage_path: str, name: str = "realgrad"):
    """Ray Train's run settings: its own files under ``storage_path``, restarts after a
    failure, and its own console logs quiet unless we log at debug level (a worker's error is
    re-raised here; with ``-v`` Ray Train's copy of its traceback, twice over, comes too)."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as TrainRunConfig

    options = {}
    try:
        from ray.train import LoggingConfig  # Train V2 (Ray's default since 2.5x)

        options["logging_config"] = LoggingConfig(
            log_level="INFO" if log.isEnabledFor(logging.DEBUG) else "CRITICAL")
    except ImportError:
        pass
    return TrainRunConfig(name=name, storage_path=storage_path,
                          failure_config=FailureConfig(max_failures=config.ray.train_failures),
                          **options)


def _pass_on_ray(config: RunConfig, plan: dict, todo: list[int]) -> None:
    """One pass over the shards by Ray Train workers for the checkpoints ``todo``.

    Ray Train keeps its own state under a storage path; the pass reports no checkpoint to it
    (the terms are published to RUN), so that is a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ead-realgrad-") as train_dir:
        run_worker_pass(config, train_loop_per_worker, dict(plan, todo=todo), train_dir)


def run_worker_pass(config: RunConfig, loop, loop_config: dict, storage_path: str,
                    name: str = "realgrad") -> None:
    """``loop(loop_config)`` on the run's Ray Train workers (gloo on CPU, nccl on GPU), with
    restarts after a failure; Ray Train's own files go under ``storage_path``."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=_workers(config),
                                     use_gpu=bool(config.ray.use_gpu),
                                     resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo",
                                 timeout_s=600),
        run_config=_train_run_config(config, storage_path, name),
    )
    trainer.fit()


def describe_plan(plan: dict) -> dict:
    """What index.json records about a classification plan's samples."""
    return {"real_samples": len(plan["d_sample"]), "p_batches": len(plan["p_batches"]),
            "p_batch_size": len(plan["p_batches"][0]) if plan["p_batches"] else 0,
            "class_terms": plan["class_terms"]}


def run_realgrad(config: RunConfig, use_ray: bool = True) -> dict:
    """Compute the real terms of every selected checkpoint not yet on storage."""
    guard(config, "realgrad")
    index_url = storage.join(realgrad_url(config.run), "index.json")
    if storage.exists(index_url):
        return storage.read_json(index_url)
    started = time.perf_counter()
    if is_image_text(config):
        from .pair_realgrad import build_pair_plan, describe_pair_plan

        plan = build_pair_plan(config, use_ray)
        described = describe_pair_plan(plan)
    else:
        ensure_weights(config, use_ray)  # before the workers read them
        plan = build_plan(config)
        described = dict(describe_plan(plan), weights=config.weights.method)
    todo = _missing(plan)
    log.info("realgrad: %d of %d checkpoints to compute (%s), %d worker(s)", len(todo),
             len(plan["checkpoints"]), described, config.realgrad.workers)
    check_checkpoints(plan, todo)
    chunk = config.realgrad.chunk or max(1, len(todo))
    passes = [todo[start:start + chunk] for start in range(0, len(todo), chunk)]
    progress = progress_bar("realgrad", total=len(passes), unit="pass")
    for part in passes:  # each pass publishes its checkpoints' files before the next starts
        if use_ray:
            _pass_on_ray(config, plan, part)
        else:
            compute_pass(plan, part)
        progress.update(1)
    progress.close()
    first = storage.join(realgrad_url(config.run), term_file(plan["checkpoints"][0]["index"]))
    result = {
        "peak_memory_mb_rank0": storage.load_metadata(first).get("peak_memory_mb_rank0"),
        "checkpoints": [{"file": term_file(c["index"]), "expert": c["expert"], "step": c["step"],
                         "lr": c["lr"], "checkpoint": c["url"]} for c in plan["checkpoints"]],
        **described, "dtype": plan["dtype"],
        "chunk": config.realgrad.chunk, "passes": len(passes), "workers": config.realgrad.workers,
        "seconds": time.perf_counter() - started,
    }
    storage.publish_json(index_url, result)
    return result

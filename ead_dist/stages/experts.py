"""Experts stage: N Ray actors each train one expert on D and record its trajectory.

Layout under RUN/experts/: ``expert-007/step-000120.safetensors`` (theta_t; eta_t and the step
in the metadata), ``expert-007/trajectory.json`` (written when that expert is done) and
``index.json`` (all experts, written last), and ``fingerprint.json`` (the settings, written
first). Rerunning skips finished experts and resumes an interrupted one from its last recorded
checkpoint; under other settings it stops (``ead_dist.fingerprint``).
"""

from __future__ import annotations

import logging
import time

import torch

from .. import storage
from ..augment import dsa_strategy
from ..config import IMAGE_TEXT_DATASETS, RunConfig
from ..data.arrays import load_split
from ..data.meta import read_meta
from ..fingerprint import guard
from ..models import build_model
from ..measure import peak_memory_mb
from ..metrics import MetricsLog
from ..progress import progress_bar
from ..runtime import actor_retry_options, compute_device, concurrent_runs, gpu_share
from ..supervised import accuracy
from ..trajectory import Checkpoint, sgd_trajectory, steps_per_epoch

log = logging.getLogger(__name__)


def experts_url(run_url: str) -> str:
    return storage.join(run_url, "experts")


def final_expert(config: RunConfig, meta) -> torch.nn.Module:
    """Expert 0 at its last recorded checkpoint, in eval mode (herding's and the weights'
    embedding)."""
    index = storage.read_json(storage.join(experts_url(config.run), "index.json"))
    final = index["experts"][0]["checkpoints"][-1]
    theta, _ = storage.load_tensors(storage.join(experts_url(config.run), final["file"]))
    model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(config.model.name))
    model.load_state_dict(theta, strict=False)
    return model.eval()


def expert_dir(run_url: str, expert: int) -> str:
    return storage.join(experts_url(run_url), f"expert-{expert:03d}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def _last_checkpoint(directory: str) -> Checkpoint | None:
    files = storage.list_files(directory, "step-*.safetensors")
    if not files:
        return None
    tensors, metadata = storage.load_tensors(files[-1])
    return Checkpoint(step=metadata["step"], params=tensors, lr=metadata["lr"])


def expert_seed(config: RunConfig, expert: int) -> int:
    return config.experts.seed * 1000 + expert


def train_subset(config: RunConfig, expert: int, size: int) -> torch.Tensor | None:
    """The expert's seeded subset of ``size`` training samples, or None to use them all."""
    wanted = config.experts.train_samples
    if not wanted or wanted >= size:
        return None
    generator = torch.Generator().manual_seed(expert_seed(config, expert))
    return torch.randperm(size, generator=generator)[:wanted]


def resume_point(directory: str, expert: int) -> tuple[Checkpoint | None, MetricsLog]:
    """The expert's last recorded checkpoint (None: start afresh) and its metrics log, with
    the lines past that checkpoint dropped (they are redone)."""
    start = _last_checkpoint(directory)
    metrics = MetricsLog(directory)
    if start is not None:
        log.info("expert %d: resuming at step %d", expert, start.step)
        metrics.truncate("step", start.step + 1)  # its own line is kept; later ones redone
    return start, metrics


def record_checkpoint(directory: str, metrics: MetricsLog, checkpoint: Checkpoint,
                      expert: int, model_name: str, **measured) -> None:
    """One metrics line, then the checkpoint (a resume from it keeps its line)."""
    metrics.log(step=checkpoint.step, **measured)
    metrics.publish()
    storage.save_tensors(
        storage.join(directory, checkpoint_name(checkpoint.step)), checkpoint.params,
        {"step": checkpoint.step, "lr": checkpoint.lr, "expert": expert, "model": model_name},
    )


def finish_expert(config: RunConfig, expert: int, train_samples: int, started: float,
                  test: dict) -> dict:
    """Publish the expert's ``trajectory.json``: its checkpoints, ``test`` (its held-out
    figure) and its cost. Returns the record."""
    directory = expert_dir(config.run, expert)
    steps = sorted(int(u.rsplit("step-", 1)[1].split(".")[0])
                   for u in storage.list_files(directory, "step-*.safetensors"))
    record = {
        "expert": expert,
        "checkpoints": [{"step": s, "file": f"expert-{expert:03d}/{checkpoint_name(s)}",
                         "lr": config.experts.lr} for s in steps],
        "train_samples": train_samples, **test,
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
    }
    storage.publish_json(storage.join(directory, "trajectory.json"), record)
    log.info("expert %d: %d checkpoints, %s", expert, len(steps), test)
    return record


# Train loss and accuracy at each checkpoint are measured on this many fixed train samples.
METRIC_SAMPLES = 512


@torch.no_grad()
def _fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode, then back) on (images, labels)."""
    training = model.training
    model.eval()
    logits = model(images)
    model.train(training)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return float(loss), float((logits.argmax(1) == labels).float().mean())


def train_one_expert(config: RunConfig, expert: int, images=None, labels=None) -> dict:
    """Train (or finish) expert ``expert``; returns its trajectory record."""
    directory = expert_dir(config.run, expert)
    done_url = storage.join(directory, "trajectory.json")
    if storage.exists(done_url):
        return storage.read_json(done_url)
    started = time.perf_counter()
    meta = read_meta(config.data.url)
    if images is None:
        images, labels, _ = load_split(config.data.url, "train", meta=meta)
    seed = expert_seed(config, expert)
    subset = train_subset(config, expert, len(labels))
    if subset is not None:
        images, labels = images[subset], labels[subset]
    torch.manual_seed(seed)
    model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(config.model.name))
    device = compute_device(config.ray.use_gpu)
    model.to(device)
    images, labels = images.to(device), labels.to(device)
    augmentation = dsa_strategy(meta.name) if config.experts.augmentation == "dsa" else None
    start, metrics = resume_point(directory, expert)
    per_epoch = steps_per_epoch(len(labels), config.experts.batch_size)
    for checkpoint in sgd_trajectory(
        model, images, labels, epochs=config.experts.epochs, lr=config.experts.lr,
        batch_size=config.experts.batch_size, save_every=config.experts.save_every, seed=seed,
        augmentation=augmentation, start=start,
    ):
        loss, train_accuracy = _fit(model, images[:METRIC_SAMPLES], labels[:METRIC_SAMPLES])
        record_checkpoint(directory, metrics, checkpoint, expert, config.model.name,
                          epoch=round(checkpoint.step / per_epoch, 3), loss=loss,
                          train_accuracy=train_accuracy,
                          seconds=round(time.perf_counter() - started, 2))
    test_images, test_labels, _ = load_split(config.data.url, "test", meta=meta)
    return finish_expert(config, expert, len(labels), started,
                         {"test_accuracy": accuracy(model, test_images, test_labels)})


class ExpertWorker:
    """A Ray actor that loads D once, at its first call, and trains the experts it is handed.

    D is loaded in a call, not in ``__init__``: an error there (a bad shard) then reaches the
    driver as itself, where one in ``__init__`` would arrive as a bare ``ActorDiedError``.
    """

    def __init__(self, config: RunConfig):
        storage.apply_settings(config.storage)
        torch.set_num_threads(1)
        self.config = config
        self.images = self.labels = None

    def train(self, expert: int) -> dict:
        if is_image_text(self.config):
            from .pair_experts import load_train_pairs, train_one_pair_expert

            self.images = self.images or load_train_pairs(self.config)
            return train_one_pair_expert(self.config, expert, self.images)
        if self.images is None:
            self.images, self.labels, _ = load_split(self.config.data.url, "train")
        return train_one_expert(self.config, expert, self.images, self.labels)


def is_image_text(config: RunConfig) -> bool:
    return config.data.dataset in IMAGE_TEXT_DATASETS


def run_experts(config: RunConfig, use_ray: bool = True) -> dict:
    """Train every expert not yet done, then publish ``RUN/experts/index.json``."""
    guard(config, "experts")
    index_url = storage.join(experts_url(config.run), "index.json")
    if storage.exists(index_url):
        return storage.read_json(index_url)
    todo = list(range(config.experts.count))
    progress = progress_bar("experts", total=len(todo), unit="expert")
    records = []
    if use_ray:
        import ray
        from ray.util import ActorPool

        resources = ray.available_resources()
        count = concurrent_runs(len(todo), int(resources.get("CPU", 1)),
                                resources.get("GPU", 0), config.ray.use_gpu,
                                config.ray.runs_per_gpu)
        actor = ray.remote(num_cpus=1, num_gpus=gpu_share(config.ray.use_gpu,
                                                          config.ray.runs_per_gpu),
                           **actor_retry_options(config.ray))(ExpertWorker)
        pool = ActorPool([actor.remote(config) for _ in range(count)])
        for record in pool.map_unordered(lambda a, e: a.train.remote(e), todo):
            records.append(record)
            progress.update(1)
    elif is_image_text(config):
        from .pair_experts import load_train_pairs, train_one_pair_expert

        pairs = load_train_pairs(config)
        for expert in todo:
            records.append(train_one_pair_expert(config, expert, pairs))
            progress.update(1)
    else:
        images, labels, _ = load_split(config.data.url, "train")
        for expert in todo:
            records.append(train_one_expert(config, expert, images, labels))
            progress.update(1)
    progress.close()
    records.sort(key=lambda r: r["expert"])
    model = config.image_text.model if is_image_text(config) else config.model.name
    index = {"experts": records, "model": model, "epochs": config.experts.epochs,
             "lr": config.experts.lr, "batch_size": config.experts.batch_size,
             "save_every": config.experts.save_every}
    storage.publish_json(index_url, index)
    return index

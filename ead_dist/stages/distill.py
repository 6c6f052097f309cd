"""Distill stage: the coordinator learns S against the precomputed real terms.

It never holds D: the initial S is IPC real images per class, drawn in one streaming pass over
the train shards that keeps only the chosen ones. Per iteration it samples t_m checkpoints
(and one P batch of each from the bank), computes the synthetic gradients g_S at theta_t with
a double-backward graph, and steps Adam on the images and the label logits. Its cost per
iteration depends on |S| and the model, not on |D|. State is saved every ``save_every``
iterations to ``RUN/distill/state-NNNNNN.safetensors`` (images, label logits, Adam moments)
and a rerun resumes from the newest one; the randomness of iteration i is a function of
(seed, i), so a resumed run ends where an uninterrupted one does.
``RUN/synthetic.safetensors`` is the result; ``RUN/distill/fingerprint.json`` records the
settings it belongs to (``ead_dist.fingerprint``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import storage
from ..alignment import (
    class_matching_loss,
    ead_loss,
    matching_loss,
    per_class_effect_loss,
)
from ..augment import augment, dsa_strategy
from ..config import RunConfig
from ..data.arrays import class_balanced_sample
from ..data.meta import read_meta
from ..effect import cross_entropy, loss_gradient
from ..fingerprint import guard
from ..models import build_model
from ..measure import peak_memory_mb
from ..runtime import compute_device
from ..synthetic import SyntheticSet, initial_set, save_synthetic
from .experts import experts_url
from .realgrad import realgrad_url

log = logging.getLogger(__name__)


class DivergedError(FloatingPointError):
    """The distillation loss or its gradient stopped being finite."""


@dataclass
class RealTerms:
    """What the coordinator knows about D at one checkpoint."""

    theta: dict[str, torch.Tensor]
    lr: float
    g_D: torch.Tensor  # [n]
    g_P: torch.Tensor  # [K, n]
    real_dots: torch.Tensor  # [K]
    g_D_classes: Optional[torch.Tensor] = None  # [C, n]
    g_P_classes: Optional[torch.Tensor] = None  # [K, C, n]
    real_dots_classes: Optional[torch.Tensor] = None  # [K, C]


def load_real_terms(run_url: str, device: torch.device | str = "cpu"
                    ) -> tuple[list[RealTerms], dict]:
    index = storage.read_json(storage.join(realgrad_url(run_url), "index.json"))
    terms = []
    for entry in index["checkpoints"]:
        tensors, _ = storage.load_tensors(storage.join(realgrad_url(run_url), entry["file"]))
        tensors = {k: v.to(device) for k, v in tensors.items()}
        theta = {k: v.to(device) for k, v in storage.load_tensors(entry["checkpoint"])[0].items()}
        terms.append(RealTerms(theta=theta, lr=entry["lr"], g_D=tensors["g_D"],
                               g_P=tensors["g_P"], real_dots=tensors["real_dots"],
                               g_D_classes=tensors.get("g_D_classes"),
                               g_P_classes=tensors.get("g_P_classes"),
                               real_dots_classes=tensors.get("real_dots_classes")))
    return terms, index


class Coordinator:
    """One EAD optimisation over S; ``step(i)`` runs iteration i."""

    def __init__(self, model: nn.Module, terms: list[RealTerms], synthetic: SyntheticSet, *,
                 objective: str, coefficient: str, real_size: int, lr_images: float,
                 lr_labels: float, learn_labels: bool, checkpoints_per_iteration: int,
                 augmentation: Optional[str], seed: int):
        needs_classes = objective in ("class_matching", "per_class_effect")
        if needs_classes and terms[0].g_D_classes is None:
            raise ValueError(f"objective {objective!r} needs per-class real terms: rerun realgrad "
                             "with realgrad.class_terms: true")
        self.model, self.terms = model, terms
        self.objective, self.coefficient, self.real_size = objective, coefficient, real_size
        self.checkpoints_per_iteration = checkpoints_per_iteration
        self.augmentation, self.seed = augmentation, seed
        device = terms[0].g_D.device
        self.images = synthetic.images.to(device).clone().requires_grad_(True)
        self.label_logits = synthetic.label_logits.to(device).clone().requires_grad_(learn_labels)
        self.classes = synthetic.classes.to(device)
        groups = [{"params": [self.images], "lr": lr_images}]
        if learn_labels:
            groups.append({"params": [self.label_logits], "lr": lr_labels})
        self.optimizer = torch.optim.Adam(groups)
        self.class_members = [torch.nonzero(self.classes == c).flatten()
                              for c in range(synthetic.label_logits.shape[1])]

    @property
    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(),
                            self.label_logits.detach().cpu().clone(), self.classes.cpu())

    def loss(self, iteration: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        picks = torch.randint(len(self.terms), (self.checkpoints_per_iteration,),
                              generator=generator).tolist()
        x = self.images
        if self.augmentation:
            x = augment(x, self.augmentation, generator)
        y = torch.softmax(self.label_logits, dim=1)
        scalar_parts: tuple[list, list, list, list] = ([], [], [], [])
        total = torch.zeros(())
        for t in picks:
            term = self.terms[t]
            k = int(torch.randint(len(term.g_P), (1,), generator=generator))
            if self.objective == "class_matching":
                g_S_classes = torch.stack([
                    loss_gradient(self.model, term.theta, cross_entropy, x[m], y[m],
                                  create_graph=True) for m in self.class_members])
                total = total + term.lr * class_matching_loss(g_S_classes, term.g_D_classes)
                continue
            g_S = loss_gradient(self.model, term.theta, cross_entropy, x, y, create_graph=True)
            if self.objective == "scalar":
                for part, value in zip(scalar_parts, (g_S, term.g_P[k], term.real_dots[k],
                                                      term.lr)):
                    part.append(value)
            elif self.objective == "per_class_effect":
                total = total + term.lr * per_class_effect_loss(
                    g_S, term.g_P_classes[k], term.real_dots_classes[k])
            elif self.objective == "matching":
                total = total + term.lr * matching_loss(g_S, term.g_D)
            else:
                raise ValueError(f"unknown objective {self.objective!r}")
        if self.objective == "scalar":
            total = ead_loss(*scalar_parts, coefficient=self.coefficient,
                             real_size=self.real_size, synthetic_size=len(self.classes))
        return total

    def step(self, iteration: int) -> float:
        loss = self.loss(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        if not torch.isfinite(loss) or any(g is not None and not torch.isfinite(g).all()
                                           for g in grads):
            raise DivergedError(f"iteration {iteration}: the {self.objective} loss or its gradient "
                                f"is not finite (loss {loss.item()}); lower distill.lr_images")
        self.optimizer.step()
        return float(loss.detach())

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"images": self.images.detach(), "label_logits": self.label_logits.detach(),
                   "classes": self.classes}
        for i, group in enumerate(self.optimizer.param_groups):
            for name, value in self.optimizer.state.get(group["params"][0], {}).items():
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(value)
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(tensors["images"])
            self.label_logits.copy_(tensors["label_logits"])
        for i, group in enumerate(self.optimizer.param_groups):
            prefix = f"adam.{i}."
            # Adam keeps its moments on the parameters' device and its step count on the CPU.
            state = {k[len(prefix):]: v.to(self.images.device).clone()
                     if k[len(prefix):] in ("exp_avg", "exp_avg_sq") else v.clone()
                     for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                self.optimizer.state[group["params"][0]] = state


def state_url(run_url: str, iteration: int) -> str:
    return storage.join(run_url, "distill", f"state-{iteration:06d}.safetensors")


def _teacher(config: RunConfig, meta) -> nn.Module:
    """The final checkpoint of expert 0: it gives the initial soft labels."""
    index = storage.read_json(storage.join(experts_url(config.run), "index.json"))
    final = index["experts"][0]["checkpoints"][-1]
    theta, _ = storage.load_tensors(storage.join(experts_url(config.run), final["file"]))
    model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(config.model.name))
    model.load_state_dict(theta, strict=False)
    return model.eval()


def initialise(config: RunConfig) -> SyntheticSet:
    """The initial S, published once as ``RUN/distill/init.safetensors`` (the 'init' baseline)."""
    url = storage.join(config.run, "distill", "init.safetensors")
    meta = read_meta(config.data.url)
    if storage.exists(url):
        tensors, _ = storage.load_tensors(url)
        return SyntheticSet(tensors["images"], tensors["label_logits"], tensors["classes"])
    images, labels = class_balanced_sample(config.data.url, "train", config.distill.ipc,
                                           config.distill.seed, meta=meta)
    synthetic = initial_set(images, labels, config.distill.ipc, meta.num_classes,
                            _teacher(config, meta), config.distill.label_temperature,
                            config.distill.seed)
    storage.save_tensors(url, {"images": synthetic.images, "label_logits": synthetic.label_logits,
                               "labels": synthetic.labels, "classes": synthetic.classes},
                         synthetic_metadata(config, meta, method="init"))
    return synthetic


def synthetic_metadata(config: RunConfig, meta, method: str) -> dict:
    return {"dataset": meta.name, "method": method, "ipc": config.distill.ipc,
            "num_classes": meta.num_classes, "mean": meta.mean, "std": meta.std,
            "config": config.to_json()}


def distill(config: RunConfig) -> dict:
    """Run (or resume, or skip when done) the coordinator; publishes RUN/synthetic.safetensors."""
    storage.apply_settings(config.storage)  # a Ray task: the driver's settings do not reach it
    guard(config, "distill")
    out_url = storage.join(config.run, "synthetic.safetensors")
    summary_url = storage.join(config.run, "distill", "summary.json")
    if storage.exists(out_url):
        done = storage.read_json(summary_url) if storage.exists(summary_url) else {}
        return dict(done, synthetic=out_url, skipped=True)
    torch.set_num_threads(config.distill.threads or len(os.sched_getaffinity(0)))
    meta = read_meta(config.data.url)
    synthetic = initialise(config)
    device = compute_device(config.ray.use_gpu)
    terms, index = load_real_terms(config.run, device)
    model = build_model(config.model.name, meta.image_shape[0], meta.num_classes,
                        tuple(meta.image_shape[1:]), **config.model.options_for(config.model.name))
    model.to(device)
    settings = config.distill
    coordinator = Coordinator(
        model, terms, synthetic, objective=settings.objective, coefficient=settings.coefficient,
        real_size=meta.splits["train"].size, lr_images=settings.lr_images,
        lr_labels=settings.lr_labels, learn_labels=settings.learn_labels,
        checkpoints_per_iteration=settings.checkpoints_per_iteration,
        augmentation=dsa_strategy(meta.name) if settings.augmentation == "dsa" else None,
        seed=settings.seed,
    )
    start, losses = 0, []
    saved = storage.list_files(storage.join(config.run, "distill"), "state-*.safetensors")
    if saved:
        tensors, state_meta = storage.load_tensors(saved[-1])
        coordinator.load_state(tensors)
        start, losses = state_meta["iteration"], state_meta["losses"]
        log.info("distill: resuming at iteration %d from %s", start, saved[-1])
    started = time.perf_counter()
    progress = tqdm(range(start, settings.iterations), desc=f"distill ({settings.objective})",
                    unit="it", initial=start, total=settings.iterations)

    def save(iteration: int) -> None:
        storage.save_tensors(state_url(config.run, iteration), coordinator.state(),
                             {"iteration": iteration, "losses": losses})

    for iteration in progress:
        try:
            losses.append(coordinator.step(iteration))
        except DivergedError:
            save(iteration)  # the state before this step is the last good one
            raise
        progress.set_postfix(loss=f"{losses[-1]:.3e}")
        if (iteration + 1) % settings.save_every == 0 or iteration + 1 == settings.iterations:
            save(iteration + 1)
    seconds = time.perf_counter() - started
    final = coordinator.synthetic
    done = max(settings.iterations - start, 1)
    summary = {
        "synthetic": out_url, "iterations": settings.iterations, "seconds": seconds,
        "seconds_per_iteration": seconds / done, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # How far S moved from its initialisation: relative L2 change of the images, and the
        # mean total-variation distance between initial and final soft labels.
        "image_change": float((final.images - synthetic.images).norm() / synthetic.images.norm()),
        "label_change": float((final.labels - synthetic.labels).abs().sum(1).mean() / 2),
        "checkpoints": len(terms), "real_samples": index["real_samples"],
        "peak_memory_mb": peak_memory_mb(),
    }
    storage.publish_json(summary_url, summary)  # before the result, whose presence means done
    save_synthetic(out_url, final,
                   synthetic_metadata(config, meta, method=f"ead-{settings.objective}"))
    return summary

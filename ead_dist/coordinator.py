"""The coordinator's optimisation of S: one iteration of any objective, its state, no I/O.

One-step objectives (``alignment.py``) compare g_S at a sampled checkpoint with precomputed
real terms. The ``trajectory`` objective (``unroll.py``) trains a student on S for N steps from
a sampled expert checkpoint theta_t and compares where it lands with the expert's theta_{t+M};
it learns the student's step size beside the images and labels. Either way the real data
enter only through stored tensors, and the randomness of iteration i is a function of
(seed, i), so a resumed run ends where an uninterrupted one does. The distill stage does the
loading, saving and progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn

from .alignment import ead_loss, gradient_distance, per_class_effect_loss
from .augment import augment
from .effect import cross_entropy, loss_gradient, parameter_order
from .formation import decode
from .similarity import LearnedSimilarity
from .synthetic import SyntheticSet
from .unroll import (
    StepLoss,
    classification_loss,
    step_loss_gradient,
    student_batches,
    student_end,
    trajectory_distance,
    trajectory_loss_and_grads,
    unrolled_sgd,
)


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


@dataclass
class Segment:
    """A stretch of one expert's trajectory: the student starts at theta_start and should reach
    theta_target, where the expert got to after its own steps on D."""

    theta_start: dict[str, torch.Tensor]
    theta_target: dict[str, torch.Tensor]


@dataclass
class StudentSettings:
    """The trajectory objective's student: N steps of SGD on S at a learned step size."""

    steps: int = 10
    batch_size: Optional[int] = None  # None: all of S at every step
    initial_lr: float = 0.01  # the student's step size before it is learned
    lr_lr: float = 1e-4  # Adam's step on the student's step size
    recompute: bool = False  # memory constant in steps (rebuild each step on the way back)


class Coordinator:
    """One optimisation over S; ``step(i)`` runs iteration i."""

    def __init__(self, model: nn.Module, synthetic: SyntheticSet, *, objective: str,
                 terms: Optional[list[RealTerms]] = None,
                 segments: Optional[list[Segment]] = None,
                 student: Optional[StudentSettings] = None,
                 coefficient: str = "derived", real_size: int = 1, lr_images: float = 0.01,
                 lr_labels: float = 0.01, learn_labels: bool = True,
                 checkpoints_per_iteration: int = 1, augmentation: Optional[str] = None,
                 distance: str = "l2", skip_head_and_biases: bool = False,
                 normalise: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 step_loss: StepLoss = classification_loss, soft_labels: bool = True,
                 similarity: Optional[LearnedSimilarity] = None, lr_similarity: float = 0.01):
        if objective == "trajectory":
            if not segments:
                raise ValueError("objective 'trajectory' needs expert segments (theta_t, "
                                 "theta_t+M): the experts' trajectories are too short for the "
                                 "configured span (distill.expert_span) and start range "
                                 "(distill.min_start)")
            student = student or StudentSettings()
        elif not terms:
            raise ValueError(f"objective {objective!r} needs real terms: run realgrad first")
        elif objective in ("class_matching", "per_class_effect") and terms[0].g_D_classes is None:
            raise ValueError(f"objective {objective!r} needs per-class real terms: rerun realgrad "
                             "with realgrad.class_terms: true")
        if similarity is not None and student is not None and student.batch_size is not None \
                and student.batch_size < len(synthetic.classes):
            raise ValueError("a learned similarity matrix needs students that train on all of "
                             f"S at every step: distill.student_batch_size {student.batch_size} "
                             f"is below the {len(synthetic.classes)} pairs")
        self.model, self.terms, self.segments, self.student = model, terms, segments, student
        self.objective, self.coefficient, self.real_size = objective, coefficient, real_size
        self.checkpoints_per_iteration = checkpoints_per_iteration
        self.augmentation, self.seed = augmentation, seed
        self.distance, self.skip_head_and_biases = distance, skip_head_and_biases
        self.normalise = normalise
        # Image-text: the learnable "labels" are the captions' token embeddings, used as they
        # are (soft_labels False) by a contrastive student loss.
        self.step_loss, self.soft_labels = step_loss, soft_labels
        if terms:
            theta = terms[0].theta
            self.layout = [(k, tuple(theta[k].shape)) for k in parameter_order(model, theta)]
        # The stored images are what is learned; with multi-formation every objective sees the
        # training images they decode to (ead_dist/formation.py) and fits the stored pixels
        # through the decoding.
        self.formation = synthetic.formation
        self.images = synthetic.images.to(device).clone().requires_grad_(True)
        self.label_logits = synthetic.label_logits.to(device).clone().requires_grad_(learn_labels)
        self.classes = synthetic.classes.to(device)
        groups = [{"params": [self.images], "lr": lr_images}]
        if learn_labels:
            groups.append({"params": [self.label_logits], "lr": lr_labels})
        self.student_lr = torch.tensor(student.initial_lr if student else 0.0, device=device,
                                       requires_grad=student is not None)
        if student is not None:
            groups.append({"params": [self.student_lr], "lr": student.lr_lr})
        # Image-text with LoRS's learned similarity (ead_dist/similarity.py): the [N, N]
        # targets of S's contrastive loss, learned beside the pairs, whole or low-rank; the
        # step loss reads them whole (every step trains on all of S).
        self.similarity = similarity
        if similarity is not None:
            # one group per tensor: state() saves Adam's moments per group's one parameter
            groups.extend({"params": [p], "lr": lr_similarity} for p in similarity.parameters())
        self.optimizer = torch.optim.Adam(groups)
        self.class_members = [torch.nonzero(self.classes == c).flatten()
                              for c in range(synthetic.label_logits.shape[1])] \
            if soft_labels else []

    @property
    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(),
                            self.label_logits.detach().cpu().clone(), self.classes.cpu())

    def _training_images(self) -> torch.Tensor:
        """What a network trains on: the stored images, decoded (differentiably)."""
        return decode(self.images, self.formation)

    def _generator(self, iteration: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)

    def loss(self, iteration: int) -> torch.Tensor:
        """The one-step objectives' loss at iteration ``iteration`` (a differentiable graph)."""
        generator = self._generator(iteration)
        picks = torch.randint(len(self.terms), (self.checkpoints_per_iteration,),
                              generator=generator).tolist()
        x = self._training_images()
        if self.augmentation:
            x = augment(x, self.augmentation, generator)
        y = torch.softmax(self.label_logits, dim=1) if self.soft_labels else self.label_logits
        scalar_parts: tuple[list, list, list, list] = ([], [], [], [])
        total = torch.zeros(())
        for t in picks:
            term = self.terms[t]
            k = int(torch.randint(len(term.g_P), (1,), generator=generator))
            if self.objective == "class_matching":
                g_S_classes = torch.stack([
                    loss_gradient(self.model, term.theta, cross_entropy, x[m], y[m],
                                  create_graph=True) for m in self.class_members])
                total = total + term.lr * self._distance(g_S_classes, term.g_D_classes)
                continue
            g_S = self._synthetic_gradient(term.theta, x, y)
            if self.objective == "scalar":
                for part, value in zip(scalar_parts, (g_S, term.g_P[k], term.real_dots[k],
                                                      term.lr)):
                    part.append(value)
            elif self.objective == "per_class_effect":
                total = total + term.lr * per_class_effect_loss(
                    g_S, term.g_P_classes[k], term.real_dots_classes[k])
            elif self.objective == "matching":
                total = total + term.lr * self._distance(g_S, term.g_D)
            else:
                raise ValueError(f"unknown objective {self.objective!r}")
        if self.objective == "scalar":
            total = ead_loss(*scalar_parts, coefficient=self.coefficient,
                             real_size=self.real_size, synthetic_size=len(self.classes))
        return total

    def _synthetic_gradient(self, theta: dict[str, torch.Tensor], x: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
        """g_S at theta, differentiable in S: of the cross-entropy on soft labels, or of the
        given step loss (image-text: the contrastive loss of the pairs, captions as y)."""
        if self.soft_labels:
            return loss_gradient(self.model, theta, cross_entropy, x, y, create_graph=True)
        return step_loss_gradient(self.model, theta, x, y, self._loss_of_step())

    def _loss_of_step(self, targets: Optional[torch.Tensor] = None) -> StepLoss:
        """The student's step loss; with a learned similarity, against ``targets`` (default:
        the similarity's current targets, differentiable in its parameters)."""
        if self.similarity is None:
            return self.step_loss
        return partial(self.step_loss, similarity=self.similarity.targets()
                       if targets is None else targets)

    def _distance(self, g_S: torch.Tensor, g_D: torch.Tensor) -> torch.Tensor:
        """The configured distance; with ``normalise``, relative to the real gradient's own size
        (so checkpoints with large gradients do not dominate)."""
        value = gradient_distance(g_S, g_D, self.layout, self.distance,
                                  self.skip_head_and_biases)
        if self.normalise and self.distance != "layer_cosine":
            value = value / gradient_distance(torch.zeros_like(g_D), g_D, self.layout,
                                              self.distance, self.skip_head_and_biases)
        return value

    def _student_augment(self, iteration: int):
        """Per student step, a DSA draw that is a function of (seed, iteration, step), so the
        memory-constant backward rebuilds each step with the same draw."""
        if not self.augmentation:
            return None
        base = (self.seed * 1_000_003 + iteration) * 1_009

        def draw(x: torch.Tensor, step: int) -> torch.Tensor:
            return augment(x, self.augmentation, torch.Generator().manual_seed(base + step))
        return draw

    def _trajectory_draws(self, iteration: int):
        """Iteration ``iteration``'s segment, student batches and augmentation draw."""
        generator = self._generator(iteration)
        segment = self.segments[int(torch.randint(len(self.segments), (1,),
                                                  generator=generator))]
        batches = [b.to(self.images.device) for b in student_batches(
            len(self.classes), self.student.steps, self.student.batch_size, generator)]
        return segment, batches, self._student_augment(iteration)

    def _trajectory_backward(self, iteration: int) -> torch.Tensor:
        """The trajectory loss of iteration ``iteration``; leaves its gradients in ``.grad``."""
        segment, batches, draw = self._trajectory_draws(iteration)
        y = torch.softmax(self.label_logits, dim=1) if self.soft_labels else self.label_logits
        if not self.student.recompute:
            theta_end = unrolled_sgd(self.model, segment.theta_start, self._training_images(),
                                     y, self.student_lr, batches, draw, self._loss_of_step())
            loss = trajectory_distance(theta_end, segment.theta_start, segment.theta_target)
            loss.backward()
            return loss.detach()
        targets = y.detach().requires_grad_(self.label_logits.requires_grad)
        training = self._training_images()
        # The similarity's targets are composed once per iteration and closed over by the
        # step loss; their gradient is then pulled back to the similarity's parameters.
        pair_targets = self.similarity.targets() if self.similarity is not None else None
        closed_over = [pair_targets.detach().requires_grad_(True)] \
            if pair_targets is not None else []
        loss, (g_images, g_targets, g_lr, *g_closed) = trajectory_loss_and_grads(
            self.model, segment.theta_start, segment.theta_target,
            training.detach().requires_grad_(True), targets, self.student_lr, batches, draw,
            self._loss_of_step(*closed_over), closed_over)
        training.backward(g_images)  # through the decoding (if any) to the stored pixels
        self.student_lr.grad = g_lr
        if pair_targets is not None:
            pair_targets.backward(g_closed[0])
        if g_targets is not None:
            y.backward(g_targets)
        return loss

    def objective_value(self, iterations: range, terms: Optional[list[RealTerms]] = None,
                        segments: Optional[list[Segment]] = None) -> float:
        """The mean objective of S as it is over the draws of ``iterations``, at ``terms`` or
        ``segments`` in place of those it fits (say, of held-out experts); S is not updated."""
        fitted = self.terms, self.segments
        self.terms = terms if terms is not None else self.terms
        self.segments = segments if segments is not None else self.segments
        try:
            values = [self._trajectory_value(i) if self.objective == "trajectory"
                      else float(self.loss(i).detach()) for i in iterations]
        finally:
            self.terms, self.segments = fitted
        return sum(values) / len(values)

    def _trajectory_value(self, iteration: int) -> float:
        """The trajectory loss of iteration ``iteration``'s draws, without any graph."""
        segment, batches, draw = self._trajectory_draws(iteration)
        y = torch.softmax(self.label_logits, dim=1) if self.soft_labels else self.label_logits
        end = student_end(self.model, segment.theta_start, self._training_images().detach(),
                          y.detach(), self.student_lr.detach(), batches, draw,
                          self._loss_of_step(self.similarity.targets().detach()
                                             if self.similarity is not None else None))
        return float(trajectory_distance(end, segment.theta_start, segment.theta_target))

    def step(self, iteration: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.objective == "trajectory":
            loss = self._trajectory_backward(iteration)
        else:
            loss = self.loss(iteration)
            loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        if not torch.isfinite(loss) or any(g is not None and not torch.isfinite(g).all()
                                           for g in grads):
            raise DivergedError(f"iteration {iteration}: the {self.objective} loss or its gradient "
                                f"is not finite (loss {loss.item()}); lower distill.lr_images")
        before = {k: v.clone() for k, v in self.state().items()}
        self.optimizer.step()
        if self.similarity is not None:  # targets stay non-negative (ead_dist/similarity.py)
            self.similarity.project()
        # A finite gradient times too large a step size can still leave S infinite: undo that
        # step, so that the state saved on divergence is the last good one.
        if not all(torch.isfinite(p).all() for group in self.optimizer.param_groups
                   for p in group["params"]):
            self.load_state(before)
            raise DivergedError(f"iteration {iteration}: the {self.objective} step left S not "
                                f"finite; lower distill.lr_images")
        return float(loss.detach())

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"images": self.images.detach(), "label_logits": self.label_logits.detach(),
                   "classes": self.classes, "student_lr": self.student_lr.detach()}
        if self.similarity is not None:
            tensors.update(self.similarity.tensors())
        for i, group in enumerate(self.optimizer.param_groups):
            for name, value in self.optimizer.state.get(group["params"][0], {}).items():
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(value)
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(tensors["images"])
            self.label_logits.copy_(tensors["label_logits"])
            if "student_lr" in tensors:
                self.student_lr.copy_(tensors["student_lr"])
        if self.similarity is not None:
            self.similarity.load(tensors)
        for i, group in enumerate(self.optimizer.param_groups):
            prefix = f"adam.{i}."
            # Adam keeps its moments on the parameters' device and its step count on the CPU.
            state = {k[len(prefix):]: v.to(self.images.device).clone()
                     if k[len(prefix):] in ("exp_avg", "exp_avg_sq") else v.clone()
                     for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                self.optimizer.state[group["params"][0]] = state
            else:  # saved before Adam's first step: none, as then
                self.optimizer.state.pop(group["params"][0], None)

"""The finite-step effect: N differentiable SGD steps on S from an expert's checkpoint.

The first-order effect looks one step ahead from theta_t. Its finite-step form (the seed's
Remark 3.4; MTT's objective) trains a functional copy of the network on S for N steps with a
learnable step size alpha and asks that it land where the expert landed after its own steps on
D, theta_{t+M}:

    loss = || theta_N(S, alpha) - theta_{t+M} ||^2 / || theta_t - theta_{t+M} ||^2

Both ends are stored checkpoints, so the coordinator still reads no real data. The unrolled
steps keep their graphs (memory grows with N); :func:`trajectory_loss_and_grads` gives the same
gradients with memory constant in N by recomputing each step on the way back (TESLA's idea,
here as a plain reverse sweep over saved parameters). Pure tensors: no files, no config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .effect import cross_entropy, parameter_order

Augment = Callable[[Tensor, int], Tensor]  # (images, step) -> augmented images
# (model, parameters by name, inputs, targets) -> the batch's mean loss at those parameters
StepLoss = Callable[[nn.Module, dict[str, Tensor], Tensor, Tensor], Tensor]


def classification_loss(model: nn.Module, params: dict[str, Tensor], x: Tensor,
                        y: Tensor) -> Tensor:
    """Cross-entropy of the classifier's logits against (soft) targets: the student's loss
    unless another is given (image-text gives the contrastive loss of pairs)."""
    return cross_entropy(functional_call(model, params, (x,)), y)


def step_loss_gradient(model: nn.Module, theta: Mapping[str, Tensor], x: Tensor, y: Tensor,
                       step_loss: StepLoss) -> Tensor:
    """grad_theta step_loss(theta; x, y), flat in parameter order and differentiable with respect
    to x and y (double backward): g_S of the one-step objectives for a loss given as a
    StepLoss, such as the contrastive loss of image-text pairs."""
    names = parameter_order(model, theta)
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    loss = step_loss(model, leaves, x, y)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=True,
                                allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                      for k, g in zip(names, grads)])


def student_batches(size: int, steps: int, batch_size: int | None,
                    generator: torch.Generator) -> list[Tensor]:
    """The indices of S each student step trains on: reshuffled passes over S, like an epoch
    loop; ``batch_size`` None (or >= |S|) means all of S at every step."""
    if batch_size is None or batch_size >= size:
        return [torch.arange(size)] * steps
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(size, generator=generator)
        batches += [order[i:i + batch_size] for i in range(0, size - batch_size + 1, batch_size)]
    return batches[:steps]


def _sgd_step(model: nn.Module, names: list[str], params: list[Tensor], x: Tensor, y: Tensor,
              lr: Tensor, create_graph: bool, step_loss: StepLoss = classification_loss
              ) -> list[Tensor]:
    loss = step_loss(model, dict(zip(names, params)), x, y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return [p - lr * g for p, g in zip(params, grads)]


def unrolled_sgd(model: nn.Module, theta: Mapping[str, Tensor], images: Tensor, targets: Tensor,
                 lr: Tensor, batches: list[Tensor], augment: Augment | None = None,
                 step_loss: StepLoss = classification_loss) -> dict[str, Tensor]:
    """theta after len(batches) SGD steps on (images[b], targets[b]), differentiable with
    respect to images, targets and lr (the graph of every step is kept)."""
    names = parameter_order(model, theta)
    params = [theta[k].detach().requires_grad_(True) for k in names]
    for step, batch in enumerate(batches):
        x = images[batch] if augment is None else augment(images[batch], step)
        params = _sgd_step(model, names, params, x, targets[batch], lr, create_graph=True,
                           step_loss=step_loss)
    return dict(zip(names, params))


def student_end(model: nn.Module, theta: Mapping[str, Tensor], images: Tensor, targets: Tensor,
                lr: Tensor, batches: list[Tensor], augment: Augment | None = None,
                step_loss: StepLoss = classification_loss) -> dict[str, Tensor]:
    """theta after the same SGD steps as :func:`unrolled_sgd`, as values: no graph kept."""
    names = parameter_order(model, theta)
    params = [theta[k].detach() for k in names]
    for step, batch in enumerate(batches):
        x = images[batch] if augment is None else augment(images[batch], step)
        with torch.enable_grad():
            leaves = [p.requires_grad_(True) for p in params]
            params = [p.detach() for p in _sgd_step(model, names, leaves, x.detach(),
                                                    targets[batch].detach(), lr.detach(),
                                                    create_graph=False, step_loss=step_loss)]
    return dict(zip(names, params))


def _flat(params: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([params[k].reshape(-1) for k in names])


def trajectory_distance(theta_end: Mapping[str, Tensor], theta_start: Mapping[str, Tensor],
                        theta_target: Mapping[str, Tensor]) -> Tensor:
    """|| theta_end - theta_target ||^2 / || theta_start - theta_target ||^2 (MTT's loss)."""
    names = sorted(theta_target)
    target = _flat(theta_target, names).detach()
    span = ((_flat(theta_start, names).detach() - target) ** 2).sum()
    return ((_flat(theta_end, names) - target) ** 2).sum() / span


def trajectory_loss_and_grads(model: nn.Module, theta: Mapping[str, Tensor],
                              theta_target: Mapping[str, Tensor], images: Tensor,
                              targets: Tensor, lr: Tensor, batches: list[Tensor],
                              augment: Augment | None = None,
                              step_loss: StepLoss = classification_loss,
                              closed_over: Sequence[Tensor] = (),
                              ) -> tuple[Tensor, list[Tensor | None]]:
    """The trajectory loss and its gradients with respect to (images, targets, lr), with memory
    constant in the number of steps.

    The forward sweep keeps only the parameters before each step (no graphs). The reverse sweep
    rebuilds one step at a time and pulls the adjoint lambda = dloss/dtheta_{k+1} back through
    it: theta_{k+1} = theta_k - lr g(theta_k, S_k) gives dloss/dtheta_k = lambda - lr H lambda
    and the contributions -lr J^T lambda to S and -<g, lambda> to lr, all from one
    vector-Jacobian product of the rebuilt step. Equal to backpropagating through
    :func:`unrolled_sgd` up to float rounding; its cost is one extra forward+backward per step.
    Augmentation draws must be a function of the step (``augment(x, step)``) so the rebuild
    sees the same draw. ``closed_over`` are tensors the step loss reads besides its arguments
    (image-text's learned similarity). Returns the loss and the gradients for (images,
    targets, lr, *closed_over), None for those that do not require grad.
    """
    names = parameter_order(model, theta)
    every = (images, targets, lr, *closed_over)
    wanted = [t.requires_grad for t in every]
    inputs = [t for t in every if t.requires_grad]
    with torch.no_grad():
        saved = [[theta[k].detach() for k in names]]
    for step, batch in enumerate(batches):  # forward: parameters only
        x = images[batch] if augment is None else augment(images[batch], step)
        with torch.enable_grad():
            params = [p.detach().requires_grad_(True) for p in saved[-1]]
            nxt = _sgd_step(model, names, params, x.detach(), targets[batch].detach(),
                            lr.detach(), create_graph=False, step_loss=step_loss)
        saved.append([p.detach() for p in nxt])
    end = [p.detach().requires_grad_(True) for p in saved[-1]]
    loss = trajectory_distance(dict(zip(names, end)), theta, theta_target)
    adjoint = list(torch.autograd.grad(loss, end))
    grads = [torch.zeros_like(t) for t in inputs]
    for step in reversed(range(len(batches))):  # reverse: rebuild step, pull the adjoint back
        batch = batches[step]
        params = [p.detach().requires_grad_(True) for p in saved[step]]
        x = images[batch] if augment is None else augment(images[batch], step)
        nxt = _sgd_step(model, names, params, x, targets[batch], lr, create_graph=True,
                        step_loss=step_loss)
        pulled = torch.autograd.grad(nxt, params + inputs, grad_outputs=adjoint,
                                     allow_unused=True)
        adjoint = [g.detach() for g in pulled[:len(params)]]
        for i, g in enumerate(pulled[len(params):]):
            if g is not None:
                grads[i] += g.detach()
    found = iter(grads)
    return loss.detach(), [next(found) if w else None for w in wanted]

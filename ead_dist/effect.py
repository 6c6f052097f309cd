"""The replacement effect of Effect Alignment as pure tensor functions (docs/design.md section 1).

Notation as in the paper: L(X, theta) is the mean loss over a set X, an expert trained on D
leaves checkpoints theta_t with step sizes eta_t, and replacing a group G of D by a group A
gives D' = D - G + A. Gradients are flat vectors, concatenated in the order of the parameter
dict they were taken at. Nothing here reads files, knows the config or starts Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy; ``targets`` are class indices [B] or probabilities [B, K].

    Soft targets give -(p * log_softmax(logits)).sum(1).mean(), which is what lets a learned
    label (softmax of label logits) receive a gradient.
    """
    if targets.is_floating_point():
        return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, targets)


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's parameters, name -> tensor, in ``named_parameters`` order."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def parameter_order(model: nn.Module, params: Mapping[str, Tensor]) -> list[str]:
    """The names of ``params`` in the model's ``named_parameters`` order: the one order every
    flat gradient uses, whatever order a loaded checkpoint's dict happens to have."""
    order = [name for name, _ in model.named_parameters() if name in params]
    return order + sorted(set(params) - set(order))


def loss_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """grad_theta L(X, theta) at theta = ``params``: the flat gradient of the mean loss of X,
    concatenated in the model's parameter order (:func:`parameter_order`).

    ``loss_fn(logits, targets)`` must return the mean over its batch. With ``batch_size`` the
    batch is taken in chunks and the gradient of the mean is sum_c |X_c| grad L(X_c) / |X|, so
    memory does not grow with |X|. With ``create_graph=True`` the result stays differentiable
    with respect to ``inputs`` and floating-point ``targets`` (double backward): this is how the
    coordinator gets d/dS < g_P, g_S > (chunks then keep their graphs, so memory grows again).
    An empty X (0 rows) gives the zero vector. Buffers are the model's own.
    """
    names = parameter_order(model, params)
    # Parameters that already carry a graph are used as they are; plain tensors become leaves.
    leaves = {
        k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()
    }
    ref = next(iter(leaves.values()))
    numel = sum(v.numel() for v in leaves.values())
    n = inputs.shape[0]
    if n == 0:
        return torch.zeros(numel, dtype=ref.dtype, device=ref.device)

    step = n if batch_size is None else batch_size
    if step <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total: Tensor | None = None
    for start in range(0, n, step):
        x, y = inputs[start : start + step], targets[start : start + step]
        loss = loss_fn(functional_call(model, leaves, (x,)), y)
        grads = torch.autograd.grad(
            loss, [leaves[k] for k in names], create_graph=create_graph, allow_unused=True
        )
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                for k, g in zip(names, grads)
            ]
        )
        # Chunk means weighted by chunk size give the mean over the whole batch.
        part = flat * (x.shape[0] / n)
        total = part if total is None else total + part
    assert total is not None
    return total


def gradient_change(
    g_D: Tensor, g_G: Tensor, g_A: Tensor, size_D: int, size_G: int, size_A: int
) -> Tensor:
    """grad L(D') - grad L(D) = ((|G|-|A|) g_D - |G| g_G + |A| g_A) / |D'|, |D'| = |D|-|G|+|A|.

    Exact for mean losses: |D'| L(D') = |D| L(D) - |G| L(G) + |A| L(A) at every theta.
    """
    size_Dp = size_D - size_G + size_A
    if size_Dp <= 0:
        raise ValueError(f"D' would be empty: |D|={size_D}, |G|={size_G}, |A|={size_A}")
    return ((size_G - size_A) * g_D - size_G * g_G + size_A * g_A) / size_Dp


def replacement_effect(
    model: nn.Module,
    checkpoints: Sequence[Mapping[str, Tensor]],
    lrs: Sequence[float],
    loss_fn: LossFn,
    P: Batch,
    D: Batch,
    G: Batch,
    A: Batch,
) -> float:
    """R-hat(G, A) = sum_t eta_t < grad L(P, theta_t), grad L(D', theta_t) - grad L(D, theta_t) >.

    First-order estimate of R(G, A) = L(P, theta_D) - L(P, theta_D') (the paper's Definition
    3.1): unrolling theta_{t+1} = theta_t - eta_t g(theta_t), training on D' instead of D moves
    the end point by about -sum_t eta_t (g_D' - g_D), so the P loss drops by about the sum above.
    Positive means training on D' would lower the loss on P. The gradient change is
    :func:`gradient_change`. ``checkpoints`` are parameter dicts theta_t, ``lrs`` the eta_t;
    P, D, G, A are (inputs, targets) pairs, G a subset of D, and G or A may have 0 rows.
    """
    if len(checkpoints) != len(lrs):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(lrs)} step sizes")
    sizes = [X[0].shape[0] for X in (D, G, A)]
    effect = 0.0
    for theta_t, eta_t in zip(checkpoints, lrs):
        g_P, g_D, g_G, g_A = (loss_gradient(model, theta_t, loss_fn, *X) for X in (P, D, G, A))
        effect += float(eta_t) * torch.dot(g_P, gradient_change(g_D, g_G, g_A, *sizes)).item()
    return effect


def paper_one_minus_alpha(real_size: int, synthetic_size: int) -> float:
    """The paper's real-term coefficient 1 - alpha, alpha = (|G|-|A|)/(|D|-|G|+|A|), at G=D, A=S.

    That is 2 - |D|/|S|: a large negative number for a small S. It comes from dropping the
    |G|/|D'| and |A|/|D'| weights of :func:`gradient_change`, whose exact coefficient at G = D,
    A = S is 1 (docs/design.md section 1, ``coefficient: paper``).
    """
    alpha = (real_size - synthetic_size) / synthetic_size
    return 1.0 - alpha

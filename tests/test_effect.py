"""Tests for ead_dist/effect.py: the replacement-effect estimator and its gradients.

The estimator is checked against brute-force retraining (the paper's Definition 3.1) on real
Fashion-MNIST images, the double-backward d/dS against finite differences (gradcheck), and the
size algebra of grad L(D') - grad L(D) exactly.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ead_dist.effect import (
    cross_entropy,
    gradient_change,
    loss_gradient,
    paper_one_minus_alpha,
    parameters_of,
    replacement_effect,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
KINDS = ("removal", "addition", "replacement", "distill")
CASES_PER_KIND = 30
SIZE_D, SIZE_P, SIZE_POOL = 400, 200, 800
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read_idx(path: Path, magic: int, header: int, count: int) -> np.ndarray:
    """The first ``count`` items of an IDX file (big-endian header, uint8 payload)."""
    with gzip.open(path, "rb") as f:
        head = f.read(header)
        found, total = struct.unpack(">II", head[:8])
        assert found == magic, f"{path}: magic {found}, expected {magic}"
        assert total >= count, f"{path}: {total} items, need {count}"
        item = int(np.prod(struct.unpack(f">{(header - 8) // 4}I", head[8:]))) if header > 8 else 1
        return np.frombuffer(f.read(count * item), dtype=np.uint8)


@pytest.fixture(scope="module")
def fashion():
    """D, P (held out) and a pool of new images A is drawn from: 14x14 real Fashion-MNIST.

    Pixels in [0, 1], then centred by D's pixel mean: raw pixels share a large common
    component that gives the logistic loss a Hessian eigenvalue of about 4.5 (0.5 centred), and
    the estimator is first order in sum_t eta_t * lambda_max (the paper's Remark 3.4).
    """
    n = SIZE_D + SIZE_P + SIZE_POOL
    images = _read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz", 2051, 16, n)
    labels = _read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz", 2049, 8, n)
    x = images.reshape(n, 14, 2, 14, 2).astype(np.float64).mean(axis=(2, 4)) / 255.0
    x = torch.from_numpy(x.reshape(n, 196))
    x = x - x[:SIZE_D].mean(0)
    y = torch.from_numpy(labels.astype(np.int64))
    d, p = slice(0, SIZE_D), slice(SIZE_D, SIZE_D + SIZE_P)
    pool = slice(SIZE_D + SIZE_P, n)
    return {"D": (x[d], y[d]), "P": (x[p], y[p]), "pool": (x[pool], y[pool])}


def _make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "linear":
        return nn.Linear(196, 10).double()
    return nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10)).double()


def _train(name, init, x, y, lrs):
    """Full-batch GD from ``init`` with plain torch.optim: the reference R-hat must track."""
    model = _make_model(name)
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    trajectory = []
    for eta in lrs:
        trajectory.append(parameters_of(model))
        for group in opt.param_groups:
            group["lr"] = eta
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, trajectory


def _p_loss(model, P) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(P[0]), P[1]).item()


def _draw(rng, labels: torch.Tensor, size: int) -> np.ndarray:
    """Uniform half the time, else from one class, so effects differ in kind, not only size."""
    if rng.random() < 0.5:
        return rng.choice(len(labels), size=size, replace=False)
    members = np.flatnonzero(labels.numpy() == rng.integers(10))
    return rng.choice(members, size=min(size, len(members)), replace=False)


def _cases(rng, data):
    """(kind, indices of G in D, indices of A in the pool) for every kind of replacement."""
    none = np.array([], dtype=np.int64)
    y_D, y_pool = data["D"][1], data["pool"][1]
    for kind in KINDS:
        for _ in range(CASES_PER_KIND):
            if kind == "distill":
                # G = D, A = a small set S drawn from a random subset of the classes.
                classes = rng.choice(10, size=int(rng.integers(3, 11)), replace=False)
                members = np.flatnonzero(np.isin(y_pool.numpy(), classes))
                a = rng.choice(members, size=int(rng.integers(10, 101)), replace=False)
                yield kind, np.arange(SIZE_D), a
                continue
            g = _draw(rng, y_D, int(rng.integers(1, 41))) if kind != "addition" else none
            a = _draw(rng, y_pool, int(rng.integers(1, 41))) if kind != "removal" else none
            yield kind, g, a


def _measure(name: str, data, lr: float):
    """True R and R-hat (derived and paper coefficients) for every case, by kind."""
    lrs = [lr * (1 - 0.5 * t / STEPS) for t in range(STEPS)]
    model = _make_model(name)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x_D, y_D = data["D"]
    x_pool, y_pool = data["pool"]
    P = data["P"]
    trained, trajectory = _train(name, init, x_D, y_D, lrs)
    loss_D = _p_loss(trained, P)
    # g_P, g_D per checkpoint, shared by every case's paper-coefficient estimate.
    fixed = [
        tuple(loss_gradient(model, th, cross_entropy, *X) for X in (P, data["D"]))
        for th in trajectory
    ]
    out = {kind: {"true": [], "derived": [], "paper": []} for kind in KINDS}
    for kind, g, a in _cases(np.random.default_rng(0), data):
        keep = np.setdiff1d(np.arange(SIZE_D), g)
        x_Dp = torch.cat([x_D[keep], x_pool[a]])
        y_Dp = torch.cat([y_D[keep], y_pool[a]])
        retrained, _ = _train(name, init, x_Dp, y_Dp, lrs)
        G, A = (x_D[g], y_D[g]), (x_pool[a], y_pool[a])
        # The paper's Eq. 4 drops the |G|/|D'| and |A|/|D'| weights: alpha g_D - g_G + g_A,
        # which at G = D, A = S is g_S - (1 - alpha) g_D (paper_one_minus_alpha).
        alpha = (len(g) - len(a)) / (SIZE_D - len(g) + len(a))
        paper = sum(
            eta
            * torch.dot(
                g_P,
                alpha * g_D
                - loss_gradient(model, th, cross_entropy, *G)
                + loss_gradient(model, th, cross_entropy, *A),
            ).item()
            for th, eta, (g_P, g_D) in zip(trajectory, lrs, fixed)
        )
        out[kind]["true"].append(loss_D - _p_loss(retrained, P))
        out[kind]["derived"].append(
            replacement_effect(model, trajectory, lrs, cross_entropy, P, data["D"], G, A)
        )
        out[kind]["paper"].append(paper)
    return out


def _pearson(out, kinds, estimator="derived") -> float:
    true = np.concatenate([out[k]["true"] for k in kinds])
    est = np.concatenate([out[k][estimator] for k in kinds])
    return float(np.corrcoef(true, est)[0, 1])


def _report(name, lr, out) -> dict[str, float]:
    r = {k: _pearson(out, [k]) for k in KINDS}
    r["pooled"] = _pearson(out, KINDS)
    r["pooled, paper coefficient"] = _pearson(out, KINDS, "paper")
    print(f"\n{name} lr={lr}: " + ", ".join(f"{k} r={v:.3f}" for k, v in r.items()))
    return r


_measured: dict[tuple[str, float], dict] = {}


def _measured_once(name, data, lr):
    if (name, lr) not in _measured:
        _measured[(name, lr)] = _measure(name, data, lr)
    return _measured[(name, lr)]


# --- the estimator against retraining -------------------------------------------------------


FIRST_ORDER_LR, LARGE_LR = 0.005, 0.1


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_estimator_tracks_retraining(fashion, name):
    """R-hat tracks R = L(P, theta_D) - L(P, theta_D') within the first-order regime.

    30 GD steps, eta_t from 0.005 down to 0.0025: sum_t eta_t * lambda_max is about 0.06 for
    the logistic model. Measured (float64, deterministic; case seeds 0-3): every kind >= 0.97
    and pooled >= 0.97 for the logistic model, >= 0.99 for the MLP. The paper's coefficient
    pools at 0.18-0.50. At twice this step the logistic D -> S cases fell to 0.90 for one seed.
    """
    r = _report(name, FIRST_ORDER_LR, _measured_once(name, fashion, FIRST_ORDER_LR))
    for kind in KINDS:
        assert r[kind] >= 0.9, (kind, r)
    assert r["pooled"] >= 0.9, r
    assert r["pooled, paper coefficient"] < r["pooled"] - 0.3, r


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_estimator_degrades_with_step_size(fashion, name):
    """Remark 3.4: at eta_t from 0.1 (sum_t eta_t * lambda_max about 1.2 for the logistic model)
    R-hat still ranks small replacements but loses D -> S, whose parameter change is not small.

    Measured over case seeds 0-3, small replacements pooled: logistic 0.73-0.84, MLP 0.97-0.99;
    D -> S: logistic 0.17-0.35, MLP 0.0-0.5.
    """
    small = _measured_once(name, fashion, FIRST_ORDER_LR)
    large = _measured_once(name, fashion, LARGE_LR)
    _report(name, LARGE_LR, large)
    assert _pearson(large, ("removal", "addition", "replacement")) >= 0.6
    assert _pearson(large, KINDS) < _pearson(small, KINDS)


# --- gradients ------------------------------------------------------------------------------


def _tiny_net(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double(), (6,)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )
    return net.double(), (1, 6, 6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_d_dS_of_effect_matches_finite_differences(kind):
    """d/dS < g_P, grad L(S) > by double backward, w.r.t. images and label logits."""
    model, shape = _tiny_net(kind)
    params = parameters_of(model)
    gen = torch.Generator().manual_seed(2)
    x_P = torch.randn(8, *shape, dtype=torch.float64, generator=gen)
    y_P = torch.randint(0, 3, (8,), generator=gen)
    g_P = loss_gradient(model, params, cross_entropy, x_P, y_P)
    images = torch.randn(4, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    label_logits = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def effect(images, label_logits, batch_size=None):
        g_S = loss_gradient(
            model, params, cross_entropy, images, label_logits.softmax(1),
            create_graph=True, batch_size=batch_size,
        )
        return torch.dot(g_P, g_S)

    assert torch.autograd.gradcheck(effect, (images, label_logits))
    whole = torch.autograd.grad(effect(images, label_logits), (images, label_logits))
    chunked = torch.autograd.grad(effect(images, label_logits, 3), (images, label_logits))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_gradient_matches_autograd_on_the_model(soft):
    model, shape = _tiny_net("conv")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (10,), generator=gen)
    if soft:
        y = torch.randn(10, 3, dtype=torch.float64, generator=gen).softmax(1)
    expected = torch.autograd.grad(cross_entropy(model(x), y), list(model.parameters()))
    expected = torch.cat([g.reshape(-1) for g in expected])
    got = loss_gradient(model, parameters_of(model), cross_entropy, x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_soft_cross_entropy_of_one_hot_is_hard_cross_entropy():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (7,), generator=gen)
    torch.testing.assert_close(
        cross_entropy(logits, F.one_hot(y, 5).double()), cross_entropy(logits, y)
    )


# --- size algebra and edge cases ------------------------------------------------------------


@pytest.fixture
def small_problem():
    model, shape = _tiny_net("mlp")
    gen = torch.Generator().manual_seed(5)

    def batch(n):
        return torch.randn(n, *shape, dtype=torch.float64, generator=gen), torch.randint(
            0, 3, (n,), generator=gen
        )

    trajectory, lrs = [parameters_of(model)], [0.1]
    with torch.no_grad():  # a second, different checkpoint
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    trajectory.append(parameters_of(model))
    lrs.append(0.05)
    return model, trajectory, lrs, batch(20), batch(50), batch(15)


def test_chunked_gradient_equals_whole_batch(small_problem):
    model, trajectory, _, _, D, _ = small_problem
    whole = loss_gradient(model, trajectory[1], cross_entropy, *D)
    for batch_size in (1, 7, 50, 64):
        chunked = loss_gradient(model, trajectory[1], cross_entropy, *D, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)


def test_empty_batch_gives_zero_gradient(small_problem):
    model, trajectory, _, _, D, _ = small_problem
    g = loss_gradient(model, trajectory[0], cross_entropy, D[0][:0], D[1][:0])
    assert g.shape == (sum(p.numel() for p in model.parameters()),)
    assert g.dtype == torch.float64 and not g.any()


def test_gradient_change_is_exact(small_problem):
    """g_D + gradient_change equals the gradient of D' = D - G + A taken directly."""
    model, trajectory, _, _, D, pool = small_problem
    theta = trajectory[1]
    G = (D[0][:12], D[1][:12])
    A = (pool[0][:5], pool[1][:5])
    Dp = (torch.cat([D[0][12:], A[0]]), torch.cat([D[1][12:], A[1]]))
    g_D, g_G, g_A, g_Dp = (loss_gradient(model, theta, cross_entropy, *X) for X in (D, G, A, Dp))
    torch.testing.assert_close(g_D + gradient_change(g_D, g_G, g_A, 50, 12, 5), g_Dp)


def test_empty_groups_contribute_nothing(small_problem):
    model, trajectory, lrs, P, D, pool = small_problem
    none = (D[0][:0], D[1][:0])
    G, A = (D[0][:10], D[1][:10]), (pool[0][:10], pool[1][:10])
    assert replacement_effect(model, trajectory, lrs, cross_entropy, P, D, none, none) == 0.0
    # Removal alone and addition alone are the general formula with the other group at zero.
    for g_part, a_part in ((G, none), (none, A)):
        expected = 0.0
        for theta, eta in zip(trajectory, lrs):
            g_P, g_D, g_G, g_A = (
                loss_gradient(model, theta, cross_entropy, *X) for X in (P, D, g_part, a_part)
            )
            n_G, n_A = len(g_part[0]), len(a_part[0])
            change = ((n_G - n_A) * g_D - n_G * g_G + n_A * g_A) / (50 - n_G + n_A)
            expected += eta * torch.dot(g_P, change).item()
        got = replacement_effect(model, trajectory, lrs, cross_entropy, P, D, g_part, a_part)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert got != 0.0


def test_replacing_a_group_by_itself_has_no_effect(small_problem):
    model, trajectory, lrs, P, D, _ = small_problem
    G = (D[0][5:25], D[1][5:25])
    effect = replacement_effect(model, trajectory, lrs, cross_entropy, P, D, G, G)
    assert abs(effect) < 1e-15


def test_distillation_reduces_to_synthetic_minus_real(small_problem):
    """G = D, A = S: every size factor cancels, R-hat = sum_t eta_t < g_P, g_S - g_D >."""
    model, trajectory, lrs, P, D, S = small_problem
    expected = 0.0
    for theta, eta in zip(trajectory, lrs):
        g_P, g_D, g_S = (loss_gradient(model, theta, cross_entropy, *X) for X in (P, D, S))
        expected += eta * torch.dot(g_P, g_S - g_D).item()
    got = replacement_effect(model, trajectory, lrs, cross_entropy, P, D, D, S)
    assert got == pytest.approx(expected, rel=1e-12)


def test_paper_coefficient():
    assert paper_one_minus_alpha(1000, 100) == pytest.approx(-8.0)
    assert paper_one_minus_alpha(100, 100) == pytest.approx(1.0)
    # The general alpha = (|G|-|A|)/(|D|-|G|+|A|) at G = D, A = S.
    size_D, size_S = 60000, 100
    alpha = (size_D - size_S) / (size_D - size_D + size_S)
    assert paper_one_minus_alpha(size_D, size_S) == pytest.approx(1 - alpha)


def test_mismatched_trajectory_is_refused(small_problem):
    model, trajectory, lrs, P, D, S = small_problem
    with pytest.raises(ValueError, match="step sizes"):
        replacement_effect(model, trajectory, lrs[:1], cross_entropy, P, D, D, S)

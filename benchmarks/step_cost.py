"""What one EAD coordinator step costs, as a multiple of a plain forward+backward.

The model is ConvNet-3 (width 128, instance norm, first_padding 3: the DC/MTT network on
28x28 Fashion-MNIST). The batch is the synthetic set S: IPC real Fashion-MNIST train images
per class (10 classes, normalised) with soft labels.

- plain: the gradient of S's loss with respect to the parameters at theta, nothing else
  (``loss_gradient`` without ``create_graph``: one forward and one backward).
- EAD step: ``Coordinator.step`` (its loss, the backward through g_S to the images and the
  label logits, and the Adam step) with one real-terms checkpoint at the same theta, for the
  objectives ``matching``, ``scalar``, ``per_class_effect`` and ``class_matching``. The real
  terms are computed here from real images at theta: g_D over 2,000, g_P over 256 (K = 1),
  real_dots = g_P @ g_D, and the per-class versions.

theta is the network's seeded initialisation (the cost does not depend on its values). The
measurements of one repeat are taken back to back (plain, then each objective), so a change
in the machine's load hits all of them alike; the tables give medians (warm-up 2, 7 repeats;
IPC 50, whose steps take seconds, warm-up 1 and 3 repeats). Writes
benchmarks/results/step_cost.json.

    .venv/bin/python benchmarks/step_cost.py
    .venv/bin/python benchmarks/step_cost.py --ipc 1 10 --repeats 3 --out /tmp/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from ead_dist.data.formats import read_split
from ead_dist.effect import cross_entropy, loss_gradient, parameters_of
from ead_dist.models import build_model
from ead_dist.stages.distill import Coordinator, RealTerms
from ead_dist.synthetic import SyntheticSet, class_balanced_indices

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step_cost.json")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixels in [0, 1]
MODEL = {"name": "convnet", "channels": 1, "num_classes": 10, "image_size": [28, 28],
         "width": 128, "depth": 3, "norm": "instancenorm", "first_padding": 3}
OBJECTIVES = ("matching", "scalar", "per_class_effect", "class_matching")
REAL_D, REAL_P = 2000, 256


def fashion_mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [60000, 1, 28, 28] and int64 labels."""
    data = read_split("fashion_mnist", "", "train")
    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (pixels - MEAN) / STD, torch.from_numpy(data.labels).long()


def benchmark_model() -> torch.nn.Module:
    """MODEL, built (seeded by the caller's torch.manual_seed)."""
    return build_model(MODEL["name"], MODEL["channels"], MODEL["num_classes"],
                       tuple(MODEL["image_size"]), width=MODEL["width"], depth=MODEL["depth"],
                       norm=MODEL["norm"], first_padding=MODEL["first_padding"])


def real_terms(model, theta, images, labels, classes: int, seed: int) -> RealTerms:
    """g_D, g_P (K = 1), real_dots and the per-class terms of real batches at theta."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    d, p = order[:REAL_D], order[REAL_D:REAL_D + REAL_P]

    def gradient(index):
        return loss_gradient(model, theta, cross_entropy, images[index], labels[index],
                             batch_size=500)

    g_D = gradient(d)
    g_P = gradient(p).unsqueeze(0)
    g_D_classes = torch.stack([gradient(d[labels[d] == c]) for c in range(classes)])
    g_P_classes = torch.stack([gradient(p[labels[p] == c]) for c in range(classes)]).unsqueeze(0)
    return RealTerms(theta=theta, lr=0.01, g_D=g_D, g_P=g_P, real_dots=g_P @ g_D,
                     g_D_classes=g_D_classes, g_P_classes=g_P_classes,
                     real_dots_classes=g_P_classes @ g_D)


def synthetic_set(images, labels, ipc: int, classes: int, seed: int) -> SyntheticSet:
    """IPC real images per class; soft labels 0.9 on the image's class, the rest spread."""
    chosen = class_balanced_indices(labels, ipc, classes, torch.Generator().manual_seed(seed))
    soft = torch.full((len(chosen), classes), 0.1 / (classes - 1))
    soft[torch.arange(len(chosen)), labels[chosen]] = 0.9
    return SyntheticSet(images[chosen].clone(), soft.log(), labels[chosen].clone())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_ipc(model, terms: RealTerms, synthetic: SyntheticSet, objectives, warmup: int,
                repeats: int) -> dict:
    x, y = synthetic.images, synthetic.labels

    def plain():
        loss_gradient(model, terms.theta, cross_entropy, x, y)

    coordinators = {
        objective: Coordinator(
            model, [terms], synthetic, objective=objective, coefficient="derived",
            real_size=60_000, lr_images=0.01, lr_labels=0.01, learn_labels=True,
            checkpoints_per_iteration=1, augmentation=None, seed=0)
        for objective in objectives
    }
    runs: dict[str, list[float]] = {"plain": [], **{o: [] for o in objectives}}
    for i in range(warmup + repeats):
        row = {"plain": timed(plain)}
        for objective, coordinator in coordinators.items():
            row[objective] = timed(lambda: coordinator.step(i))
        if i >= warmup:
            for name, seconds in row.items():
                runs[name].append(seconds)
        print(f"  ipc {len(x) // 10} rep {i}{' (warm-up)' if i < warmup else ''}: "
              + ", ".join(f"{k} {v:.4f}s" for k, v in row.items()), flush=True)
    plain_median = statistics.median(runs["plain"])
    result = {"synthetic_size": len(x), "warmup": warmup, "repeats": repeats,
              "plain_seconds": plain_median, "plain_runs": runs["plain"], "objectives": {}}
    for objective in objectives:
        median = statistics.median(runs[objective])
        result["objectives"][objective] = {
            "seconds": median, "ratio_to_plain": median / plain_median,
            "runs": runs[objective],
            "ratio_per_repeat_median": statistics.median(
                e / p for e, p in zip(runs[objective], runs["plain"])),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--large-ipc", type=int, default=50,
                        help="from this IPC on, use --large-repeats (the step takes seconds)")
    parser.add_argument("--large-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = fashion_mnist_train()
    classes = MODEL["num_classes"]
    model = benchmark_model()
    theta = parameters_of(model)
    terms = real_terms(model, theta, images, labels, classes, seed=1)
    report = {
        "benchmark": "step_cost",
        "command": " ".join(["python", "benchmarks/step_cost.py",
                             *map(shlex.quote, sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": "cpu", "torch_threads": torch.get_num_threads(),
                    # The 1-minute load average: other work on the machine skews the timings.
                    "load_average_at_start": os.getloadavg()[0]},
        "settings": {
            "model": MODEL, "parameters": sum(v.numel() for v in theta.values()),
            "dataset": "fashion_mnist train, normalised (mean 0.2860, std 0.3530)",
            "synthetic_labels": "soft: 0.9 on the image's class, 0.1 spread over the rest; "
                                "learned (learn_labels true)",
            "real_terms": f"one checkpoint (theta = seeded initialisation): g_D over {REAL_D} "
                          f"real images, g_P over {REAL_P} (K = 1), per-class versions",
            "plain": "loss_gradient at theta, params only: one forward + backward of S",
            "ead_step": "Coordinator.step: loss (double-backward graph), backward to images "
                        "and label logits, Adam step; checkpoints_per_iteration 1, "
                        "no augmentation",
            "timing": "per repeat: plain then each objective back to back; medians",
        },
        "results": {},
    }
    for ipc in args.ipc:
        synthetic = synthetic_set(images, labels, ipc, classes, seed=0)
        repeats = args.large_repeats if ipc >= args.large_ipc else args.repeats
        warmup = min(args.warmup, 1) if ipc >= args.large_ipc else args.warmup
        result = measure_ipc(model, terms, synthetic, args.objectives, warmup, repeats)
        report["results"][f"ipc{ipc}"] = result
        print(f"IPC {ipc}: plain {result['plain_seconds']:.4f}s; " + "; ".join(
            f"{o} {r['seconds']:.4f}s ({r['ratio_to_plain']:.1f}x)"
            for o, r in result["objectives"].items()), flush=True)
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

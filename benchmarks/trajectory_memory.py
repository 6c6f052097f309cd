"""Peak memory and time of one coordinator step as the trajectory objective's student steps grow.

MTT's objective (``distill.objective: trajectory``) unrolls N SGD steps of a student on S and
backpropagates through all of them, so its graph, and its memory, grow with N. The
``recompute`` unroll (``distill.unroll: recompute``) keeps only the N parameter vectors and
rebuilds one step at a time on the way back. EAD's one-step ``matching`` objective needs no
student at all. This measures all three at the same IPC on the same network (ConvNet-3 w128,
the DC/MTT Fashion-MNIST net): each measurement runs in a fresh process, which builds the model,
S and the inputs, resets its peak resident memory (``/proc/self/clear_refs``) and takes its
resident memory as the baseline, then runs ``Coordinator.step`` ``--repeats`` times; the
figure is the peak resident memory above that baseline.

S is IPC real Fashion-MNIST images per class with soft labels (benchmarks/step_cost.py). The
trajectory segment goes from the seeded initialisation to a perturbed copy of it (the cost does
not depend on the values); ``matching`` uses one real-terms checkpoint at the same theta.
No augmentation. Writes benchmarks/results/trajectory_memory.json.

    .venv/bin/python benchmarks/trajectory_memory.py [--ipc 10] [--steps-list 10 20 50]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "trajectory_memory.json")


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start VmHWM again from the current resident size (Linux >= 4.0, clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_one(kind: str, ipc: int, student_steps: int, repeats: int) -> dict:
    """In this process: baseline, then ``repeats`` coordinator steps; peak above baseline."""
    from step_cost import MODEL, benchmark_model, fashion_mnist_train, real_terms, synthetic_set

    from ead_dist.coordinator import Coordinator, Segment, StudentSettings
    from ead_dist.effect import parameters_of

    torch.manual_seed(0)
    images, labels = fashion_mnist_train()
    classes = MODEL["num_classes"]
    model = benchmark_model()
    theta = parameters_of(model)
    synthetic = synthetic_set(images, labels, ipc, classes, seed=0)
    if kind == "matching":
        coordinator = Coordinator(model, synthetic, objective="matching",
                                  terms=[real_terms(model, theta, images, labels, classes, 1)],
                                  real_size=60_000)
    else:
        generator = torch.Generator().manual_seed(1)
        target = {k: v + 0.01 * torch.randn(v.shape, generator=generator)
                  for k, v in theta.items()}
        coordinator = Coordinator(
            model, synthetic, objective="trajectory", segments=[Segment(theta, target)],
            student=StudentSettings(steps=student_steps, recompute=kind == "recompute"))
    del images, labels
    gc.collect()
    reset_peak()  # the setup (real terms over 2,000 images) peaks higher than a step may
    baseline = status_mb("VmRSS")
    seconds = []
    for i in range(repeats):
        started = time.perf_counter()
        coordinator.step(i)
        seconds.append(time.perf_counter() - started)
    return {"kind": kind, "ipc": ipc, "student_steps": student_steps if kind != "matching" else None,
            "baseline_mb": round(baseline, 1), "peak_mb": round(status_mb("VmHWM"), 1),
            "peak_above_baseline_mb": round(status_mb("VmHWM") - baseline, 1),
            "seconds_per_step": [round(s, 3) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps-list", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--full-max-steps", type=int, default=20,
                        help="measure the full unroll up to this N only (its memory grows "
                             "linearly: about 0.34 GiB per step at IPC 10, so N = 50 would "
                             "take most of this machine's 24 GiB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.ipc, int(args.one[1]), args.repeats)))
        return
    jobs = [("matching", 0)] + [(kind, n) for n in args.steps_list
                                for kind in ("full", "recompute")
                                if kind == "recompute" or n <= args.full_max_steps]
    done = {}  # a rerun with the same settings keeps the measurements already made
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if previous["settings"]["ipc"] == args.ipc:
            done = {(r["kind"], r["student_steps"] or 0): r for r in previous["results"]}
    report = {"benchmark": "trajectory_memory",
              "command": " ".join(["python", "benchmarks/trajectory_memory.py",
                                   *map(shlex.quote, sys.argv[1:])]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "torch_threads": args.threads,
                          "load_average_at_start": os.getloadavg()[0]},
              "settings": {"model": "ConvNet-3 w128 instancenorm first_padding 3",
                           "ipc": args.ipc, "repeats": args.repeats, "augmentation": None,
                           "full": "trajectory, unroll full (graph of every step kept)",
                           "recompute": "trajectory, unroll recompute (memory constant in N)",
                           "matching": "EAD one-step gradient matching, one checkpoint"},
              "results": []}
    for kind, steps in jobs:
        if (kind, steps) in done:
            report["results"].append(done[(kind, steps)])
            continue
        out = subprocess.run([sys.executable, __file__, "--ipc", str(args.ipc), "--repeats",
                              str(args.repeats), "--threads", str(args.threads),
                              "--one", kind, str(steps)],
                             check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        report["results"].append(row)
        print(f"{kind:10s} N={steps:3d}: +{row['peak_above_baseline_mb']:.0f} MiB above "
              f"{row['baseline_mb']:.0f}, {row['seconds_per_step']} s", flush=True)
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""The Fashion-MNIST table: EAD objectives against random real images and the initial set.

Experts and real terms do not depend on S, so one base run trains them and every variant
(IPC x objective) links them and runs distill + evaluate in its own RUN directory. Every
variant's eval.json and synthetic.safetensors are copied to benchmarks/results/fashion_mnist/,
and the table to benchmarks/results/fashion_mnist.json.

    .venv/bin/python benchmarks/fashion_mnist.py                 # the CPU profile below
    .venv/bin/python benchmarks/fashion_mnist.py --only ipc10-matching ipc10-scalar

Reruns skip finished variants (each stage is idempotent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time

from ead_dist.config import load_config
from ead_dist.run import run_stages
from ead_dist.runtime import ray_session

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, "fashion_mnist_base.yaml")

# What 2 CPU cores can do in about an hour (the GPU settings live in the pipeline file).
CPU_PROFILE = [
    "experts.count=2", "experts.epochs=1", "experts.save_every=30",
    "realgrad.workers=2", "realgrad.checkpoints=8", "realgrad.real_samples=10000",
    "realgrad.p_batches=4", "realgrad.p_batch_size=256",
    "distill.iterations=200", "distill.save_every=100",
    "evaluate.models=[convnet]", "evaluate.runs=3", "evaluate.epochs=300",
    "evaluate.augmentation=dsa",
]

VARIANTS = {
    # name: overrides, in the order they run; the first variant of each IPC also evaluates
    # the baselines (random real images, and the initial set).
    "ipc10-matching": ["distill.ipc=10", "distill.objective=matching"],
    "ipc10-scalar": ["distill.ipc=10", "distill.objective=scalar", "distill.coefficient=derived"],
    "ipc1-matching": ["distill.ipc=1", "distill.objective=matching"],
    "ipc1-scalar": ["distill.ipc=1", "distill.objective=scalar", "distill.coefficient=derived"],
    "ipc10-paper": ["distill.ipc=10", "distill.objective=scalar", "distill.coefficient=paper"],
    "ipc1-paper": ["distill.ipc=1", "distill.objective=scalar", "distill.coefficient=paper"],
    "ipc10-per_class_effect": ["distill.ipc=10", "distill.objective=per_class_effect"],
    "ipc10-class_matching": ["distill.ipc=10", "distill.objective=class_matching"],
}


def link_base(base_run: str, run: str) -> None:
    os.makedirs(run, exist_ok=True)
    for stage in ("experts", "realgrad"):
        target = os.path.join(run, stage)
        if not os.path.exists(target):
            os.symlink(os.path.join(base_run, stage), target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="further overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    base_run = os.path.join(runs_dir, "fashion_mnist_base")
    common = CPU_PROFILE + args.extra
    os.makedirs(os.path.join(RESULTS, "fashion_mnist"), exist_ok=True)
    table_path = os.path.join(RESULTS, "fashion_mnist.json")
    table = json.load(open(table_path)) if os.path.exists(table_path) else {"variants": {}}
    with ray_session(load_config(CONFIG).ray):
        started = time.perf_counter()
        base = run_stages(load_config(CONFIG, common + [f"run={base_run}"]),
                          ("ingest", "experts", "realgrad"))
        table["base"] = {"overrides": common, "experts": base["experts"],
                         "experts_seconds": base["experts_seconds"],
                         "realgrad_seconds": base["realgrad_seconds"]}
        # Baselines are evaluated once per IPC: skip them when an earlier run has them.
        seen_ipc = {v["overrides"][0] for v in table["variants"].values()
                    if "random_real" in v["eval"]["results"]}
        for name in args.only:
            ipc = VARIANTS[name][0]
            baselines = "[random_real, init]" if ipc not in seen_ipc else "[]"
            seen_ipc.add(ipc)
            run = os.path.join(runs_dir, name)
            link_base(base_run, run)
            overrides = common + VARIANTS[name] + [f"run={run}", f"name={name}",
                                                   f"evaluate.baselines={baselines}"]
            summary = run_stages(load_config(CONFIG, overrides), ("distill", "evaluate"))
            table["variants"][name] = {"overrides": VARIANTS[name], "distill": summary["distill"],
                                       "distill_seconds": summary["distill_seconds"],
                                       "evaluate_seconds": summary["evaluate_seconds"],
                                       "eval": summary["evaluate"]}
            shutil.copy(os.path.join(run, "synthetic.safetensors"),
                        os.path.join(RESULTS, "fashion_mnist", f"{name}.safetensors"))
            table["command"] = "python benchmarks/fashion_mnist.py"
            table["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "device": "cpu"}
            table["seconds_total"] = time.perf_counter() - started
            with open(table_path, "w") as f:
                json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()

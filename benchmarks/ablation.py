"""IPC 10 ablations on Fashion-MNIST: checkpoints per iteration (t_m) and trajectory length.

t_m in 1, 2, 4, 8 at an equal coordinator budget (t_m x iterations = 200 synthetic-gradient
evaluations; t_m = 1 is the table's ipc10-matching run), and experts trained 1 epoch (the
table's base) against 2 epochs (the same experts continued, so the first epoch's checkpoints
are shared). Uses the base run of benchmarks/fashion_mnist.py and writes
benchmarks/results/ablation.json.

    .venv/bin/python benchmarks/ablation.py [--only tm2 tm4 tm8 epochs2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time

from fashion_mnist import CONFIG, CPU_PROFILE, RESULTS, link_base

from ead_dist.config import load_config
from ead_dist.run import run_stages
from ead_dist.runtime import ray_session

ABLATIONS = {
    "tm2": ["distill.checkpoints_per_iteration=2", "distill.iterations=100",
            "distill.save_every=50"],
    "tm4": ["distill.checkpoints_per_iteration=4", "distill.iterations=50",
            "distill.save_every=25"],
    "tm8": ["distill.checkpoints_per_iteration=8", "distill.iterations=25",
            "distill.save_every=25"],
    "epochs2": ["experts.epochs=2"],
}


def prepare_longer_experts(base_run: str, run: str) -> None:
    """Start the 2-epoch experts from the 1-epoch ones: their first epoch is identical."""
    if os.path.exists(os.path.join(run, "experts")):
        return
    shutil.copytree(os.path.join(base_run, "experts"), os.path.join(run, "experts"))
    # The copy is made under other settings (experts.epochs): it is this run's to record.
    for name in ("index.json", "fingerprint.json"):
        os.unlink(os.path.join(run, "experts", name))
    for expert in os.listdir(os.path.join(run, "experts")):
        if expert.startswith("expert-"):
            os.unlink(os.path.join(run, "experts", expert, "trajectory.json"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--only", nargs="*", default=list(ABLATIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    base_run = os.path.join(runs_dir, "fashion_mnist_base")
    out_path = os.path.join(RESULTS, "ablation.json")
    report = json.load(open(out_path)) if os.path.exists(out_path) else {"variants": {}}
    common = CPU_PROFILE + ["distill.ipc=10", "distill.objective=matching",
                            "evaluate.baselines=[]"]
    with ray_session(load_config(CONFIG).ray):
        for name in args.only:
            started = time.perf_counter()
            run = os.path.join(runs_dir, f"ablation-{name}")
            if name == "epochs2":
                prepare_longer_experts(base_run, run)
                stages = ("experts", "realgrad", "distill", "evaluate")
            else:
                link_base(base_run, run)
                stages = ("distill", "evaluate")
            overrides = common + ABLATIONS[name] + [f"run={run}", f"name=ablation-{name}"]
            summary = run_stages(load_config(CONFIG, overrides), stages)
            report["variants"][name] = {
                "overrides": ABLATIONS[name], "distill": summary["distill"],
                "eval": summary["evaluate"], "seconds": time.perf_counter() - started,
                "stage_seconds": {k: v for k, v in summary.items() if k.endswith("_seconds")},
            }
            if "experts" in summary:
                report["variants"][name]["experts"] = summary["experts"]
            report["command"] = "python benchmarks/ablation.py"
            report["common_overrides"] = common
            report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
            with open(out_path, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

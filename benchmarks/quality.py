"""The quality levers at Fashion-MNIST IPC 10 and 1 (issue: sets that beat the field).

Each base run trains experts once (and real terms when a variant needs them); each variant
links them into its own RUN and runs distill + evaluate there with the published protocol
(ConvNet-3 w128, DSA, 300 epochs, 3 runs). Reruns skip what is done, so an interrupted
benchmark resumes where it stopped. Results go to benchmarks/results/quality.json and the
sets to benchmarks/results/quality/.

    .venv/bin/python benchmarks/quality.py --only ipc10-trajectory-n10
    .venv/bin/python benchmarks/quality.py --list
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time

from ead_dist.alignment import REAL_TERM_OBJECTIVES
from ead_dist.config import load_config
from ead_dist.run import run_stages
from ead_dist.runtime import ray_session

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, "fashion_mnist_base.yaml")

# What 2 CPU cores allow. An epoch of Fashion-MNIST is 234 SGD steps of 256; save_every 78
# records three checkpoints per epoch.
EVALUATION = ["evaluate.models=[convnet]", "evaluate.runs=3", "evaluate.epochs=300",
              "evaluate.augmentation=dsa"]
BASES = {
    "dsa-experts": ["experts.count=2", "experts.epochs=2", "experts.save_every=78",
                    "experts.augmentation=dsa"],
    "plain-experts": ["experts.count=2", "experts.epochs=2", "experts.save_every=78",
                      "experts.augmentation=none"],
}
REAL_TERMS = ["realgrad.workers=2", "realgrad.checkpoints=8", "realgrad.real_samples=10000",
              "realgrad.p_batches=4", "realgrad.p_batch_size=256"]
TRAJECTORY = ["distill.objective=trajectory", "distill.augmentation=dsa",
              "distill.expert_span=3", "distill.max_start=3", "distill.save_every=25"]

VARIANTS = {
    # name: (base, overrides)
    "ipc10-trajectory-n10": ("dsa-experts", ["distill.ipc=10", "distill.iterations=200",
                                             "distill.student_steps=10", *TRAJECTORY]),
    # The same run stopped at 100 iterations (iteration i's draws depend on (seed, i) only, so
    # its states are those of the 200-iteration run): about 21 s per iteration on 2 cores.
    "ipc10-trajectory-n10-it100": ("dsa-experts", ["distill.ipc=10", "distill.iterations=100",
                                                   "distill.student_steps=10", *TRAJECTORY]),
    "ipc10-matching-dsa-experts": ("dsa-experts", ["distill.ipc=10", "distill.iterations=200",
                                                   "distill.objective=matching"]),
    "ipc10-trajectory-n10-plain-experts": ("plain-experts", [
        "distill.ipc=10", "distill.iterations=200", "distill.student_steps=10", *TRAJECTORY]),
    "ipc1-trajectory-n10": ("dsa-experts", ["distill.ipc=1", "distill.iterations=300",
                                            "distill.student_steps=10", *TRAJECTORY]),
    "ipc10-trajectory-n10-labels": ("dsa-experts", [
        "distill.ipc=10", "distill.iterations=200", "distill.student_steps=10", *TRAJECTORY,
        "distill.label_init=ensemble", "distill.init_images=correct"]),
    "ipc10-matching-labels": ("dsa-experts", [
        "distill.ipc=10", "distill.iterations=200", "distill.objective=matching",
        "distill.label_init=ensemble", "distill.init_images=correct"]),
    # Multi-formation (IDC): 10 stored images per class, each 4 training images at 14 x 14.
    "ipc10-matching-f2": ("dsa-experts", ["distill.ipc=10", "distill.iterations=200",
                                          "distill.objective=matching", "distill.formation=2"]),
    "ipc1-matching": ("dsa-experts", ["distill.ipc=1", "distill.iterations=200",
                                      "distill.objective=matching"]),
    "ipc1-matching-f2": ("dsa-experts", ["distill.ipc=1", "distill.iterations=200",
                                         "distill.objective=matching", "distill.formation=2"]),
    # The one-GPU IPC 1 winner's shape (trajectory with formation 2) at this machine's size.
    "ipc1-trajectory-n10-f2": ("dsa-experts", ["distill.ipc=1", "distill.iterations=200",
                                               "distill.student_steps=10", *TRAJECTORY,
                                               "distill.formation=2"]),
    # The same run taken on to 600 iterations (distill.iterations is all that differs, so a
    # copy of the 200-iteration run's RUN/distill goes on from its last state to the same set).
    "ipc1-trajectory-n10-f2-it600": ("dsa-experts", ["distill.ipc=1", "distill.iterations=600",
                                                     "distill.student_steps=10", *TRAJECTORY,
                                                     "distill.formation=2"]),
}
# The settings that make the initial set: variants that share them share the init baseline.
INIT_FIELDS = ("distill.ipc=", "distill.label_init=", "distill.init_images=",
               "distill.label_temperature=", "distill.seed=", "distill.formation=")


def link_base(base_run: str, run: str) -> None:
    os.makedirs(run, exist_ok=True)
    for stage in ("experts", "realgrad"):
        target = os.path.join(run, stage)
        if os.path.exists(os.path.join(base_run, stage)) and not os.path.lexists(target):
            os.symlink(os.path.join(base_run, stage), target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/quality")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run that change no result (ray.enabled=false)")
    args = parser.parse_args()
    if args.list:
        for name, (base, overrides) in VARIANTS.items():
            print(f"{name:40s} {base:14s} {' '.join(overrides)}")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    os.makedirs(os.path.join(RESULTS, "quality"), exist_ok=True)
    table_path = os.path.join(RESULTS, "quality.json")
    ray_config = load_config(CONFIG, args.set).ray
    with ray_session(ray_config, enabled=ray_config.enabled):
        for name in args.only:
            table = load_table(table_path)
            base, overrides = VARIANTS[name]
            base_run = os.path.join(runs_dir, base)
            base_overrides = BASES[base] + REAL_TERMS + EVALUATION + [f"run={base_run}"]
            needs_terms = any(o == f"distill.objective={k}" for o in overrides
                              for k in REAL_TERM_OBJECTIVES)
            stages = ("ingest", "experts") + (("realgrad",) if needs_terms else ())
            done_before = {stage for stage in stages
                           if os.path.exists(os.path.join(base_run, stage, "fingerprint.json"))}
            summary = run_stages(load_config(CONFIG, base_overrides + args.set
                                             + ["distill.objective=matching"]), stages)
            record = table["bases"].setdefault(base, {"overrides": BASES[base]})
            # a stage that reused its outputs took ~0 s: keep the time of the run that made them
            record.update({k: v for k, v in summary.items()
                           if k.startswith(("experts", "realgrad"))
                           and k.removesuffix("_seconds") not in done_before})
            run = os.path.join(runs_dir, name)
            link_base(base_run, run)
            init = sorted(o for o in overrides if o.startswith(INIT_FIELDS))
            seen = any(v["base"] == base and init == sorted(o for o in v["overrides"]
                                                            if o.startswith(INIT_FIELDS))
                       and "init" in v["eval"]["results"] for v in table["variants"].values())
            baselines = "[]" if seen else "[random_real, init]"
            started = time.perf_counter()
            summary = run_stages(load_config(CONFIG, BASES[base] + REAL_TERMS + EVALUATION
                                             + overrides + [f"run={run}", f"name={name}",
                                                            f"evaluate.baselines={baselines}"]
                                             + args.set),
                                 ("distill", "evaluate"))
            variant = {
                "base": base, "overrides": overrides, "distill": summary["distill"],
                "distill_seconds": summary["distill_seconds"],
                "evaluate_seconds": summary["evaluate_seconds"], "eval": summary["evaluate"],
                "seconds": time.perf_counter() - started,
                "command": " ".join(["python benchmarks/quality.py --only", name]
                                    + (["--set", *args.set] if args.set else []))}
            shutil.copy(os.path.join(run, "synthetic.safetensors"),
                        os.path.join(RESULTS, "quality", f"{name}.safetensors"))
            publish_variant(table_path, base, record, name, variant)


def load_table(path: str) -> dict:
    table = json.load(open(path)) if os.path.exists(path) else {}
    table.setdefault("bases", {})
    table.setdefault("variants", {})
    return table


def publish_variant(path: str, base: str, base_record: dict, name: str, variant: dict) -> None:
    """Merge one variant into the file as it is now (another quality.py may have written it
    since this one started), replacing the file whole."""
    table = load_table(path)
    table["bases"][base] = base_record
    table["variants"][name] = variant
    table["command"] = "python benchmarks/quality.py"
    table["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "device": "cpu"}
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()

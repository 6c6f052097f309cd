"""Re-evaluate committed synthetic sets from scratch: fresh networks trained on each set file.

An independent check of a figure: it reads only the set file and the real test split, and
trains and tests fresh networks with the evaluation stage itself (``ead_dist.stages.evaluate``).
Each job is ``SET_NAME=PATH:MODELS:EPOCHS``, e.g.
``ipc10=benchmarks/results/fashion_mnist/gpu_levers-ipc10-late.safetensors:convnet,mlp:300``.

    python benchmarks/reevaluate.py --source /usr/share/datasets/fashion-mnist \\
        --job ipc10=benchmarks/results/fashion_mnist/gpu_levers-ipc10-late.safetensors:convnet:1000

Results: ``OUT/NAME.json`` (``--name``, default ``reevaluate``; one entry per job, written
after each job). ``--set`` overrides apply to every job, e.g. ``--set evaluate.lr=0.034 --set
evaluate.lr_schedule=tenth`` for MTT's evaluation (the learned step size, lr / 10 at half).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time

import torch

from ead_dist import formation, storage
from ead_dist.config import load_config
from ead_dist.run import run_stages

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "fashion_mnist_base.yaml")


def parse_job(text: str) -> tuple[str, str, list[str], int]:
    name, _, rest = text.partition("=")
    path, models, epochs = rest.rsplit(":", 2)
    if not (name and path and models and epochs.isdigit()):
        raise SystemExit(f"--job {text!r}: expected NAME=PATH:MODEL[,MODEL]:EPOCHS")
    return name, path, models.split(","), int(epochs)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the real test split comes from, how many runs, the runs folder and overrides."""
    parser.add_argument("--source", default="", help="folder with Fashion-MNIST's IDX .gz files")
    parser.add_argument("--data", default="", help="an already ingested DATA url to reuse")
    parser.add_argument("--runs", type=int, default=3, help="evaluation runs per set and model")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override, e.g. ray.enabled=false")


def prepare(args, runs_dir: str) -> list[str]:
    """The overrides every evaluation shares; ingests the data first if they are not there."""
    common = args.overrides + [f"data.url={args.data or os.path.join(runs_dir, 'data')}",
                               "evaluate.baselines=[]", f"evaluate.runs={args.runs}"]
    if args.source:
        common.append(f"data.source={os.path.abspath(args.source)}")
    run_stages(load_config(CONFIG, common + [f"run={os.path.join(runs_dir, 'base')}"]),
               ("ingest",))
    return common


def machine() -> dict:
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(), "torch": torch.__version__}


def evaluate_file(common: list[str], run: str, path: str, models: list[str],
                  epochs: int) -> dict:
    """Fresh networks trained on the set file at ``path`` in the run folder ``run``."""
    tensors = storage.load_tensors(path)[0]
    stored = len(tensors.get("stored_images", tensors["images"]))  # a formation's budget
    ipc = stored // tensors["labels"].shape[1]
    factor = formation.factor_of(stored, len(tensors["images"]))
    os.makedirs(run, exist_ok=True)
    shutil.copy(path, os.path.join(run, "synthetic.safetensors"))
    with open(path, "rb") as f:  # which file was evaluated, whatever name it has later
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    started = time.perf_counter()
    summary = run_stages(load_config(CONFIG, common + [
        f"run={run}", f"distill.ipc={ipc}", f"distill.formation={factor}",
        f"evaluate.epochs={epochs}", f"evaluate.models=[{','.join(models)}]"]), ("evaluate",))
    return {"set": path, "sha256": sha256, "ipc": ipc, "formation": factor, "epochs": epochs,
            "seconds": round(time.perf_counter() - started, 1),
            "results": summary["evaluate"]["results"]["synthetic"],
            "protocol": summary["evaluate"]["protocol"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", action="append", required=True, help="NAME=PATH:MODELS:EPOCHS")
    parser.add_argument("--runs-dir", default="runs/reevaluate")
    parser.add_argument("--name", default="reevaluate", help="the JSON is OUT/NAME.json")
    add_data_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    jobs = [parse_job(j) for j in args.job]
    runs_dir = os.path.abspath(args.runs_dir)
    common = prepare(args, runs_dir)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "overrides": args.overrides, **machine(), "jobs": {}}
    os.makedirs(args.out, exist_ok=True)
    for name, path, models, epochs in jobs:
        report["jobs"][f"{name}-{epochs}"] = evaluate_file(
            common, os.path.join(runs_dir, f"{name}-{epochs}"), path, models, epochs)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""Fashion-MNIST at GPU size, in one process per distillation on one GPU (no Ray needed).

The GPU machines this project is lent have PyTorch but neither Ray nor WebDataset, and reach
no network, so this runs every stage with ``ray.enabled: false``; ``gpu_fashion_mnist.sh``
sets up the rest. Experts are shared by every job; each job (an IPC and its iteration count)
distils with the trajectory objective and is evaluated with the published protocol
(ConvNet-3, DSA, 300 epochs) beside random real images and the initial set.

One distillation step is bound by kernel launches, not by the GPU (IPC 1 and IPC 10 took
0.29 and 0.32 s per iteration on an H100), so ``--parallel`` runs the jobs at once, one process
each. Results: ``OUT/NAME.json`` (merged) and ``OUT/NAME-ipcN.json`` plus the sets
``OUT/NAME-ipcN.safetensors``, each written as soon as its stage ends, so a call cut short
still brings back what finished.

    python benchmarks/gpu_fashion_mnist.py --source DIR_WITH_IDX_GZ --out benchmarks/results
    python benchmarks/gpu_fashion_mnist.py --job 10:800 --job 1:800 --parallel --name NAME ...
    python benchmarks/gpu_fashion_mnist.py --job 10:800 --job 10:800:late --mtt-eval ...
    python benchmarks/gpu_fashion_mnist.py --set experts.epochs=8 --job 10:700:later ...

A job is ``IPC:ITERATIONS`` or ``IPC:ITERATIONS:TAG``, TAG one of ``TAGS`` or several joined
by ``+`` (``late+n30``; settings over ``GPU``; the job's run, JSON and set are named
``ipcN-TAG`` with ``-`` for ``+``). ``--set KEY=VALUE`` changes a setting for the whole call,
the shared experts included. ``--mtt-eval`` evaluates each set
a second time the way MTT does (``evaluate.lr: learned``, lr / 10 at half; ``eval_mtt`` in the
job's JSON).
    python benchmarks/gpu_fashion_mnist.py --smoke ...   # a minutes-long CPU check of the path
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

from ead_dist.config import load_config
from ead_dist.run import run_stages

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "fashion_mnist_base.yaml")

GPU = ["experts.count=10", "experts.epochs=4", "experts.save_every=78",
       "experts.augmentation=dsa", "ray.enabled=false",
       "distill.objective=trajectory", "distill.augmentation=dsa", "distill.student_steps=20",
       "distill.expert_span=3", "distill.max_start=6", "distill.save_every=100",
       "evaluate.models=[convnet]", "evaluate.runs=3", "evaluate.epochs=300"]
# Levers for one GPU call beside the default: matching later stretches of the experts (DATM:
# later for larger IPC), more student steps (MTT's CIFAR-10 IPC 10 uses 30), multi-formation
# (IDC; on 2 cores it lifted IPC 1 matching to 71.45 %, benchmarks/quality.py).
TAGS = {"late": ["distill.max_start=9"], "n30": ["distill.student_steps=30"],
        "f2": ["distill.formation=2"],
        # starts in the first 6 epochs: for experts trained longer (--set experts.epochs=8)
        "later": ["distill.max_start=18"],
        # each student step on 20 of the images (the 2-core recipe,
        # pipelines/fashion_mnist_ipc10_2cores.yaml): does it cost accuracy at 10 experts?
        "sb20": ["distill.student_batch_size=20"]}
MTT_EVAL = ["evaluate.lr=learned", "evaluate.lr_schedule=tenth", "evaluate.baselines=[]"]
JOBS = ["10:500", "1:500"]  # the first call's jobs (gpu_fashion_mnist.json); IPC 10 first
SMOKE = ["experts.count=1", "experts.epochs=1", "experts.train_samples=1024",
         "experts.save_every=4", "distill.student_steps=2", "distill.expert_span=1",
         "distill.max_start=2", "model.width=16", "evaluate.runs=1", "evaluate.epochs=2",
         "evaluate.test_samples=500"]


def parse_job(text: str) -> tuple[int, int, str]:
    parts = text.split(":")
    try:
        ipc, iterations = int(parts[0]), int(parts[1])
        tag = parts[2] if len(parts) == 3 else ""
    except (ValueError, IndexError):
        raise SystemExit(f"--job {text!r}: expected IPC:ITERATIONS[:TAG], e.g. 10:800") from None
    unknown = [lever for lever in tag.split("+") if tag and lever not in TAGS]
    if len(parts) > 3 or unknown:
        raise SystemExit(f"--job {text!r}: TAG must be one of {', '.join(TAGS)}, "
                         "or several joined by '+'")
    return ipc, iterations, tag


def job_name(ipc: int, tag: str) -> str:
    """``ipc10-late-n30`` for tag ``late+n30``: the device tool brings back no file whose name
    holds a ``+`` (gpu_levers2 lost two sets that way)."""
    return f"ipc{ipc}" + (f"-{tag.replace('+', '-')}" if tag else "")


def write_json(path: str, report: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def run_job(args, common: list[str], ipc: int, iterations: int, tag: str = "") -> dict:
    """Distil and evaluate one IPC from the shared experts; its JSON is written per stage."""
    runs_dir = os.path.abspath(args.runs_dir)
    name = job_name(ipc, tag)
    run = os.path.join(runs_dir, name)
    os.makedirs(run, exist_ok=True)
    if not os.path.lexists(os.path.join(run, "experts")):
        os.symlink(os.path.join(runs_dir, "base", "experts"), os.path.join(run, "experts"))
    levers = [override for lever in tag.split("+") if tag for override in TAGS[lever]]
    overrides = common + levers + [
        f"run={run}", f"distill.ipc={ipc}",
        f"distill.iterations={2 if args.smoke else iterations}"]
    config = load_config(CONFIG, overrides)
    path = os.path.join(args.out, f"{args.name}-{name}.json")
    summary = run_stages(config, ("distill",))
    report = {"ipc": ipc, "tag": tag, "overrides": overrides, "distill": summary["distill"],
              "distill_seconds": summary["distill_seconds"]}
    shutil.copy(os.path.join(run, "synthetic.safetensors"),
                os.path.join(args.out, f"{args.name}-{name}.safetensors"))
    write_json(path, report)
    summary = run_stages(config, ("evaluate",))
    report.update(evaluate_seconds=summary["evaluate_seconds"], eval=summary["evaluate"])
    write_json(path, report)
    if args.mtt_eval:  # the same set, evaluated as MTT evaluates (a run of its own)
        again = os.path.join(run, "eval-mtt")
        os.makedirs(again, exist_ok=True)
        shutil.copy(os.path.join(run, "synthetic.safetensors"), again)
        summary = run_stages(load_config(CONFIG, overrides + MTT_EVAL + [f"run={again}"]),
                             ("evaluate",))
        report["eval_mtt"] = summary["evaluate"]
        write_json(path, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="", help="folder with Fashion-MNIST's IDX .gz files")
    parser.add_argument("--data", default="", help="an already ingested DATA url to reuse")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--runs-dir", default="runs/gpu")
    parser.add_argument("--name", default="gpu_fashion_mnist",
                        help="JSON name; the sets are NAME-ipcN.safetensors")
    parser.add_argument("--job", action="append", default=None, metavar="IPC:ITERATIONS[:TAG]",
                        help=f"one distillation (repeatable; default {' '.join(JOBS)})")
    parser.add_argument("--mtt-eval", action="store_true",
                        help="also evaluate each set with its learned lr, lr / 10 at half")
    parser.add_argument("--parallel", action="store_true",
                        help="run the jobs at once, one process each, after the experts")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # a --parallel child
    parser.add_argument("--smoke", action="store_true", help="tiny settings, any device")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a setting over GPU for the whole call, experts included "
                             "(e.g. experts.epochs=8); repeatable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    common = GPU + (SMOKE if args.smoke else []) + args.extra + [
        f"data.url={args.data or os.path.join(runs_dir, 'data')}"]
    if args.source:
        common.append(f"data.source={os.path.abspath(args.source)}")
    os.makedirs(args.out, exist_ok=True)
    if args.only:
        run_job(args, common, *parse_job(args.only))
        return
    jobs = [parse_job(text) for text in (args.job or JOBS)]
    started = time.perf_counter()
    # the .sh wrapper (the GPU machine) says so; run directly (this CPU) it is the script itself
    launcher = os.environ.get("EAD_BENCH_LAUNCHER", "python benchmarks/gpu_fashion_mnist.py")
    command = launcher + " " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "overrides": common, "parallel": args.parallel,
              "jobs": [f"{ipc}:{iterations}" + (f":{tag}" if tag else "")
                       for ipc, iterations, tag in jobs],
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "platform": platform.platform(), "torch": torch.__version__, "ipc": {}}

    def save() -> None:  # after every stage, so a run cut short still reports what it did
        report["seconds_total"] = round(time.perf_counter() - started, 1)
        write_json(os.path.join(args.out, f"{args.name}.json"), report)

    summary = run_stages(load_config(CONFIG, common + [f"run={os.path.join(runs_dir, 'base')}"]),
                         ("ingest", "experts"))
    report["experts"] = {"seconds": summary["experts_seconds"],
                         "test_accuracy": summary["experts"]["test_accuracy"]}
    save()
    if not args.parallel:
        for ipc, iterations, tag in jobs:
            report["ipc"][job_name(ipc, tag)] = run_job(args, common, ipc, iterations, tag)
            save()
        return
    passed = [a for a in sys.argv[1:] if a not in ("--parallel",)]
    children = {job_name(ipc, tag): subprocess.Popen(
                    [sys.executable, __file__, *passed, "--only",
                     f"{ipc}:{iterations}" + (f":{tag}" if tag else "")])
                for ipc, iterations, tag in jobs}
    failed = []
    for name, child in children.items():
        if child.wait() != 0:
            failed.append(name)
        part = os.path.join(args.out, f"{args.name}-{name}.json")
        if os.path.exists(part):
            with open(part) as f:
                report["ipc"][name] = json.load(f)
        save()
    if failed:
        raise SystemExit(f"jobs {failed} failed; see their logs above")


if __name__ == "__main__":
    main()

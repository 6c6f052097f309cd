"""The field in our harness: Random, Herding, DM and DC beside EAD on real Fashion-MNIST.

Every method distils from the same base run (the quality benchmark's ``dsa-experts``: 2
experts x 2 epochs with DSA; herding embeds with expert 0's final checkpoint) and is evaluated
with the same protocol (ConvNet-3 w128, DSA, 300 epochs, 3 runs) on this machine. The EAD rows
come from ``benchmarks/results/quality.json`` (same base, same protocol; its command is
recorded there), so this script does not recompute them. Reruns skip what is done.

    .venv/bin/python benchmarks/methods.py                 # every method, IPC 1 and 10
    .venv/bin/python benchmarks/methods.py --only ipc10-dm --scale 0.5
    .venv/bin/python benchmarks/methods.py --report        # table + plot from the JSON only

Writes ``benchmarks/results/methods.json``, ``methods.md`` (the table) and ``methods.png``
(test accuracy against distillation wall time, through a method's intermediate states where
``benchmarks/intermediate.py --name ROW`` evaluated them), and the sets to
``benchmarks/results/methods/``.
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
from quality import BASES, CONFIG, EVALUATION, REAL_TERMS, RESULTS, link_base

BASE = "dsa-experts"
# name: (ipc, method, iterations). DM's paper runs 20,000 iterations and DC's 1,000 (IPC 10:
# 10 outer x 50 inner loops each). Here each gets about the wall time of EAD's IPC 10
# `matching` run on the same base (real terms 9 min + 200 iterations 9 min on 2 cores): DM
# costs about 10-27 s per iteration on 2 shared cores (10 classes x 256 real images through a
# fresh ConvNet-3 w128 with DSA), DC far more.
METHODS = {
    "ipc10-random": (10, "random", 0),
    "ipc10-dm": (10, "dm", 60),
    "ipc1-dm": (1, "dm", 60),
    "ipc10-herding": (10, "herding", 0),
    "ipc1-herding": (1, "herding", 0),
    "ipc1-random": (1, "random", 0),
    "ipc10-dc": (10, "dc", 4),
    "ipc1-dc": (1, "dc", 20),
    # The same budget spent as multi-formation (4 training images of 14 x 14 per stored image),
    # beside EAD's IPC 1 set with formation 2.
    "ipc1-random-f2": (1, "random", 0, ["distill.formation=2"]),
    "ipc1-herding-f2": (1, "herding", 0, ["distill.formation=2"]),
    "ipc1-dm-f2": (1, "dm", 60, ["distill.formation=2"]),
    # The same DM run taken further: its states every 10 iterations give the curve (its first 60
    # iterations are ipc1-dm-f2's: iteration i's draws depend on (seed, i) only).
    "ipc1-dm-f2-it200": (1, "dm", 200, ["distill.formation=2"]),
}
# EAD's rows: quality.json variants on the same base and protocol.
EAD_ROWS = {"ipc10-ead-matching": "ipc10-matching-dsa-experts",
            "ipc1-ead-matching-f2": "ipc1-matching-f2",
            "ipc1-ead-trajectory-f2": "ipc1-trajectory-n10-f2",
            "ipc10-ead-trajectory": "ipc10-trajectory-n10-it100",
            "ipc1-ead-trajectory": "ipc1-trajectory-n10"}
# The IPC 10 trajectory set resumed the states of a longer run; its distill wall time comes from
# those state files' timestamps (quality.json's note on that variant): 100 iterations, 35.75 min.
DISTILL_SECONDS_FROM_NOTE = {"ipc10-trajectory-n10-it100": 35.75 * 60}
PUBLISHED = {  # Fashion-MNIST, ConvNet-3, test accuracy % at IPC 1 / 10, from the papers
    "Random": (51.4, 73.8), "DC": (70.5, 82.3), "DSA": (70.6, 84.6), "MTT": (75.1, 87.2),
    "KIP": (73.5, 86.8), "FRePo": (75.6, 86.2), "RTP (factorised)": (88.5, 90.0),
    "EAD (seed paper)": (None, 86.7), "whole set": (93.5, 93.5)}
# DM's paper reports no Fashion-MNIST figures.


def labelled(method: str, overrides: list[str]) -> str:
    """The table's name of a method run with these overrides: its formation, when > 1."""
    factor = next((int(o.split("=")[1]) for o in overrides
                   if o.startswith("distill.formation=")), 1)
    return method + (f" (formation {factor})" if factor > 1 else "")


def run_method(name: str, runs_dir: str, scale: float, extra: list[str]) -> dict:
    ipc, method, iterations, *levers = METHODS[name]
    levers = (levers[0] if levers else []) + extra
    iterations = max(1, round(iterations * scale)) if iterations else 1
    base_run = os.path.join(runs_dir, BASE)
    run_stages(load_config(CONFIG, BASES[BASE] + REAL_TERMS + EVALUATION + extra
                           + [f"run={base_run}", "distill.objective=matching"]),
               ("ingest", "experts"))
    run = os.path.join(runs_dir, name)
    link_base(base_run, run)
    started = time.perf_counter()
    summary = run_stages(load_config(CONFIG, BASES[BASE] + EVALUATION + [
        f"run={run}", f"name={name}", f"distill.ipc={ipc}", f"distill.method={method}",
        f"distill.iterations={iterations}", "distill.save_every=10",
        "evaluate.baselines=[]"] + levers), ("distill", "evaluate"))
    os.makedirs(os.path.join(RESULTS, "methods"), exist_ok=True)
    shutil.copy(os.path.join(run, "synthetic.safetensors"),
                os.path.join(RESULTS, "methods", f"{name}.safetensors"))
    synthetic = summary["evaluate"]["results"]["synthetic"]["convnet"]
    return {"ipc": ipc, "method": labelled(method, levers), "iterations": iterations,
            "overrides": levers,
            "command": " ".join(["python benchmarks/methods.py --only", name]
                                + [f"--set {o}" for o in extra]),
            "distill": summary["distill"], "distill_seconds": summary["distill_seconds"],
            "evaluate_seconds": summary["evaluate_seconds"], "accuracy": synthetic,
            "seconds": round(time.perf_counter() - started, 1)}


def ead_rows() -> dict:
    quality = json.load(open(os.path.join(RESULTS, "quality.json")))
    rows = {}
    for name, variant in EAD_ROWS.items():
        if variant not in quality["variants"]:
            continue
        v = quality["variants"][variant]
        matching = "matching" in name
        rows[name] = {"ipc": v["distill"].get("ipc") or int(name.split("-")[0][3:]),
                      "method": labelled("ead-" + ("matching" if matching else "trajectory"),
                                         v["overrides"]),
                      "iterations": v["distill"]["iterations"], "distill": v["distill"],
                      "distill_seconds": DISTILL_SECONDS_FROM_NOTE.get(variant,
                                                                       v["distill_seconds"]),
                      # the real-term pass (realgrad) that only the one-step objectives need
                      "real_terms_seconds": quality["bases"][v["base"]]["realgrad_seconds"]
                      if matching else 0,
                      "accuracy": v["eval"]["results"]["synthetic"]["convnet"],
                      "from": f"benchmarks/results/quality.json variant {variant}"}
    return rows


def intermediate_points(name: str, real_terms_seconds: float) -> list[tuple]:
    """(wall s, acc %, std %) of the run's evaluated intermediate states, from
    ``intermediate_NAME.json`` (``benchmarks/intermediate.py --name NAME``) when it exists."""
    path = os.path.join(RESULTS, f"intermediate_{name}.json")
    if not os.path.exists(path):
        return []
    points = []
    for point in json.load(open(path))["points"].values():
        acc = point["results"]["convnet"]
        if point.get("distill_seconds") is not None:
            points.append((max(point["distill_seconds"] + real_terms_seconds, 1),
                           100 * acc["mean"], 100 * acc["std"]))
    return points


def report(table: dict) -> None:
    rows = dict(table["methods"], **ead_rows())
    lines = ["| method | IPC | test acc % (ConvNet-3, DSA, 300 ep, 3 runs) | distill wall s "
             "| real-term pass s | iterations | peak MiB | reads D in its loop |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in sorted(rows.items(), key=lambda kv: (kv[1]["ipc"], kv[0])):
        acc = row["accuracy"]
        distill = row["distill"]
        reads = distill.get("reads_real_data_in_loop")
        if reads is None:
            reads = False  # EAD's coordinator reads precomputed terms or checkpoints only
        lines.append(f"| {row['method']} | {row['ipc']} | {100 * acc['mean']:.2f} ± "
                     f"{100 * acc['std']:.2f} | {row['distill_seconds']:.0f} | "
                     f"{row.get('real_terms_seconds', 0):.0f} | {row['iterations']} | {distill.get('peak_memory_mb') or 0:.0f} | "
                     f"{'yes' if reads else 'no'} |")
    lines += ["", "Published (ConvNet-3, GPU, the papers' own budgets), IPC 1 / IPC 10: "
              + "; ".join(f"{k} {a if a is not None else '-'} / {b}"
                          for k, (a, b) in PUBLISHED.items()) + ". DM: no Fashion-MNIST figure."]
    with open(os.path.join(RESULTS, "methods.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, ipc in zip(axes, (1, 10)):
        for name, row in rows.items():
            if row["ipc"] != ipc:
                continue
            wall = max(row["distill_seconds"] + row.get("real_terms_seconds", 0), 1)
            points = intermediate_points(name, row.get("real_terms_seconds", 0))
            points.append((wall, 100 * row["accuracy"]["mean"], 100 * row["accuracy"]["std"]))
            x, y, err = zip(*sorted(points))
            axis.errorbar(x, y, yerr=err, fmt="o-" if len(points) > 1 else "o")
            axis.annotate(row["method"], (wall, 100 * row["accuracy"]["mean"]), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("distillation + real-term wall time, s (2 CPU cores)")
        axis.set_ylabel("test accuracy %")
        axis.set_title(f"Fashion-MNIST IPC {ipc}")
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, "methods.png"), dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/quality")
    parser.add_argument("--only", nargs="*", default=list(METHODS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the iterations")
    parser.add_argument("--report", action="store_true", help="only write the table and plot")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for every run, e.g. ray.enabled=false")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = os.path.join(RESULTS, "methods.json")
    table = json.load(open(path)) if os.path.exists(path) else {"methods": {}}
    if not args.report:
        runs_dir = os.path.abspath(args.runs_dir)
        ray_config = load_config(CONFIG, args.overrides).ray
        with ray_session(ray_config, enabled=ray_config.enabled):
            for name in args.only:
                table["methods"][name] = run_method(name, runs_dir, args.scale, args.overrides)
                table["command"] = "python benchmarks/methods.py"
                table["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
                with open(path, "w") as f:
                    json.dump(table, f, indent=2)
    report(table)


if __name__ == "__main__":
    main()

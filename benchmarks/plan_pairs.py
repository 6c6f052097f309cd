"""``ead-dist plan`` against a real image-text run: predicted and measured time and peak memory.

The config is ``benchmarks/image_text.py``'s (the Fashion-MNIST caption scenes, clip-tiny, 2
experts of 4 epochs, N = 100 pairs, 100 coordinator iterations, 3 evaluation runs, Ray off) with
``--objective`` (``matching``: realgrad's contrastive real terms; ``trajectory``: none). For each
objective, in this order: the plan (``calibrate.plan_run``, its calibrations in spawned
processes), then every stage of the run, each in a fresh spawned process so that its recorded
peak is its own, as each calibration's was. The trajectory run reuses the matching run's
experts (linked), so its experts row is not measured again. Nothing else should run on the
machine: the times are the point.

Writes ``--out`` (default ``benchmarks/results/plan_pairs_quiet.json``) after each objective,
with the commands, the machine and its load average before and after each step.

    .venv/bin/python benchmarks/plan_pairs.py
    .venv/bin/python benchmarks/plan_pairs.py --replan   # a new plan beside the same run
    .venv/bin/python benchmarks/plan_pairs.py --scenes 2000 --runs-dir /tmp/pp --out /tmp/pp.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from image_text import COMMON, CONFIG, make_data

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "plan_pairs_quiet.json")
SETTINGS = COMMON + ["image_text.pairs=100"]
log = logging.getLogger("plan_pairs")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stage_in_fresh_process(overrides: list[str], stage: str) -> dict:
    """One stage of the run in this (spawned) process: its wall time and its recorded peak."""
    from ead_dist import storage
    from ead_dist.config import load_config
    from ead_dist.run import run_stages

    config = load_config(CONFIG, overrides)
    summary = run_stages(config, (stage,))
    if stage == "experts":
        index = storage.read_json(storage.join(config.run, "experts", "index.json"))
        peak = max(e["peak_memory_mb"] for e in index["experts"])
    elif stage == "realgrad":
        peak = summary["realgrad"]["peak_memory_mb_rank0"]
    else:
        peak = summary[stage]["peak_memory_mb"]
    return {"seconds": summary[stage + "_seconds"], "peak_mb": peak}


def measure(objective: str, data: str, runs_dir: str, base: str | None,
            kept: dict | None = None) -> dict:
    from ead_dist.calibrate import plan_run
    from ead_dist.config import load_config

    run = os.path.join(runs_dir, objective)
    overrides = SETTINGS + [f"distill.objective={objective}", f"data.url={data}",
                            f"data.source={data}", f"run={run}", f"name=plan-pairs-{objective}"]
    stages = ["experts", "realgrad", "distill", "evaluate"]
    if objective == "trajectory":
        stages.remove("realgrad")
    if base is not None:  # the experts of an earlier objective's run
        os.makedirs(run, exist_ok=True)
        if not os.path.exists(os.path.join(run, "experts")):
            os.symlink(os.path.join(base, "experts"), os.path.join(run, "experts"))
        stages.remove("experts")
    record = {"overrides": overrides, "load_before_plan": _load()}
    started = time.perf_counter()
    # Planned as before any stage ran (a RUN that never exists: no initial pairs drawn yet)
    fresh = overrides + [f"run={run}-unstarted"]
    record["plan"] = {p.stage: p.to_dict() for p in plan_run(load_config(CONFIG, fresh))}
    record["plan_seconds"] = round(time.perf_counter() - started, 1)
    if kept is not None and kept.get("overrides") == overrides:
        # --replan: the stages ran already (they would skip themselves now): keep their figures
        record["measured"] = kept["measured"]
        record["measured_before_replan"] = True
        return record
    record["measured"] = {}
    context = multiprocessing.get_context("spawn")
    for stage in stages:
        before = _load()
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            measured = pool.submit(stage_in_fresh_process, overrides, stage).result()
        record["measured"][stage] = dict(measured, load_before=before, load_after=_load())
        predicted = record["plan"][stage]
        log.info("%s %s: predicted %.0f s / %.0f MiB, measured %.0f s / %.0f MiB", objective,
                 stage, predicted["seconds"], predicted["peak_mb"] or 0, measured["seconds"],
                 measured["peak_mb"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--runs-dir", default="runs/plan_pairs")
    parser.add_argument("--objectives", nargs="+", default=["matching", "trajectory"],
                        choices=["matching", "trajectory"])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replan", action="store_true",
                        help="plan again, keeping the stages measured in --out (same settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    runs_dir = os.path.abspath(args.runs_dir)
    data = make_data(os.path.join(runs_dir, "data"), args.scenes)
    report = {"benchmark": "plan_pairs",
              "command": " ".join([".venv/bin/python", "benchmarks/plan_pairs.py",
                                   *map(shlex.quote, sys.argv[1:])]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "load_average_at_start": _load()},
              "scenes": args.scenes, "config": "pipelines/scenes_tiny.yaml", "results": {}}
    previous = {}
    if args.replan:
        with open(args.out) as f:
            earlier = json.load(f)
        previous, report["measured_by"] = earlier["results"], earlier["command"]
    base = None
    for objective in args.objectives:
        report["results"][objective] = measure(objective, data, runs_dir, base,
                                               previous.get(objective))
        base = base or os.path.join(runs_dir, objective)
        report["machine"]["load_average_at_end"] = _load()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()

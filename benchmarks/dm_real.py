"""DM's real side in its loop against in the realgrad pass, on real Fashion-MNIST (issue #14).

DM (distill.method dm, IPC 10, ConvNet-3 w128, DSA, 256 real images per class per iteration)
runs ``--iterations`` iterations twice from the same initial set: ``dm_real: loop`` (the
training split in the coordinator's memory, embedded every iteration) and ``dm_real: realgrad``
(the realgrad pass replays every iteration's draws over the shards with ``--workers`` Ray Train
workers; the loop then reads no real data). It reports each way's wall time (the pass and the
loop), the loop's peak memory, and how far apart the two final sets are (they replay the same
draws, so only float rounding separates them). The experts come from the methods benchmark's
base run (``runs/quality/dsa-experts``; made first if missing). Writes
benchmarks/results/dm_real.json.

    .venv/bin/python benchmarks/dm_real.py [--iterations 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

import torch

from quality import BASES, CONFIG, RESULTS

from ead_dist.config import load_config
from ead_dist.run import run_stages
from ead_dist.runtime import ray_session
from ead_dist.synthetic import load_synthetic

BASE = "dsa-experts"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/quality")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    base_run = os.path.join(runs_dir, BASE)
    common = BASES[BASE] + ["distill.ipc=10", "distill.method=dm",
                            f"distill.iterations={args.iterations}", "distill.save_every=100",
                            f"realgrad.workers={args.workers}"]
    report = {"benchmark": "dm_real", "command": "python benchmarks/dm_real.py "
              + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__,
                          "load_average_at_start": os.getloadavg()[0]},
              "settings": {"ipc": 10, "iterations": args.iterations, "workers": args.workers,
                           "real_batch_size": 256, "base": BASE}, "ways": {}}
    with ray_session(load_config(CONFIG).ray):
        run_stages(load_config(CONFIG, BASES[BASE] + [f"run={base_run}"]), ("ingest", "experts"))
        sets = {}
        # The loops run in this process (ray.enabled false for distill only: it is not in any
        # fingerprint), realgrad first, so each way's peak memory is its own: a process's
        # peak only grows, and the in-loop way, which holds D, peaks higher.
        for way in ("realgrad", "loop"):
            run = os.path.join(runs_dir, f"ipc10-dm-{way}-it{args.iterations}")
            shutil.rmtree(run, ignore_errors=True)  # time the whole way, every time
            os.makedirs(run)
            os.symlink(os.path.join(base_run, "experts"), os.path.join(run, "experts"))
            config = load_config(CONFIG, common + [f"run={run}", f"distill.dm_real={way}"])
            started = time.perf_counter()
            summary = run_stages(config, ("realgrad",))
            in_process = load_config(CONFIG, common + [f"run={run}", f"distill.dm_real={way}",
                                                       "ray.enabled=false"])
            summary.update(run_stages(in_process, ("distill",)))
            distill = summary["distill"]
            report["ways"][way] = {
                "realgrad_seconds": summary["realgrad_seconds"] if way == "realgrad" else 0,
                "realgrad": summary["realgrad"], "loop_seconds": distill["seconds"],
                "seconds_per_iteration": distill["seconds_per_iteration"],
                "loop_peak_memory_mb": distill["peak_memory_mb"],
                "reads_real_data_in_loop": distill["reads_real_data_in_loop"],
                "real_samples_held_by_loop": distill["real_samples"],
                "total_seconds": round(time.perf_counter() - started, 1)}
            sets[way] = load_synthetic(distill["synthetic"])[0]
            print(way, json.dumps(report["ways"][way]), flush=True)
    report["max_abs_image_difference"] = float((sets["loop"] - sets["realgrad"]).abs().max())
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    with open(os.path.join(RESULTS, "dm_real.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""A realgrad worker's peak memory against checkpoints per pass (``realgrad.chunk``) and class
terms, with C = 100 classes, beside the documented bound (``realgrad.sums_bytes``).

D is 2,000 random 28 x 28 images with labels 0..99 (memory does not depend on what the pixels
are) in 2 shards; one expert (ConvNet-2, width 16) is trained for a few steps to have
checkpoints. Each case runs one worker's ``partial_sums`` (rank 0 of 1) in a fresh spawned
process and records its peak RSS before and after: the growth is what the pass holds, to be
compared with ``sums_bytes(n, C, K, class_terms, chunk)``. Writes
benchmarks/results/realgrad_memory.json, with the load average beside each case.

    PYTHONPATH=. .venv/bin/python benchmarks/realgrad_memory.py
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "realgrad_memory.json")
CONFIG = os.path.join(HERE, "..", "pipelines", "tiny_test.yaml")
CLASSES, SAMPLES, SHARD = 100, 2000, 1000
SETTINGS = ["experts.count=1", "experts.epochs=1", "experts.train_samples=null",
            "experts.batch_size=100", "experts.save_every=5", "realgrad.real_samples=1000",
            "realgrad.p_batches=4", "realgrad.p_batch_size=100", "realgrad.batch_size=200"]
CASES = [(False, 1), (False, 4), (True, 1), (True, 2), (True, 4)]  # (class_terms, chunk)


def make_data(data_url: str) -> None:
    from ead_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo, write_meta
    from ead_dist.data.shards import shard_name, write_classification_shard

    rng = np.random.default_rng(0)
    splits = {}
    for split, size in (("train", SAMPLES), ("test", SHARD)):
        images = rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8)
        labels = np.arange(size) % CLASSES
        shards = []
        for j in range(size // SHARD):
            name = shard_name(j)
            part = slice(j * SHARD, (j + 1) * SHARD)
            write_classification_shard(os.path.join(data_url, split, name), images[part],
                                       labels[part], j * SHARD)
            shards.append(ShardInfo(name, SHARD))
        splits[split] = SplitInfo(size, shards)
    write_meta(data_url, DatasetMeta(name="random100", task="classification",
                                     image_shape=[1, 28, 28], mean=[0.5], std=[0.29],
                                     splits=splits, classes=[f"c{i}" for i in range(CLASSES)]))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def one_case(plan: dict, chunk: int, queue) -> None:
    """In a fresh process: resident memory before one worker's pass over ``chunk`` checkpoints
    and its peak during the pass (VmHWM, reset first through clear_refs: getrusage's peak
    would carry the parent's over exec)."""
    import torch

    from ead_dist.stages.realgrad import partial_sums

    torch.set_num_threads(1)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    part = partial_sums(plan, 0, 1, todo=list(range(chunk)))
    held = sum(v.nbytes for k, v in part.items() if not k.startswith("count"))
    queue.put({"rss_before_mb": before, "peak_during_mb": _status_mb("VmHWM"),
               "sums_held_mb": held / 2**20})


def main() -> None:
    from ead_dist import storage
    from ead_dist.config import load_config
    from ead_dist.stages.experts import run_experts
    from ead_dist.stages.realgrad import build_plan, sums_bytes

    work = tempfile.mkdtemp(prefix="realgrad-memory-")
    data = os.path.join(work, "data")
    make_data(data)
    config = load_config(CONFIG, SETTINGS + [f"run={os.path.join(work, 'run')}",
                                             f"data.url={data}", "ray.enabled=false"])
    run_experts(config, use_ray=False)
    context = multiprocessing.get_context("spawn")
    cases = []
    for class_terms, chunk in CASES:
        config.realgrad.class_terms, config.realgrad.checkpoints = class_terms, max(4, chunk)
        plan = build_plan(config)
        n = sum(v.numel() for v in storage.load_tensors(plan["checkpoints"][0]["url"])[0].values())
        queue = context.Queue()
        load = [round(x, 2) for x in os.getloadavg()]
        process = context.Process(target=one_case, args=(plan, chunk, queue))
        process.start()
        measured = queue.get()
        process.join()
        bound = sums_bytes(n, CLASSES, len(plan["p_batches"]), class_terms, chunk) / 2**20
        case = dict(measured, class_terms=class_terms, chunk=chunk, parameters=n,
                    classes=CLASSES, p_batches=len(plan["p_batches"]),
                    growth_mb=measured["peak_during_mb"] - measured["rss_before_mb"],
                    bound_mb=bound, load=load)
        cases.append(case)
        print(json.dumps(case), file=sys.stderr)
    report = {"benchmark": "realgrad_memory",
              "command": "PYTHONPATH=. .venv/bin/python benchmarks/realgrad_memory.py",
              "settings": SETTINGS + ["model: tiny_test.yaml (convnet width 16 depth 2)",
                                      f"D: {SAMPLES} random 28x28 images, {CLASSES} classes"],
              "note": "growth_mb: peak RSS during one worker's partial_sums minus RSS before "
                      "it (imports loaded); bound_mb: sums_bytes, the sums and "
                      "the checkpoints; the rest is one batch's activations and allocator slack",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "cases": cases}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

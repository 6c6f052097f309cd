"""Coordinator cost per iteration against |D|: the claim is that it does not grow with |D|.

The coordinator's inputs are fixed-size gradient vectors (g_D, g_P, per checkpoint), so its
time per iteration and its memory should be the same for |D| = 10k, 100k and 1M, while
realgrad, which passes over all of D, should grow linearly. For each size N:

1. D is Fashion-MNIST's 60,000 train images tiled to N samples, written once as 10,000-sample
   shards with consecutive keys into ``RUNS/shards/train/`` (shard j holds samples
   j*10000 ... j*10000+9999, the same for every N, so the sizes share them); ``RUNS/data-N/``
   holds only a meta.json (real Fashion-MNIST classes, shape, mean and std) that lists the
   first N/10000 shards by path. The test split is the real test set.
2. One expert is trained once (1 epoch on 2,000 samples of the first 10,000, a checkpoint
   every 10 steps) in ``RUNS/base``, which also makes the initial S once
   (``distill/init.safetensors``, IPC 10). Neither depends on N: every ``RUNS/nN`` links the
   experts and copies the initial S, so all sizes distil from the same start, and the distill
   process never loads D (``initialise`` would otherwise read the whole train split).
3. realgrad over all of D (``real_samples: null``), 2 checkpoints, K = 4 P batches of 256,
   W Ray Train workers. Its time is index.json's ``seconds``.
4. distill, 30 iterations, IPC 10, objective ``matching``, in a fresh Ray worker process
   (``max_calls=1``) so its ``peak_memory_mb`` is its own.

The network is small (ConvNet-2, width 16, first_padding 1) so that realgrad over 1M samples
fits on 2 CPU cores; the coordinator's claim does not depend on the network. Stages skip
themselves and shards that exist are not rewritten, so a rerun resumes. Writes
benchmarks/results/coordinator_scaling.json after each size.

    .venv/bin/python benchmarks/coordinator_scaling.py                    # 10k, 100k, 1M
    .venv/bin/python benchmarks/coordinator_scaling.py --sizes 10000 --workers 1 --num-cpus 1 \\
        --runs-dir runs/scaling-check --out /tmp/scaling.json             # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time

import numpy as np

from ead_dist import storage
from ead_dist.config import RayConfig, load_config
from ead_dist.data.formats import read_split
from ead_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo, write_meta
from ead_dist.data.shards import shard_name, write_classification_shard
from ead_dist.runtime import ray_session

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "coordinator_scaling.json")
CONFIG = os.path.join(HERE, "..", "pipelines", "tiny_test.yaml")
SHARD_SIZE = 10_000
BASE_SIZE = 10_000  # the D the expert and the initial S come from: the first shard

SETTINGS = [
    "model.name=convnet", "model.width=16", "model.depth=2", "model.norm=instancenorm",
    "model.first_padding=1",
    "experts.count=1", "experts.epochs=1", "experts.train_samples=2000",
    "experts.save_every=10", "experts.batch_size=64",
    "realgrad.checkpoints=2", "realgrad.real_samples=null", "realgrad.p_batches=4",
    "realgrad.p_batch_size=256", "realgrad.batch_size=500", "realgrad.class_terms=true",
    "distill.ipc=10", "distill.iterations=30", "distill.save_every=30",
    "distill.objective=matching", "distill.augmentation=none",
]
log = logging.getLogger("coordinator_scaling")


def write_shards(directory: str, images: np.ndarray, labels: np.ndarray, count: int) -> dict:
    """Shards 0 .. count/SHARD_SIZE-1 of ``images`` tiled to ``count`` samples, those missing.

    Returns the writing time over every invocation (kept in ``directory/writing.json``).
    """
    record_url = os.path.join(directory, "writing.json")
    done = storage.read_json(record_url) if os.path.exists(record_url) else {"shards": 0,
                                                                              "seconds": 0.0}
    started, written = time.perf_counter(), 0
    for j in range(count // SHARD_SIZE):
        url = os.path.join(directory, shard_name(j))
        if os.path.exists(url):  # shards are published whole, so one that exists is complete
            continue
        tiled = np.arange(j * SHARD_SIZE, (j + 1) * SHARD_SIZE) % len(labels)
        write_classification_shard(url, images[tiled], labels[tiled], first_index=j * SHARD_SIZE)
        written += 1
        log.info("wrote %s", url)
    if written:
        done = {"shards": done["shards"] + written,
                "seconds": done["seconds"] + time.perf_counter() - started}
        storage.publish_json(record_url, done)
    return dict(done, seconds_per_shard=done["seconds"] / max(done["shards"], 1),
                shard_samples=SHARD_SIZE)


def write_data_meta(data_url: str, shards: str, size: int, test_url: str, test_size: int,
                    classes: list[str], mean: float, std: float) -> None:
    """DATA/meta.json of a D of ``size`` samples: the first size/SHARD_SIZE shards, by path."""
    train = [ShardInfo(os.path.join(shards, shard_name(j)), SHARD_SIZE)
             for j in range(size // SHARD_SIZE)]
    meta = DatasetMeta(name="fashion_mnist", task="classification", image_shape=[1, 28, 28],
                       mean=[mean], std=[std], classes=classes,
                       splits={"train": SplitInfo(size, train),
                               "test": SplitInfo(test_size, [ShardInfo(test_url, test_size)])})
    write_meta(data_url, meta)


def kept_record(url: str, key: str, expected) -> dict | None:
    """The record kept at ``url`` by an earlier run (None without one), refused when its ``key``
    differs from ``expected``: a rerun never hands back figures measured with other settings."""
    if not os.path.exists(url):
        return None
    record = storage.read_json(url)
    if record[key] != expected:
        raise RuntimeError(f"{url} was measured with other settings ({key} {record[key]}, not "
                           f"{expected}): use another --runs-dir")
    return record


def link_base(base_run: str, run: str) -> None:
    """The size's RUN shares the expert and starts from the same initial S."""
    os.makedirs(os.path.join(run, "distill"), exist_ok=True)
    if not os.path.exists(os.path.join(run, "experts")):
        # A copy, not a link: this run's data differ (D tiled to size), so its experts stage
        # records its own fingerprint for the same checkpoints. (distill then warns that its
        # folder has outputs but no fingerprint: the copied init, which it takes as this
        # config's.)
        shutil.copytree(os.path.join(base_run, "experts"), os.path.join(run, "experts"),
                        ignore=shutil.ignore_patterns("fingerprint.json"))
    init = os.path.join(run, "distill", "init.safetensors")
    if not os.path.exists(init):
        shutil.copy(os.path.join(base_run, "distill", "init.safetensors"), init)


def measure_size(size: int, run: str, overrides: list[str]) -> dict:
    """realgrad then distill for one |D|; the record is kept in RUN/scaling.json."""
    import ray

    from ead_dist.stages.distill import distill
    from ead_dist.stages.realgrad import run_realgrad

    record_url = os.path.join(run, "scaling.json")
    kept = kept_record(record_url, "overrides", overrides)
    if kept:
        return kept
    config = load_config(CONFIG, overrides)
    realgrad = run_realgrad(config)  # its index.json's seconds: the stage's wall time
    # A fresh worker process, so that the peak memory it reports is the coordinator's alone.
    coordinator = ray.get(ray.remote(num_cpus=1, max_calls=1)(distill).remote(config))
    if coordinator.get("skipped"):
        raise RuntimeError(f"{run} has a synthetic set but no scaling.json: delete "
                           f"{run}/synthetic.safetensors and {run}/distill/state-* to remeasure")
    record = {
        "real_samples": realgrad["real_samples"], "shards": size // SHARD_SIZE,
        "realgrad_seconds": realgrad["seconds"],
        "realgrad_seconds_per_1k_samples": 1000 * realgrad["seconds"] / realgrad["real_samples"],
        "realgrad_peak_memory_mb_rank0": realgrad["peak_memory_mb_rank0"],
        "realgrad_workers": realgrad["workers"],
        "distill_seconds_per_iteration": coordinator["seconds_per_iteration"],
        "distill_seconds": coordinator["seconds"],
        "distill_iterations": coordinator["iterations"],
        "distill_peak_memory_mb": coordinator["peak_memory_mb"],
        "distill_real_samples": coordinator["real_samples"],
        "distill_first_loss": coordinator["first_loss"],
        "distill_final_loss": coordinator["final_loss"],
        "overrides": overrides,
    }
    storage.publish_json(record_url, record)
    return record


def summarise(results: dict) -> dict:
    """Largest over smallest size: coordinator time and memory, and realgrad time."""
    sizes = sorted(results, key=int)
    if len(sizes) < 2:
        return {}
    small, large = results[sizes[0]], results[sizes[-1]]
    return {
        "sizes": [int(s) for s in sizes], "size_ratio": int(sizes[-1]) / int(sizes[0]),
        "distill_seconds_per_iteration_ratio":
            large["distill_seconds_per_iteration"] / small["distill_seconds_per_iteration"],
        "distill_peak_memory_ratio":
            large["distill_peak_memory_mb"] / small["distill_peak_memory_mb"],
        "realgrad_seconds_ratio": large["realgrad_seconds"] / small["realgrad_seconds"],
        # realgrad = a fixed start-up (Ray Train's worker group) + a per-sample part; this is
        # the per-sample part, which the size ratio should predict.
        "realgrad_marginal_seconds_per_1k_samples":
            1000 * (large["realgrad_seconds"] - small["realgrad_seconds"])
            / (int(sizes[-1]) - int(sizes[0])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--runs-dir", default="runs/scaling")
    parser.add_argument("--workers", type=int, default=2, help="realgrad Ray Train workers")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="further config overrides for every run (section.field=value)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    for size in args.sizes:
        if size <= 0 or size % SHARD_SIZE:
            parser.error(f"--sizes must be positive multiples of {SHARD_SIZE}, got {size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs_dir = os.path.abspath(args.runs_dir)
    shards = os.path.join(runs_dir, "shards")
    os.makedirs(os.path.join(shards, "train"), exist_ok=True)
    os.makedirs(os.path.join(shards, "test"), exist_ok=True)
    started = time.perf_counter()

    train = read_split("fashion_mnist", "", "train")
    test = read_split("fashion_mnist", "", "test")
    mean = float(train.images.mean(dtype=np.float64)) / 255
    std = float(train.images.std(dtype=np.float64)) / 255
    test_url = os.path.join(shards, "test", shard_name(0))
    if not os.path.exists(test_url):
        write_classification_shard(test_url, test.images, test.labels, first_index=0)

    def data_dir(size: int) -> str:
        url = os.path.join(runs_dir, f"data-{size}")
        write_data_meta(url, os.path.join(shards, "train"), size, test_url, len(test.labels),
                        train.classes, mean, std)
        return url

    common = SETTINGS + [f"realgrad.workers={args.workers}"] + args.extra
    shard_writing = write_shards(os.path.join(shards, "train"), train.images, train.labels,
                                 max(args.sizes + [BASE_SIZE]))
    base_run = os.path.join(runs_dir, "base")
    base = load_config(CONFIG, common + [f"run={base_run}", f"data.url={data_dir(BASE_SIZE)}"])

    report = {
        "benchmark": "coordinator_scaling",
        "command": " ".join(["python", "benchmarks/coordinator_scaling.py",
                             *map(shlex.quote, sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "device": "cpu",
                    "load_average_at_start": os.getloadavg()[0]},
        "claim": "the coordinator's time per iteration and memory do not grow with |D| (its "
                 "inputs are fixed-size gradient vectors); realgrad's time grows linearly",
        "settings": {
            "config": "pipelines/tiny_test.yaml", "overrides": common,
            "ray_num_cpus": args.num_cpus,
            "network": "ConvNet-2, width 16, instance norm, first_padding 1: small so that "
                       "realgrad over 1M samples is computable on 2 CPU cores",
            "data": "Fashion-MNIST train (60,000) tiled to |D| samples with unique keys, "
                    f"{SHARD_SIZE}-sample PNG shards; real test set; mean {mean:.4f}, "
                    f"std {std:.4f}",
            "shared": "one expert (trained on 2,000 of the first 10,000 samples) and one initial "
                      "S (IPC 10, from the first 10,000) for every size",
            "distill": "in a fresh Ray worker (max_calls=1): peak memory is that process's",
        },
        "shard_writing": shard_writing,
        "results": {},
    }
    with ray_session(RayConfig(num_cpus=args.num_cpus)):
        from ead_dist.stages.distill import initialise
        from ead_dist.stages.experts import run_experts

        run_experts(base)
        initialise(base)  # in this process: it reads the base D, never the large ones
        for size in args.sizes:
            run = os.path.join(runs_dir, f"n{size}")
            link_base(base_run, run)
            overrides = common + [f"run={run}", f"data.url={data_dir(size)}",
                                  f"name=scaling-{size}"]
            record = measure_size(size, run, overrides)
            report["results"][str(size)] = record
            report["summary"] = summarise(report["results"])
            report["machine"]["load_average_at_end"] = os.getloadavg()[0]
            report["seconds_total"] = time.perf_counter() - started
            log.info("|D| = %d: realgrad %.1f s, coordinator %.3f s/iteration, %.0f MiB",
                     size, record["realgrad_seconds"], record["distill_seconds_per_iteration"],
                     record["distill_peak_memory_mb"])
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""Realgrad throughput: 1 against 2 Ray Train workers, and shards on S3 against local disk.

One expert (ConvNet-3 width 64, as ``pipelines/demo.yaml``) is trained once on real
Fashion-MNIST; then the realgrad stage runs over the same DATA for each case below, each in a
fresh RUN holding a copy of that expert, and its wall time is ``index.json``'s ``seconds``
(Ray Train's start-up included). Throughput is gradient-samples per second: (D-sample size +
K x P-batch size) x checkpoints / seconds. Two D-sample sizes per worker count separate the
fixed cost (Ray Train's start, reading and skipping every shard's records) from the marginal
rate: T(N) = fixed + N / rate. Parallel efficiency is rate(2) / (2 rate(1)).

S3 is moto's server on loopback (the S3 code path: HTTP, s3fs, the gopen handler, not a
network): DATA's shards and meta.json, the expert and the RUN all live in one bucket.

The machine's load average (``os.getloadavg()``) is recorded before and after every case: on
a shared 2-core machine the figures carry that noise.

    PYTHONPATH=. .venv/bin/python benchmarks/realgrad_throughput.py --data data/fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "realgrad_throughput.json")
CONFIG = os.path.join(HERE, "..", "pipelines", "demo.yaml")
SETTINGS = [
    "experts.count=1", "experts.epochs=1", "experts.train_samples=2000",
    "experts.save_every=5", "experts.batch_size=128",
    "realgrad.checkpoints=2", "realgrad.p_batches=4", "realgrad.p_batch_size=128",
    "realgrad.batch_size=500", "realgrad.class_terms=false", "realgrad.chunk=null",
    "ray.train_failures=0",
]
# (name, storage, workers, D-sample size)
CASES = [
    ("local-w1-n8000", "local", 1, 8000), ("local-w2-n8000", "local", 2, 8000),
    ("local-w1-n1000", "local", 1, 1000), ("local-w2-n1000", "local", 2, 1000),
    ("s3-w1-n8000", "s3", 1, 8000), ("s3-w2-n8000", "s3", 2, 8000),
]
log = logging.getLogger("realgrad_throughput")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def _copy_tree(source: str, target: str) -> None:
    """Every file under local ``source`` to ``target`` (any storage URL), whole."""
    from ead_dist import storage

    for root, _, files in os.walk(source):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, source).replace(os.sep, "/")
            with open(path, "rb") as f:
                storage.publish_bytes(storage.join(target, relative), f.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="an ingested local Fashion-MNIST DATA dir")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--cases", nargs="*", default=None, help="names from CASES")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--keep", action="store_true",
                        help="keep the cases already in --out (their own load figures)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import boto3
    import ray

    from ead_dist import storage
    from ead_dist.config import load_config
    from ead_dist.stages.experts import run_experts
    from ead_dist.stages.realgrad import run_realgrad

    runs = args.runs_dir or tempfile.mkdtemp(prefix="realgrad-bench-")
    data = os.path.abspath(args.data)
    base = os.path.join(runs, "base")
    config = load_config(CONFIG, SETTINGS + [f"run={base}", f"data.url={data}"])
    started = time.perf_counter()
    run_experts(config, use_ray=False)
    expert_seconds = time.perf_counter() - started

    server, endpoint = _moto()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="bench")
    storage.configure({"endpoint_url": endpoint})
    s3_data = "s3://bench/data/fashion_mnist"
    _copy_tree(data, s3_data)

    # Ray workers import this checkout's package: the driver's PYTHONPATH travels with them.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases]
    results = {}
    if args.keep and os.path.exists(args.out):  # cases measured by an earlier invocation
        with open(args.out) as f:
            results = json.load(f)["cases"]
    report = {
        "benchmark": "realgrad_throughput",
        "command": " ".join([os.path.relpath(sys.executable), "benchmarks/realgrad_throughput.py",
                             *sys.argv[1:]]),
        "settings": SETTINGS + ["model: pipelines/demo.yaml (convnet width 64 depth 3)"],
        "data": "real Fashion-MNIST train, 60,000 PNG samples in 6 shards of 10,000",
        "expert_seconds": round(expert_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "note": "2 cores shared with other jobs: see load_before / load_after"},
        "cases": results,
    }
    try:
        for name, where, workers, samples in cases:
            run = (os.path.join(runs, name) if where == "local"
                   else f"s3://bench/runs/{name}")
            _copy_tree(os.path.join(base, "experts"), storage.join(run, "experts"))
            case = load_config(CONFIG, SETTINGS + [
                f"run={run}", f"data.url={data if where == 'local' else s3_data}",
                f"realgrad.workers={workers}", f"realgrad.real_samples={samples}",
                f"storage.s3_endpoint_url={endpoint}"])
            load_before = _load()
            index = run_realgrad(case, use_ray=True)
            gradient_samples = ((index["real_samples"] + index["p_batches"] * index["p_batch_size"])
                                * len(index["checkpoints"]))
            results[name] = {
                "storage": where, "workers": workers, "real_samples": index["real_samples"],
                "checkpoints": len(index["checkpoints"]), "gradient_samples": gradient_samples,
                "seconds": round(index["seconds"], 2),
                "gradient_samples_per_s": round(gradient_samples / index["seconds"], 1),
                "peak_memory_mb_rank0": index["peak_memory_mb_rank0"],
                "load_before": load_before, "load_after": _load(),
            }
            log.info("%s: %s", name, results[name])
            report["derived"] = derive(results)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        ray.shutdown()
        server.stop()
        if not args.runs_dir:
            shutil.rmtree(runs, ignore_errors=True)
    print(json.dumps(report["derived"], indent=2))


def derive(results: dict) -> dict:
    """Fixed cost and marginal rate per worker count (two D sizes), parallel efficiency, and
    S3 against local at equal settings."""
    out = {}
    for workers in (1, 2):
        small = results.get(f"local-w{workers}-n1000")
        large = results.get(f"local-w{workers}-n8000")
        if small and large:
            extra = large["gradient_samples"] - small["gradient_samples"]
            seconds = large["seconds"] - small["seconds"]
            rate = extra / seconds if seconds > 0 else None
            out[f"w{workers}"] = {
                "marginal_gradient_samples_per_s": round(rate, 1) if rate else None,
                "fixed_seconds": round(small["seconds"] - small["gradient_samples"] / rate, 1)
                if rate else None}
    if "w1" in out and "w2" in out and out["w1"]["marginal_gradient_samples_per_s"] \
            and out["w2"]["marginal_gradient_samples_per_s"]:
        out["parallel_efficiency_marginal"] = round(
            out["w2"]["marginal_gradient_samples_per_s"]
            / (2 * out["w1"]["marginal_gradient_samples_per_s"]), 3)
    if "local-w1-n8000" in results and "local-w2-n8000" in results:
        out["parallel_efficiency_wall_n8000"] = round(
            results["local-w1-n8000"]["seconds"] / (2 * results["local-w2-n8000"]["seconds"]), 3)
    for workers in (1, 2):
        local, s3 = results.get(f"local-w{workers}-n8000"), results.get(f"s3-w{workers}-n8000")
        if local and s3:
            out[f"s3_over_local_seconds_w{workers}"] = round(s3["seconds"] / local["seconds"], 3)
    return out


if __name__ == "__main__":
    main()

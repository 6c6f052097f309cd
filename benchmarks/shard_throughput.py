"""Shard read throughput (samples/s) for Fashion-MNIST, local disk against S3 over HTTP.

The S3 endpoint is moto's server on loopback, so the figure measures the S3 code path (HTTP,
s3fs, the fsspec gopen handler), not a real network. Writes benchmarks/results/shard_throughput.json.

    .venv/bin/python benchmarks/shard_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time

import boto3

from ead_dist import storage
from ead_dist.data.ingest import ingest_classification
from ead_dist.data.meta import read_meta, shard_urls
from ead_dist.data.pipeline import classification_samples

RESULTS = os.path.join(os.path.dirname(__file__), "results", "shard_throughput.json")


def read_all(urls: list[str], image_shape, num_classes) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum(1 for _ in classification_samples(urls, image_shape=image_shape,
                                                  num_classes=num_classes, split_nodes=False))
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None, help="existing local DATA dir to reuse")
    args = parser.parse_args()

    data_url = args.data or os.path.join(tempfile.mkdtemp(), "fashion_mnist")
    ingest_classification("fashion_mnist", "", data_url, use_ray=False)
    meta = read_meta(data_url)
    local_urls = shard_urls(data_url, meta, "train")

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                     region_name="us-east-1").create_bucket(Bucket="bench")
        s3_urls = []
        for url in local_urls:
            target = f"s3://bench/fashion_mnist/train/{os.path.basename(url)}"
            storage.publish_bytes(target, storage.read_bytes(url))
            s3_urls.append(target)
        results = {}
        for where, urls in (("local", local_urls), ("s3_loopback", s3_urls)):
            runs = []
            for _ in range(args.repeats):
                count, seconds = read_all(urls, meta.image_shape, meta.num_classes)
                runs.append({"samples": count, "seconds": seconds,
                             "samples_per_s": count / seconds})
            rates = [r["samples_per_s"] for r in runs]
            results[where] = {"runs": runs, "best_samples_per_s": max(rates),
                              "median_samples_per_s": sorted(rates)[len(rates) // 2]}
            print(f"{where}: median {results[where]['median_samples_per_s']:.0f} samples/s "
                  f"over {args.repeats} reads of {count} samples", file=sys.stderr)
    finally:
        server.stop()
    report = {
        "benchmark": "shard_throughput",
        "command": "python benchmarks/shard_throughput.py --repeats %d" % args.repeats,
        "dataset": "fashion_mnist train (60000 PNG samples, 6 shards)",
        "decode": "PNG decode + validation, single process, no DataLoader workers",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "results": results,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v["median_samples_per_s"] for k, v in results.items()}))


if __name__ == "__main__":
    main()

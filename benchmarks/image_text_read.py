"""Reading img2dataset shards at CC3M's size: samples/s of one process validating a shard.

CC3M as img2dataset writes it (``--image_size 256``, the recipe in docs) holds 256 x 256 JPEGs
with a caption and a JSON record per sample. No CC3M can be downloaded here, so the shard is
made of 256 x 256 JPEGs (quality 90) of smooth gradients with noise, about the byte size of
a photo at that resolution; decoding cost follows pixel count and byte size, not content. The
timed work is ``image_text.shard_statistics`` (ingest's validation task: decode, centre-crop
and resize to ``data.image_size``, pixel sums), over local disk and over S3 (moto's server on
loopback). The load average is recorded beside each figure.

    PYTHONPATH=. .venv/bin/python benchmarks/image_text_read.py [--samples 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "image_text_read.json")


def write_shard(path: str, samples: int, side: int = 256) -> int:
    """One img2dataset-style shard of ``samples`` JPEGs; returns its size in bytes."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, side * side * 3).reshape(side, side, 3)
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"00000{i:04d}"
            pixels = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            caption = f"a photo number {i}"
            files = {"jpg": buffer.getvalue(), "txt": caption.encode(),
                     "json": json.dumps({"key": key, "caption": caption, "status": "success",
                                         "width": side, "height": side}).encode()}
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from ead_dist import storage
    from ead_dist.data.image_text import shard_statistics

    local = os.path.join(tempfile.mkdtemp(), "00000.tar")
    shard_bytes = write_shard(local, args.samples)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    results = {}
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench")
        storage.configure({"endpoint_url": endpoint})
        remote = "s3://bench/cc3m/00000.tar"
        with open(local, "rb") as f:
            storage.publish_bytes(remote, f.read())
        for where, url in (("local", local), ("s3_loopback", remote)):
            runs = []
            for _ in range(args.repeats):
                load = [round(x, 2) for x in os.getloadavg()]
                started = time.perf_counter()
                count = shard_statistics(url, args.image_size)["count"]
                seconds = time.perf_counter() - started
                runs.append({"samples": count, "seconds": round(seconds, 3),
                             "samples_per_s": round(count / seconds, 1), "load_before": load})
            results[where] = {"runs": runs,
                              "best_samples_per_s": max(r["samples_per_s"] for r in runs)}
            print(where, results[where], file=sys.stderr)
    finally:
        server.stop()
    report = {
        "benchmark": "image_text_read",
        "command": " ".join(["python", "benchmarks/image_text_read.py", *sys.argv[1:]]),
        "shard": {"samples": args.samples, "bytes": shard_bytes,
                  "bytes_per_sample": round(shard_bytes / args.samples),
                  "images": "256 x 256 JPEG quality 90 (gradient + noise), caption, json"},
        "work": f"image_text.shard_statistics: decode, centre-crop, resize to "
                f"{args.image_size}, pixel sums; one process",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "2 cores shared with other jobs: see load_before"},
        "results": results,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

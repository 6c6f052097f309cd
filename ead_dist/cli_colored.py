"""The ``ingest colored-fashion-mnist`` command: the biased benchmark dataset of issue #18.
:mod:`ead_dist.cli` registers it and calls :func:`run`."""

from __future__ import annotations

import argparse

from .config import RunConfig
from .data.colouring import CONFLICT_RATIOS

COMMAND = "ingest colored-fashion-mnist"


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        COMMAND, help="Fashion-MNIST with a colour bias: each class tinted with its own colour "
        "except a --conflict-ratio of its training images; the test split is unbiased")
    parser.add_argument("--conflict-ratio", type=float, default=0.05, choices=CONFLICT_RATIOS,
                        help="fraction of each class's training images given another colour "
                        "(default 0.05)")
    parser.add_argument("--out", required=True, help="DATA URL for shards and meta.json")
    parser.add_argument("--source", default="", help="the Fashion-MNIST IDX files (default: "
                        "Debian's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0, help="draws the conflicting images and "
                        "their colours (default 0)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--no-ray", action="store_true", help="write shards in this process")


def run(args: argparse.Namespace, describe) -> int:
    from . import storage
    from .data.ingest import COLORED_FASHION_MNIST, ingest_colored_fashion_mnist
    from .runtime import ray_session

    config = RunConfig()
    storage.apply_settings(config.storage)
    with ray_session(config.ray, enabled=not args.no_ray):
        meta = ingest_colored_fashion_mnist(
            args.source, args.out, args.conflict_ratio, seed=args.seed,
            shard_size=args.shard_size, use_ray=not args.no_ray)
    print(describe(meta, args.out))
    print(f"  conflict ratio {meta.attributes['conflict_ratio']}, per-sample colours and "
          f"conflict flags in {storage.join(args.out, 'bias.safetensors')}")
    print(f"  distill it: ead-dist run CONFIG --set data.dataset={COLORED_FASHION_MNIST} "
          f"--set data.url={args.out}")
    return 0

"""The ``caption-scenes`` command: write the Fashion-MNIST scene captions (issue #16's test data)
as img2dataset shards. :mod:`ead_dist.cli` registers it and calls :func:`run`."""

from __future__ import annotations

import argparse

COMMAND = "caption-scenes"


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        COMMAND, help="image-caption test data in img2dataset's layout: 2-3 tinted "
        "Fashion-MNIST items per image, captions from their colour, size and position")
    parser.add_argument("--out", required=True, help="folder URL for 00000.tar, ... "
                        "(local or s3://)")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--canvas", type=int, default=64, help="image side in pixels")
    parser.add_argument("--source", default="", help="the Fashion-MNIST IDX files (default: "
                        "Debian's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from . import storage
    from .config import RunConfig
    from .data.caption_scenes import write_caption_scenes
    from .data.formats.idx import read_fashion_mnist

    storage.apply_settings(RunConfig().storage)
    items = read_fashion_mnist(args.source, "train")
    urls = write_caption_scenes(args.out, items.images[:, :, :, 0], items.labels,
                                samples=args.samples, shard_size=args.shard_size,
                                canvas=args.canvas, seed=args.seed)
    print(f"{args.samples} scenes in {len(urls)} shards: {urls[0]} .. {urls[-1]}")
    return 0

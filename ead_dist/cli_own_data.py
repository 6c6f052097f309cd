"""The commands that bring a user's own data in: ``ingest imagefolder``, ``ingest webdataset``
and ``validate``. :mod:`ead_dist.cli` registers them and calls :func:`run`."""

from __future__ import annotations

import argparse
import sys

from . import storage
from .config import ConfigError, RunConfig

FORMS = ("imagefolder", "webdataset")
COMMANDS = tuple(f"ingest {form}" for form in FORMS) + ("validate",)
# ``ingest NAME`` forms routed to one subcommand: these, and cli_colored's dataset.
ROUTED = FORMS + ("colored-fashion-mnist",)


def route(argv: list[str]) -> list[str]:
    """``ingest imagefolder ...`` -> the one subcommand ``"ingest imagefolder"``, so the
    existing ``ingest [CONFIG]`` keeps its optional positional."""
    argv = list(argv)
    first = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if first is not None and argv[first] == "ingest" and argv[first + 1:first + 2] and \
            argv[first + 1] in ROUTED:
        argv[first:first + 2] = [f"ingest {argv[first + 1]}"]
    return argv


def _add_fitting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=32,
                        help="images are resized (shorter side) and centre-cropped to SIZE x "
                        "SIZE (default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3,
                        help="1: greyscale (mode L), 3: RGB (default); other modes are "
                        "converted, alpha dropped")
    parser.add_argument("--allow-upscale", action="store_true",
                        help="accept images smaller than SIZE (they are enlarged)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="without a test split, hold out this fraction (by a stable hash "
                        "of each file path or sample key; default 0.1)")


def _add_shard_keys(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--image-key", required=required,
                        help="the image field of each sample, e.g. jpg (or jpg;png)")
    parser.add_argument("--label-key", required=required,
                        help="the label field, e.g. cls or label.txt (an index or a name)")
    parser.add_argument("--classes", help="a text file of class names, one a line (default: "
                        "from the label values)")
    parser.add_argument("--test", dest="test_url", help="shard URL of the test split (default: "
                        "held out by --test-fraction)")


def _add_ingest_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="DATA URL for shards and meta.json")
    parser.add_argument("--name", help="dataset name in meta.json, and data.dataset in a run "
                        "config (default: the source folder's name)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--no-ray", action="store_true", help="write shards in this process")


def add_commands(commands: argparse._SubParsersAction) -> None:
    folder = commands.add_parser(
        "ingest imagefolder", help="shard your own images: PATH/<class>/<images>, or "
        "PATH/train/<class> and PATH/test/<class>")
    folder.add_argument("source", metavar="PATH", help="the image folder")
    _add_ingest_output(folder)
    _add_fitting(folder)

    shards = commands.add_parser(
        "ingest webdataset", help="re-shard your own WebDataset shards (local or s3://, brace "
        "URLs) into ours")
    shards.add_argument("source", metavar="URL", help="e.g. s3://bucket/data/{000..099}.tar")
    _add_shard_keys(shards, required=True)
    _add_ingest_output(shards)
    _add_fitting(shards)

    validate = commands.add_parser(
        "validate", help="list every problem of an image folder, WebDataset shards (give "
        "--image-key) or an ingested DATA; exit 2 if any")
    validate.add_argument("source", metavar="DATA_OR_SOURCE")
    _add_shard_keys(validate, required=False)
    _add_fitting(validate)


def _default_name(source: str) -> str:
    """The folder a path or shard URL names: ``/d/pets`` and ``s3://b/pets/{0..9}.tar``: pets."""
    parts = [p for p in source.split("://")[-1].split("/") if p]
    if parts and ("{" in parts[-1] or parts[-1].endswith(".tar")):
        parts = parts[:-1]
    return parts[-1] if parts else "data"


def _classes(path: str | None) -> list[str] | None:
    if path is None:
        return None
    names = [line.strip() for line in storage.read_bytes(path).decode("utf-8").splitlines()]
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: needs distinct class names, one a line")
    return names


def _ingest(command: str, args: argparse.Namespace):
    from .data.formats import imagefolder, webdataset_shards
    from .data.ingest import ingest_images
    from .runtime import ray_session

    if args.size < 1 or args.shard_size < 1:
        raise ConfigError("--size and --shard-size must be positive")
    if command == "ingest imagefolder":
        def read():
            listing = imagefolder.list_imagefolder(args.source, args.test_fraction)
            imagefolder.check_listing(listing)
            return {split: imagefolder.read_images(files, listing.classes, args.size,
                                                   args.channels, args.allow_upscale)
                    for split, files in listing.files.items()}
    else:
        classes = _classes(args.classes)

        def read():
            return webdataset_shards.read_webdataset_splits(
                args.source, args.image_key, args.label_key, args.size, args.channels,
                classes=classes, test_url=args.test_url, test_fraction=args.test_fraction,
                allow_upscale=args.allow_upscale)
    name = args.name or _default_name(args.source)
    if name == "cc3m":  # the one name the stages read as image-text data
        raise ConfigError("--name cc3m is taken by the image-text dataset; choose another")
    config = RunConfig()
    storage.apply_settings(config.storage)
    with ray_session(config.ray, enabled=not args.no_ray):
        meta = ingest_images(name, args.out, read, args.size, args.channels,
                             shard_size=args.shard_size, use_ray=not args.no_ray)
    return meta, (f"  distill it: ead-dist run CONFIG --set data.dataset={name} "
                  f"--set data.url={args.out}")


def _validate(args: argparse.Namespace) -> tuple[list[str], str]:
    from .data import validate

    if validate.is_ingested(args.source):
        report, what = validate.check_data(args.source), "samples"
    elif args.image_key or args.label_key:
        if not (args.image_key and args.label_key):
            raise ConfigError("validating WebDataset shards needs --image-key and --label-key")
        report = validate.check_webdataset(
            args.source, args.image_key, args.label_key, args.size, args.channels,
            classes=_classes(args.classes), test_url=args.test_url,
            allow_upscale=args.allow_upscale)
        what = "samples"
    else:
        report = validate.check_imagefolder(args.source, args.size, args.channels,
                                            args.test_fraction, args.allow_upscale)
        what = "images"
    if report.problems:
        return report.problems, (f"{len(report.problems)} problems in {args.source} "
                                 f"({report.checked} {what} checked)")
    return [], f"{args.source}: {report.checked} {what}, no problems"


def run(args: argparse.Namespace, describe) -> int:
    """Run one of :data:`COMMANDS`; prints its result and returns the exit status."""
    if args.command == "validate":
        problems, summary = _validate(args)
        for line in problems:
            print(line)
        if problems:
            print(f"ead-dist: error: {summary}", file=sys.stderr)
            return 2
        print(summary)
        return 0
    meta, hint = _ingest(args.command, args)
    print(describe(meta, args.out))
    print(hint)
    return 0

"""``ead-dist``: the command line. Each stage is a subcommand; ``run`` does them all in order."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

# Only light modules here (no torch, Ray or webdataset), so that --help and a config error
# answer at once; the stages import theirs when they run.
from . import cli_colored, cli_own_data, cli_scenes, storage
from .config import ConfigError, RunConfig, load_config
from .data.meta import read_meta
from .ray_errors import unwrap

log = logging.getLogger("ead_dist")

STAGES = ("ingest", "experts", "realgrad", "distill", "evaluate")
EXPORT_FORMATS = ("imagefolder", "webdataset", "npz")  # ead_dist.export.FORMATS (a test checks)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix (config, data, storage, a diverging run): one line,
    exit 2. Imported here, when an error is being reported, not at start-up."""
    from .coordinator import DivergedError
    from .data.formats import FormatError
    from .data.meta import MetaError
    from .data.pipeline import ShardError
    from .export import ExportError
    from .plan import InsufficientMemoryError
    from .submit import SubmitError

    return (ConfigError, FormatError, MetaError, ShardError, storage.StorageError,
            SubmitError, DivergedError, ExportError, InsufficientMemoryError)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run configuration (YAML), e.g. pipelines/demo.yaml, "
                        "or env:NAME for YAML text in the environment variable NAME")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override one config field")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ead-dist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="shard a dataset (or validate CC3M shards); "
                                 "your own data: ingest imagefolder | webdataset; the colour-biased "
                                 "benchmark: ingest colored-fashion-mnist")
    ingest.add_argument("config", nargs="?", help="run configuration; or give --dataset")
    ingest.add_argument("--set", dest="overrides", action="append", default=[])
    ingest.add_argument("--dataset", help="mnist, fashion_mnist, svhn, cifar10, cifar100, "
                        "tiny_imagenet or cc3m")
    ingest.add_argument("--source", help="raw files (classification) or shard folder (cc3m)")
    ingest.add_argument("--out", help="DATA URL for shards and meta.json")
    ingest.add_argument("--shard-size", type=int)
    ingest.add_argument("--no-ray", action="store_true", help="write shards in this process")

    cli_own_data.add_commands(commands)
    cli_colored.add_command(commands)
    cli_scenes.add_command(commands)

    summary = commands.add_parser("summary", help="describe an ingested dataset")
    summary.add_argument("data_url")

    for stage in STAGES[1:] + ("run",):
        _add_config(commands.add_parser(stage, help=f"the {stage} stage" if stage != "run"
                                        else "every stage in order, on this machine"))
    commands.choices["run"].add_argument(
        "--check-memory", action="store_true", help="calibrate first (ead-dist plan) and stop "
        "if a stage's predicted peak memory exceeds what this machine has available")

    plan = commands.add_parser("plan", help="predict each stage's time and peak memory from a "
                               "short calibration run")
    _add_config(plan)
    plan.add_argument("--json", help="also write the plan as JSON to this path")

    show = commands.add_parser("show", help="draw a run's synthetic set, loss curve and "
                               "accuracy as PNGs")
    show.add_argument("run_url", metavar="RUN")
    show.add_argument("--out", help="folder for the PNGs (default RUN/show)")
    show.add_argument("--data", help="DATA URL for class names (default: the run's data.url)")
    show.add_argument("--per-class", type=int, default=10, help="images drawn per class")

    export = commands.add_parser("export", help="write a run's synthetic set as PNGs with soft "
                                 "labels (ImageFolder or WebDataset) or as an .npz")
    export.add_argument("run_url", metavar="RUN")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="a new local folder")
    export.add_argument("--data", help="DATA URL for class names (default: the run's data.url)")

    submit = commands.add_parser("submit", help="run on a Ray cluster via job submission")
    _add_config(submit)
    submit.add_argument("--address", required=True, help="Ray dashboard, http://HEAD:8265")
    submit.add_argument("--no-wait", action="store_true")
    return parser


def _ingest(args: argparse.Namespace) -> None:
    from .data.image_text import ingest_image_text
    from .data.ingest import DEFAULT_SHARD_SIZE, ingest_classification
    from .runtime import ray_session

    if args.config:
        config = load_config(args.config, args.overrides)
        dataset, source, out = config.data.dataset, config.data.source, config.data.url
        shard_size, image_size = config.data.shard_size, config.data.image_size
    else:
        config = RunConfig()
        dataset, source, out = args.dataset, args.source or "", args.out
        shard_size, image_size = DEFAULT_SHARD_SIZE, config.data.image_size
        if not dataset or not out:
            raise ConfigError("ingest needs a config file, or --dataset and --out")
    dataset, source, out = args.dataset or dataset, args.source or source, args.out or out
    shard_size = args.shard_size or shard_size
    storage.apply_settings(config.storage)
    with ray_session(config.ray, enabled=not args.no_ray):
        if dataset == "cc3m":
            meta = ingest_image_text(dataset, source, out, image_size=image_size,
                                     use_ray=not args.no_ray)
        else:
            meta = ingest_classification(dataset, source, out, shard_size=shard_size,
                                         use_ray=not args.no_ray)
    print(describe(meta, out))


def describe(meta, data_url: str) -> str:
    lines = [f"{meta.name} at {data_url} ({meta.task})",
             f"  image shape {meta.image_shape}, mean {[round(v, 4) for v in meta.mean]}, "
             f"std {[round(v, 4) for v in meta.std]}"]
    if meta.classes:
        shown = ", ".join(meta.classes[:10]) + (", ..." if len(meta.classes) > 10 else "")
        lines.append(f"  {len(meta.classes)} classes: {shown}")
    for split, info in meta.splits.items():
        lines.append(f"  {split}: {info.size} samples in {len(info.shards)} shards")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(cli_own_data.route(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command in cli_own_data.COMMANDS:
            return cli_own_data.run(args, describe)
        if args.command == cli_colored.COMMAND:
            return cli_colored.run(args, describe)
        if args.command == cli_scenes.COMMAND:
            return cli_scenes.run(args)
        if args.command == "ingest":
            _ingest(args)
        elif args.command == "summary":
            print(describe(read_meta(args.data_url), args.data_url))
        elif args.command == "show":
            from .show import show_run

            print("\n".join(show_run(args.run_url, args.out, args.data, args.per_class)))
        elif args.command == "export":
            from .export import export_run

            print(export_run(args.run_url, args.format, args.out, args.data))
        elif args.command == "plan":
            from .calibrate import write_plan

            print(write_plan(load_config(args.config, args.overrides), args.json))
        elif args.command == "submit":
            from .submit import submit_job

            config = load_config(args.config, args.overrides)
            submit_job(args.config, args.overrides, config, args.address, wait=not args.no_wait)
        else:
            from .run import run_stages

            config = load_config(args.config, args.overrides)
            if getattr(args, "check_memory", False):
                from .calibrate import check_run_memory

                check_run_memory(config)
            stages = STAGES if args.command == "run" else (args.command,)
            result = run_stages(config, stages)
            if result is not None:
                print(json.dumps(result, indent=2))
    except Exception as error:  # raised here, or inside a Ray task, actor or Train worker
        cause = unwrap(error)
        if not isinstance(cause, user_errors()):
            raise
        if args.verbose:
            traceback.print_exception(error, file=sys.stderr)
        print(f"ead-dist: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

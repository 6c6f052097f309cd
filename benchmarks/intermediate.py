"""Test accuracy of a distillation run's intermediate states: points of accuracy against time.

A distill stage saves its state every ``distill.save_every`` iterations
(``RUN/distill/state-NNNNNN.safetensors``) and logs each iteration's seconds
(``RUN/distill/metrics.jsonl``). This turns the chosen states into set files (EAD's soft
labels, the baselines' hard ones: ``ead_dist.synthetic.synthetic_from_state``) and evaluates
each with fresh networks, as ``reevaluate.py`` does. Each point records the iteration, the
distillation seconds up to it (summed from the metrics) and, for objectives that read real
terms, the seconds of the realgrad pass (``RUN/realgrad/index.json``).

    python benchmarks/intermediate.py --run runs/quality/ipc10-matching --at 50 100 \\
        --data runs/reevaluate/data --set ray.enabled=false --name ipc10-matching

Results: ``OUT/intermediate_NAME.json`` (written after each point) and the sets under
``RUNS_DIR/NAME/``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shlex
import sys

from reevaluate import add_data_arguments, evaluate_file, machine, prepare

from ead_dist import storage
from ead_dist.synthetic import save_synthetic, synthetic_from_state

STATE = re.compile(r"state-(\d+)\.safetensors$")


def saved_states(run: str) -> dict[int, str]:
    """iteration -> state file of every state the run saved."""
    found = {}
    for path in glob.glob(os.path.join(run, "distill", "state-*.safetensors")):
        match = STATE.search(path)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def seconds_until(run: str, iteration: int) -> float | None:
    """Distillation seconds of iterations 0 .. iteration - 1, from the run's metrics log."""
    path = os.path.join(run, "distill", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    seen = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "iteration" in row and "seconds" in row:
                seen[row["iteration"]] = row["seconds"]  # a resumed run's redo replaces a line
    if any(i not in seen for i in range(iteration)):
        return None
    return round(sum(seen[i] for i in range(iteration)), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a run whose distill stage saved states")
    parser.add_argument("--at", type=int, nargs="*", default=None,
                        help="iterations to evaluate (default: every saved state)")
    parser.add_argument("--models", default="convnet")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--runs-dir", default="runs/intermediate")
    parser.add_argument("--name", required=True, help="the JSON is OUT/intermediate_NAME.json")
    add_data_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    states = saved_states(args.run)
    wanted = args.at if args.at is not None else list(states)
    missing = [i for i in wanted if i not in states]
    if missing:
        raise SystemExit(f"{args.run} saved no state at iterations {missing}; it has "
                         f"{list(states) or 'none'}")
    runs_dir = os.path.abspath(os.path.join(args.runs_dir, args.name))
    common = prepare(args, runs_dir)
    realgrad_index = os.path.join(args.run, "realgrad", "index.json")
    realgrad_seconds = (json.load(open(realgrad_index)).get("seconds")
                        if os.path.exists(realgrad_index) else None)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "run": os.path.abspath(args.run), "overrides": args.overrides, **machine(),
              "realgrad_seconds": realgrad_seconds, "points": {}}
    out = os.path.join(args.out, f"intermediate_{args.name}.json")
    os.makedirs(args.out, exist_ok=True)
    init, init_metadata = storage.load_tensors(os.path.join(args.run, "distill",
                                                           "init.safetensors"))
    num_classes = init["labels"].shape[1]
    os.makedirs(runs_dir, exist_ok=True)
    for iteration in wanted:
        tensors, _ = storage.load_tensors(states[iteration])
        path = os.path.join(runs_dir, f"state-{iteration:06d}.safetensors")
        save_synthetic(path, synthetic_from_state(tensors, num_classes),
                       {**init_metadata, "method": f"state of {args.run}",
                        "iteration": iteration})
        point = evaluate_file(common, os.path.join(runs_dir, f"it{iteration}"), path,
                              args.models.split(","), args.epochs)
        seconds, source = seconds_until(args.run, iteration), "metrics.jsonl"
        if seconds is None:  # runs from before the metrics log: the files' times, if unbroken
            seconds = round(os.path.getmtime(states[iteration]) - os.path.getmtime(
                os.path.join(args.run, "distill", "init.safetensors")), 1)
            source = "state file time minus init file time"
        point.update(iteration=iteration, distill_seconds=seconds, seconds_from=source)
        report["points"][str(iteration)] = point
        with open(out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

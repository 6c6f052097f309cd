"""A lever of the image-text path measured over distillation seeds (issue #16).

One distillation's recall moves by 2 to 3 points from seed to seed, as much as any lever found
so far, so a lever is judged by the paired gain of each distilled set over its own initial
pairs (same evaluation seeds, so the networks start alike), averaged over distillation seeds.
Each arm is ``benchmarks/image_text.py`` at N pairs with the arm's overrides; an arm trains its
own experts once (seed 0's run; later seeds link its ``base`` and everyone shares one copy of
the scenes), and ``--set distill.seed=S`` picks the initial pairs, the random pairs and the
coordinator's draws. Runs resume: stages skip themselves when their outputs exist, so rerunning
the command over finished runs only rewrites the summary.

    .venv/bin/python benchmarks/image_text_seeds.py --arm none --arm \\
        aug:image_text.augmentation=crop_scale --seeds 0 1 2 3 \\
        --out benchmarks/results/image_text_augmentation.json

Writes ``--out``: per arm and seed the recall of the distilled set, its initial pairs and the
random real pairs (mean and std over evaluation runs, %), and per arm the mean ± standard error
over seeds of the distilled set's gain over its initial pairs and over the random pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GAINS = ("i2t@5", "t2i@5", "i2t@10", "t2i@10")


def arm_of(text: str) -> tuple[str, list[str]]:
    """"name:field=value,field=value" (or just "name": the defaults) -> (name, overrides)."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def link(source: str, target: str) -> None:
    if not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.path.abspath(source), target)


def run_arm_seed(runs_dir: str, arm: str, overrides: list[str], seed: int, pairs: int,
                 variant: str, shared_data: str | None) -> str:
    """image_text.py for one (arm, seed); returns the path of the JSON it writes."""
    directory = os.path.join(runs_dir, f"{arm}_s{seed}")
    first = os.path.join(runs_dir, f"{arm}_s0")
    if seed != 0:
        link(os.path.join(first, "base"), os.path.join(directory, "base"))
    if shared_data and os.path.abspath(shared_data) != os.path.abspath(
            os.path.join(directory, "data")):
        link(shared_data, os.path.join(directory, "data"))
    out = directory + ".json"
    command = [sys.executable, os.path.join(HERE, "image_text.py"), "--pairs", str(pairs),
               "--only", variant, "--runs-dir", directory, "--out", out,
               "--set", f"distill.seed={seed}"]
    for override in overrides:
        command += ["--set", override]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return out


def recall_row(entry: dict, which: str) -> dict:
    return {k: entry["recall"][which][k] for k in GAINS}


def mean_and_error(values: list[float]) -> list[float]:
    error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return [round(statistics.mean(values), 2), round(error, 2)]


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean ± standard error over seeds of the distilled set's gain over init and random."""
    summary = {}
    for baseline in ("init", "random_real"):
        summary[f"gain_over_{baseline}"] = {
            k: mean_and_error([row["synthetic"][k][0] - row[baseline][k][0]
                               for row in per_seed.values()]) for k in GAINS}
    summary["synthetic"] = {k: mean_and_error([row["synthetic"][k][0]
                                               for row in per_seed.values()]) for k in GAINS}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", action="append", required=True,
                        help="name[:field=value,...]; repeat for each arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--variant", default="trajectory", help="an image_text.py variant")
    parser.add_argument("--runs-dir", default="runs/image_text_seeds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    arms = dict(arm_of(text) for text in args.arm)
    result = {"benchmark": f"image_text.py's {args.variant} at N = {args.pairs} over "
                           "distillation seeds, per arm",
              "command": "python benchmarks/image_text_seeds.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "arms": {}}
    shared_data = None
    for arm, overrides in arms.items():
        per_seed = {}
        for seed in args.seeds:
            out = run_arm_seed(args.runs_dir, arm, overrides, seed, args.pairs, args.variant,
                               shared_data)
            shared_data = shared_data or os.path.join(args.runs_dir, f"{arm}_s{seed}", "data")
            entry = json.load(open(out))["variants"][f"n{args.pairs}-{args.variant}"]
            per_seed[seed] = {which: recall_row(entry, which)
                              for which in ("synthetic", "init", "random_real")}
            per_seed[seed]["distill_seconds"] = entry["distill_seconds"]
        result["arms"][arm] = {"overrides": overrides, "seeds": per_seed,
                               "summary": summarise(per_seed)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({arm: value["summary"] for arm, value in result["arms"].items()},
                     indent=2))


if __name__ == "__main__":
    main()

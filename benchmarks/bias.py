"""Bias-aware distillation on Colored Fashion-MNIST (issue #18): one IPC at a conflict ratio.

Five sets on the same experts, evaluated on the unbiased test split (every test image a random
colour, so a set that learned "colour = class" scores low): random real images, DM, DM with
kernel-density weights, EAD (gradient matching at the experts' checkpoints), EAD with the
weights. Writes benchmarks/results/bias.json (one entry per IPC and variant, written as each
ends) and the sets to benchmarks/results/bias/. Every IPC uses the same two experts (DSA, one
epoch each: the CPU profile of fashion_mnist.py); a rerun resumes from the saved stages.

    .venv/bin/python benchmarks/bias.py [--ratio 0.05] [--ipc 10] [--only ead ead_kde dm ...]
        [--set section.field=value ...] [--quick]
    .venv/bin/python benchmarks/bias.py --report     # benchmarks/results/bias.md from the JSON
    .venv/bin/python benchmarks/bias.py --temperatures 1 0.5 0.25   # weight shares, no pass

``--quick`` shrinks everything to a minutes-long smoke run (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import shutil
import sys
import time

from fashion_mnist import CONFIG, CPU_PROFILE, RESULTS

from ead_dist.config import load_config
from ead_dist.data.ingest import COLORED_FASHION_MNIST, ingest_colored_fashion_mnist
from ead_dist.run import run_stages
from ead_dist.runtime import ray_session

# DM's paper runs 20,000 iterations; at 10 classes x 256 real images through a fresh ConvNet-3
# per iteration that is 8-15 s an iteration on 2 cores, so DM gets 60 here, as in methods.py
# (about EAD's wall time; 79.9 % on plain Fashion-MNIST IPC 10 there).
VARIANTS = {
    "ead": ["distill.method=ead", "weights.method=none"],
    "ead_kde": ["distill.method=ead", "weights.method=kde"],
    "dm": ["distill.method=dm", "weights.method=none", "distill.iterations=60",
           "distill.save_every=10"],
    "dm_kde": ["distill.method=dm", "weights.method=kde", "distill.iterations=60",
               "distill.save_every=10"],
    "random": ["distill.method=random", "weights.method=none"],
    # Colder weights (w ~ p^(-1/T)): at T = 1 the conflicting 5 % of the images get 18 % of the
    # total weight, at T = 0.5 about 44 %, at T = 1/3 about 66 % (from the recorded densities).
    "ead_kde_t05": ["distill.method=ead", "weights.method=kde", "weights.temperature=0.5"],
    "dm_kde_t05": ["distill.method=dm", "weights.method=kde", "weights.temperature=0.5",
                   "distill.iterations=60", "distill.save_every=10"],
    "ead_kde_t033": ["distill.method=ead", "weights.method=kde", "weights.temperature=0.3333"],
    "dm_kde_t033": ["distill.method=dm", "weights.method=kde", "weights.temperature=0.3333",
                    "distill.iterations=60", "distill.save_every=10"],
    # The same weights, DM's real batches drawn in proportion to them (importance resampling)
    # instead of a uniform batch averaged with them: every drawn image counts.
    "dm_kde_t033_rs": ["distill.method=dm", "weights.method=kde", "weights.temperature=0.3333",
                       "distill.weighted_batches=resample", "distill.iterations=60",
                       "distill.save_every=10"],
}
QUICK = [
    "experts.count=1", "experts.epochs=1", "experts.train_samples=2000", "experts.save_every=5",
    "realgrad.workers=1", "realgrad.checkpoints=2", "realgrad.real_samples=1000",
    "realgrad.p_batches=2", "realgrad.p_batch_size=64", "weights.sample=200",
    "distill.iterations=5", "distill.save_every=5", "evaluate.runs=1", "evaluate.epochs=2",
    "evaluate.test_samples=1000", "model.width=16",
]


def link_experts(base_run: str, run: str) -> None:
    """Every variant, at every IPC, distils from the base run's experts (same settings, data)."""
    os.makedirs(run, exist_ok=True)
    target = os.path.join(run, "experts")
    if not os.path.exists(target):
        os.symlink(os.path.join(base_run, "experts"), target)


PUBLISHED = ("Seed paper, Colored MNIST (a different base dataset), r = 5 %, IPC 50: DM 23.8 %, "
             "DM reweighted 91.5 %.")


def weight_shares(run: str, data_url: str) -> dict:
    """How the run's weights treat the bias-conflicting samples: their mean weight, the aligned
    samples', and the conflicting share of the total weight (r unweighted)."""
    from ead_dist import storage
    from ead_dist.data.ingest import BIAS_FILE

    weights = storage.load_tensors(os.path.join(run, "weights", "weights.safetensors"))[0]
    conflicting = storage.load_tensors(os.path.join(data_url, BIAS_FILE))[0][
        "train_conflicting"].bool()
    w = weights["weights"].double()
    return {"mean_weight_conflicting": round(float(w[conflicting].mean()), 3),
            "mean_weight_aligned": round(float(w[~conflicting].mean()), 3),
            "conflicting_share_of_weight": round(float(w[conflicting].sum() / w.sum()), 4),
            "conflicting_share_of_samples": round(float(conflicting.double().mean()), 4)}


def temperature_shares(weights_path: str, data_url: str, temperatures: list[float]) -> dict:
    """From a weights file that records its densities: for each temperature, the conflicting
    images' share of the total weight and the effective sample size (sum w)^2 / sum w^2 / N."""
    from ead_dist import storage
    from ead_dist.data.ingest import BIAS_FILE
    from ead_dist.weights import weights_from_log_density

    tensors = storage.load_tensors(weights_path)[0]
    conflicting = storage.load_tensors(os.path.join(data_url, BIAS_FILE))[0][
        "train_conflicting"].bool()
    classes = int(tensors["labels"].max()) + 1
    shares = {}
    for temperature in temperatures:
        w = weights_from_log_density(tensors["log_density"], tensors["labels"], classes,
                                     temperature).double()
        shares[str(temperature)] = {
            "conflicting_share_of_weight": round(float(w[conflicting].sum() / w.sum()), 4),
            "effective_sample_fraction": round(float(w.sum() ** 2 / (w ** 2).sum() / len(w)),
                                               4),
            "max_weight": round(float(w.max()), 1)}
    return {"weights_file": weights_path, "shares": shares}


def report(table: dict) -> str:
    lines = ["| IPC | set | test acc % on the unbiased split (ConvNet-3, DSA, 300 ep) | runs "
             "| realgrad s | distill s | conflicting share of weight |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in sorted(table["variants"].items(),
                            key=lambda kv: (kv[1]["ipc"], list(VARIANTS).index(
                                kv[0].split("-", 1)[1]))):
        acc = row["eval"]["results"]["synthetic"]["convnet"]
        share = row.get("weights", {}).get("conflicting_share_of_weight")
        lines.append(f"| {row['ipc']} | {name.split('-', 1)[1]} | {100 * acc['mean']:.2f} ± "
                     f"{100 * acc['std']:.2f} | {len(acc['runs'])} | "
                     f"{row.get('realgrad_seconds') or 0:.0f} | {row.get('distill_seconds') or 0:.0f}"
                     f" | {'-' if share is None else f'{100 * share:.1f} %'} |")
    return "\n".join(lines) + f"\n\n{PUBLISHED}\n"


def safe_keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def share_weights(runs_dir: str, run: str) -> None:
    """A weighted variant starts from another's weights file when one exists: the weights stage
    checks the settings recorded in it and remakes the file if they differ, or only reweights
    its recorded densities when the temperature alone differs (files that record them first)."""
    target = os.path.join(run, "weights", "weights.safetensors")

    def lacks_densities(path: str) -> bool:
        return "log_density" not in safe_keys(path)

    found = sorted(sorted(glob.glob(os.path.join(runs_dir, "ipc*", "*_kde*", "weights",
                                                 "weights.safetensors"))), key=lacks_densities)
    if found and not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(found[0], target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--runs-dir", default="runs/bench_bias")
    parser.add_argument("--data", default="data/colored_fashion_mnist")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true", help="only write bias.md from the JSON")
    parser.add_argument("--temperatures", type=float, nargs="*", default=None,
                        help="only compute the weight shares at these temperatures from a "
                             "weights file that records its densities "
                             "(benchmarks/results/bias_temperatures.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tag = f"r{round(args.ratio * 100):02d}"
    data_url = os.path.abspath(f"{args.data}_{tag}")
    runs_dir = os.path.abspath(os.path.join(args.runs_dir, tag + ("_quick" if args.quick else "")))
    if args.temperatures:
        found = [path for path in sorted(glob.glob(os.path.join(
            runs_dir, "ipc*", "*_kde*", "weights", "weights.safetensors")))
            if "log_density" in safe_keys(path)]
        if not found:
            raise SystemExit(f"no weights file under {runs_dir} records its densities yet")
        shares = dict(temperature_shares(found[0], data_url, args.temperatures),
                      command="python benchmarks/bias.py " + " ".join(sys.argv[1:]))
        with open(os.path.join(RESULTS, "bias_temperatures.json"), "w") as f:
            json.dump(shares, f, indent=2)
        print(json.dumps(shares, indent=2))
        return
    if args.report:
        table_path = os.path.join(RESULTS, "bias.json")
        table = json.load(open(table_path))
        for name, row in table["variants"].items():  # rows written before the shares were
            if "kde" in name and "weights" not in row:
                ipc, variant = name.split("-", 1)
                row["weights"] = weight_shares(
                    os.path.join(args.runs_dir, tag, ipc, variant), data_url)
        with open(table_path, "w") as f:
            json.dump(table, f, indent=2, default=str)
        with open(os.path.join(RESULTS, "bias.md"), "w") as f:
            f.write(report(table))
        return
    common = CPU_PROFILE + [
        f"data.dataset={COLORED_FASHION_MNIST}", f"data.url={data_url}",
        "experts.augmentation=dsa", "distill.objective=matching",
        "evaluate.baselines=[]"]
    last = (QUICK if args.quick else []) + args.extra  # over the variants' own settings
    out_path = os.path.join(RESULTS, "bias_quick.json" if args.quick else "bias.json")
    table = json.load(open(out_path)) if os.path.exists(out_path) else {"variants": {}}
    table.update(command="python benchmarks/bias.py " + " ".join(sys.argv[1:]),
                 ratio=args.ratio, common=common + last,
                 machine={"cpus": os.cpu_count(), "platform": platform.platform()})
    with ray_session(load_config(CONFIG).ray):
        ingest_colored_fashion_mnist("", data_url, args.ratio)
        base_run = os.path.join(runs_dir, "base")
        started = time.perf_counter()
        run_stages(load_config(CONFIG, common + last + [f"run={base_run}"]), ("experts",))
        table["experts_seconds"] = table.get("experts_seconds") or round(
            time.perf_counter() - started, 1)
        for name in args.only:
            run = os.path.join(runs_dir, f"ipc{args.ipc}", name)
            link_experts(base_run, run)
            if "kde" in name:
                share_weights(runs_dir, run)
            overrides = common + VARIANTS[name] + last + [f"distill.ipc={args.ipc}",
                                                          f"run={run}", f"name={name}"]
            started = time.perf_counter()
            stages = ("experts", "realgrad", "distill", "evaluate")
            summary = run_stages(load_config(CONFIG, overrides), stages)
            set_path = os.path.join(RESULTS, "bias", f"{tag}-ipc{args.ipc}-{name}.safetensors")
            os.makedirs(os.path.dirname(set_path), exist_ok=True)
            shutil.copy(os.path.join(run, "synthetic.safetensors"), set_path)
            table["variants"][f"ipc{args.ipc}-{name}"] = {
                "ipc": args.ipc, "overrides": VARIANTS[name], "set": set_path,
                "command": table["command"],
                "seconds": round(time.perf_counter() - started, 1),
                **{f"{stage}_seconds": summary.get(f"{stage}_seconds")
                   for stage in ("realgrad", "distill", "evaluate")},
                "eval": summary.get("evaluate")}
            if "kde" in name:
                table["variants"][f"ipc{args.ipc}-{name}"]["weights"] = weight_shares(run,
                                                                                data_url)
            with open(out_path, "w") as f:
                json.dump(table, f, indent=2, default=str)

if __name__ == "__main__":
    main()

"""Turn the JSON in benchmarks/results/ into the markdown tables quoted in README and notes.

    .venv/bin/python benchmarks/report.py        # prints, and writes benchmarks/results/REPORT.md
"""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

LABELS = {
    "random_real": "random real images, hard labels",
    "init": "initial set: real images + expert soft labels (no EAD step)",
    "matching": "EAD `matching`: every direction, gradient matching at checkpoints",
    "scalar": "EAD `scalar`, derived coefficient (Eq. 7, weight 1)",
    "paper": "EAD `scalar`, paper coefficient (Eq. 7 as printed, 1 - alpha)",
    "per_class_effect": "EAD `per_class_effect`: one effect per class of P",
    "class_matching": "EAD `class_matching`: every direction of each class",
}


RUNS = os.path.join(os.path.dirname(RESULTS), "..", "runs", "bench")


def _image_change(run: str) -> float | None:
    """|S - S_init| / |S_init| from a run's files, for runs whose summary predates that field."""
    init_url = os.path.join(run, "distill", "init.safetensors")
    final_url = os.path.join(run, "synthetic.safetensors")
    if not (os.path.exists(init_url) and os.path.exists(final_url)):
        return None
    from safetensors.torch import load_file

    init, final = load_file(init_url)["images"], load_file(final_url)["images"]
    return float((final - init).norm() / init.norm())


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None


def _cell(summary: dict | None) -> str:
    if not summary:
        return "not run"
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def fashion_mnist_table(table: dict) -> str:
    rows: dict[str, dict[str, dict]] = {}
    extra: dict[str, dict[str, str]] = {}
    for name, variant in table["variants"].items():
        ipc, method = name.split("-", 1)
        for set_name, per_model in variant["eval"]["results"].items():
            key = method if set_name == "synthetic" else set_name
            rows.setdefault(key, {})[ipc] = per_model["convnet"]
        change = variant["distill"].get("image_change")
        if change is None:
            change = _image_change(os.path.join(RUNS, name))
        if change is not None:
            extra.setdefault(method, {})[ipc] = f"{change:.3f}"
    order = ["random_real", "init", "scalar", "paper", "per_class_effect", "class_matching",
             "matching"]
    lines = ["| set | IPC 1 | IPC 10 | image change (IPC 1 / 10) |", "| --- | --- | --- | --- |"]
    for key in [k for k in order if k in rows]:
        change = " / ".join(extra.get(key, {}).get(i, "-") for i in ("ipc1", "ipc10"))
        lines.append(f"| {LABELS[key]} | {_cell(rows[key].get('ipc1'))} | "
                     f"{_cell(rows[key].get('ipc10'))} | {change} |")
    return "\n".join(lines)


def ablation_table(ablation: dict, table: dict) -> str:
    lines = ["| variant | IPC 10 test acc % | distill s/iteration |", "| --- | --- | --- |"]
    base = table["variants"].get("ipc10-matching")
    if base:
        lines.append(f"| t_m = 1, 200 iterations, experts 1 epoch (the table's run) | "
                     f"{_cell(base['eval']['results']['synthetic']['convnet'])} | "
                     f"{base['distill'].get('seconds_per_iteration', 0):.2f} |")
    names = {"tm2": "t_m = 2, 100 iterations", "tm4": "t_m = 4, 50 iterations",
             "tm8": "t_m = 8, 25 iterations", "epochs2": "t_m = 1, 200 iterations, experts 2 epochs"}
    for name, variant in ablation["variants"].items():
        lines.append(f"| {names.get(name, name)} | "
                     f"{_cell(variant['eval']['results']['synthetic']['convnet'])} | "
                     f"{variant['distill'].get('seconds_per_iteration', 0):.2f} |")
    return "\n".join(lines)


def step_table(step: dict) -> str:
    results = step["results"]
    objectives = list(next(iter(results.values()))["objectives"])
    lines = ["| IPC | plain | " + " | ".join(objectives) + " |",
             "| --- | --- | " + " | ".join("---" for _ in objectives) + " |"]
    for key, row in results.items():
        cells = [f"{row['objectives'][o]['seconds']:.3f} ({row['objectives'][o]['ratio_to_plain']:.1f}x)"
                 for o in objectives]
        lines.append(f"| {row['synthetic_size'] // 10} | {row['plain_seconds']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(scaling: dict) -> str:
    lines = ["| abs(D) | realgrad s | realgrad s per 1k samples | coordinator s/iteration | "
             "coordinator peak MiB |", "| --- | --- | --- | --- | --- |"]
    for size, row in sorted(scaling["results"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(size):,} | {row['realgrad_seconds']:.1f} | "
                     f"{row['realgrad_seconds_per_1k_samples']:.2f} | "
                     f"{row['distill_seconds_per_iteration']:.3f} | "
                     f"{row.get('distill_peak_memory_mb', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parts = []
    table = _load("fashion_mnist.json")
    if table:
        parts += ["## Fashion-MNIST (ConvNet-3, DSA, 300 epochs, 3 runs, test acc %)",
                  fashion_mnist_table(table)]
    ablation = _load("ablation.json")
    if ablation and table:
        parts += ["## Ablation (IPC 10, objective matching)", ablation_table(ablation, table)]
    step = _load("step_cost.json")
    if step:
        parts += ["## EAD coordinator step, seconds (ratio to a plain forward+backward on S)",
                  step_table(step)]
    scaling = _load("coordinator_scaling.json")
    if scaling:
        parts += ["## Coordinator and realgrad against |D| (" + scaling["settings"]["network"]
                  + ")", scaling_table(scaling)]
    text = "\n\n".join(parts) + "\n"
    print(text)
    with open(os.path.join(RESULTS, "REPORT.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

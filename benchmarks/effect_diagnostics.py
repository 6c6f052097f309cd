"""Why the scalar EAD loss barely moves S: how small is the scalar effect already at the init?

For every checkpoint t and P batch k of a finished base run, with v = g_S - g_D at the initial
set S (real images + expert soft labels) and at a distilled set:
- the scalar effect < g_P, v > and its size relative to |g_P| |v| (the cosine): a near-zero
  cosine means Eq. 7 is already met while v, the part of D's effect S does not reproduce, is
  large;
- |v| / |g_D|: how far S's gradient is from D's in every direction (what `matching` reduces).

    .venv/bin/python benchmarks/effect_diagnostics.py --run runs/bench/ipc10-matching \
        --sets distill/init.safetensors synthetic.safetensors runs/bench/ipc10-scalar/synthetic.safetensors

Writes benchmarks/results/effect_diagnostics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from ead_dist import storage
from ead_dist.config import load_config
from ead_dist.effect import cross_entropy, loss_gradient
from ead_dist.models import build_model
from ead_dist.stages.distill import load_real_terms

HERE = os.path.dirname(os.path.abspath(__file__))


def diagnose(run: str, set_url: str, model) -> dict:
    tensors, _ = storage.load_tensors(set_url)
    images, labels = tensors["images"], tensors["labels"]
    terms, _ = load_real_terms(run)
    cosines, effects, relative_gap = [], [], []
    for term in terms:
        g_S = loss_gradient(model, term.theta, cross_entropy, images, labels)
        v = g_S - term.g_D
        relative_gap.append(float(v.norm() / term.g_D.norm()))
        for g_P in term.g_P:
            effect = float(torch.dot(g_P, v))
            effects.append(abs(effect))
            cosines.append(abs(effect) / float(g_P.norm() * v.norm()))
    return {"mean_abs_scalar_effect": statistics.fmean(effects),
            "mean_abs_cosine_gP_v": statistics.fmean(cosines),
            "max_abs_cosine_gP_v": max(cosines),
            "mean_relative_gap_v_over_gD": statistics.fmean(relative_gap)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/bench/ipc10-matching")
    parser.add_argument("--sets", nargs="+", default=["distill/init.safetensors",
                                                      "synthetic.safetensors"])
    args = parser.parse_args()
    config = load_config(os.path.join(HERE, "fashion_mnist_base.yaml"))
    model = build_model("convnet", 1, 10, (28, 28), **config.model.options_for("convnet"))
    results = {}
    for name in args.sets:
        url = name if os.path.isabs(name) or name.startswith("runs/") else \
            storage.join(args.run, name)
        results[name] = diagnose(args.run, url, model)
        print(name, json.dumps(results[name]))
    out = {"command": "python benchmarks/effect_diagnostics.py " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "run": args.run, "results": results}
    with open(os.path.join(HERE, "results", "effect_diagnostics.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""Does the evaluation protocol hide what image-text distillation learned? An exploration.

The image-text sets are distilled against students that take plain SGD steps (the experts'
optimizer, at a learned step size), but ``evaluate`` trains fresh dual encoders with Adam.
This re-evaluates the three sets of a finished image-text run (the distilled ``synthetic``, its
``init`` pairs and ``random_real``: the same sets ``eval.json`` scored) with plain SGD, as MTT
evaluates its sets: at the run's learned student step size (``distill/summary.json``) or a
given one, in batches of the student's size, for ``--epochs`` epochs. Recall@1/5/10 both ways
on the run's held-out pairs, ``--runs`` seeds; the same seed starts every set's network from
the same weights, so the per-seed differences pair up.

    .venv/bin/python benchmarks/image_text_eval_protocol.py --run runs/image_text/n100/trajectory \\
        --epochs 300 --out benchmarks/results/image_text_sgd_eval.json

It changes nothing in ``ead_dist``; the sets and held-out pairs are read as ``evaluate`` reads
them (``evaluate_pairs.evaluation_pair_sets``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished image-text RUN")
    parser.add_argument("--data", default=None, help="its DATA url, if moved since the run")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD step size; default: the run's learned student step size")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the run's distill.student_batch_size (all pairs if null)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from ead_dist import storage
    from ead_dist.config import parse_config
    from ead_dist.data.meta import read_meta
    from ead_dist.data.pairs import load_pairs
    from ead_dist.retrieval import model_recall
    from ead_dist.stages.evaluate_pairs import (evaluation_pair_sets, summarise_runs,
                                                train_on_pairs)
    from ead_dist.stages.pair_experts import pair_model

    # the run's own config, as RUN/run.json recorded it
    config = parse_config(storage.read_json(os.path.join(args.run, "run.json"))["config"])
    config.data.url = args.data or config.data.url
    summary = storage.read_json(os.path.join(args.run, "distill", "summary.json"))
    lr = args.lr or summary.get("student_lr") or config.experts.lr
    batch = args.batch_size or config.distill.student_batch_size or config.image_text.pairs
    torch.set_num_threads(2)
    meta = read_meta(config.data.url)
    test = load_pairs(config.data.url, config.image_text, "test",
                      limit=config.image_text.test_pairs, meta=meta)
    sets = evaluation_pair_sets(config, meta)
    started = time.perf_counter()
    results = {}
    for name, (images, text, similarity) in sets.items():
        runs = []
        for seed in range(args.runs):
            torch.manual_seed(seed)
            model = train_on_pairs(pair_model(config, meta.image_shape[1]), images, text,
                                   epochs=args.epochs, lr=lr, batch_size=batch, seed=seed,
                                   similarity=similarity, optimizer="sgd")
            runs.append(model_recall(model, test.images, test.tokens))
        results[name] = summarise_runs(runs)
        print(name, {k: round(100 * v, 1) for k, v in results[name]["mean"].items()},
              flush=True)
    gains = {k: [100 * (s[k] - i[k]) for s, i in zip(results["synthetic"]["runs"],
                                                     results["init"]["runs"])]
             for k in ("i2t@5", "t2i@5")} if "init" in results else {}
    report = {"command": " ".join(["python", "benchmarks/image_text_eval_protocol.py",
                                   *sys.argv[1:]]),
              "run": args.run, "protocol": {"optimizer": "sgd", "lr": lr, "batch_size": batch,
                                            "epochs": args.epochs, "runs": args.runs,
                                            "test_pairs": len(test.keys)},
              "adam_eval": storage.read_json(os.path.join(args.run, "eval.json"))["protocol"],
              "results": results,
              "paired_gain_over_init": {k: {"mean": statistics.fmean(v),
                                            "per_seed": v} for k, v in gains.items()},
              "seconds": time.perf_counter() - started}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

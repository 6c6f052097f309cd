"""Image-text distillation on the Fashion-MNIST caption scenes (issue #16): recall at N pairs.

The scenes (``ead_dist/data/caption_scenes.py``: 2-3 real Fashion-MNIST items per 64 x 64
canvas, each with a colour, a size and a quadrant, and a caption that says all of it) are
written once in img2dataset's layout and ingested at 32 x 32. One base run trains the experts
(clip-tiny, plain SGD) and, for the one-step objectives, realgrad's contrastive real terms;
every variant at every N distils from those. Each set of N pairs trains fresh dual encoders
(``evaluate.runs`` seeds, Adam) whose image-to-text and text-to-image recall@1/5/10 is
measured on ``image_text.test_pairs`` held-out pairs. Three sets per run: the distilled one,
``init`` (the N real pairs it started from) and ``random_real`` (another seeded draw of N real
pairs). ``init`` is the fair baseline: same pairs, not distilled.

Writes ``benchmarks/results/image_text.json`` (one entry per N and variant, written as each
ends), ``image_text.md`` (the table) and the sets to ``benchmarks/results/image_text/`` (with
another ``--out`` X.json, to ``X_sets/``). Stages
skip themselves when their outputs exist, so a rerun resumes.

    .venv/bin/python benchmarks/image_text.py                 # N = 100 and 500
    .venv/bin/python benchmarks/image_text.py --pairs 100 --only trajectory-1000
    .venv/bin/python benchmarks/image_text.py --report        # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, "..", "pipelines", "scenes_tiny.yaml")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

COMMON = [
    "experts.count=2", "experts.epochs=4", "experts.batch_size=64", "experts.save_every=25",
    "image_text.held_out=0.05", "image_text.test_pairs=1000",
    "realgrad.checkpoints=16", "realgrad.real_samples=4000", "realgrad.p_batches=8",
    "realgrad.p_batch_size=100", "realgrad.class_terms=false",
    "distill.iterations=100", "distill.save_every=50", "distill.threads=2",
    "evaluate.runs=3", "ray.enabled=false",
    # the figures in the README were made with learned captions, before pipelines/scenes_tiny.yaml
    # set learn_captions: false; the *-fixed variants keep the real captions
    "image_text.learn_captions=true",
]
VARIANTS = {
    # pipelines/scenes_tiny.yaml's objective: 5 student steps of 20 pairs from checkpoint t
    # against the expert's checkpoint t + 2, Adam at lr 0.003 (images) and 0.0003 (captions).
    "trajectory": ["distill.objective=trajectory"],
    # The same objective run 10 times longer.
    "trajectory-1000": ["distill.objective=trajectory", "distill.iterations=1000",
                        "distill.save_every=250"],
    # The same objective at a tenth of the images' and captions' learning rates (the sets
    # distilled at the default rates end behind the pairs they start from).
    "trajectory-lr10": ["distill.objective=trajectory", "distill.lr_images=0.0003",
                        "image_text.lr_text=0.00003"],
    # 20 student steps instead of 5 (the student covers 400 pairs per iteration, the expert's
    # 2 checkpoints 50 steps of 64).
    "trajectory-n20": ["distill.objective=trajectory", "distill.student_steps=20"],
    # The real captions the pairs start from kept, the images learned.
    "trajectory-fixed": ["distill.objective=trajectory", "image_text.learn_captions=false"],
    # ... with the student starting in the second half of the experts' trajectories.
    "trajectory-fixed-late": ["distill.objective=trajectory", "image_text.learn_captions=false",
                              "distill.min_start=24"],
    # LoRS's learned similarity with the real captions kept: the pairs' soft labels learn, the
    # images learn, the captions stay.
    "trajectory-lors-fixed": ["distill.objective=trajectory", "image_text.similarity=learned",
                              "distill.student_batch_size=null",
                              "image_text.learn_captions=false"],
    # One-step effect alignment: the batch-mean contrastive g_S against realgrad's g_D.
    "matching": ["distill.objective=matching"],
    # LoRS's learned similarity as the contrastive targets (image_text.similarity: learned);
    # the student then trains on all N pairs at each of its 5 steps.
    "trajectory-lors": ["distill.objective=trajectory", "image_text.similarity=learned",
                        "distill.student_batch_size=null"],
    "matching-lors": ["distill.objective=matching", "image_text.similarity=learned"],
    # LoRS's low-rank form: diag(d) + L R^T, rank 10 (N * 21 numbers instead of N^2).
    "trajectory-lors-rank10": ["distill.objective=trajectory", "image_text.similarity=low_rank",
                               "image_text.similarity_rank=10",
                               "distill.student_batch_size=null"],
    "matching-lors-rank10": ["distill.objective=matching", "image_text.similarity=low_rank",
                             "image_text.similarity_rank=10"],
}
RECALLS = ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10")


def make_data(root: str, scenes: int) -> str:
    """The scenes as img2dataset shards under ``root/raw``, ingested there: the DATA url."""
    from ead_dist.data.caption_scenes import write_caption_scenes
    from ead_dist.data.formats.idx import read_fashion_mnist
    from ead_dist.data.image_text import ingest_image_text

    data = os.path.join(root, "raw")
    if not os.path.exists(os.path.join(data, "meta.json")):
        items = read_fashion_mnist(FASHION_MNIST, "train")
        write_caption_scenes(data, items.images[:, :, :, 0], items.labels, samples=scenes,
                             shard_size=1000, canvas=64)
        ingest_image_text("cc3m", data, data, image_size=32, use_ray=False)
    return data


def sets_dir(out: str) -> str:
    """Where the distilled sets are copied: ``results/image_text/`` for the default ``--out``,
    else a folder named after ``--out`` (``runs/x.json`` -> ``runs/x_sets/``), so a run written
    elsewhere never replaces the committed sets, nor do two runs beside each other (the
    seeds of benchmarks/image_text_seeds.py) replace each other's."""
    out = os.path.abspath(out)
    if out == os.path.abspath(os.path.join(RESULTS, "image_text.json")):
        return os.path.join(RESULTS, "image_text")
    return os.path.splitext(out)[0] + "_sets"


def link_stages(base_run: str, run: str) -> None:
    """A variant's run shares the base run's experts and real terms."""
    os.makedirs(run, exist_ok=True)
    for stage in ("experts", "realgrad"):
        target = os.path.join(run, stage)
        if not os.path.exists(target) and os.path.exists(os.path.join(base_run, stage)):
            os.symlink(os.path.join(base_run, stage), target)


def row(report: dict) -> dict:
    """set name -> {recall: (mean %, std %)} from an eval.json."""
    return {name: {k: (round(100 * sets[model]["mean"][k], 1),
                       round(100 * sets[model]["std"][k], 1)) for k in RECALLS}
            for name, sets in report["results"].items() for model in sets}


def markdown(table: dict) -> str:
    """The table: per N, the two baselines once (every variant trains them alike) and then one
    row per distilled variant."""
    tested = sorted({entry.get("test_pairs") for entry in table["variants"].values()} - {None})
    lines = [f"Caption scenes, clip-tiny, recall % on {' / '.join(map(str, tested))} held-out "
             "pairs, "
             f"mean ± std of {table['runs']} evaluation runs (Adam, "
             f"{table['eval_epochs']} epochs).", "",
             "| N | set | " + " | ".join(RECALLS) + " | distill s |",
             "| --- | --- | " + " | ".join("---" for _ in RECALLS) + " | --- |"]

    def line(pairs: int, label: str, recall: dict, seconds: str = "") -> str:
        cells = [f"{recall[k][0]:.1f} ± {recall[k][1]:.1f}" for k in RECALLS]
        return f"| {pairs} | {label} | " + " | ".join(cells) + f" | {seconds} |"

    by_pairs: dict[int, list[dict]] = {}
    for entry in table["variants"].values():
        by_pairs.setdefault(entry["pairs"], []).append(entry)
    for pairs, entries in sorted(by_pairs.items()):
        for baseline in ("random_real", "init"):  # those the runs evaluated
            if baseline in entries[0]["recall"]:
                lines.append(line(pairs, baseline, entries[0]["recall"][baseline]))
        for entry in sorted(entries, key=lambda e: e["variant"]):
            lines.append(line(pairs, f"EAD {entry['variant']}", entry["recall"]["synthetic"],
                              str(entry["distill_seconds"])))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--runs-dir", default="runs/image_text")
    parser.add_argument("--only", nargs="*", default=["trajectory", "matching"])
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--out", default=os.path.join(RESULTS, "image_text.json"))
    parser.add_argument("--report", action="store_true", help="only write the markdown table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    md_path = os.path.splitext(args.out)[0] + ".md"
    table = json.load(open(args.out)) if os.path.exists(args.out) else {"variants": {}}
    if args.report:
        with open(md_path, "w") as f:
            f.write(markdown(table))
        return

    from ead_dist.config import load_config
    from ead_dist.run import run_stages

    runs_dir = os.path.abspath(args.runs_dir)
    data = make_data(os.path.join(runs_dir, "data"), args.scenes)
    common = COMMON + [f"data.url={data}", f"data.source={data}"] + args.extra
    base_run = os.path.join(runs_dir, "base")
    base = load_config(CONFIG, common + [f"run={base_run}", "distill.objective=matching"])
    table.update(command="python benchmarks/image_text.py " + " ".join(sys.argv[1:]),  # the last
                 common=common, scenes=args.scenes,
                 runs=base.evaluate.runs, eval_epochs=base.evaluate.epochs,
                 machine={"cpus": os.cpu_count(), "platform": platform.platform()})
    started = time.perf_counter()
    summary = run_stages(base, ("experts", "realgrad"))
    table.setdefault("experts_seconds", summary.get("experts_seconds"))
    table.setdefault("realgrad_seconds", summary.get("realgrad_seconds"))
    table["base_seconds"] = round(time.perf_counter() - started, 1)
    for pairs in args.pairs:
        for name in args.only:
            run = os.path.join(runs_dir, f"n{pairs}", name)
            link_stages(base_run, run)
            config = load_config(CONFIG, common + VARIANTS[name] + [
                f"image_text.pairs={pairs}", f"run={run}", f"name={name}"])
            summary = run_stages(config, ("distill", "evaluate"))
            set_path = os.path.join(sets_dir(args.out), f"scenes-n{pairs}-{name}.safetensors")
            os.makedirs(os.path.dirname(set_path), exist_ok=True)
            shutil.copy(os.path.join(run, "synthetic.safetensors"), set_path)
            distilled = json.load(open(os.path.join(run, "distill", "summary.json")))
            report = json.load(open(os.path.join(run, "eval.json")))
            table["variants"][f"n{pairs}-{name}"] = {
                "pairs": pairs, "variant": name, "overrides": VARIANTS[name], "set": set_path,
                "command": table["command"],
                "distill_seconds": round(distilled["seconds"], 1),
                "seconds_per_iteration": distilled["seconds_per_iteration"],
                # without Ray every stage runs in this one process: its peak so far, not the
                # distill stage's own (benchmarks/pair_scaling.py measures that)
                "process_peak_memory_mb": distilled["peak_memory_mb"],
                "image_change": distilled["image_change"],
                "text_change": distilled["text_change"],
                "evaluate_seconds": summary.get("evaluate_seconds"),
                "test_pairs": report["protocol"]["test_pairs"],
                "recall": row(report)}
            with open(args.out, "w") as f:
                json.dump(table, f, indent=2)
            with open(md_path, "w") as f:
                f.write(markdown(table))


if __name__ == "__main__":
    main()

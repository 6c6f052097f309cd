"""Image-text at growing |D|: the coordinator's cost should stay flat, realgrad's grow linearly.

The pairs counterpart of ``coordinator_scaling.py``, on the Fashion-MNIST caption scenes
(``ead_dist/data/caption_scenes.py``) in img2dataset's layout, clip-tiny, 32 x 32 images. For
each size (pairs in D's shards):

1. Shards. The distinct scenes (``--distinct-pairs``, 10,000 by default) are written once by
   ``write_caption_scenes`` into ``RUNS/scenes/`` (1,000-pair shards, canvas 32) and ingested
   there (``ingest_image_text``: ``RUNS/data-base``). ``RUNS/shards/`` holds shard j for every
   j a size needs: a hard link to scene shard j while j is below the distinct count, else a
   copy of scene shard j mod that count whose tar members and JSON ``key``/``url`` are renamed
   to shard j's 9-digit keys (5 digits of shard, 4 of position), so every key of D is unique.
   Copies carry no ``.parquet`` or ``_stats.json`` (nothing reads them). Each ``RUNS/data-N``
   is only a meta.json listing the first N/1000 shards by path (the last as "test", as ingest
   does) with the base's mean and std, which the copies repeat. The image-text path splits
   every shard by key hash (``image_text.held_out`` 0.05), so D, the train split, is about 95 %
   of N; every record gives its exact |D| (``train_pairs``). Re-keyed copies fall on either
   side of the hash differently from their originals, which is fine: D is what the hash says.
2. One expert is trained once on the first 1,000 train pairs of the distinct scenes
   (``image_text.train_pairs``) in ``RUNS/base``, which also makes the initial set once
   (``distill/init.safetensors``, N = 100 pairs). Every size's runs copy both, so all sizes
   distil from the same start with the same checkpoints. The size runs set
   ``image_text.train_pairs: null``: D is the whole train split (pair realgrad's D is the
   experts' ``train_pairs`` prefix when one is set).
3. The realgrad plan, in a fresh process (spawned): ``pair_realgrad.build_pair_plan``, the
   step in which the realgrad driver counts D's pairs per shard (read here in one process, as
   the driver does without Ray; with Ray one task per shard) and draws the batches. RSS before
   and after, the peak (VmHWM, reset just before the step), and the pickled size of the plan,
   which travels to every Ray Train worker. (Until this benchmark's first run the driver
   listed every key of D and the plan carried them: ``pair_scaling_key_lists.json`` holds
   what that cost.)
4. What ``initialise_pairs`` would cost at this size, in a fresh process without Ray: it
   draws the N initial pairs as reservoir sampling over the keys of the whole train split
   would (each shard's pairs counted without decoding, the positions drawn from the counts),
   then each shard holding drawn pairs decodes its own (with Ray, one task per shard) (until the
   benchmark's first run it decoded every pair: ``initialise_decode_all.json`` in each RUN and
   ``pair_scaling_key_lists.json`` keep what that cost). The
   distill runs below skip it (they copy the base's init), so step 6 measures the loop alone;
   this step says what a run that does not copy an init pays once, before its first iteration.
5. realgrad over all of D (``realgrad.real_samples: null``), 2 checkpoints, K = 4 P batches of
   B = 100 pairs, D cut into each shard's consecutive batches of B (a shard's last < B train
   pairs left out), W Ray Train workers. Time: index.json's ``seconds`` (the driver's plan,
   one Ray task per shard, and Ray Train's start included); throughput: D-batch pairs
   per second, each at every checkpoint. At 1M pairs all of D takes about 1.5 h on 2 cores
   (about 190 pairs/s), so ``--real-samples-cap N`` draws realgrad's D sample of N pairs at
   the sizes above N (the plan still counts all of D, and the coordinator's terms are the
   same size either way); without it there is no cap.
6. distill, 20 iterations, N = 100 pairs, in a fresh Ray worker (``max_calls=1``) so its
   ``peak_memory_mb`` is its own: (a) ``trajectory`` (5 student steps of 20 pairs against a
   2-checkpoint segment: reads only expert checkpoints), (b) one-step ``matching`` (reads the
   realgrad terms of step 5). One thread each.

Then, once, realgrad on ``--s3-size`` pairs (10,000 by default) from local disk and from the
same shards and meta.json in moto's S3 server on loopback (``ThreadedMotoServer`` in this
process, ``storage.s3_endpoint_url``; the S3 code path, not a network), back to back, RUN on
local disk for both; and the plan of step 3 from each, which reads every tar whole without
decoding: the shard reading alone, apart from realgrad's fixed start and its compute.

What still depends on |D| (the JSON's ``depends_on_D`` lists them): the time of the plan's
count (memory: counts per shard, and one pool index per D batch when ``real_samples`` is null)
and ``initialise_pairs``'s pass; the coordinator's loop reads no data.

Stages skip themselves, shards that exist are not rewritten and each measurement is kept in
its RUN (``plan.json``, ``initialise.json``, ``measured.json``), so a rerun resumes. Writes
``--out`` after each size and after the S3 case, with the command, the machine (CPUs, torch,
load average before and after each case) and every setting.

    .venv/bin/python benchmarks/pair_scaling.py --real-samples-cap 100000  # 10k, 100k, 1M
    .venv/bin/python benchmarks/pair_scaling.py --sizes 2000 4000 --distinct-pairs 2000 \\
        --s3-size 2000 --runs-dir runs/pair_scaling_check --out /tmp/pair_scaling_check.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import os
import pickle
import platform
import shlex
import socket
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from coordinator_scaling import kept_record, link_base
from ead_dist import storage
from ead_dist.config import RayConfig, RunConfig, load_config
from ead_dist.data.caption_scenes import SHARD_DIGITS, sample_key, shard_name
from ead_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo, read_meta, write_meta
from ead_dist.runtime import ray_session

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "pair_scaling.json")
CONFIG = os.path.join(HERE, "..", "pipelines", "scenes_tiny.yaml")
SHARD_PAIRS = 1000
CANVAS = 32
EXPERT_PAIRS = 1000  # the experts' train pairs, and where the initial set is drawn from
CC3M_PAIRS = 3_300_000  # what the plan's size is extrapolated to

SETTINGS = [
    "data.image_size=32",
    "experts.count=1", "experts.epochs=2", "experts.batch_size=50", "experts.save_every=5",
    "experts.lr=0.01",
    "image_text.model=clip-tiny", "image_text.held_out=0.05", "image_text.pairs=100",
    "image_text.test_pairs=100",
    "realgrad.checkpoints=2", "realgrad.real_samples=null", "realgrad.p_batches=4",
    "realgrad.p_batch_size=100", "realgrad.chunk=null",
    "distill.iterations=20", "distill.save_every=20", "distill.threads=1",
    "distill.student_steps=5", "distill.student_batch_size=20", "distill.expert_span=2",
]
OBJECTIVES = {"trajectory": ["distill.objective=trajectory"],
              "matching": ["distill.objective=matching"]}
# Where ead_dist still depends on |D| (file:line as measured); the benchmark reports each.
DEPENDS_ON_D = {
    "realgrad plan": "ead_dist/stages/pair_realgrad.py build_pair_plan: the driver counts D's "
        "pairs per shard (data/pairs.py split_counts, every tar read without decoding): time "
        "grows with |D|, memory is one count per shard; with real_samples null the plan lists "
        "every D batch's pool index (|D| / B integers) and travels to every worker: measured "
        "as plan",
    "realgrad worker": "ead_dist/stages/pair_realgrad.py pair_partial_sums: the planned "
        "(shard, run) pairs of its shards, |D| / (B W) of them with real_samples null",
    "initial set": "ead_dist/stages/distill_pairs.py:98-111 initialise_pairs -> :68-75 "
        "random_pairs -> data/pairs.py sample_pairs: reads the keys of the whole train split "
        "without decoding (up to image_text.train_pairs), serially, in the coordinator's "
        "process, before iteration 0, then decodes the N drawn; this benchmark copies the "
        "base's init so the distill figures are the loop's, and measures the pass separately "
        "as initialise",
    "coordinator's real_size": "ead_dist/stages/distill_pairs.py:132 real_size = realgrad "
        "index's train_pairs: a number, no cost",
    "meta.json": "every stage's guard reads meta.json, which lists every shard: O(shards), "
        "kilobytes at CC3M",
}
log = logging.getLogger("pair_scaling")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def _reset_peak() -> None:
    """Start this process's peak resident memory (VmHWM) afresh: Linux's ``clear_refs`` 5, so
    the peak read after a step is the step's, not the imports' before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    """This process's peak resident memory since the last :func:`_reset_peak`, in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# --- shards -----------------------------------------------------------------------------------


def write_scenes(directory: str, pairs: int) -> dict:
    """The distinct scenes, once; the writing time is kept in ``directory/writing.json``."""
    from ead_dist.data.caption_scenes import write_caption_scenes
    from ead_dist.data.formats.idx import read_fashion_mnist

    record_url = os.path.join(directory, "writing.json")
    kept = kept_record(record_url, "pairs", pairs)
    if kept:
        return kept
    items = read_fashion_mnist("", "train")
    started = time.perf_counter()
    write_caption_scenes(directory, items.images[:, :, :, 0], items.labels, samples=pairs,
                         shard_size=SHARD_PAIRS, canvas=CANVAS, seed=0)
    record = {"pairs": pairs, "shard_pairs": SHARD_PAIRS, "canvas": CANVAS,
              "seconds": time.perf_counter() - started}
    storage.publish_json(record_url, record)
    return record


def rekeyed_shard(source: str, shard: int) -> bytes:
    """Scene shard ``source`` with every member renamed to shard ``shard``'s keys (position
    kept) and its JSON record's ``key`` and ``url`` to match; the images are the same bytes."""
    out = io.BytesIO()
    with tarfile.open(source) as original, tarfile.open(fileobj=out, mode="w") as copied:
        for member in original:
            data = original.extractfile(member).read()
            old_key, extension = member.name.split(".", 1)
            key = sample_key(shard, int(old_key[SHARD_DIGITS:]))
            if extension == "json":
                record = json.loads(data)
                record["key"], record["url"] = key, record["url"].replace(old_key, key)
                data = json.dumps(record).encode()
            renamed = copy.copy(member)
            renamed.name, renamed.size = f"{key}.{extension}", len(data)
            copied.addfile(renamed, io.BytesIO(data))
    return out.getvalue()


def assemble_shards(scenes: str, directory: str, distinct_shards: int, count: int) -> dict:
    """Shards 0 .. count-1 of D under ``directory``, those missing: links to the scene shards,
    then re-keyed copies. The time over every invocation is kept in ``writing.json``."""
    record_url = os.path.join(directory, "writing.json")
    done = storage.read_json(record_url) if os.path.exists(record_url) else \
        {"linked": 0, "copied": 0, "copy_seconds": 0.0}
    started, linked, copied = time.perf_counter(), 0, 0
    for j in range(count):
        url = os.path.join(directory, shard_name(j))
        if os.path.exists(url):  # published whole (link, or write then rename)
            continue
        if j < distinct_shards:
            os.link(os.path.join(scenes, shard_name(j)), url)
            linked += 1
            continue
        partial = url + ".partial"
        with open(partial, "wb") as f:
            f.write(rekeyed_shard(os.path.join(scenes, shard_name(j % distinct_shards)), j))
        os.replace(partial, url)
        copied += 1
        if copied % 50 == 0:
            log.info("re-keyed %d shards (now %s)", copied, url)
    if linked or copied:
        done = {"linked": done["linked"] + linked, "copied": done["copied"] + copied,
                "copy_seconds": done["copy_seconds"]
                + (time.perf_counter() - started if copied else 0.0)}
        storage.publish_json(record_url, done)
    sizes = [os.path.getsize(os.path.join(directory, shard_name(j))) for j in range(count)]
    return dict(done, seconds_per_copied_shard=done["copy_seconds"] / max(done["copied"], 1),
                shards=count, bytes=sum(sizes), bytes_per_pair=sum(sizes) / (count * SHARD_PAIRS))


def write_data_meta(data_url: str, base: DatasetMeta, shards: list[str]) -> None:
    """DATA/meta.json of the given shards, by path: the last is "test" as ingest's, and the
    mean and std are the distinct scenes' (the copies repeat them)."""
    listed = [ShardInfo(url, SHARD_PAIRS) for url in shards]
    splits = {"train": SplitInfo(SHARD_PAIRS * (len(listed) - 1), listed[:-1]),
              "test": SplitInfo(SHARD_PAIRS, listed[-1:])}
    write_meta(data_url, dataclasses.replace(base, splits=splits))


# --- measurements in a fresh process (module level: they run in a spawned interpreter) ---------


def plan_cost(config: RunConfig) -> dict:
    """The realgrad driver's plan, alone: counting D's pairs per shard (reading every tar
    without decoding) and drawing the batches; its seconds, its memory and the size of the plan
    every Ray Train worker receives."""
    from ead_dist.data.pairs import split_counts
    from ead_dist.stages.pair_realgrad import build_pair_plan

    storage.apply_settings(config.storage)
    meta = read_meta(config.data.url)
    split_counts(config.data.url, config.image_text, "train", 1, meta)  # imports, openers, fs
    rss_before = _rss_mb()
    _reset_peak()
    started = time.perf_counter()
    plan = build_pair_plan(config, use_ray=False)
    seconds = time.perf_counter() - started
    rss_after, peak = _rss_mb(), _peak_mb()
    return {"train_pairs": plan["train_pairs"], "seconds": seconds,
            "pairs_per_second": plan["train_pairs"] / seconds,
            "rss_before_mb": rss_before, "rss_after_mb": rss_after, "peak_rss_mb": peak,
            "held_mb": rss_after - rss_before, "peak_growth_mb": peak - rss_before,
            "pool_batches": plan["pool"], "d_batches": len(plan["d_batches"]),
            "plan_pickled_mb": len(pickle.dumps(plan)) / 1024**2}


def initialise_cost(config: RunConfig) -> dict:
    """What ``initialise_pairs`` spends drawing the initial pairs from all of D (streamed)."""
    import torch

    from ead_dist.models.dual_encoder import tokenize
    from ead_dist.stages.distill_pairs import random_pairs

    torch.set_num_threads(1)
    storage.apply_settings(config.storage)
    meta = read_meta(config.data.url)
    tokenize(["a warm-up caption"], config.image_text.context_length)  # loads the vocabulary
    rss_before = _rss_mb()
    _reset_peak()
    started = time.perf_counter()
    images, _ = random_pairs(config, config.image_text.pairs, config.distill.seed, meta)
    seconds = time.perf_counter() - started
    peak = _peak_mb()
    return {"pairs": len(images), "seconds": seconds, "rss_before_mb": rss_before,
            "peak_rss_mb": peak, "peak_growth_mb": peak - rss_before}


def in_fresh_process(job, config: RunConfig) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(job, config).result()


def measured(record_url: str, measure) -> dict:
    """``measure()`` with the load average around it, kept at ``record_url``; the kept record
    when there is one."""
    if os.path.exists(record_url):
        return storage.read_json(record_url)
    load_before = _load()
    record = dict(measure(), load_before=load_before, load_after=_load())
    storage.publish_json(record_url, record)
    return record


# --- stages -----------------------------------------------------------------------------------


def realgrad_record(config: RunConfig) -> dict:
    from ead_dist.stages.realgrad import run_realgrad

    index = run_realgrad(config)
    return {"seconds": index["seconds"], "train_pairs": index["train_pairs"],
            "real_samples": index["real_samples"], "d_batches": index["d_batches"],
            "pool_batches": index["pool_batches"], "p_batches": index["p_batches"],
            "p_batch_size": index["p_batch_size"], "checkpoints": len(index["checkpoints"]),
            "workers": index["workers"],
            "pairs_per_second": index["real_samples"] / index["seconds"],
            "gradient_pairs_per_second":
                index["real_samples"] * len(index["checkpoints"]) / index["seconds"],
            "peak_memory_mb_rank0": index["peak_memory_mb_rank0"]}


def distill_record(config: RunConfig) -> dict:
    """distill in a fresh Ray worker, so that its peak memory is the coordinator's alone."""
    import ray

    from ead_dist.stages.distill import distill

    summary = ray.get(ray.remote(num_cpus=1, max_calls=1)(distill).remote(config))
    if summary.get("skipped"):
        log.warning("%s: distill had already run; its summary is reused without load figures",
                    config.run)
    keep = ("seconds_per_iteration", "seconds", "iterations", "iterations_run",
            "peak_memory_mb", "first_loss", "final_loss", "segments", "checkpoints",
            "real_samples", "image_change", "text_change")
    return {key: summary[key] for key in keep if key in summary}


def measure_size(size: int, runs_dir: str, base_run: str, common: list[str],
                 real_samples_cap: int | None = None) -> dict:
    """Key listing, initialise's pass, realgrad and both objectives for one |D|. Above
    ``real_samples_cap`` pairs in the shards, realgrad's D sample is capped there (the plan
    still counts all of D; the coordinator reads terms of the same size either way)."""
    root = os.path.join(runs_dir, f"n{size}")
    data = os.path.join(runs_dir, f"data-{size}")
    overrides = common + [f"data.url={data}", "image_text.train_pairs=null",
                          f"name=pair-scaling-{size}"]
    if real_samples_cap is not None and size > real_samples_cap:
        overrides.append(f"realgrad.real_samples={real_samples_cap}")
    record_url = os.path.join(root, "record.json")
    kept = kept_record(record_url, "overrides", overrides)
    if kept:
        return kept
    runs = {name: os.path.join(root, name) for name in OBJECTIVES}
    configs = {name: load_config(CONFIG, overrides + OBJECTIVES[name] + [f"run={run}"])
               for name, run in runs.items()}
    for run in runs.values():
        link_base(base_run, run)
    matching = configs["matching"]
    record = {"pairs_in_shards": size, "shards": size // SHARD_PAIRS}
    record["plan"] = measured(os.path.join(root, "plan.json"),
                              lambda: in_fresh_process(plan_cost, matching))
    record["initialise"] = measured(os.path.join(root, "initialise.json"),
                                    lambda: in_fresh_process(initialise_cost, matching))
    record["realgrad"] = measured(os.path.join(root, "realgrad.json"),
                                  lambda: realgrad_record(matching))
    record["train_pairs"] = record["realgrad"]["train_pairs"]
    record["distill"] = {
        name: measured(os.path.join(runs[name], "measured.json"),
                       lambda config=configs[name]: distill_record(config))
        for name in OBJECTIVES}
    record["overrides"] = overrides
    storage.publish_json(record_url, record)
    return record


# --- S3 ---------------------------------------------------------------------------------------


def _moto() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, in this process (realgrad_throughput's way)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def measure_s3(size: int, runs_dir: str, base_run: str, shards: list[str], base: DatasetMeta,
               common: list[str]) -> dict:
    """realgrad over the same ``size`` pairs from local disk, then from moto's S3."""
    root = os.path.join(runs_dir, f"s3-{size}")
    record_url = os.path.join(root, "record.json")
    if os.path.exists(record_url):
        return storage.read_json(record_url)
    overrides = common + ["image_text.train_pairs=null", "distill.objective=matching",
                          f"name=pair-scaling-s3-{size}"]
    local_run, s3_run = os.path.join(root, "local"), os.path.join(root, "s3")
    for run in (local_run, s3_run):
        link_base(base_run, run)
    local = load_config(CONFIG, overrides + [f"run={local_run}",
                                             f"data.url={runs_dir}/data-{size}"])
    record = {"pairs_in_shards": size,
              "local_plan": measured(os.path.join(root, "local_plan.json"),
                                     lambda: in_fresh_process(plan_cost, local)),
              "local": measured(os.path.join(root, "local.json"), lambda: realgrad_record(local))}
    if not all(os.path.exists(os.path.join(root, f"{name}.json")) for name in ("s3", "s3_plan")):
        import boto3

        server, endpoint = _moto()
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="bench")
            storage.configure({"endpoint_url": endpoint})
            s3_shards = []
            started = time.perf_counter()
            for url in shards:
                s3_shards.append(f"s3://bench/shards/{os.path.basename(url)}")
                with open(url, "rb") as f:
                    storage.publish_bytes(s3_shards[-1], f.read())
            upload = time.perf_counter() - started
            write_data_meta(f"s3://bench/data-{size}", base, s3_shards)
            remote = load_config(CONFIG, overrides + [
                f"run={s3_run}", f"data.url=s3://bench/data-{size}",
                f"storage.s3_endpoint_url={endpoint}"])
            measured(os.path.join(root, "s3_plan.json"),
                     lambda: in_fresh_process(plan_cost, remote))
            measured(os.path.join(root, "s3.json"),
                     lambda: dict(realgrad_record(remote), upload_seconds=upload))
        finally:
            storage.configure({})
            server.stop()
    record["s3_plan"] = storage.read_json(os.path.join(root, "s3_plan.json"))
    record["s3"] = storage.read_json(os.path.join(root, "s3.json"))
    record["s3_over_local_pairs_per_second"] = (record["s3"]["pairs_per_second"]
                                                / record["local"]["pairs_per_second"])
    # the plan's counting reads every tar whole without decoding: shard reading alone
    record["s3_over_local_plan_pairs_per_second"] = (record["s3_plan"]["pairs_per_second"]
                                                     / record["local_plan"]["pairs_per_second"])
    record["overrides"] = overrides
    storage.publish_json(record_url, record)
    return record


# --- report -----------------------------------------------------------------------------------


def summarise(results: dict) -> dict:
    """Largest over smallest size; realgrad's marginal rate; the key list at CC3M's size."""
    sizes = sorted(results, key=int)
    if not sizes:
        return {}
    small, large = results[sizes[0]], results[sizes[-1]]
    plan = large["plan"]
    summary = {
        "sizes": [int(s) for s in sizes],
        "train_pairs": [results[s]["train_pairs"] for s in sizes],
        "plan_held_mb_largest": plan["held_mb"],
        # with real_samples null the plan lists every D batch's pool index: |D| / B integers
        "plan_pickled_mb_at_cc3m":
            plan["plan_pickled_mb"] * CC3M_PAIRS / max(large["train_pairs"], 1),
    }
    if len(sizes) < 2:
        return summary
    ratio = large["train_pairs"] / small["train_pairs"]
    summary["train_pairs_ratio"] = ratio
    for name in OBJECTIVES:
        a, b = small["distill"][name], large["distill"][name]
        summary[f"{name}_seconds_per_iteration_ratio"] = \
            b["seconds_per_iteration"] / a["seconds_per_iteration"]
        summary[f"{name}_peak_memory_ratio"] = b["peak_memory_mb"] / a["peak_memory_mb"]
    summary["realgrad_seconds_ratio"] = large["realgrad"]["seconds"] / small["realgrad"]["seconds"]
    # realgrad = a fixed start (Ray Train's worker group, key-listing tasks) + a per-pair part;
    # this is the per-pair part's rate, which should not fall with size: between the sizes
    # with the fewest and the most pairs among those whose realgrad read all of D (a capped
    # size also counts all of D's pairs and scans every shard for its sample: not per pair).
    by_sample = sorted((results[s]["realgrad"] for s in sizes
                        if results[s]["realgrad"]["d_batches"]
                        == results[s]["realgrad"]["pool_batches"]),
                       key=lambda r: r["real_samples"])
    fewest, most = (by_sample[0], by_sample[-1]) if by_sample else (None, None)
    if by_sample and most["real_samples"] > fewest["real_samples"]:
        rate = ((most["real_samples"] - fewest["real_samples"])
                / (most["seconds"] - fewest["seconds"]))
        summary["realgrad_marginal_pairs_per_second"] = rate
        summary["realgrad_fixed_seconds"] = fewest["seconds"] - fewest["real_samples"] / rate
        summary["realgrad_rate_between_samples"] = [fewest["real_samples"],
                                                    most["real_samples"]]
    summary["initialise_seconds_ratio"] = \
        large["initialise"]["seconds"] / small["initialise"]["seconds"]
    summary["plan_held_mb"] = [results[s]["plan"]["held_mb"] for s in sizes]
    summary["plan_seconds_ratio"] = large["plan"]["seconds"] / small["plan"]["seconds"]
    return summary


def write_report(report: dict, out: str, started: float) -> None:
    report["summary"] = summarise(report["results"])
    report["machine"]["load_average_at_end"] = _load()
    report["seconds_total"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="pairs in D's shards (|D| is the train part, about 95 %%)")
    parser.add_argument("--distinct-pairs", type=int, default=10_000,
                        help="distinct scenes written; larger sizes repeat them, re-keyed")
    parser.add_argument("--s3-size", type=int, default=10_000,
                        help="pairs for realgrad from S3 against local disk; 0: skip")
    parser.add_argument("--runs-dir", default="runs/pair_scaling")
    parser.add_argument("--workers", type=int, default=2, help="realgrad Ray Train workers")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="further config overrides for every run (section.field=value)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--real-samples-cap", type=int, default=None,
                        help="sizes with more pairs than this draw realgrad's D sample of this "
                             "many pairs (realgrad.real_samples); default: all of D everywhere")
    args = parser.parse_args()
    for size in args.sizes + [args.distinct_pairs] + ([args.s3_size] if args.s3_size else []):
        if size < 2 * SHARD_PAIRS or size % SHARD_PAIRS:
            parser.error(f"sizes must be multiples of {SHARD_PAIRS} of at least "
                         f"{2 * SHARD_PAIRS} (a train and a test shard), got {size}")
    if args.distinct_pairs < 2 * EXPERT_PAIRS:
        parser.error(f"--distinct-pairs must be at least {2 * EXPERT_PAIRS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    # moto's credentials, before Ray starts: its workers take this environment
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    runs_dir = os.path.abspath(args.runs_dir)
    scenes, shard_dir = os.path.join(runs_dir, "scenes"), os.path.join(runs_dir, "shards")
    os.makedirs(scenes, exist_ok=True)
    os.makedirs(shard_dir, exist_ok=True)
    started = time.perf_counter()
    common = SETTINGS + [f"realgrad.workers={args.workers}"] + args.extra
    report = {
        "benchmark": "pair_scaling",
        "command": " ".join([".venv/bin/python", "benchmarks/pair_scaling.py",
                             *map(shlex.quote, sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": "cpu", "load_average_at_start": _load(),
                    "note": "load averages before and after each case: load_before / "
                            "load_after"},
        "claim": "the coordinator's time per iteration and memory do not grow with |D| for "
                 "either objective (trajectory reads checkpoints, matching fixed-size real "
                 "terms); realgrad's time grows linearly",
        "settings": {
            "config": "pipelines/scenes_tiny.yaml", "overrides": common,
            "size_overrides": ["image_text.train_pairs=null"],
            "base_overrides": [f"image_text.train_pairs={EXPERT_PAIRS}"],
            "objectives": OBJECTIVES, "ray_num_cpus": args.num_cpus,
            "data": f"Fashion-MNIST caption scenes, {CANVAS}x{CANVAS} JPEG, "
                    f"{args.distinct_pairs} distinct in {SHARD_PAIRS}-pair img2dataset shards, "
                    "larger sizes from re-keyed copies; D = the train split by key hash "
                    "(held_out 0.05)",
            "shared": f"one expert (trained on the first {EXPERT_PAIRS} train pairs of the "
                      "distinct scenes) and one initial set (100 pairs drawn from them) for "
                      "every size",
            "realgrad": "real_samples null (all of D) at every size" + (
                f", except sizes above {args.real_samples_cap} pairs: real_samples "
                f"{args.real_samples_cap}" if args.real_samples_cap else ": no cap"),
            "plan": "pair_realgrad.build_pair_plan in a spawned process, without Ray",
            "initialise": "distill_pairs.random_pairs over all of D in a spawned process; the "
                          "distill runs copy the base's init instead",
            "distill": "in a fresh Ray worker (max_calls=1), one thread: peak memory is that "
                       "process's",
            "s3": "moto's ThreadedMotoServer on loopback in the driver process; shards and "
                  "meta.json in S3, RUN on local disk",
        },
        "depends_on_D": DEPENDS_ON_D,
        "results": {},
    }
    report["scene_writing"] = write_scenes(scenes, args.distinct_pairs)
    distinct_shards = args.distinct_pairs // SHARD_PAIRS
    needed = max(args.sizes + [args.distinct_pairs, args.s3_size]) // SHARD_PAIRS
    report["shards"] = assemble_shards(scenes, shard_dir, distinct_shards, needed)
    shard_urls = [os.path.join(shard_dir, shard_name(j)) for j in range(needed)]

    base_data, base_run = os.path.join(runs_dir, "data-base"), os.path.join(runs_dir, "base")
    base_config = load_config(CONFIG, common + [
        f"run={base_run}", f"data.url={base_data}", f"data.source={scenes}",
        f"image_text.train_pairs={EXPERT_PAIRS}", "name=pair-scaling-base",
        "distill.objective=trajectory"])
    with ray_session(RayConfig(num_cpus=args.num_cpus)):
        from ead_dist.data.image_text import ingest_image_text
        from ead_dist.stages.distill_pairs import initialise_pairs
        from ead_dist.stages.experts import run_experts
        from ead_dist.stages.pair_experts import pair_model

        ingest_started = time.perf_counter()
        base = ingest_image_text("cc3m", scenes, base_data, image_size=CANVAS)
        report["base_ingest_seconds"] = time.perf_counter() - ingest_started
        experts = run_experts(base_config)
        report["experts"] = {"count": len(experts["experts"]),
                             "seconds": [e.get("seconds") for e in experts["experts"]],
                             "checkpoints": sum(len(e["checkpoints"])
                                                for e in experts["experts"])}
        # in this process: it reads the first EXPERT_PAIRS of the base, never the large D
        initialise_pairs(base_config, pair_model(base_config, CANVAS), base)
        for size in args.sizes:
            write_data_meta(os.path.join(runs_dir, f"data-{size}"), base,
                            shard_urls[:size // SHARD_PAIRS])
        if args.s3_size:
            write_data_meta(os.path.join(runs_dir, f"data-{args.s3_size}"), base,
                            shard_urls[:args.s3_size // SHARD_PAIRS])
        for size in args.sizes:
            record = measure_size(size, runs_dir, base_run, common, args.real_samples_cap)
            report["results"][str(size)] = record
            log.info("|D| = %d: realgrad %.1f s (%.0f pairs/s), coordinator %.3f s/it "
                     "trajectory, %.3f s/it matching, %.0f / %.0f MiB; plan %.1f MiB",
                     record["train_pairs"], record["realgrad"]["seconds"],
                     record["realgrad"]["pairs_per_second"],
                     record["distill"]["trajectory"]["seconds_per_iteration"],
                     record["distill"]["matching"]["seconds_per_iteration"],
                     record["distill"]["trajectory"]["peak_memory_mb"],
                     record["distill"]["matching"]["peak_memory_mb"],
                     record["plan"]["held_mb"])
            write_report(report, args.out, started)
        if args.s3_size:
            s3 = measure_s3(args.s3_size, runs_dir, base_run,
                            shard_urls[:args.s3_size // SHARD_PAIRS], base, common)
            report["s3_against_local"] = s3
            log.info("realgrad on %d pairs: %.0f pairs/s local, %.0f pairs/s S3", args.s3_size,
                     s3["local"]["pairs_per_second"], s3["s3"]["pairs_per_second"])
            write_report(report, args.out, started)


if __name__ == "__main__":
    main()

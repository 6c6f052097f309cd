"""Evaluate stage for image-text: retrieval recall of dual encoders trained on each set of pairs.

Each set (the distilled S, its initialisation ``init`` and ``random_real``: another seeded
draw of N real train pairs) trains a fresh dual encoder (``image_text.model``, seed = run) for
``evaluate.epochs`` epochs with Adam at ``evaluate.lr`` and batch ``evaluate.batch_size`` on
its images and caption embeddings; image-to-text and text-to-image recall@1/5/10 are then
measured on ``image_text.test_pairs`` held-out pairs (keys held out by hash). Every finished
run is published at once (``RUN/evaluate/<set>-<model>-<seed>.json``), so a rerun does only
the missing ones; ``RUN/eval.json`` holds per set the runs, mean and std of each recall and
the protocol.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch
from torch import Tensor

from .. import storage
from ..augment import augment
from ..config import RunConfig
from ..data.meta import read_meta
from ..data.pairs import load_pairs
from ..fingerprint import guard
from ..measure import peak_memory_mb
from ..metrics import MetricsLog
from ..retrieval import KS, model_recall
from .distill_pairs import load_pair_set, random_pairs
from .evaluate import run_result_url
from .pair_experts import pair_model

log = logging.getLogger(__name__)

RANDOM_REAL_SEED_OFFSET = 7919  # random_real draws other pairs than init (distill.seed)


OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def train_on_pairs(model: torch.nn.Module, images: Tensor, text: Tensor, *, epochs: int,
                   lr: float, batch_size: int, seed: int,
                   similarity: Optional[Tensor] = None,
                   optimizer: str = "adam",
                   augmentation: Optional[str] = None) -> torch.nn.Module:
    """Adam (the evaluation's protocol; ``optimizer="sgd"``: plain SGD, the students' and
    experts' optimizer) on the contrastive loss of (images, text) in reshuffled batches; in
    place. A learned ``similarity`` [N, N] gives each batch its block as the loss's targets.
    ``augmentation`` (a DSA strategy) is drawn per image from its own generator, so the
    batches' order is the same with and without it."""
    descent = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + 1_000_003)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images) - 1, batch_size):  # a batch of 1 has no negatives
            batch = order[i:i + batch_size]
            if len(batch) < 2:
                continue
            targets = None if similarity is None else similarity[batch][:, batch]
            x = images[batch] if augmentation is None else augment(images[batch], augmentation,
                                                                    draws)
            loss = model(x, text[batch], targets)
            descent.zero_grad(set_to_none=True)
            loss.backward()
            descent.step()
    return model.eval()


def evaluation_pair_sets(config: RunConfig, meta
                         ) -> dict[str, tuple[Tensor, Tensor, Optional[Tensor]]]:
    """name -> (images, caption embeddings, learned similarity or None) of every set to
    evaluate."""
    distilled = load_pair_set(storage.join(config.run, "synthetic.safetensors"))
    sets = {"synthetic": (distilled.images, distilled.text, distilled.similarity)}
    if "init" in config.evaluate.baselines:
        init = load_pair_set(storage.join(config.run, "distill", "init.safetensors"))
        sets["init"] = (init.images, init.text, init.similarity)
    if "random_real" in config.evaluate.baselines:
        real, tokens = random_pairs(config, len(distilled.images),
                                    config.distill.seed + RANDOM_REAL_SEED_OFFSET, meta)
        with torch.no_grad():
            sets["random_real"] = (real, pair_model(config, meta.image_shape[1])
                                   .embed_tokens(tokens), None)
    return sets


def summarise_runs(runs: list[dict[str, float]]) -> dict:
    keys = sorted(runs[0])
    return {"runs": runs,
            "mean": {k: statistics.fmean(r[k] for r in runs) for k in keys},
            "std": {k: statistics.pstdev([r[k] for r in runs]) for k in keys}}


def run_evaluate_pairs(config: RunConfig) -> dict:
    guard(config, "evaluate")
    eval_url = storage.join(config.run, "eval.json")
    if storage.exists(eval_url):
        return storage.read_json(eval_url)
    started = time.perf_counter()
    meta = read_meta(config.data.url)
    test = load_pairs(config.data.url, config.image_text, "test",
                      limit=config.image_text.test_pairs, meta=meta)
    sets = evaluation_pair_sets(config, meta)
    name = config.image_text.model
    metrics = MetricsLog(storage.join(config.run, "evaluate"))
    results: dict[str, dict] = {}
    for set_name, (images, text, similarity) in sets.items():
        runs = []
        for seed in range(config.evaluate.runs):
            url = run_result_url(config.run, set_name, name, seed)
            if storage.exists(url):
                runs.append(storage.read_json(url)["recall"])
                continue
            run_started = time.perf_counter()
            torch.manual_seed(seed)
            model = train_on_pairs(pair_model(config, meta.image_shape[1]), images, text,
                                   epochs=config.evaluate.epochs, lr=config.evaluate.lr,
                                   batch_size=config.evaluate.batch_size, seed=seed,
                                   similarity=similarity,
                                   augmentation=config.image_text.augmentation)
            recall = model_recall(model, test.images, test.tokens)
            seconds = time.perf_counter() - run_started
            storage.publish_json(url, {"recall": recall, "seconds": seconds,
                                       "peak_memory_mb": peak_memory_mb()})
            metrics.log(set=set_name, model=name, seed=seed, recall=recall, seconds=seconds)
            metrics.publish()
            log.info("evaluate %s seed %d: %s", set_name, seed, recall)
            runs.append(recall)
        results[set_name] = {name: summarise_runs(runs)}
    report = {
        "results": results,
        "protocol": {"task": "image_text retrieval", "model": name,
                     "pretrained": config.image_text.pretrained, "optimizer": "adam",
                     "epochs": config.evaluate.epochs, "lr": config.evaluate.lr,
                     "batch_size": config.evaluate.batch_size, "runs": config.evaluate.runs,
                     "pairs": len(sets["synthetic"][0]), "test_pairs": len(test.keys),
                     "held_out": config.image_text.held_out, "recall_at": list(KS),
                     "augmentation": config.image_text.augmentation,
                     "targets": "learned similarity" if sets["synthetic"][2] is not None
                     else "identity"},
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
    }
    storage.publish_json(eval_url, report)
    return report

"""The evaluate stage publishes each (set, model, seed) run and a rerun redoes only missing ones."""

import json

import pytest
import torch

from conftest import tiny_config
from ead_dist import storage
from ead_dist.data.meta import read_meta
from ead_dist.stages import evaluate
from ead_dist.synthetic import SyntheticSet, save_synthetic


def _synthetic_set(config, **metadata) -> None:
    meta = read_meta(config.data.url)
    count = config.distill.ipc * meta.num_classes
    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(meta.num_classes).repeat_interleave(config.distill.ipc)
    synthetic = SyntheticSet(torch.randn(count, *meta.image_shape, generator=generator),
                             torch.randn(count, meta.num_classes, generator=generator), classes)
    save_synthetic(storage.join(config.run, "synthetic.safetensors"), synthetic,
                   {"dataset": meta.name, "method": "test", "ipc": config.distill.ipc,
                    "num_classes": meta.num_classes, "mean": meta.mean, "std": meta.std,
                    **metadata})


def test_a_rerun_recomputes_only_the_runs_not_published(small_fashion_mnist, tmp_path,
                                                        monkeypatch):
    config = tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                         {"ray.enabled": False, "evaluate.runs": 2, "evaluate.epochs": 1,
                          "evaluate.baselines": ["random_real"], "evaluate.test_samples": 100})
    _synthetic_set(config)
    calls = []
    real = evaluate.train_and_test

    def counted(config, images, targets, model_name, seed, test, threads=1):
        calls.append((len(images), model_name, seed))
        return real(config, images, targets, model_name, seed, test, threads=1)

    monkeypatch.setattr(evaluate, "train_and_test", counted)
    first = evaluate.run_evaluate(config, use_ray=False)
    assert len(calls) == 4
    names = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(
        storage.join(config.run, "evaluate"), "*-*-*.json"))
    assert names == ["random_real-convnet-0.json", "random_real-convnet-1.json",
                     "synthetic-convnet-0.json", "synthetic-convnet-1.json"]
    # A killed evaluation: no report yet, and one run not published.
    (tmp_path / "run" / "eval.json").unlink()
    (tmp_path / "run" / "evaluate" / "random_real-convnet-1.json").unlink()
    calls.clear()
    second = evaluate.run_evaluate(config, use_ray=False)
    assert [seed for _, _, seed in calls] == [1] and len(calls) == 1
    for name, per_model in first["results"].items():
        for model, summary in per_model.items():
            again = second["results"][name][model]
            assert again["runs"] == summary["runs"]
            assert again["mean"] == summary["mean"] and again["std"] == summary["std"]
    lines = storage.read_bytes(storage.join(config.run, "evaluate", "metrics.jsonl")).decode()
    runs = [json.loads(line) for line in lines.splitlines()]
    assert len(runs) == 5 and runs[-1]["set"] == "random_real" and runs[-1]["seed"] == 1
    assert set(runs[0]) >= {"set", "model", "seed", "accuracy", "seconds", "time"}


def test_the_configured_lr_schedule_trains_and_is_recorded(small_fashion_mnist, tmp_path,
                                                           sgd_rates):
    config = tiny_config(str(tmp_path / "run"), small_fashion_mnist,
                         {"ray.enabled": False, "evaluate.runs": 1, "evaluate.epochs": 4,
                          "evaluate.lr": 0.02, "evaluate.lr_schedule": "tenth",
                          "evaluate.baselines": [], "evaluate.test_samples": 50})
    _synthetic_set(config)
    report = evaluate.run_evaluate(config, use_ray=False)
    # one batch per epoch: epochs 0-2 at lr, epoch 3 at lr / 10 (DC's and MTT's evaluation)
    assert sgd_rates == pytest.approx([0.02] * 3 + [0.002])
    assert report["protocol"]["lr_schedule"] == "times 0.1 after 3 epochs"


def test_learned_lr_trains_every_set_at_the_step_size_recorded_in_the_set(
        small_fashion_mnist, tmp_path, sgd_rates):
    from ead_dist.config import ConfigError

    def config_at(name):
        return tiny_config(str(tmp_path / name), small_fashion_mnist,
                           {"ray.enabled": False, "evaluate.runs": 1, "evaluate.epochs": 2,
                            "evaluate.lr": "learned", "distill.objective": "trajectory",
                            "evaluate.baselines": ["random_real"], "evaluate.test_samples": 50})

    config = config_at("learned")
    _synthetic_set(config, student_lr=0.037)
    report = evaluate.run_evaluate(config, use_ray=False)
    assert sgd_rates and set(sgd_rates) == {0.037}  # the set and the random real baseline
    assert report["protocol"]["lr"] == 0.037 and report["protocol"]["lr_source"] == "learned"
    unrecorded = config_at("unrecorded")
    _synthetic_set(unrecorded)
    with pytest.raises(ConfigError, match="synthetic.safetensors records no learned step size"):
        evaluate.run_evaluate(unrecorded, use_ray=False)

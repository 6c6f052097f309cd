"""Real-data terms: exact against a direct computation, and the same with 1 or 2 Ray Train
workers all-reducing their partial sums as in one process."""

import os
from typing import ClassVar

import pytest
import torch

from conftest import tiny_config
from ead_dist import storage
from ead_dist.data.arrays import load_split
from ead_dist.effect import cross_entropy, loss_gradient
from ead_dist.models import build_model
from ead_dist.stages.experts import run_experts
from ead_dist.stages.realgrad import build_plan, realgrad_url, run_realgrad, term_file

OVERRIDES = {"realgrad.real_samples": 250, "realgrad.p_batches": 3, "realgrad.p_batch_size": 20,
             "realgrad.checkpoints": 3, "experts.count": 1, "experts.train_samples": 256}


@pytest.fixture(scope="module")
def experts_run(small_fashion_mnist, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("realgrad") / "base")
    config = tiny_config(run, small_fashion_mnist, OVERRIDES)
    run_experts(config, use_ray=False)
    return run


def _config(experts_run, small_fashion_mnist, tmp_path, name, workers):
    import shutil

    run = str(tmp_path / name)
    shutil.copytree(storage.join(experts_run, "experts"), storage.join(run, "experts"))
    return tiny_config(run, small_fashion_mnist, dict(OVERRIDES, **{"realgrad.workers": workers}))


def close(a, b, tolerance=1e-4):
    """Equal up to float32 summation order: max error relative to the largest entry."""
    return (a - b).abs().max() <= tolerance * b.abs().max()


def _load(config):
    index = storage.read_json(storage.join(realgrad_url(config.run), "index.json"))
    return [storage.load_tensors(storage.join(realgrad_url(config.run), c["file"]))[0]
            for c in index["checkpoints"]]


def test_single_process_terms_match_a_direct_computation(experts_run, small_fashion_mnist,
                                                         tmp_path):
    config = _config(experts_run, small_fashion_mnist, tmp_path, "direct", 1)
    run_realgrad(config, use_ray=False)
    plan = build_plan(config)
    images, labels, meta = load_split(small_fashion_mnist, "train")
    model = build_model("convnet", 1, 10, (28, 28), **config.model.options_for("convnet"))
    for checkpoint, terms in zip(plan["checkpoints"], _load(config)):
        theta, _ = storage.load_tensors(checkpoint["url"])
        d = torch.tensor(plan["d_sample"])
        g_D = loss_gradient(model, theta, cross_entropy, images[d], labels[d])
        assert close(terms["g_D"], g_D)
        for k, batch in enumerate(plan["p_batches"]):
            b = torch.tensor(batch)
            g_P = loss_gradient(model, theta, cross_entropy, images[b], labels[b])
            assert close(terms["g_P"][k], g_P)
            assert close(terms["real_dots"][k], torch.dot(g_P, g_D))
        c = 3
        members = d[labels[d] == c]
        g_Dc = loss_gradient(model, theta, cross_entropy, images[members], labels[members])
        assert close(terms["g_D_classes"][c], g_Dc)
        assert int(terms["d_class_counts"].sum()) == len(d)


@pytest.mark.cluster
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_train_workers_all_reduce_to_the_single_process_sums(
        workers, experts_run, small_fashion_mnist, tmp_path, ray_session):
    reference = _config(experts_run, small_fashion_mnist, tmp_path, "reference", 1)
    run_realgrad(reference, use_ray=False)
    config = _config(experts_run, small_fashion_mnist, tmp_path, f"w{workers}", workers)
    result = run_realgrad(config, use_ray=True)
    assert result["workers"] == workers
    for expected, got in zip(_load(reference), _load(config)):
        assert set(expected) == set(got)
        for name in expected:
            if expected[name].is_floating_point():
                scale = expected[name].abs().max()
                assert (got[name] - expected[name]).abs().max() <= 1e-5 * scale, name
            else:
                assert torch.equal(got[name], expected[name]), name


def test_rerun_is_skipped_and_missing_checkpoints_are_resumed(experts_run, small_fashion_mnist,
                                                              tmp_path):
    config = _config(experts_run, small_fashion_mnist, tmp_path, "resume", 1)
    run_realgrad(config, use_ray=False)
    first = _load(config)
    import os

    os.unlink(storage.join(realgrad_url(config.run), "index.json"))
    os.unlink(storage.join(realgrad_url(config.run), term_file(1)))
    kept = os.stat(storage.join(realgrad_url(config.run), term_file(0))).st_mtime_ns
    run_realgrad(config, use_ray=False)
    assert os.stat(storage.join(realgrad_url(config.run), term_file(0))).st_mtime_ns == kept
    for a, b in zip(first, _load(config)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_without_shards_contributes_zeros(experts_run, small_fashion_mnist, tmp_path):
    from ead_dist.stages.realgrad import partial_sums

    config = _config(experts_run, small_fashion_mnist, tmp_path, "idle", 4)
    plan = build_plan(config)
    part = partial_sums(plan, rank=3, world=4, todo=[0])  # 3 shards: rank 3 gets none
    assert int(part["count_d"].sum()) == 0 and int(part["count_p"].sum()) == 0
    assert part["0_d"].abs().sum() == 0 and part["0_d"].shape[0] == 10


def test_chunks_without_class_terms_in_float16_give_the_same_terms(experts_run,
                                                                   small_fashion_mnist, tmp_path):
    reference = _config(experts_run, small_fashion_mnist, tmp_path, "whole", 1)
    run_realgrad(reference, use_ray=False)
    config = _config(experts_run, small_fashion_mnist, tmp_path, "lean", 1)
    config.realgrad.chunk, config.realgrad.class_terms, config.realgrad.dtype = 2, False, "float16"
    index = run_realgrad(config, use_ray=False)
    assert index["passes"] == 2 and index["dtype"] == "float16"  # 3 checkpoints, 2 per pass
    for expected, got in zip(_load(reference), _load(config)):
        assert "g_D_classes" not in got and "g_P_classes" not in got
        for name in ("g_D", "g_P", "real_dots"):
            assert got[name].dtype == torch.float16, name
            assert close(got[name].float(), expected[name], tolerance=2e-3), name
        assert torch.equal(got["d_class_counts"], expected["d_class_counts"])
        assert torch.equal(got["p_class_counts"], expected["p_class_counts"])


def test_a_pass_holds_the_documented_sums_whatever_the_number_of_checkpoints(
        experts_run, small_fashion_mnist, tmp_path):
    from ead_dist.stages.realgrad import partial_sums, sums_bytes

    config = _config(experts_run, small_fashion_mnist, tmp_path, "bytes", 1)
    plan = build_plan(config)
    n = sum(v.numel() for v in storage.load_tensors(plan["checkpoints"][0]["url"])[0].values())
    for class_terms, chunk in ((True, 1), (True, 2), (False, 2)):
        plan["class_terms"] = class_terms
        part = partial_sums(plan, 0, 1, todo=list(range(chunk)))
        held = sum(v.nbytes for k, v in part.items() if not k.startswith("count"))
        # sums_bytes also counts the checkpoints themselves: one n-vector each.
        assert held + 4 * n * chunk == sums_bytes(n, 10, 3, class_terms, chunk)
    # With class terms a checkpoint's sums have C + K*C = 40 rows, without 1 + K = 4.
    assert sums_bytes(n, 10, 3, True, 1) == 4 * n * 41
    assert sums_bytes(n, 10, 3, False, 1) == 4 * n * 5


class _RecordingTrainer:
    """Stands in for TorchTrainer: records where Ray Train would keep its files."""

    storage_paths: ClassVar[list[str]] = []

    def __init__(self, train_fn, *, run_config, **options):
        self.storage_path = run_config.storage_path

    def fit(self):
        import os

        assert os.path.isdir(self.storage_path)  # there while the pass runs
        _RecordingTrainer.storage_paths.append(self.storage_path)


def test_ray_train_storage_is_a_temporary_directory_removed_after_each_pass(monkeypatch,
                                                                            tmp_path):
    import os
    import tempfile

    import ray.train.torch

    from ead_dist.stages import realgrad

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _RecordingTrainer)
    monkeypatch.setattr(_RecordingTrainer, "storage_paths", [])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = tiny_config(str(tmp_path / "run"), "data", {"ray.use_gpu": False})
    for todo in ([0, 1], [2]):
        realgrad._pass_on_ray(config, {}, todo)
    first, second = _RecordingTrainer.storage_paths
    assert first != second and os.path.dirname(first) == str(tmp_path)
    assert os.listdir(tmp_path) == []


def test_realgrad_runs_ray_train_v2_as_production_does():
    """No test sets RAY_TRAIN_V2_ENABLED: Ray 2.60's default, which `ead-dist run` gets, is the
    Ray Train the tests exercise."""
    import ray.train.torch

    assert "RAY_TRAIN_V2_ENABLED" not in os.environ
    assert ray.train.torch.TorchTrainer.__module__.startswith("ray.train.v2.")

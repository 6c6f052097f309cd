"""Stage fingerprints: a rerun under other settings stops naming the fields and the way out; the
same settings, or ones that change only speed and placement, still skip or resume."""

import logging
import os
import shutil

import pytest
import torch

import raw_writers
from conftest import tiny_config
from ead_dist import storage
from ead_dist.cli import main as cli_main
from ead_dist.data.ingest import ingest_classification
from ead_dist.data.meta import read_meta
from ead_dist.fingerprint import (
    StaleRunError,
    data_content,
    differences,
    stage_fields,
)
from ead_dist.stages.distill import distill, state_url
from ead_dist.stages.evaluate import run_evaluate
from ead_dist.stages.experts import run_experts
from ead_dist.stages.realgrad import run_realgrad

BASE = {"experts.count": 1, "experts.train_samples": 256, "realgrad.real_samples": 200,
        "realgrad.checkpoints": 3, "realgrad.class_terms": False, "distill.iterations": 4,
        "distill.save_every": 2, "evaluate.epochs": 1, "evaluate.test_samples": 100,
        "evaluate.baselines": ["init"]}
STAGES = {"experts": lambda config: run_experts(config, use_ray=False),
          "realgrad": lambda config: run_realgrad(config, use_ray=False),
          "distill": distill,
          "evaluate": lambda config: run_evaluate(config, use_ray=False)}
CONTENT = "sha256:0123456789abcdef"


@pytest.fixture(autouse=True)
def _default_storage_settings():
    """Stages apply their config's storage settings to this process: undo them after a test."""
    yield
    storage.configure()


@pytest.fixture(scope="module")
def done_run(small_fashion_mnist, tmp_path_factory):
    """A finished run, every stage in this process; tests copy it."""
    run = str(tmp_path_factory.mktemp("fingerprint") / "base")
    config = tiny_config(run, small_fashion_mnist, BASE)
    for stage in STAGES.values():
        stage(config)
    return run


def _copy(done_run, small_fashion_mnist, tmp_path, name, **overrides):
    run = str(tmp_path / name)
    shutil.copytree(done_run, run, symlinks=True)
    return tiny_config(run, small_fashion_mnist, dict(BASE, **overrides))


def _bytes(run, *path):
    return storage.read_bytes(storage.join(run, *path))


# --- what counts ------------------------------------------------------------------------------


def test_each_stage_counts_its_settings_and_its_inputs_but_not_speed_or_placement():
    config = tiny_config("/runs/r", "/data/d", {"distill.objective": "matching"})
    fields = {stage: stage_fields(config, stage, CONTENT)
              for stage in ("ingest", "experts", "realgrad", "distill", "evaluate")}
    assert fields["ingest"] == {"data.dataset": "fashion_mnist"}
    assert fields["experts"]["data.content"] == CONTENT and fields["experts"]["experts.lr"] == 0.01
    assert not any(f.startswith(("realgrad.", "distill.", "evaluate.")) for f in fields["experts"])
    # Each stage's fingerprint holds its inputs' (matching reads the real terms).
    order = ["ingest", "experts", "realgrad", "distill", "evaluate"]
    for earlier, later in zip(order, order[1:]):
        assert fields[earlier].items() < fields[later].items(), later
    for field in ("realgrad.class_terms", "realgrad.dtype", "distill.objective", "distill.ipc",
                  "distill.student_steps", "distill.student_batch_size", "distill.expert_span",
                  "distill.max_start", "distill.student_lr", "distill.lr_student_lr"):
        assert field in fields["distill"], field
    assert "evaluate.test_samples" in fields["evaluate"]
    for field in ("realgrad.workers", "realgrad.batch_size", "realgrad.chunk", "distill.threads",
                  "distill.save_every", "distill.unroll", "evaluate.baselines", "data.url",
                  "data.source", "data.shard_size", "run", "name"):
        assert field not in fields["evaluate"], field
    assert not any(f.startswith(("ray.", "storage.")) for f in fields["evaluate"])


def test_the_trajectory_objective_does_not_count_real_term_settings():
    config = tiny_config("/runs/r", "/data/d", {"distill.objective": "trajectory"})
    fields = stage_fields(config, "distill", CONTENT)
    assert "distill.expert_span" in fields and "experts.save_every" in fields
    assert not any(f.startswith("realgrad.") for f in fields)


def test_data_content_follows_what_the_data_are_not_where_or_how_sharded(small_fashion_mnist):
    meta = read_meta(small_fashion_mnist)
    digest = data_content(meta)
    meta.splits["train"].shards = meta.splits["train"].shards[::-1]
    assert data_content(meta) == digest
    meta.splits["train"].size -= 1
    assert data_content(meta) != digest


def test_a_field_added_after_a_record_was_made_differs_only_off_its_default():
    recorded = {"distill.ipc": 10}
    assert differences(recorded, {"distill.ipc": 10, "distill.student_steps": 10}) == []
    assert differences(recorded, {"distill.ipc": 1, "distill.student_steps": 4}) == [
        ("distill.ipc", 10, 1), ("distill.student_steps", 10, 4)]


# --- refused, skipped, resumed ----------------------------------------------------------------


@pytest.mark.parametrize("stage,override,message", [
    ("experts", {"experts.lr": 0.02}, "experts.lr 0.01 -> 0.02"),
    # The error that says "rerun realgrad with class_terms" must not lead to a silent skip.
    ("realgrad", {"realgrad.class_terms": True}, "realgrad.class_terms False -> True"),
    ("distill", {"distill.objective": "scalar"}, "distill.objective 'matching' -> 'scalar'"),
    ("distill", {"distill.ipc": 1}, "distill.ipc 2 -> 1"),
    ("distill", {"distill.student_lr": 0.1}, "distill.student_lr None -> 0.1"),
    ("evaluate", {"evaluate.epochs": 2}, "evaluate.epochs 1 -> 2"),
])
def test_a_finished_stage_under_other_settings_is_refused(done_run, small_fashion_mnist,
                                                          tmp_path, stage, override, message):
    config = _copy(done_run, small_fashion_mnist, tmp_path, stage, **override)
    before = _bytes(config.run, "synthetic.safetensors")
    with pytest.raises(StaleRunError) as error:
        STAGES[stage](config)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert f"the {stage} stage at {storage.join(config.run, stage)}" in text
    assert "new run URL" in text and storage.join(config.run, "eval.json") in text
    assert _bytes(config.run, "synthetic.safetensors") == before


def test_an_interrupted_stage_is_protected_too(done_run, small_fashion_mnist, tmp_path):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "cut")
    os.unlink(storage.join(config.run, "synthetic.safetensors"))
    os.unlink(state_url(config.run, 4))
    changed = tiny_config(config.run, small_fashion_mnist,
                          dict(BASE, **{"distill.lr_images": 0.5}))
    with pytest.raises(StaleRunError, match="distill.lr_images 0.01 -> 0.5"):
        distill(changed)
    assert not os.path.exists(storage.join(config.run, "synthetic.safetensors"))


def test_the_same_settings_skip_every_stage(done_run, small_fashion_mnist, tmp_path):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "same")
    files = ["experts/index.json", "realgrad/index.json", "synthetic.safetensors", "eval.json"]
    before = {name: os.stat(storage.join(config.run, name)).st_mtime_ns for name in files}
    for stage in STAGES.values():
        stage(config)
    assert distill(config)["skipped"] is True
    assert {name: os.stat(storage.join(config.run, name)).st_mtime_ns for name in files} == before


def test_settings_that_change_no_result_still_resume(done_run, small_fashion_mnist, tmp_path):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "shape")
    before = storage.load_tensors(storage.join(config.run, "synthetic.safetensors"))[0]
    for name in ("realgrad/index.json", "realgrad/ckpt-0001.safetensors",
                 "synthetic.safetensors", "distill/state-000004.safetensors", "eval.json"):
        os.unlink(storage.join(config.run, name))
    other_shape = tiny_config(config.run, small_fashion_mnist, dict(BASE, **{
        "realgrad.workers": 3, "realgrad.batch_size": 50, "distill.threads": 1,
        "distill.save_every": 3, "distill.unroll": "recompute", "ray.num_cpus": 1,
        "storage.s3_endpoint_url": "http://127.0.0.1:9", "evaluate.baselines": []}))
    assert run_realgrad(other_shape, use_ray=False)["workers"] == 3
    result = distill(other_shape)
    assert "skipped" not in result and result["iterations"] == 4
    after = storage.load_tensors(storage.join(config.run, "synthetic.safetensors"))[0]
    for name in before:  # resumed from state 2: the set of the uninterrupted run
        assert torch.allclose(before[name], after[name], rtol=1e-5, atol=1e-6), name
    assert set(run_evaluate(other_shape, use_ray=False)["results"]) == {"synthetic"}


def test_fewer_baselines_reuse_eval_json_and_more_are_refused(done_run, small_fashion_mnist,
                                                              tmp_path):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "baselines",
                   **{"evaluate.baselines": []})
    assert set(run_evaluate(config, use_ray=False)["results"]) == {"synthetic", "init"}
    more = tiny_config(config.run, small_fashion_mnist,
                       dict(BASE, **{"evaluate.baselines": ["init", "random_real"]}))
    with pytest.raises(StaleRunError, match=r"evaluate.baselines \['random_real'\]"):
        run_evaluate(more, use_ray=False)


def test_a_changed_upstream_setting_is_refused_downstream(done_run, small_fashion_mnist,
                                                          tmp_path):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "upstream",
                   **{"experts.lr": 0.02})
    os.unlink(storage.join(config.run, "synthetic.safetensors"))
    with pytest.raises(StaleRunError) as error:
        distill(config)
    assert "the experts stage" in str(error.value) and "experts.lr 0.01 -> 0.02" in str(error.value)
    # Experts redone under the new settings: the real terms and the set made from the old ones
    # are still refused, naming the experts field their own fingerprints hold.
    shutil.rmtree(storage.join(config.run, "experts"))
    run_experts(config, use_ray=False)
    with pytest.raises(StaleRunError, match=r"the realgrad stage .*experts.lr 0.01 -> 0.02"):
        distill(config)


def test_a_variant_run_may_link_a_base_runs_experts_and_real_terms(done_run, small_fashion_mnist,
                                                                   tmp_path):
    # What benchmarks/fashion_mnist.py and quality.py do: variants share experts and realgrad.
    run = tmp_path / "variant"
    run.mkdir()
    for stage in ("experts", "realgrad"):
        os.symlink(os.path.join(done_run, stage), run / stage)
    experts_record = _bytes(done_run, "experts", "fingerprint.json")
    config = tiny_config(str(run), small_fashion_mnist,
                         dict(BASE, **{"distill.objective": "scalar", "distill.ipc": 1}))
    assert distill(config)["iterations"] == 4
    assert _bytes(done_run, "experts", "fingerprint.json") == experts_record
    recorded = storage.read_json(storage.join(str(run), "distill", "fingerprint.json"))
    assert recorded["fields"]["distill.objective"] == "scalar"


def test_a_stage_from_before_fingerprints_is_adopted_with_a_warning(done_run, small_fashion_mnist,
                                                                     tmp_path, caplog):
    config = _copy(done_run, small_fashion_mnist, tmp_path, "legacy")
    os.unlink(storage.join(config.run, "experts", "fingerprint.json"))
    with caplog.at_level(logging.WARNING, logger="ead_dist.fingerprint"):
        run_experts(config, use_ray=False)
    assert "no fingerprint.json" in caplog.text
    assert storage.exists(storage.join(config.run, "experts", "fingerprint.json"))


def test_an_interrupted_ingest_refuses_another_dataset_through_the_cli(tmp_path, capsys):
    cifar10, cifar100 = str(tmp_path / "raw10"), str(tmp_path / "raw100")
    raw_writers.write_cifar10(cifar10)
    raw_writers.write_cifar100(cifar100)
    data_url = str(tmp_path / "data")
    ingest_classification("cifar10", cifar10, data_url, shard_size=4, use_ray=False)
    os.unlink(os.path.join(data_url, "meta.json"))  # interrupted before it was done
    code = cli_main(["ingest", "--dataset", "cifar100", "--source", cifar100, "--out", data_url,
                     "--shard-size", "4", "--no-ray"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("ead-dist: error: the ingest stage at " + data_url)
    assert "data.dataset 'cifar10' -> 'cifar100'" in last
    assert not os.path.exists(os.path.join(data_url, "meta.json"))
    assert ingest_classification("cifar10", cifar10, data_url, shard_size=4,
                                 use_ray=False).name == "cifar10"

"""The coordinator: exact resume, a clear stop on divergence, every objective runs and moves S,
and the synthetic.safetensors it writes follows docs/design.md section 3."""

import os
import shutil

import pytest
import torch

from conftest import run_with_real_terms, tiny_config
from ead_dist import storage
from ead_dist.stages.distill import (
    DivergedError,
    distill,
    initialise,
    load_real_terms,
    state_url,
)
from ead_dist.synthetic import load_synthetic

BASE = {"experts.count": 1, "experts.train_samples": 256, "realgrad.real_samples": 200,
        "realgrad.checkpoints": 3, "distill.iterations": 6, "distill.save_every": 2}


@pytest.fixture(scope="module")
def prepared(small_fashion_mnist, tmp_path_factory):
    """A run with experts and real terms done; tests copy it and distill in the copy."""
    return run_with_real_terms(str(tmp_path_factory.mktemp("distill") / "base"),
                               small_fashion_mnist, BASE).run


def _copy(prepared, small_fashion_mnist, tmp_path, name, **overrides):
    run = str(tmp_path / name)
    shutil.copytree(prepared, run)
    return tiny_config(run, small_fashion_mnist, dict(BASE, **overrides))


def _assert_same_set(run_a: str, run_b: str) -> None:
    """The two runs' synthetic.safetensors hold the same tensors, up to float rounding."""
    a, _ = storage.load_tensors(storage.join(run_a, "synthetic.safetensors"))
    b, _ = storage.load_tensors(storage.join(run_b, "synthetic.safetensors"))
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-6, atol=1e-7), name


def test_synthetic_file_format(prepared, small_fashion_mnist, tmp_path):
    config = _copy(prepared, small_fashion_mnist, tmp_path, "format")
    distill(config)
    images, labels, classes, metadata = load_synthetic(storage.join(config.run,
                                                                    "synthetic.safetensors"))
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (20, 10) and torch.allclose(labels.sum(1), torch.ones(20))
    assert classes.dtype == torch.int64 and torch.bincount(classes).tolist() == [2] * 10
    assert metadata["dataset"] == "fashion_mnist" and metadata["ipc"] == 2
    assert metadata["method"] == "ead-matching" and len(metadata["mean"]) == 1
    assert '"ipc": 2' in metadata["config"]


def test_interrupted_distill_resumes_to_the_same_set(prepared, small_fashion_mnist, tmp_path):
    whole = _copy(prepared, small_fashion_mnist, tmp_path, "whole")
    distill(whole)
    broken = _copy(prepared, small_fashion_mnist, tmp_path, "broken")
    distill(broken)
    # Interrupted after iteration 4: the later state and the result were never published.
    os.unlink(state_url(broken.run, 6))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    result = distill(broken)
    assert result["iterations"] == 6
    _assert_same_set(whole.run, broken.run)


@pytest.mark.parametrize("objective,coefficient", [
    ("scalar", "derived"), ("scalar", "paper"), ("per_class_effect", "derived"),
    ("class_matching", "derived"), ("matching", "derived")])
def test_every_objective_changes_images_and_labels(prepared, small_fashion_mnist, tmp_path,
                                                   objective, coefficient):
    config = _copy(prepared, small_fashion_mnist, tmp_path, objective + coefficient,
                   **{"distill.objective": objective, "distill.coefficient": coefficient,
                      "distill.iterations": 2, "distill.lr_images": 0.1})
    result = distill(config)
    assert result["final_loss"] >= 0 and result["final_loss"] == result["final_loss"]
    init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
    final, _ = storage.load_tensors(storage.join(config.run, "synthetic.safetensors"))
    assert not torch.equal(init["images"], final["images"])
    assert not torch.allclose(init["labels"], final["labels"])


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_state(
        prepared, small_fashion_mnist, tmp_path):
    config = _copy(prepared, small_fashion_mnist, tmp_path, "nan")
    # Poison the real terms of every checkpoint from iteration 0 on.
    for url in storage.list_files(storage.join(config.run, "realgrad"), "ckpt-*.safetensors"):
        tensors, metadata = storage.load_tensors(url)
        tensors["g_D"][0] = float("nan")
        storage.save_tensors(url, tensors, metadata)
    with pytest.raises(DivergedError, match="iteration 0: the matching loss"):
        distill(config)
    assert not storage.exists(storage.join(config.run, "synthetic.safetensors"))
    state, metadata = storage.load_tensors(state_url(config.run, 0))
    init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
    assert metadata["iteration"] == 0 and torch.equal(state["images"], init["images"])


def test_coordinator_never_reads_real_data(prepared):
    terms, index = load_real_terms(prepared)
    assert index["real_samples"] == 200 and len(terms) == 3
    # What it holds per checkpoint is a few gradient vectors, independent of |D|.
    n = terms[0].g_D.numel()
    assert all(t.g_P.shape == (len(t.g_P), n) for t in terms)


def test_initial_images_are_streamed_class_balanced_training_images(
        prepared, small_fashion_mnist, tmp_path, monkeypatch):
    from ead_dist.data import arrays
    from ead_dist.stages import distill as distill_stage

    train_images, train_labels, _ = arrays.load_split(small_fashion_mnist, "train")
    whole_split = arrays.load_split

    def only_small_splits(data_url, split, *args, **kwargs):
        if split == "train":
            raise AssertionError("the coordinator loaded the whole training split")
        return whole_split(data_url, split, *args, **kwargs)

    for module in (arrays, distill_stage):
        monkeypatch.setattr(module, "load_split", only_small_splits, raising=False)
    config = _copy(prepared, small_fashion_mnist, tmp_path, "streamed",
                   **{"distill.iterations": 1, "distill.ipc": 3})
    distill(config)
    init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
    assert torch.bincount(init["classes"], minlength=10).tolist() == [3] * 10
    for image, label in zip(init["images"], init["classes"]):
        same = (train_images == image).flatten(1).all(1)
        assert same.sum() == 1 and train_labels[same].item() == label
    assert len({image.numpy().tobytes() for image in init["images"]}) == 30
    # The draw is a function of distill.seed.
    again = _copy(prepared, small_fashion_mnist, tmp_path, "again", **{"distill.ipc": 3})
    other = _copy(prepared, small_fashion_mnist, tmp_path, "other",
                  **{"distill.ipc": 3, "distill.seed": 1})
    assert torch.equal(initialise(again).images, init["images"])
    assert not torch.equal(initialise(other).images, init["images"])


TRAJECTORY = {"distill.objective": "trajectory", "distill.student_steps": 3,
              "distill.expert_span": 1, "distill.student_batch_size": 10,
              "distill.augmentation": "dsa", "distill.lr_images": 0.1}


@pytest.mark.parametrize("unroll", ["full", "recompute"])
def test_trajectory_objective_resumes_to_the_same_set_and_learns_its_step_size(
        prepared, small_fashion_mnist, tmp_path, unroll):
    settings = dict(TRAJECTORY, **{"distill.unroll": unroll})
    whole = _copy(prepared, small_fashion_mnist, tmp_path, "whole" + unroll, **settings)
    result = distill(whole)
    # Expert with 4 steps of 64 on 256 samples and save_every 3: checkpoints 0, 3, 4.
    assert result["segments"] == 2 and result["checkpoints"] is None
    assert result["student_lr"] != pytest.approx(0.01, abs=1e-7)
    recorded = storage.load_metadata(storage.join(whole.run, "synthetic.safetensors"))
    assert recorded["student_lr"] == result["student_lr"]  # what evaluate.lr: learned reads
    broken = _copy(prepared, small_fashion_mnist, tmp_path, "broken" + unroll, **settings)
    distill(broken)
    os.unlink(state_url(broken.run, 6))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    distill(broken)
    a, _ = storage.load_tensors(storage.join(whole.run, "synthetic.safetensors"))
    init, _ = storage.load_tensors(storage.join(whole.run, "distill", "init.safetensors"))
    assert not torch.equal(a["images"], init["images"])
    _assert_same_set(whole.run, broken.run)


def test_trajectory_objective_needs_a_target_checkpoint(prepared, small_fashion_mnist, tmp_path):
    config = _copy(prepared, small_fashion_mnist, tmp_path, "span",
                   **dict(TRAJECTORY, **{"distill.expert_span": 5}))
    with pytest.raises(ValueError, match="trajectories are too short"):
        distill(config)


@pytest.mark.parametrize("objective,distance", [("matching", "layer_l1"),
                                                ("class_matching", "layer_cosine")])
def test_distances_move_the_set(prepared, small_fashion_mnist, tmp_path, objective, distance):
    config = _copy(prepared, small_fashion_mnist, tmp_path, objective + distance,
                   **{"distill.objective": objective, "distill.distance": distance,
                      "distill.skip_head_and_biases": True, "distill.normalise": True,
                      "distill.iterations": 2, "distill.lr_images": 0.1})
    result = distill(config)
    assert result["first_loss"] > 0 and result["image_change"] > 0


def test_ensemble_labels_and_correctly_classified_initial_images(prepared, small_fashion_mnist,
                                                                 tmp_path):
    from ead_dist.stages.distill import _teachers, initialise
    from ead_dist.data.meta import read_meta

    config = _copy(prepared, small_fashion_mnist, tmp_path, "labels",
                   **{"distill.label_init": "ensemble", "distill.init_images": "correct"})
    synthetic = initialise(config)
    teachers = _teachers(config, read_meta(small_fashion_mnist))
    with torch.no_grad():
        logits = torch.stack([t(synthetic.images) for t in teachers]).mean(0)
    assert torch.allclose(synthetic.label_logits, logits, atol=1e-5)
    random_init = initialise(_copy(prepared, small_fashion_mnist, tmp_path, "random"))
    with torch.no_grad():
        random_logits = torch.stack([t(random_init.images) for t in teachers]).mean(0)
    correct = (logits.argmax(1) == synthetic.classes).float().mean()
    assert correct >= (random_logits.argmax(1) == random_init.classes).float().mean()
    # Every class holds as many correctly classified images as its 4 x ipc candidates offer.
    from ead_dist.data.arrays import class_balanced_sample
    from ead_dist.stages.distill import CANDIDATES_PER_IMAGE

    pool, pool_labels = class_balanced_sample(small_fashion_mnist, "train",
                                              2 * CANDIDATES_PER_IMAGE, 0)
    with torch.no_grad():
        pool_right = torch.stack([t(pool) for t in teachers]).mean(0).argmax(1) == pool_labels
    for c in range(10):
        offered = min(2, int(pool_right[pool_labels == c].sum()))
        mine = synthetic.classes == c
        assert int((logits.argmax(1)[mine] == c).sum()) == offered


def test_a_diverged_run_resumes_from_its_last_good_state_with_a_lower_step_size(
        prepared, small_fashion_mnist, tmp_path):
    from ead_dist.fingerprint import StaleRunError

    # An infinite step size: Adam's first step leaves S infinite from a finite gradient. The
    # config refuses inf, so it is set on the loaded config (as a run that blew up would be).
    config = _copy(prepared, small_fashion_mnist, tmp_path, "diverges")
    config.distill.lr_images = float("inf")
    with pytest.raises(DivergedError, match="step left S not finite; lower distill.lr_images; "
                                            "the state before it is saved.*resumes from "
                                            "iteration 0"):
        distill(config)
    saved, metadata = storage.load_tensors(state_url(config.run, 0))
    init, _ = storage.load_tensors(storage.join(config.run, "distill", "init.safetensors"))
    assert metadata["iteration"] == 0 and torch.equal(saved["images"], init["images"])
    # Another objective is still another run: refused.
    other = _copy(prepared, small_fashion_mnist, tmp_path, "other",
                  **{"distill.objective": "scalar"})
    other.run = config.run
    with pytest.raises(StaleRunError, match="distill.objective"):
        distill(other)
    # A lower step size, as the error advises: resumed from the saved state, and finished.
    lower = _copy(prepared, small_fashion_mnist, tmp_path, "lower")
    lower.run = config.run
    summary = distill(lower)
    assert summary["iterations"] == 6 and summary["iterations_run"] == 6
    record = storage.read_json(storage.join(config.run, "distill", "fingerprint.json"))
    assert record["fields"]["distill.lr_images"] == 0.01 and "diverged" not in record
    assert record["resumed_after_divergence"] == [
        {"iteration": 0, "changed": {"distill.lr_images": [float("inf"), 0.01]}}]
    # It is the set an uninterrupted run at the lower step size makes.
    whole = _copy(prepared, small_fashion_mnist, tmp_path, "whole")
    distill(whole)
    _assert_same_set(whole.run, config.run)
    # Done: a later rerun with yet another step size is refused like any other change.
    lower.distill.lr_images = 0.001
    with pytest.raises(StaleRunError, match="distill.lr_images"):
        distill(lower)


def test_more_iterations_go_on_from_the_finished_run_and_keep_its_evaluation(
        prepared, small_fashion_mnist, tmp_path):
    from ead_dist.fingerprint import StaleRunError
    from ead_dist.stages.evaluate import run_evaluate

    short = _copy(prepared, small_fashion_mnist, tmp_path, "short",
                  **{"distill.iterations": 4})
    distill(short)
    report = run_evaluate(short, use_ray=False)
    longer = _copy(prepared, small_fashion_mnist, tmp_path, "longer")  # 6 iterations
    longer.run = short.run
    summary = distill(longer)
    assert summary["resumed_at"] == 4 and summary["iterations_run"] == 2
    record = storage.read_json(storage.join(short.run, "distill", "fingerprint.json"))
    assert record["extended"] == [{"from": 4, "to": 6}]
    assert record["fields"]["distill.iterations"] == 6
    # The short run's figures are kept; its evaluation no longer stands for the run.
    kept = storage.read_json(storage.join(short.run, "distill", "eval-000004.json"))
    assert kept["results"] == report["results"]
    assert not storage.exists(storage.join(short.run, "eval.json"))
    assert not storage.exists(storage.join(short.run, "evaluate"))
    run_evaluate(longer, use_ray=False)  # evaluated afresh, as the longer run's set
    evaluated = storage.read_json(storage.join(short.run, "evaluate", "fingerprint.json"))
    assert evaluated["fields"]["distill.iterations"] == 6
    # It is the set an uninterrupted 6-iteration run makes.
    whole = _copy(prepared, small_fashion_mnist, tmp_path, "whole")
    distill(whole)
    _assert_same_set(whole.run, short.run)
    # Fewer iterations, or more together with another change, are another run: refused.
    with pytest.raises(StaleRunError, match="distill.iterations 6 -> 4"):
        distill(short)
    other = _copy(prepared, small_fashion_mnist, tmp_path, "other",
                  **{"distill.iterations": 8, "distill.lr_images": 0.02})
    other.run = short.run
    with pytest.raises(StaleRunError, match="distill.lr_images"):
        distill(other)
    assert storage.exists(storage.join(short.run, "synthetic.safetensors"))


@pytest.fixture(scope="module")
def two_experts(small_fashion_mnist, tmp_path_factory):
    return run_with_real_terms(str(tmp_path_factory.mktemp("held-out") / "base"),
                               small_fashion_mnist,
                               dict(BASE, **{"experts.count": 2, "realgrad.checkpoints": 4})).run


@pytest.mark.parametrize("objective", ["matching", "trajectory"])
def test_held_out_experts_are_not_fitted_and_measure_generalisation(
        two_experts, small_fashion_mnist, tmp_path, objective):
    settings = {"experts.count": 2, "realgrad.checkpoints": 4, "distill.held_out_experts": 1}
    if objective == "trajectory":
        settings.update(TRAJECTORY)
    run = str(tmp_path / objective)
    shutil.copytree(two_experts, run)
    config = tiny_config(run, small_fashion_mnist, dict(BASE, **settings))
    result = distill(config)
    gap = result["generalisation"]
    assert gap["held_out_experts"] == [1] and gap["draws"] > 1
    assert gap["objective_fitted"] > 0 and gap["objective_held_out"] > 0
    assert gap["objective_held_out"] != gap["objective_fitted"]
    # only expert 0's checkpoints (or segments) were fitted
    everything = dict(settings, **{"distill.held_out_experts": 0})
    both = tiny_config(str(tmp_path / "both"), small_fashion_mnist, dict(BASE, **everything))
    shutil.copytree(two_experts, both.run)
    if objective == "matching":
        _, index = load_real_terms(both.run)
        fitted = [entry for entry in index["checkpoints"] if entry["expert"] == 0]
        assert 0 < result["checkpoints"] == len(fitted) < len(index["checkpoints"])
    else:
        assert 0 < result["segments"] < distill(both)["segments"]


def test_holding_out_every_expert_is_refused(small_fashion_mnist, tmp_path):
    from ead_dist.config import ConfigError

    with pytest.raises(ConfigError, match="leaves none of the 2 experts"):
        tiny_config(str(tmp_path / "r"), small_fashion_mnist,
                    dict(BASE, **{"experts.count": 2, "distill.held_out_experts": 2}))

"""The image-text path past ingest on the Fashion-MNIST scene captions: experts' checkpoints,
the pair set's file format and resume, evaluation, and the whole run from S3 to S3."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ead_dist import storage
from ead_dist.cli import main as cli_main
from conftest import SMALL_PAIRS, scene_items, small_pair_config
from ead_dist.data.caption_scenes import write_caption_scenes
from ead_dist.stages.distill import distill, state_url
from ead_dist.stages.distill_pairs import load_pair_set
from ead_dist.stages.evaluate_pairs import run_evaluate_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_experts_record_trajectories_like_classification(experts_done):
    index = storage.read_json(storage.join(experts_done, "experts", "index.json"))
    assert index["model"] == "clip-tiny"
    [expert] = index["experts"]
    assert [c["step"] for c in expert["checkpoints"]] == [0, 2, 3]  # 96 pairs / 32 a step
    assert set(expert["test_recall"]) == {f"{d}@{k}" for d in ("i2t", "t2i")
                                          for k in (1, 5, 10)}
    theta, metadata = storage.load_tensors(storage.join(experts_done, "experts",
                                                        expert["checkpoints"][1]["file"]))
    assert metadata["step"] == 2 and metadata["lr"] == 0.01 and metadata["model"] == "clip-tiny"
    assert "clip.logit_scale" in theta and "clip.visual.conv1.weight" in theta
    assert not any("token_embedding" in name for name in theta)  # a fixed table, not theta
    start, _ = storage.load_tensors(storage.join(experts_done, "experts",
                                                 expert["checkpoints"][0]["file"]))
    assert not torch.equal(start["clip.text_projection"], theta["clip.text_projection"])


def _copy(experts_done, scenes, tmp_path, name, overrides=None):
    run = str(tmp_path / name)
    shutil.copytree(experts_done, run)
    return small_pair_config(run, scenes, overrides)


def assert_resumes_to_the_same_set(whole, broken) -> None:
    """``broken`` (a copy of ``whole``'s config in another run), interrupted after iteration 2
    and rerun, ends with the set ``whole`` distilled in one go."""
    distill(broken)
    os.unlink(state_url(broken.run, 4))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    distill(broken)
    a, _ = storage.load_tensors(storage.join(whole.run, "synthetic.safetensors"))
    b, _ = storage.load_tensors(storage.join(broken.run, "synthetic.safetensors"))
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-6), name


def test_pair_set_format_and_resume(experts_done, scenes, tmp_path):
    whole = _copy(experts_done, scenes, tmp_path, "whole")
    summary = distill(whole)
    images, text, metadata, _ = load_pair_set(storage.join(whole.run, "synthetic.safetensors"))
    assert images.shape == (8, 3, 32, 32) and text.shape == (8, 32, 64)
    assert metadata["model"] == "clip-tiny" and metadata["pretrained"] is None
    assert metadata["tokenizer"] == "open_clip.SimpleTokenizer"
    assert metadata["context_length"] == 32 and metadata["method"] == "ead-trajectory"
    init, init_text, _, _ = load_pair_set(storage.join(whole.run, "distill", "init.safetensors"))
    assert summary["image_change"] > 0 and not torch.equal(text, init_text)
    assert summary["reads_real_data_in_loop"] is False
    assert_resumes_to_the_same_set(whole, _copy(experts_done, scenes, tmp_path, "broken"))


def test_fixed_captions_stay_the_real_ones_while_images_learn_and_resume(
        experts_done, scenes, tmp_path):
    def fixed(name):
        return _copy(experts_done, scenes, tmp_path, name,
                     {"image_text": {"learn_captions": False}})

    whole = fixed("fixed")
    summary = distill(whole)
    images, text, _, _ = load_pair_set(storage.join(whole.run, "synthetic.safetensors"))
    init, init_text, _, _ = load_pair_set(storage.join(whole.run, "distill", "init.safetensors"))
    assert torch.equal(text, init_text) and summary["text_change"] == 0
    assert summary["image_change"] > 0 and not torch.equal(images, init)
    assert_resumes_to_the_same_set(whole, fixed("fixed-broken"))


def test_evaluation_reports_recall_of_every_set(experts_done, scenes, tmp_path):
    config = _copy(experts_done, scenes, tmp_path, "evaluate")
    distill(config)
    report = run_evaluate_pairs(config)
    assert set(report["results"]) == {"synthetic", "init", "random_real"}
    summary = report["results"]["random_real"]["clip-tiny"]
    assert len(summary["runs"]) == 1 and 0 <= summary["mean"]["i2t@5"] <= 1
    assert report["protocol"]["pairs"] == 8 and report["protocol"]["test_pairs"] == 20
    assert storage.exists(storage.join(config.run, "evaluate", "init-clip-tiny-0.json"))


LEARNED = {"image_text": {**SMALL_PAIRS["image_text"],
                          "similarity": "learned", "lr_similarity": 0.05}}


def test_a_learned_similarity_moves_is_stored_resumes_and_trains_the_evaluation(
        experts_done, scenes, tmp_path):
    def copy(name, **distill_settings):
        run = str(tmp_path / name)
        shutil.copytree(experts_done, run)
        overrides = dict(LEARNED, distill={**SMALL_PAIRS["distill"], **distill_settings})
        return small_pair_config(run, scenes, overrides)

    whole = copy("whole")
    summary = distill(whole)
    pairs = load_pair_set(storage.join(whole.run, "synthetic.safetensors"))
    assert pairs.similarity.shape == (8, 8) and summary["similarity_change"] > 0
    assert not torch.equal(pairs.similarity, torch.eye(8))
    assert pairs.similarity.min() == 0  # kept non-negative: moved entries below 0 are cut
    assert load_pair_set(storage.join(whole.run, "distill", "init.safetensors")).similarity is None
    # Resumed from iteration 2: the same set, similarity included.
    broken = copy("broken")
    distill(broken)
    os.unlink(state_url(broken.run, 4))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    distill(broken)
    resumed = load_pair_set(storage.join(broken.run, "synthetic.safetensors"))
    assert torch.allclose(resumed.similarity, pairs.similarity, rtol=1e-5, atol=1e-6)
    # The memory-constant unroll learns it the same way.
    rebuilt = copy("rebuilt", unroll="recompute")
    distill(rebuilt)
    again = load_pair_set(storage.join(rebuilt.run, "synthetic.safetensors"))
    assert torch.allclose(again.similarity, pairs.similarity, atol=1e-4)
    # Evaluation trains on the learned targets, and says so.
    report = run_evaluate_pairs(whole)
    assert report["protocol"]["targets"] == "learned similarity"


def test_evaluation_training_reads_the_similarity_block_of_each_batch():
    from ead_dist.models.dual_encoder import build_dual_encoder
    from ead_dist.stages.evaluate_pairs import train_on_pairs

    # float64: in float32 Adam's first steps turn rounding noise in near-zero gradients into
    # steps of about lr, which would hide whether the two losses agree.
    images, text = torch.randn(6, 3, 16, 16).double(), torch.randn(6, 20, 64).double()

    def trained(similarity):
        torch.manual_seed(0)
        model = train_on_pairs(build_dual_encoder("clip-tiny", 16, 20).double(), images, text,
                               epochs=2, lr=0.01, batch_size=4, seed=0, similarity=similarity)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = trained(None)
    assert torch.allclose(trained(torch.eye(6).double()), plain, atol=1e-8)  # CLIP's loss
    assert (trained(torch.ones(6, 6).double() / 6) - plain).abs().max() > 1e-2


def test_evaluation_training_with_sgd_takes_plain_gradient_steps():
    from torch.func import functional_call

    from ead_dist.models.dual_encoder import build_dual_encoder
    from ead_dist.stages.evaluate_pairs import train_on_pairs

    images, text = torch.randn(4, 3, 16, 16).double(), torch.randn(4, 20, 64).double()
    torch.manual_seed(0)
    model = build_dual_encoder("clip-tiny", 16, 20).double()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    # one epoch of one batch: one step, theta - lr * grad L(theta) (the order is a permutation
    # of all four pairs, and the contrastive loss does not depend on the order)
    leaves = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    grads = torch.autograd.grad(functional_call(model, leaves, (images, text)),
                                list(leaves.values()), allow_unused=True)
    train_on_pairs(model, images, text, epochs=1, lr=0.1, batch_size=4, seed=0,
                   optimizer="sgd")
    for (name, value), grad in zip(start.items(), grads):
        expected = value if grad is None else value - 0.1 * grad
        assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-10), name


def test_a_learned_similarity_is_refused_where_it_cannot_be_read_whole(scenes, tmp_path):
    from ead_dist.config import ConfigError

    with pytest.raises(ConfigError, match="distill.student_batch_size 4 is below "
                                          "image_text.pairs 8"):
        small_pair_config(str(tmp_path / "run"), scenes,
                          dict(LEARNED, distill={"objective": "trajectory",
                                                 "student_batch_size": 4}))
    from conftest import tiny_config

    with pytest.raises(ConfigError, match="image_text.similarity 'learned' is for image-text "
                                          "data, not data.dataset 'fashion_mnist'"):
        tiny_config(str(tmp_path / "run"), str(tmp_path / "data"),
                    {"image_text.similarity": "learned"})


PAIR_TERMS = {"realgrad": {"checkpoints": 2, "real_samples": 48, "p_batches": 2,
                           "p_batch_size": 16}}


@pytest.mark.parametrize("objective", ["matching", "scalar"])
def test_one_step_objectives_distill_pairs_against_contrastive_real_terms(
        objective, experts_done, scenes, tmp_path):
    """realgrad's pair terms, then a few coordinator iterations: S moves, the loss stays finite
    (no claim about recall)."""
    import math
    import shutil

    from ead_dist.run import run_stages

    run = str(tmp_path / objective)
    shutil.copytree(experts_done, run)
    config = small_pair_config(run, scenes, {
        **PAIR_TERMS, "distill": {"objective": objective, "iterations": 3, "save_every": 3,
                                  "threads": 1, "lr_images": 0.01}})
    stages = run_stages(config, ("realgrad", "distill"))  # the stage dispatch, without Ray
    assert stages["realgrad"]["d_batches"] == 3 and stages["realgrad"]["p_batches"] == 2
    summary = stages["distill"]
    assert summary["objective"] == objective and summary["checkpoints"] == 2
    assert summary["real_samples"] == 48 and summary["reads_real_data_in_loop"] is False
    assert summary["iterations_run"] == 3
    assert all(math.isfinite(v) for v in (summary["first_loss"], summary["final_loss"]))
    images, text, metadata, _ = load_pair_set(storage.join(run, "synthetic.safetensors"))
    init, init_text, _, _ = load_pair_set(storage.join(run, "distill", "init.safetensors"))
    assert not torch.equal(images, init) and not torch.equal(text, init_text)
    assert metadata["method"] == f"ead-{objective}"


def test_config_refuses_objectives_pairs_do_not_support(scenes, tmp_path):
    from ead_dist.config import ConfigError

    for objective in ("class_matching", "per_class_effect"):
        with pytest.raises(ConfigError, match=f"distill.objective '{objective}' is not "
                                              "available for image-text data"):
            small_pair_config(str(tmp_path / "run"), scenes, {"distill": {"objective": objective}})
    with pytest.raises(ConfigError, match="distill.method 'dm' is not available"):
        small_pair_config(str(tmp_path / "run"), scenes, {"distill": {"method": "dm"}})
    with pytest.raises(ConfigError, match="weights.method 'kde' is not available"):
        small_pair_config(str(tmp_path / "run"), scenes,
                          {"distill": {"objective": "matching"}, "weights": {"method": "kde"}})


def test_distill_refuses_a_class_wise_objective_set_past_the_config_check(experts_done, scenes,
                                                                         tmp_path):
    from ead_dist.config import ConfigError

    config = _copy(experts_done, scenes, tmp_path, "class_wise")
    config.distill.objective = "class_matching"  # assignment skips validation
    with pytest.raises(ConfigError, match="distill.objective matching or scalar or trajectory"):
        distill(config)


E2E_SCENES = 1200  # 3 shards of 400; about 960 train and 240 held-out pairs
# Every stage on S3 at the smallest sizes: the plumbing alone, no claim about quality.
PLUMBING = ["experts.count=1", "experts.epochs=1", "experts.save_every=7",
            "image_text.train_pairs=128", "distill.iterations=2", "distill.save_every=1",
            "distill.student_steps=2", "distill.expert_span=1", "evaluate.runs=1",
            "evaluate.epochs=1", "image_text.pairs=8", "image_text.test_pairs=20"]


@pytest.mark.cluster
@pytest.mark.s3
@pytest.mark.slow
def test_image_text_run_from_s3_to_s3(fashion_mnist_root, s3_endpoint, s3_bucket, ray_session,
                                      monkeypatch):
    """ingest (Ray tasks), experts (actors), distill (a task) and evaluate, every file on S3, at
    the smallest sizes: the plumbing, with no claim about quality. At these sizes (40 pairs,
    160 scenes) recall is noise; tests/test_image_text_win.py asserts that distilled pairs beat
    random real ones, at the 20,000 scenes and 100 pairs where the benchmark measures it."""
    images, labels = scene_items(fashion_mnist_root)
    write_caption_scenes(f"{s3_bucket}/scenes", images, labels, samples=E2E_SCENES,
                         shard_size=400, canvas=64)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    run, data = f"{s3_bucket}/run", f"{s3_bucket}/scenes"
    try:
        arguments = ["run", "pipelines/scenes_tiny.yaml", "--set", f"run={run}",
                     "--set", f"data.url={data}", "--set", f"data.source={data}",
                     "--set", f"storage.s3_endpoint_url={s3_endpoint}"]
        for override in PLUMBING:
            arguments += ["--set", override]
        assert cli_main(arguments) == 0
        storage.configure({"endpoint_url": s3_endpoint})
        assert storage.exists(f"{data}/meta.json")
        assert len(storage.list_files(f"{run}/experts/expert-000", "step-*.safetensors")) > 1
        assert storage.exists(f"{run}/synthetic.safetensors")
        report = storage.read_json(f"{run}/eval.json")
        recall = {name: sets["clip-tiny"]["mean"] for name, sets in report["results"].items()}
        assert set(recall) == {"synthetic", "init", "random_real"}
        for result in recall.values():
            assert set(result) >= {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10"}
    finally:
        storage.configure()


def test_a_low_rank_similarity_stores_its_factors_and_resumes_exactly(
        experts_done, scenes, tmp_path):
    def copy(name, **distill_settings):
        run = str(tmp_path / name)
        shutil.copytree(experts_done, run)
        overrides = dict(image_text={**LEARNED["image_text"], "similarity": "low_rank",
                                     "similarity_rank": 2},
                         distill={**SMALL_PAIRS["distill"], **distill_settings})
        return small_pair_config(run, scenes, overrides)

    whole = copy("whole")
    summary = distill(whole)
    url = storage.join(whole.run, "synthetic.safetensors")
    tensors, _ = storage.load_tensors(url)
    assert "similarity" not in tensors  # 8 (2 * 2 + 1) numbers stored, not 8 * 8
    assert tensors["similarity_left"].shape == tensors["similarity_right"].shape == (8, 2)
    assert tensors["similarity_left"].abs().max() > 0  # the factor that starts at zero moved
    pairs = load_pair_set(url)
    assert pairs.similarity.shape == (8, 8) and summary["similarity_change"] > 0
    assert pairs.similarity.min() >= 0 and not torch.equal(pairs.similarity, torch.eye(8))
    # Resumed from iteration 2: Adam's moments of all three factors come back with them.
    broken = copy("broken")
    distill(broken)
    os.unlink(state_url(broken.run, 4))
    os.unlink(storage.join(broken.run, "synthetic.safetensors"))
    distill(broken)
    resumed, _ = storage.load_tensors(storage.join(broken.run, "synthetic.safetensors"))
    for name in ("similarity_diagonal", "similarity_left", "similarity_right"):
        assert torch.allclose(resumed[name], tensors[name], rtol=1e-5, atol=1e-6), name
    # The memory-constant unroll pulls the targets' gradient back to the same factors.
    rebuilt = copy("rebuilt", unroll="recompute")
    distill(rebuilt)
    again = load_pair_set(storage.join(rebuilt.run, "synthetic.safetensors"))
    assert torch.allclose(again.similarity, pairs.similarity, atol=1e-4)

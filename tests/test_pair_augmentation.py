"""image_text.augmentation: caption-preserving DSA ops, drawn alike for the experts, the
coordinator's synthetic images and the evaluation, and refused where they would change what a
caption says."""

from __future__ import annotations

import shutil

import pytest
import torch

from ead_dist import storage
from conftest import small_pair_config
from ead_dist.config import ConfigError
from ead_dist.fingerprint import stage_fields
from ead_dist.stages.distill import distill, state_url
from ead_dist.trajectory import step_augmentation as augmented

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ops_that_change_a_caption_and_classification_data_are_refused(scenes, tmp_path):
    from conftest import tiny_config

    run = str(tmp_path / "run")
    for strategy, named in (("flip_crop", "flip changes"), ("color", "color changes"),
                            ("crop_color_flip", "color and flip change")):
        with pytest.raises(ConfigError, match=f"image_text.augmentation '{strategy}': {named} "
                                              "what a caption says"):
            small_pair_config(run, scenes, {"image_text": {"augmentation": strategy}})
    with pytest.raises(ConfigError, match="unknown augmentation 'zoom'"):
        small_pair_config(run, scenes, {"image_text": {"augmentation": "crop_zoom"}})
    with pytest.raises(ConfigError, match="image_text.augmentation 'crop' is for image-text "
                                          "data, not data.dataset 'fashion_mnist'"):
        tiny_config(run, str(tmp_path / "data"), {"image_text.augmentation": "crop"})
    with pytest.raises(ConfigError, match="experts.augmentation are not read for image-text "
                                          "data: set image_text.augmentation"):
        small_pair_config(run, scenes, {"experts": {"augmentation": "dsa"}})
    config = small_pair_config(run, scenes, {"image_text": {"augmentation": "crop_scale"}})
    assert config.image_text.augmentation == "crop_scale"


def test_the_augmentation_is_part_of_every_pair_stage_fingerprint(scenes, tmp_path):
    plain = small_pair_config(str(tmp_path / "run"), scenes)
    shifted = small_pair_config(str(tmp_path / "run"), scenes,
                                {"image_text": {"augmentation": "crop"}})
    for stage in ("experts", "distill", "evaluate"):
        assert stage_fields(plain, stage, "d")["image_text.augmentation"] is None
        assert stage_fields(shifted, stage, "d")["image_text.augmentation"] == "crop"


def test_an_experts_draw_is_a_function_of_seed_and_step():
    images = torch.rand(6, 3, 16, 16)
    assert augmented(images, None, 0, 3) is images
    first = augmented(images, "crop_scale", 0, 3)
    assert first.shape == images.shape
    assert torch.equal(augmented(images, "crop_scale", 0, 3), first)  # a resumed step repeats
    assert not torch.equal(augmented(images, "crop_scale", 0, 4), first)
    assert not torch.equal(augmented(images, "crop_scale", 1, 3), first)
    assert not torch.equal(first, images)


def test_evaluation_training_draws_augmentation_apart_from_the_batch_order():
    from ead_dist.models.dual_encoder import build_dual_encoder
    from ead_dist.stages.evaluate_pairs import train_on_pairs

    images, text = torch.rand(6, 3, 16, 16), torch.randn(6, 20, 64)

    def trained(augmentation):
        torch.manual_seed(0)
        model = train_on_pairs(build_dual_encoder("clip-tiny", 16, 20), images, text, epochs=2,
                               lr=0.01, batch_size=4, seed=0, augmentation=augmentation)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = trained(None)
    assert torch.equal(trained(None), plain)
    shifted = trained("crop")
    assert torch.equal(trained("crop"), shifted)  # seeded: the same draws again
    assert (shifted - plain).abs().max() > 1e-3


@pytest.fixture(scope="module")
def augmented_experts(scenes, tmp_path_factory):
    """SMALL_PAIRS' one expert trained under crop_scale (the augmentation is in its fingerprint,
    so distill cannot reuse experts_done's)."""
    from ead_dist.stages.experts import run_experts

    run = str(tmp_path_factory.mktemp("augmented") / "base")
    run_experts(small_pair_config(run, scenes, CROP), use_ray=False)
    return run


CROP = {"image_text": {"augmentation": "crop_scale"}}


def _copy(experts, scenes, tmp_path, name, overrides=None):
    run = str(tmp_path / name)
    shutil.copytree(experts, run)
    return small_pair_config(run, scenes, overrides)


def test_an_augmented_expert_differs_from_a_plain_one(experts_done, augmented_experts):
    path = "experts/expert-000/step-000003.safetensors"
    plain, _ = storage.load_tensors(storage.join(experts_done, path))
    shifted, _ = storage.load_tensors(storage.join(augmented_experts, path))
    start, _ = storage.load_tensors(storage.join(augmented_experts,
                                                 "experts/expert-000/step-000000.safetensors"))
    assert all(torch.equal(start[k], plain_start) for k, plain_start in storage.load_tensors(
        storage.join(experts_done, "experts/expert-000/step-000000.safetensors"))[0].items())
    assert max((plain[k] - shifted[k]).abs().max() for k in plain) > 1e-6


def test_the_coordinator_augments_the_synthetic_images_and_resumes_exactly(
        experts_done, augmented_experts, scenes, tmp_path):
    plain = _copy(experts_done, scenes, tmp_path, "plain")
    distill(plain)
    whole = _copy(augmented_experts, scenes, tmp_path, "whole", CROP)
    distill(whole)
    a, _ = storage.load_tensors(storage.join(whole.run, "synthetic.safetensors"))
    b, _ = storage.load_tensors(storage.join(plain.run, "synthetic.safetensors"))
    assert (a["images"] - b["images"]).abs().max() > 1e-6
    broken = _copy(augmented_experts, scenes, tmp_path, "broken", CROP)
    distill(broken)
    storage.remove(state_url(broken.run, 4))  # interrupted after iteration 2
    storage.remove(storage.join(broken.run, "synthetic.safetensors"))
    distill(broken)
    c, _ = storage.load_tensors(storage.join(broken.run, "synthetic.safetensors"))
    for name in a:
        assert torch.allclose(a[name].float(), c[name].float(), rtol=1e-5, atol=1e-6), name

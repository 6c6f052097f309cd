"""Multi-formation: the decoding's layout and gradient, the initial set it starts from, the
coordinator learning stored pixels through it, and the set file every reader trains on."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_with_real_terms, tiny_config
from ead_dist import storage
from ead_dist.config import ConfigError
from ead_dist.formation import decode, encode, factor_of
from ead_dist.stages.distill import distill, state_url
from ead_dist.synthetic import initial_set, load_synthetic, synthetic_from_state


def test_decode_cuts_each_image_into_row_major_blocks_upsampled_to_full_size():
    stored = torch.zeros(1, 1, 4, 6)
    stored[0, 0, :2, 3:] = 1.0  # the top-right block only
    decoded = decode(stored, 2)
    assert decoded.shape == (4, 1, 4, 6)
    assert torch.equal(decoded[1], torch.ones(1, 4, 6))  # block (0, 1) is the second image
    assert torch.equal(decoded[[0, 2, 3]], torch.zeros(3, 1, 4, 6))
    assert decode(stored, 1) is stored


def test_encode_then_decode_is_the_images_at_a_lower_resolution():
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stored = encode(images, 2)
    assert stored.shape == (2, 3, 8, 8)
    expected = F.interpolate(F.avg_pool2d(images, 2), size=(8, 8), mode="bilinear",
                             align_corners=False)
    assert torch.allclose(decode(stored, 2), expected, atol=1e-6)
    with pytest.raises(ValueError, match="do not fill stored images of 4"):
        encode(images[:6], 2)
    with pytest.raises(ValueError, match="must divide the image size 8 x 8"):
        decode(stored, 3)


def test_every_stored_pixel_receives_gradient_through_the_decoding():
    stored = torch.randn(2, 1, 6, 6, requires_grad=True)
    decode(stored, 3).pow(2).sum().backward()
    assert stored.grad.shape == stored.shape and (stored.grad != 0).all()


def test_factor_of_a_set_is_read_from_its_shapes():
    assert factor_of(10, 40) == 2 and factor_of(10, 10) == 1 and factor_of(5, 45) == 3
    with pytest.raises(ValueError, match="not a square multiple"):
        factor_of(10, 20)


def test_the_initial_set_tiles_formation_squared_real_images_per_stored_image():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(60, 1, 4, 4, generator=generator)
    labels = torch.arange(3).repeat_interleave(20)
    synthetic = initial_set(images, labels, ipc=2, num_classes=3,
                            teacher_logits_fn=lambda x: x.flatten(1)[:, :3], temperature=1.0,
                            seed=0, formation=2)
    assert synthetic.images.shape == (6, 1, 4, 4) and synthetic.formation == 2
    assert synthetic.classes.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    # The labels are the teacher's on the training images the stored ones decode to.
    training = synthetic.training_images
    assert training.shape == (24, 1, 4, 4)
    assert torch.equal(synthetic.label_logits, training.flatten(1)[:, :3])


def test_the_memory_constant_unroll_gives_the_stored_images_the_full_unrolls_gradient():
    """Through the decoding, recompute (rebuilt steps, then back through decode) and the full
    unroll (one graph) agree, and so do the loss values; the gradient is on the stored pixels."""
    from ead_dist.coordinator import Coordinator, Segment, StudentSettings
    from ead_dist.effect import parameters_of
    from ead_dist.models import build_model
    from ead_dist.synthetic import SyntheticSet

    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=1)
    theta = parameters_of(model)
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in theta.items()}
    synthetic = SyntheticSet(torch.randn(3, 1, 8, 8), torch.randn(12, 3),
                             torch.arange(3).repeat_interleave(4))
    grads, losses = {}, {}
    for recompute in (False, True):
        coordinator = Coordinator(
            model, synthetic, objective="trajectory", segments=[Segment(theta, target)],
            student=StudentSettings(steps=3, batch_size=6, initial_lr=0.1, recompute=recompute),
            augmentation="color_crop")
        losses[recompute] = coordinator._trajectory_backward(4)
        grads[recompute] = (coordinator.images.grad.clone(), coordinator.label_logits.grad)
    assert grads[True][0].shape == (3, 1, 8, 8) and grads[True][0].abs().sum() > 0
    assert float(losses[True]) == pytest.approx(float(losses[False]), rel=1e-5)
    for full, rebuilt in zip(grads[False], grads[True]):
        assert torch.allclose(full, rebuilt, rtol=1e-4, atol=1e-7)


BASE = {"experts.count": 1, "experts.train_samples": 256, "realgrad.real_samples": 200,
        "realgrad.checkpoints": 3, "distill.iterations": 4, "distill.save_every": 2,
        "distill.lr_images": 0.1}


@pytest.fixture(scope="module")
def prepared(small_fashion_mnist, tmp_path_factory):
    return run_with_real_terms(str(tmp_path_factory.mktemp("formation") / "base"),
                               small_fashion_mnist, BASE).run


@pytest.mark.parametrize("objective", ["matching", "trajectory"])
def test_the_coordinator_learns_stored_images_and_publishes_their_training_images(
        prepared, small_fashion_mnist, tmp_path, objective):
    run = str(tmp_path / objective)
    shutil.copytree(prepared, run)
    overrides = {"distill.formation": 2, "distill.objective": objective}
    if objective == "trajectory":
        overrides.update({"distill.student_steps": 2, "distill.expert_span": 1,
                          "distill.unroll": "recompute"})
    config = tiny_config(run, small_fashion_mnist, dict(BASE, **overrides))
    distill(config)
    images, labels, classes, metadata = load_synthetic(storage.join(run, "synthetic.safetensors"))
    tensors, _ = storage.load_tensors(storage.join(run, "synthetic.safetensors"))
    # ipc 2 stored images per class, each 4 training images: 80 of them, 8 per class.
    assert tensors["stored_images"].shape == (20, 1, 28, 28) and metadata["formation"] == 2
    assert images.shape == (80, 1, 28, 28) and labels.shape == (80, 10)
    assert torch.bincount(classes).tolist() == [8] * 10
    assert torch.allclose(images, decode(tensors["stored_images"], 2), atol=1e-6)
    init, _ = storage.load_tensors(storage.join(run, "distill", "init.safetensors"))
    assert init["images"].shape == (80, 1, 28, 28)
    assert not torch.equal(init["stored_images"], tensors["stored_images"])
    # A saved state holds the stored images; it reads back as the same set.
    state, _ = storage.load_tensors(state_url(run, 4))
    synthetic = synthetic_from_state(state, 10)
    assert synthetic.formation == 2
    assert torch.allclose(synthetic.training_images, images, atol=1e-6)
    if objective == "matching":  # show draws the stored images beside the training images
        from ead_dist.show import show_run

        written = show_run(run, data_url=small_fashion_mnist)
        stored = storage.join(run, "show", "stored.png")
        assert stored in written and storage.read_bytes(stored)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["random", "herding", "dm", "dc"])
def test_every_baseline_keeps_the_budget_of_stored_images_with_formation(
        prepared, small_fashion_mnist, tmp_path, method):
    run = str(tmp_path / method)
    shutil.copytree(prepared, run)
    overrides = {"distill.formation": 2, "distill.method": method, "distill.iterations": 2,
                 "distill.real_batch_size": 16, "distill.outer_loop": 2, "distill.inner_loop": 1}
    distill(tiny_config(run, small_fashion_mnist, dict(BASE, **overrides)))
    images, labels, classes, metadata = load_synthetic(storage.join(run, "synthetic.safetensors"))
    tensors, _ = storage.load_tensors(storage.join(run, "synthetic.safetensors"))
    assert tensors["stored_images"].shape == (20, 1, 28, 28) and metadata["formation"] == 2
    assert images.shape == (80, 1, 28, 28)
    assert torch.allclose(images, decode(tensors["stored_images"], 2), atol=1e-6)
    assert torch.equal(labels, F.one_hot(classes, 10).float())  # hard labels, one per image
    # Each stored image holds training images of one class.
    assert torch.equal(classes.view(20, 4), classes.view(20, 4)[:, :1].expand(20, 4))
    init, _ = storage.load_tensors(storage.join(run, "distill", "init.safetensors"))
    moved = not torch.equal(init["stored_images"], tensors["stored_images"])
    assert moved == (method != "random")  # herding picks other images; DM and DC learn


def test_formation_on_image_text_data_is_refused():
    import os

    from ead_dist.config import load_config

    pipeline = os.path.join(os.path.dirname(__file__), "..", "pipelines", "scenes_tiny.yaml")
    with pytest.raises(ConfigError, match="multi-formation is for classification sets"):
        load_config(pipeline, ["distill.formation=2"])


def test_a_factor_that_does_not_divide_the_images_is_refused(prepared, small_fashion_mnist,
                                                             tmp_path):
    run = str(tmp_path / "three")
    shutil.copytree(prepared, run)
    config = tiny_config(run, small_fashion_mnist, dict(BASE, **{"distill.formation": 3}))
    with pytest.raises(ConfigError, match="distill.formation: formation factor 3 must divide "
                                          "the image size 28 x 28"):
        distill(config)
    assert not storage.exists(storage.join(run, "distill", "init.safetensors"))


def test_the_plan_calibrates_with_the_training_images_a_formation_makes(tmp_path, monkeypatch):
    from ead_dist import calibrate, coordinator, supervised

    config = tiny_config(str(tmp_path / "r"), str(tmp_path / "not-ingested"),
                         {"distill.formation": 2, "distill.ipc": 1})
    shape = calibrate.data_shape(config)
    seen = {}
    step, train = coordinator.Coordinator.step, supervised.train_classifier

    def recording_step(self, iteration):
        seen["distill"] = (tuple(self.images.shape), tuple(self._training_images().shape))
        return step(self, iteration)

    def recording_train(model, images, *args, **kwargs):
        seen["evaluate"] = len(images)
        return train(model, images, *args, **kwargs)

    monkeypatch.setattr(coordinator.Coordinator, "step", recording_step)
    monkeypatch.setattr(supervised, "train_classifier", recording_train)
    calibrate.calibrate_distill(config, shape, threads=1)
    calibrate.calibrate_evaluate(config, shape, threads=1)
    assert seen == {"distill": ((10, 1, 28, 28), (40, 1, 28, 28)), "evaluate": 40}

"""open_clip's dual encoder as built here: tokens and token embeddings agree, the loss is
open_clip's, small configs build offline, unknown names fail by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ead_dist.models.dual_encoder import build_dual_encoder, tokenize

CAPTIONS = ["a small red sneaker at the top left", "a large blue bag at the bottom right and "
            "a small white dress at the top right"]


def test_tokenize_puts_end_of_text_last():
    tokens = tokenize(CAPTIONS, 20)
    assert tokens.shape == (2, 20) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == 49406).all() and (tokens[:, -1] == 49407).all()
    assert (tokens.argmax(dim=1) == 19).all()
    assert (tokens[0, 9:19] == 0).all()  # padding between the words and the end


def test_text_features_match_open_clip_and_embeddings():
    torch.manual_seed(0)
    model = build_dual_encoder("clip-tiny", 16, 20)
    tokens = tokenize(CAPTIONS, 20)
    ours = model.encode_text(tokens)
    theirs = model.clip.encode_text(tokens, normalize=True)  # argmax pooling
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(model.encode_text(model.embed_tokens(tokens)), ours, atol=1e-6)


def test_loss_is_clip_loss_with_learnable_temperature():
    torch.manual_seed(0)
    model = build_dual_encoder("clip-tiny", 16, 20)
    images = torch.randn(2, 3, 16, 16)
    tokens = tokenize(CAPTIONS, 20)
    loss = model(images, tokens)
    logits = model.clip.logit_scale.exp() * model.encode_image(images) @ \
        model.encode_text(tokens).T
    expected = (F.cross_entropy(logits, torch.arange(2)) +
                F.cross_entropy(logits.T, torch.arange(2))) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert model.clip.logit_scale.grad is not None and model.clip.logit_scale.grad != 0


def test_identity_targets_give_clip_loss_and_others_another_loss():
    torch.manual_seed(0)
    model = build_dual_encoder("clip-tiny", 16, 20)
    images = torch.randn(2, 3, 16, 16)
    tokens = tokenize(CAPTIONS, 20)
    assert torch.allclose(model(images, tokens, torch.eye(2)), model(images, tokens), atol=1e-6)
    # Caption 0 credited to image 1 as much as to image 0: a loss of its own, and a gradient
    # reaches the targets (the learned similarity).
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = model(images, tokens, targets)
    assert not torch.allclose(loss, model(images, tokens), atol=1e-3)
    loss.backward()
    assert targets.grad is not None and targets.grad.abs().sum() > 0


def test_unknown_model_and_pretrained_small_config_fail_by_name():
    with pytest.raises(ValueError, match="unknown image-text model 'clip-huge'"):
        build_dual_encoder("clip-huge", 16, 20)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_dual_encoder("clip-tiny", 16, 20, pretrained="openai")

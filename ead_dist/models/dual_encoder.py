"""open_clip's dual encoder as the image-text model: built by name, fed tokens or token embeddings.

Small tower configs (``clip-tiny``, ``clip-small``) fit this project's CPUs; any other name is
open_clip's own model registry (``ViT-B-32``, ``RN50``, ...), with ``pretrained`` a tag that
open_clip loads on the user's machine (nothing is downloaded for the small configs).

:class:`PairLoss` wraps the open_clip model so that one call is the contrastive loss of a batch
of pairs, given captions either as token ids [B, L] (real data) or as continuous token
embeddings [B, L, W] (the synthetic set's learnable captions, as MTT-VL and LoRS feed them).
Both go through the text tower the same way: token embedding (for ids), positional embedding,
transformer, final norm, projection. Captions are tokenized with the end-of-text token moved to
the last position (:func:`tokenize`), so the text feature is always read at position L - 1:
where open_clip's ``argmax`` pooling reads it for ids, and a fixed place for embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_CONFIGS = {
    # embed_dim, vision tower (ViT), text tower; widths and depths sized for 2 CPU cores
    "clip-tiny": dict(embed_dim=64,
                      vision_cfg=dict(layers=2, width=64, head_width=32, mlp_ratio=2.0,
                                      patch_size=8),
                      text_cfg=dict(layers=2, width=64, heads=2, mlp_ratio=2.0)),
    "clip-small": dict(embed_dim=128,
                       vision_cfg=dict(layers=4, width=128, head_width=32, mlp_ratio=4.0,
                                       patch_size=8),
                       text_cfg=dict(layers=4, width=128, heads=4, mlp_ratio=4.0)),
}


def build_dual_encoder(name: str, image_size: int, context_length: int,
                       pretrained: str | None = None) -> "PairLoss":
    """A :class:`PairLoss` around open_clip model ``name`` taking [B, 3, S, S] images."""
    import open_clip

    if name in SMALL_CONFIGS:
        if pretrained:
            raise ValueError(f"model {name!r} is one of this project's small configs and has no "
                             f"pretrained weights; drop model.pretrained ({pretrained!r})")
        config = SMALL_CONFIGS[name]
        clip = open_clip.CLIP(
            embed_dim=config["embed_dim"],
            vision_cfg=open_clip.CLIPVisionCfg(image_size=image_size, **config["vision_cfg"]),
            text_cfg=open_clip.CLIPTextCfg(context_length=context_length, vocab_size=49408,
                                           **config["text_cfg"]),
        )
    elif name in open_clip.list_models():
        clip = open_clip.create_model(name, pretrained=pretrained or None,
                                      force_image_size=image_size)
    else:
        raise ValueError(f"unknown image-text model {name!r}; expected one of "
                         f"{sorted(SMALL_CONFIGS)} or an open_clip model name")
    if getattr(clip, "text_pool_type", "argmax") != "argmax" or not hasattr(clip, "transformer"):
        raise ValueError(f"model {name!r}: only open_clip CLIP models with a built-in text "
                         "tower pooled at the end-of-text token are supported")
    if clip.positional_embedding.shape[0] != context_length:
        raise ValueError(f"model {name!r} reads {clip.positional_embedding.shape[0]} tokens; set "
                         f"image_text.context_length to that, not {context_length}")
    table = clip.token_embedding.weight.detach()
    if not pretrained:  # the same table for every expert, student and evaluation model
        generator = torch.Generator().manual_seed(TOKEN_TABLE_SEED)
        table = torch.randn(table.shape, generator=generator) * 0.02  # open_clip's init std
    clip.token_embedding = TokenTable(table)
    return PairLoss(clip)


TOKEN_TABLE_SEED = 0


class TokenTable(nn.Module):
    """A fixed token embedding (a buffer, not a parameter): the input space of the text tower.

    Synthetic captions are points in this space, so every model that trains on them or is
    compared with them (experts, the coordinator's student, the evaluation models) must share
    it: a seeded random table for the small configs, the pretrained one otherwise. Being a
    buffer it is not in the experts' checkpoints (theta) nor moved by any training.
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.clone())

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)


def tokenizer_name(name: str) -> str:
    """What the set file records as the captions' tokenizer."""
    return "open_clip.SimpleTokenizer" if name in SMALL_CONFIGS else f"open_clip:{name}"


def tokenize(captions: list[str], context_length: int) -> Tensor:
    """int64 [B, L] token ids of open_clip's BPE tokenizer (its vocabulary ships in the wheel),
    with each caption's end-of-text token moved to position L - 1 and padding between."""
    import open_clip

    tokens = open_clip.SimpleTokenizer(context_length=context_length)(captions)
    end = tokens.argmax(dim=1)  # the end-of-text token has the largest id
    eot = tokens[torch.arange(len(tokens)), end]
    tokens[torch.arange(len(tokens)), end] = 0
    tokens[:, -1] = eot
    return tokens


class PairLoss(nn.Module):
    """open_clip's symmetric contrastive loss with its learnable temperature, for one batch."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def text_width(self) -> int:
        return int(self.clip.token_embedding.weight.shape[1])

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.clip.token_embedding(tokens)

    def encode_text(self, text: Tensor) -> Tensor:
        """Unit text features of token ids [B, L] or token embeddings [B, L, W]."""
        clip = self.clip
        x = self.embed_tokens(text) if not text.is_floating_point() else text
        x = x + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        x = x[:, -1]  # the end-of-text position (see tokenize)
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) \
            else x @ clip.text_projection
        return F.normalize(x, dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images, normalize=True)

    def forward(self, images: Tensor, text: Tensor, similarity: Tensor | None = None) -> Tensor:
        """Mean of the image-to-text and text-to-image cross-entropies of the batch's
        similarity logits, scaled by exp(logit_scale) (CLIP's loss; open_clip's ClipLoss).

        ``similarity`` [B, B], when given, replaces the identity as the targets (LoRS's
        learned similarity: :func:`soft_contrastive_loss`)."""
        from open_clip import ClipLoss

        scale = self.clip.logit_scale.exp().clamp(max=100.0)
        image_features, text_features = self.encode_image(images), self.encode_text(text)
        if similarity is None:
            return ClipLoss()(image_features, text_features, scale)
        return soft_contrastive_loss(scale * image_features @ text_features.T, similarity)


def soft_contrastive_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy with the target matrix ``targets`` [B, B] in place of the
    identity: the mean of -sum_j T_ij log softmax_j(logits_i) over images i and of the same
    over captions (columns). Targets are taken as they are, not normalised (LoRS's InfoNCE
    form), so the identity gives CLIP's loss exactly."""
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2

"""Retrieval recall of paired features: image-to-text and text-to-image recall@k. Pure tensors.

Pair i is (image i, caption i). Image-to-text recall@k is the fraction of images whose own
caption is among the k captions most similar to it; text-to-image the same the other way.
Ties count against the pair (its rank is the number of others scoring at least as high).
"""

from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10)


def ranks(similarity: Tensor) -> Tensor:
    """The 0-based rank of each row's own column (the diagonal) among that row's scores."""
    own = similarity.diagonal().unsqueeze(1)
    others = similarity >= own
    others.fill_diagonal_(False)
    return others.sum(dim=1)


def recall_at(image_features: Tensor, text_features: Tensor, ks=KS) -> dict[str, float]:
    """{"i2t@1": ..., "t2i@1": ..., ...} for unit features [N, E] of N pairs."""
    similarity = image_features @ text_features.T
    image_ranks, text_ranks = ranks(similarity), ranks(similarity.T)
    result = {}
    for k in ks:
        result[f"i2t@{k}"] = float((image_ranks < k).float().mean())
        result[f"t2i@{k}"] = float((text_ranks < k).float().mean())
    return result


@torch.no_grad()
def model_recall(model, images: Tensor, tokens: Tensor, batch_size: int = 500,
                 ks=KS) -> dict[str, float]:
    """:func:`recall_at` of a :class:`~ead_dist.models.dual_encoder.PairLoss` on (images,
    tokens), encoded in batches, in eval mode."""
    training = model.training
    model.eval()
    image_features = torch.cat([model.encode_image(images[i:i + batch_size])
                                for i in range(0, len(images), batch_size)])
    text_features = torch.cat([model.encode_text(tokens[i:i + batch_size])
                               for i in range(0, len(tokens), batch_size)])
    model.train(training)
    return recall_at(image_features, text_features, ks)

"""Recall@k of paired features, checked on hand-made similarities."""

import pytest
import torch

from ead_dist.retrieval import ranks, recall_at


def test_ranks_and_recall():
    # image 0 finds its caption first, image 1 second, image 2 third; captions: 0, 1, 1
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.5, 0.8], [0.7, 0.8, 0.3]])
    assert ranks(similarity).tolist() == [0, 1, 2]
    assert ranks(similarity.T).tolist() == [0, 1, 1]
    image = torch.eye(3)  # features whose similarity is exactly that matrix
    recall = recall_at(image, similarity.T, ks=(1, 2))
    assert recall == pytest.approx({"i2t@1": 1 / 3, "i2t@2": 2 / 3, "t2i@1": 1 / 3,
                                    "t2i@2": 1.0})


def test_ties_count_against_the_pair():
    features = torch.ones(4, 2) / 2 ** 0.5
    assert recall_at(features, features, ks=(1,)) == {"i2t@1": 0.0, "t2i@1": 0.0}


def test_perfect_features_recall_everything():
    features = torch.eye(5)
    assert all(v == 1.0 for v in recall_at(features, features).values())

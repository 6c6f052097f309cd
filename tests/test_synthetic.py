"""The synthetic set's initialisation: class-balanced picks, correct predictions first."""

import pytest
import torch

from ead_dist.synthetic import correctly_classified_first, synthetic_from_state


def test_correctly_classified_samples_come_first_then_the_rest():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    predicted = torch.tensor([1, 0, 0, 0, 0, 1])
    picks = correctly_classified_first(labels, predicted, 2, 2)
    assert picks.tolist() == [1, 2, 5, 3]  # class 1 has one correct sample, topped up by 3


def test_too_few_samples_of_a_class_is_an_error():
    with pytest.raises(ValueError, match="class 1 has 1 samples"):
        correctly_classified_first(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 2, 2)


def test_a_state_gives_the_set_it_holds():

    images, classes = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    logits = torch.randn(4, 3)
    soft = synthetic_from_state({"images": images, "label_logits": logits, "classes": classes,
                                 "adam.0.step": torch.tensor(3.0)}, 3)
    assert torch.equal(soft.images, images) and torch.allclose(soft.labels, logits.softmax(1))
    hard = synthetic_from_state({"images": images, "classes": classes,
                                 "momentum": torch.zeros(4, 1, 2, 2)}, 3)
    assert torch.equal(hard.labels, torch.nn.functional.one_hot(classes, 3).float())

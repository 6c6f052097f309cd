"""The class-balanced reservoir: per_class items of each class, uniformly drawn, seeded."""

import collections

import pytest

from ead_dist.data.reservoir import TooFewSamplesError, class_reservoirs

# Class 0 has 10 items, class 1 has 4, interleaved as a shard stream would be.
STREAM = [(0, f"a{i}") for i in range(6)] + [(1, f"b{i}") for i in range(4)] + \
         [(0, f"a{i}") for i in range(6, 10)]


def test_each_class_gets_per_class_distinct_items_of_its_own():
    reservoirs = class_reservoirs(iter(STREAM), per_class=2, num_classes=2, seed=0)
    assert [len(r) for r in reservoirs] == [2, 2]
    assert all(item.startswith("a") for item in reservoirs[0])
    assert all(item.startswith("b") for item in reservoirs[1])
    assert len(set(reservoirs[0])) == 2 and len(set(reservoirs[1])) == 2


def test_the_draw_is_uniform_within_each_class():
    draws = 4000
    counts = collections.Counter()
    for seed in range(draws):
        for reservoir in class_reservoirs(iter(STREAM), per_class=2, num_classes=2, seed=seed):
            counts.update(reservoir)
    for i in range(10):  # 2 of 10: each item 20 % of the time (binomial sd 0.6 %)
        assert counts[f"a{i}"] / draws == pytest.approx(0.2, abs=0.03), i
    for i in range(4):
        assert counts[f"b{i}"] / draws == pytest.approx(0.5, abs=0.04), i


def test_the_draw_is_a_function_of_the_seed():
    first = class_reservoirs(iter(STREAM), per_class=3, num_classes=2, seed=7)
    assert class_reservoirs(iter(STREAM), per_class=3, num_classes=2, seed=7) == first
    assert any(class_reservoirs(iter(STREAM), per_class=3, num_classes=2, seed=s) != first
               for s in range(8, 12))


def test_a_class_with_too_few_items_is_named():
    with pytest.raises(ValueError, match="class 2 has 0 samples, fewer than ipc=2"):
        class_reservoirs(iter(STREAM), per_class=2, num_classes=3, seed=0)


def test_reservoir_positions_are_the_positions_the_stream_reservoir_keeps():
    from ead_dist.data.reservoir import reservoir_positions

    for total, count, seed in ((5, 5, 0), (40, 8, 0), (40, 8, 3), (1000, 7, 11)):
        [kept] = class_reservoirs(((0, i) for i in range(total)), count, 1, seed)
        assert reservoir_positions(total, count, seed) == kept
    with pytest.raises(TooFewSamplesError):
        reservoir_positions(4, 5, 0)

"""Image-text pairs read as streams, the way a CC3M run must: experts that stream their batches
from the shards (``image_text.expert_data: stream``) record the same checkpoints as experts
that hold the pairs, without holding the train split, deterministically and resumably; random
pairs (the initial set, the random baseline) are drawn by reservoir sampling."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import SMALL_PAIRS as SMALL
from ead_dist import storage
from ead_dist.config import ConfigError, parse_config
from ead_dist.stages import pair_experts
from ead_dist.stages.experts import METRIC_SAMPLES, run_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STREAM = {"image_text": dict(SMALL["image_text"], expert_data="stream", stream_buffer=50)}


def stream_config(run: str, data: str, **experts):
    raw = {"run": run, "data": {"dataset": "cc3m", "source": data, "url": data,
                                "image_size": 32}, **SMALL, **STREAM,
           "experts": dict(SMALL["experts"], **experts)}
    return parse_config(raw)


@pytest.fixture(scope="module")
def streamed(scenes, tmp_path_factory):  # noqa: F811
    """One streamed expert, with every load_pairs call's split and limit recorded."""
    calls = []
    original = pair_experts.load_pairs

    def recording(data_url, settings, split, limit=None, meta=None):
        calls.append((split, limit))
        return original(data_url, settings, split, limit=limit, meta=meta)

    pair_experts.load_pairs = recording
    try:
        run = str(tmp_path_factory.mktemp("stream") / "run")
        run_experts(stream_config(run, scenes), use_ray=False)
    finally:
        pair_experts.load_pairs = original
    return run, calls


def _checkpoint(run: str, step: int) -> dict[str, torch.Tensor]:
    return storage.load_tensors(storage.join(run, "experts", "expert-000",
                                             f"step-{step:06d}.safetensors"))[0]


def test_a_streamed_expert_records_the_checkpoints_of_an_epoch_of_train_pairs(streamed):
    run, _ = streamed
    [expert] = storage.read_json(storage.join(run, "experts", "index.json"))["experts"]
    # train_pairs 96 is the epoch: 96 / 32 = 3 steps, saved every 2, as in memory
    assert [c["step"] for c in expert["checkpoints"]] == [0, 2, 3]
    assert expert["train_samples"] == 96
    assert set(expert["test_recall"]) == {f"{d}@{k}" for d in ("i2t", "t2i")
                                          for k in (1, 5, 10)}
    assert not torch.equal(_checkpoint(run, 0)["clip.text_projection"],
                           _checkpoint(run, 3)["clip.text_projection"])


def test_a_streamed_expert_never_loads_the_train_split(streamed):
    _, calls = streamed
    # the train pairs it loads are the probe its loss and recall are measured on; the test
    # pairs are the held-out evaluation; nothing else
    assert sorted(calls) == [("test", SMALL["image_text"]["test_pairs"]),
                             ("train", METRIC_SAMPLES)]


def test_streamed_experts_are_deterministic_given_the_seed(streamed, scenes, tmp_path):  # noqa: F811
    run, _ = streamed
    again = str(tmp_path / "again")
    run_experts(stream_config(again, scenes), use_ray=False)
    for step in (2, 3):
        first, second = _checkpoint(run, step), _checkpoint(again, step)
        assert all(torch.equal(first[name], second[name]) for name in first), step
    other = str(tmp_path / "other_seed")
    run_experts(stream_config(other, scenes, seed=1), use_ray=False)
    assert not torch.equal(_checkpoint(run, 2)["clip.text_projection"],
                           _checkpoint(other, 2)["clip.text_projection"])


def test_a_streamed_expert_resumes_from_its_last_checkpoint(streamed, scenes, tmp_path):  # noqa: F811
    import shutil

    run, _ = streamed
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    expert_dir = os.path.join(resumed, "experts", "expert-000")
    os.remove(os.path.join(resumed, "experts", "index.json"))
    os.remove(os.path.join(expert_dir, "trajectory.json"))
    os.remove(os.path.join(expert_dir, "step-000003.safetensors"))
    kept = _checkpoint(resumed, 2)
    run_experts(stream_config(resumed, scenes), use_ray=False)
    [expert] = storage.read_json(storage.join(resumed, "experts", "index.json"))["experts"]
    assert [c["step"] for c in expert["checkpoints"]] == [0, 2, 3]
    assert all(torch.equal(kept[name], _checkpoint(resumed, 2)[name]) for name in kept)
    # one step from the step-2 checkpoint, on a fresh draw: not theta_2 any more
    assert not torch.equal(kept["clip.text_projection"],
                           _checkpoint(resumed, 3)["clip.text_projection"])


def test_a_subset_of_a_stream_is_refused(scenes, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="experts.train_samples"):
        stream_config(str(tmp_path / "run"), scenes, train_samples=10)


def test_sampled_pairs_are_a_seeded_uniform_draw_from_the_first_limit_pairs(scenes):  # noqa: F811
    from ead_dist.data.pairs import load_pairs, sample_pairs
    from ead_dist.data.reservoir import TooFewSamplesError

    settings = stream_config("unused", scenes).image_text
    first = load_pairs(scenes, settings, "train", limit=40)
    drawn = sample_pairs(scenes, settings, "train", 8, seed=0, limit=40)
    assert drawn.images.shape == (8, 3, 32, 32) and drawn.tokens.shape == (8, 32)
    assert len(set(drawn.keys)) == 8 and set(drawn.keys) <= set(first.keys)
    row = first.keys.index(drawn.keys[0])
    assert torch.equal(drawn.images[0], first.images[row])
    assert torch.equal(drawn.tokens[0], first.tokens[row])
    assert sample_pairs(scenes, settings, "train", 8, seed=0, limit=40).keys == drawn.keys
    # every one of the 40 is drawn about 8/40 of the time over seeds
    counts = {key: 0 for key in first.keys}
    for seed in range(100):
        for key in sample_pairs(scenes, settings, "train", 8, seed=seed, limit=40).keys:
            counts[key] += 1
    assert min(counts.values()) >= 5 and max(counts.values()) <= 40  # expected 20 each
    with pytest.raises(TooFewSamplesError, match="test pairs asked for"):
        sample_pairs(scenes, settings, "test", 10_000, seed=0)


def test_a_draw_shard_by_shard_is_the_stream_reservoirs_and_ray_tasks_make_the_same(
        scenes, ray_session):  # noqa: F811
    """sample_pairs counts each shard, draws positions and lets each shard decode its own:
    the very draw a reservoir over the train keys in shard order makes, and the same whether
    the shards' calls run here or as Ray tasks."""
    from ead_dist.data.image_text_stream import SkipBroken, image_text_keys
    from ead_dist.data.meta import read_meta
    from ead_dist.data.pairs import all_shards, sample_pairs
    from ead_dist.data.reservoir import class_reservoirs
    from ead_dist.stages.distill_pairs import shard_map

    settings = stream_config("unused", scenes).image_text
    every = all_shards(scenes, read_meta(scenes))
    assert len(every) > 1
    listed = [key for key, _ in image_text_keys(every, handler=SkipBroken(limit=None),
                                                held_out_fraction=settings.held_out)]
    for limit in (None, 40):
        [expected] = class_reservoirs(((0, key) for key in listed[:limit]), 8, 1, seed=5)
        assert sample_pairs(scenes, settings, "train", 8, seed=5, limit=limit).keys == expected
    here = sample_pairs(scenes, settings, "train", 8, seed=5)
    config = parse_config({"run": "unused", "data": {"dataset": "cc3m", "source": scenes,
                                                     "url": scenes, "image_size": 32},
                           **SMALL, "ray": {"enabled": True}})
    tasks = sample_pairs(scenes, settings, "train", 8, seed=5, map_shards=shard_map(config))
    assert tasks.keys == here.keys and torch.equal(tasks.images, here.images)

"""Contrastive real terms of image-text pairs: means over fixed batches, exact against an explicit
computation, and the same with 1 or 2 Ray Train workers as in one process."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import small_pair_config
from ead_dist import storage
from ead_dist.data.pairs import load_pairs
from ead_dist.fingerprint import stage_fields
from ead_dist.models.dual_encoder import build_dual_encoder
from ead_dist.data.image_text_stream import SkipBroken, image_text_keys
from ead_dist.data.meta import read_meta
from ead_dist.data.pairs import all_shards
from ead_dist.stages.pair_realgrad import (batches_per_shard, build_pair_plan, draw_batches,
                                            locate)
from ead_dist.stages.realgrad import realgrad_url, run_realgrad, sums_bytes

# 96 train pairs in 2 shards (about 60 and 36): a pool of 5 batches of 16, 3 of them D batches.
TERMS = {"checkpoints": 3, "real_samples": 48, "p_batches": 2, "p_batch_size": 16, "chunk": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_keys(data: str, settings, limit: int | None = None) -> list[tuple[str, int]]:
    """(key, shard index) of the first ``limit`` train pairs in shard order, listed from the tar
    files here, apart from the plan's counting."""
    shards = all_shards(data, read_meta(data))
    keys = image_text_keys(shards, handler=SkipBroken(), held_out_fraction=settings.held_out)
    return [(key, shards.index(url)) for key, url in keys][:limit]


def _config(experts_done, scenes, tmp_path, name, workers=1, **realgrad):
    run = str(tmp_path / name)
    shutil.copytree(storage.join(experts_done, "experts"), storage.join(run, "experts"))
    return small_pair_config(run, scenes, {
        "realgrad": {**TERMS, "workers": workers, **realgrad},
        "distill": {"objective": "matching"}})


def _load(config):
    index = storage.read_json(storage.join(realgrad_url(config.run), "index.json"))
    return [storage.load_tensors(storage.join(realgrad_url(config.run), c["file"]))[0]
            for c in index["checkpoints"]]


def close(a, b, tolerance=1e-5):
    """Equal up to float32 summation order: max error relative to the largest entry."""
    return bool((a - b).abs().max() <= tolerance * b.abs().max())


def test_batches_are_consecutive_runs_within_shards_and_draws_are_fixed():
    per_shard = batches_per_shard([7, 0, 2, 5], 3)  # shard 0: 2 runs (its 7th pair left out), 3: 1
    assert per_shard == [2, 0, 0, 1]
    assert locate(per_shard, [0, 1, 2]) == [(0, 0), (0, 1), (3, 0)]
    with pytest.raises(IndexError, match="batch 3 is outside the pool of 3"):
        locate(per_shard, [3])
    d, p = draw_batches(10, 4, 3, seed=0)
    assert (d, p) == draw_batches(10, 4, 3, seed=0) and d != draw_batches(10, 4, 3, seed=1)[0]
    assert len(set(d)) == 4 and len(set(p)) == 3 and d == sorted(d)
    assert draw_batches(10, None, 3, seed=0)[0] == list(range(10))


def test_pair_terms_are_means_of_batch_contrastive_gradients(experts_done, scenes, tmp_path):
    config = _config(experts_done, scenes, tmp_path, "direct")
    index = run_realgrad(config, use_ray=False)
    assert index["passes"] == 2 and index["d_batches"] == 3 and index["real_samples"] == 48
    assert index["train_pairs"] == 96 and index["p_batch_size"] == 16
    plan = build_pair_plan(config)
    # The batches: 16 consecutive pairs of D (the experts' train pairs), each in one shard,
    # named by pool index; their keys, listed here independently of the plan.
    pairs = load_pairs(scenes, config.image_text, "train", limit=96)
    row = {key: i for i, key in enumerate(pairs.keys)}
    by_shard: dict[int, list[str]] = {}
    for key, shard in train_keys(scenes, config.image_text, 96):
        by_shard.setdefault(shard, []).append(key)
    assert plan["batches_per_shard"] == [len(by_shard[s]) // 16 for s in sorted(by_shard)]

    def keys_of(b):
        [(shard, j)] = locate(plan["batches_per_shard"], [b])
        return by_shard[shard][16 * j:16 * (j + 1)]

    assert len(plan["d_batches"]) == 3 and len(plan["p_batches"]) == 2
    assert plan["pool"] == index["pool_batches"] == 5  # 3 + 2 in 96 pairs
    assert "batches" not in plan  # no key travels to the workers
    for b in plan["d_batches"] + plan["p_batches"]:
        rows = [row[key] for key in keys_of(b)]
        assert rows == list(range(rows[0], rows[0] + 16))
    model = build_dual_encoder("clip-tiny", 32, 32)

    def gradient(theta, b):
        """grad L(b): plain backward of the batch's contrastive loss on a loaded model."""
        rows = torch.tensor([row[key] for key in keys_of(b)])
        model.zero_grad()
        model(pairs.images[rows], pairs.tokens[rows]).backward()
        return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                          for name, p in model.named_parameters() if name in theta])

    terms = _load(config)
    assert len(terms) == 3
    for checkpoint, got in zip(plan["checkpoints"], terms):
        theta, _ = storage.load_tensors(checkpoint["url"])
        model.load_state_dict(theta, strict=False)
        g_D = torch.stack([gradient(theta, b) for b in plan["d_batches"]]).mean(0)
        g_P = torch.stack([gradient(theta, b) for b in plan["p_batches"]])
        assert close(got["g_D"], g_D, 1e-4) and close(got["g_P"], g_P, 1e-4)
        assert close(got["real_dots"], g_P @ g_D, 1e-4)
        assert got["d_batches"].tolist() == [3] and got["p_batches"].tolist() == [1, 1]
        assert "g_D_classes" not in got
        # Not the gradient of one batch of all 48: the contrastive loss is no sum over pairs.
        rows = torch.tensor([row[k] for b in plan["d_batches"] for k in keys_of(b)])
        model.zero_grad()
        model(pairs.images[rows], pairs.tokens[rows]).backward()
        whole = torch.cat([p.grad.reshape(-1) for name, p in model.named_parameters()
                           if name in theta])
        assert not close(got["g_D"], whole, 1e-2)


def test_the_plan_does_not_depend_on_workers_and_reads_pairs_per_shard(experts_done, scenes,
                                                                       tmp_path):
    from ead_dist.stages.pair_realgrad import pair_partial_sums

    plan = build_pair_plan(_config(experts_done, scenes, tmp_path, "plan"))
    other = build_pair_plan(_config(experts_done, scenes, tmp_path, "plan2", workers=2))
    for name in ("shards", "batches_per_shard", "d_batches", "p_batches", "train_pairs"):
        assert plan[name] == other[name], name
    used = plan["d_batches"] + plan["p_batches"]
    assert {shard for shard, _ in locate(plan["batches_per_shard"], used)} == {0, 1}  # both
    parts = [pair_partial_sums(plan, rank, 2, [0]) for rank in (0, 1)]
    # each shard's batches on one worker: counts add up to every planned batch once
    assert sum(int(p["count_d"][0]) for p in parts) == 3
    assert (parts[0]["count_p"] + parts[1]["count_p"]).tolist() == [1, 1]
    whole = pair_partial_sums(plan, 0, 1, [0])
    assert close(parts[0]["0_d"] + parts[1]["0_d"], whole["0_d"])
    n = whole["0_d"].numel()
    held = sum(v.nbytes for k, v in whole.items() if not k.startswith("count"))
    assert held + 4 * n == sums_bytes(n, 1, 2, False, 1)  # the documented (K + 2) rows


def test_the_realgrad_fingerprint_holds_what_fixes_the_pair_batches(experts_done, scenes,
                                                                   tmp_path):
    config = _config(experts_done, scenes, tmp_path, "fingerprint")
    fields = stage_fields(config, "realgrad", "sha256:x")
    for name in ("realgrad.p_batch_size", "realgrad.p_batches", "realgrad.real_samples",
                 "realgrad.seed", "realgrad.checkpoints", "realgrad.dtype",
                 "image_text.train_pairs", "image_text.held_out", "image_text.model",
                 "image_text.context_length", "data.image_size"):
        assert name in fields, name
    assert "realgrad.class_terms" not in fields  # pairs have no classes
    assert "realgrad.workers" not in fields and "realgrad.chunk" not in fields
    config.realgrad.p_batch_size = 8
    assert stage_fields(config, "realgrad", "sha256:x")["realgrad.p_batch_size"] == 8


def test_too_few_batches_for_the_p_bank_name_the_fields(experts_done, scenes, tmp_path):
    from ead_dist.config import ConfigError

    config = _config(experts_done, scenes, tmp_path, "few", p_batches=9)
    with pytest.raises(ConfigError, match="realgrad.p_batches 9 .* realgrad.p_batch_size 16"):
        build_pair_plan(config)


@pytest.mark.cluster
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_train_workers_give_the_single_process_pair_terms(workers, experts_done, scenes,
                                                              tmp_path, ray_session):
    reference = _config(experts_done, scenes, tmp_path, "reference")
    run_realgrad(reference, use_ray=False)
    config = _config(experts_done, scenes, tmp_path, f"w{workers}", workers=workers)
    result = run_realgrad(config, use_ray=True)
    assert result["workers"] == workers and result["passes"] == 2
    for expected, got in zip(_load(reference), _load(config), strict=True):
        assert set(expected) == set(got)
        for name in expected:
            if expected[name].is_floating_point():
                assert close(got[name], expected[name]), name
            else:
                assert torch.equal(got[name], expected[name]), name


def test_with_streaming_experts_d_is_the_whole_train_split(experts_done, scenes, tmp_path):
    """Streaming experts read every train pair (train_pairs is their epoch length): so does D."""
    config = _config(experts_done, scenes, tmp_path, "stream")
    config.image_text.expert_data = "stream"
    plan = build_pair_plan(config)
    every = load_pairs(scenes, config.image_text, "train")
    assert plan["train_pairs"] == len(every.keys) > 96
    assert plan["pool"] == sum(plan["batches_per_shard"]) > 5  # 5 batches of 16 in 96 pairs


@pytest.mark.cluster
def test_ray_tasks_count_a_streamed_d_as_one_process_does(scenes, tmp_path, ray_session):
    from ead_dist.data.meta import read_meta
    from ead_dist.stages.pair_realgrad import count_train_pairs

    config = small_pair_config(str(tmp_path / "run"), scenes, {
        "image_text": {"expert_data": "stream"}, "distill": {"objective": "matching"}})
    meta = read_meta(scenes)
    counted = count_train_pairs(config, meta, use_ray=False)
    assert count_train_pairs(config, meta, use_ray=True) == counted
    listed = train_keys(scenes, config.image_text)
    assert counted == [sum(1 for _, s in listed if s == shard) for shard in (0, 1)]
    assert sum(counted) > 96 and min(counted) > 0

"""Streaming img2dataset shards: broken samples skipped and counted, the limit, the held-out
split, brace URLs on S3, node splitting and resampling."""

from __future__ import annotations

import io

import numpy as np
import torch
import pytest
from PIL import Image

from ead_dist import storage
from ead_dist.data.caption_scenes import shard_bytes
from ead_dist.data.image_text_stream import SkipBroken, held_out, image_text_pairs, take
from ead_dist.data.pipeline import ShardError
from ead_dist.data.reservoir import TooFewSamplesError


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _good(key: str, seed: int) -> dict:
    return {"__key__": key, "jpg": _jpeg(seed), "txt": f"caption {key}".encode(),
            "json": b"{}"}


def _shard(first: int, count: int, broken: dict | None = None) -> bytes:
    """``count`` samples keyed from ``first``; ``broken`` maps an offset to a kind of damage."""
    samples = []
    for i in range(count):
        key = f"{first + i:09d}"
        sample = _good(key, first + i)
        kind = (broken or {}).get(i)
        if kind == "corrupt":
            sample["jpg"] = sample["jpg"][:20] + b"\x00" * 40
        elif kind == "empty":
            sample["txt"] = b"  \n"
        elif kind == "no_txt":
            del sample["txt"]
        samples.append(sample)
    return shard_bytes(samples)


@pytest.fixture
def broken_shards(tmp_path):
    (tmp_path / "00000.tar").write_bytes(_shard(0, 6, {1: "corrupt", 3: "empty"}))
    (tmp_path / "00001.tar").write_bytes(_shard(10000, 5, {2: "no_txt"}))
    return str(tmp_path)


def test_broken_samples_are_skipped_and_counted(broken_shards):
    handler = SkipBroken(limit=5)
    pairs = list(image_text_pairs(f"{broken_shards}/{{00000..00001}}.tar", image_size=16,
                                  handler=handler))
    assert len(pairs) == 11 - 3
    key, image, caption = pairs[0]
    assert key == "000000000" and caption == "caption 000000000"
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
    assert dict(handler.counts) == {"corrupt image": 1, "empty caption": 1, "missing txt": 1}
    assert handler.by_shard[f"{broken_shards}/00000.tar"] == 2
    assert handler.by_shard[f"{broken_shards}/00001.tar"] == 1




def test_past_the_limit_the_error_names_the_shard(broken_shards):
    handler = SkipBroken(limit=2)
    with pytest.raises(ShardError, match=r"more than 2 broken samples.*00001\.tar.*missing txt"):
        list(image_text_pairs(f"{broken_shards}/{{00000..00001}}.tar", image_size=16,
                              handler=handler))
    with pytest.raises(ShardError, match=r"00000\.tar sample 000000001: corrupt image"):
        list(image_text_pairs([f"{broken_shards}/00000.tar"], image_size=16,
                              handler=SkipBroken(limit=0)))


def test_a_truncated_tar_counts_against_the_limit(tmp_path):
    data = _shard(0, 4)
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"00000\.tar"):
        list(image_text_pairs([str(tmp_path / "00000.tar")], image_size=8,
                              handler=SkipBroken(limit=0)))


def test_resize_and_centre_crop(tmp_path):
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 15:45] = 255  # the centre square is white, the sides black
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=100)
    (tmp_path / "00000.tar").write_bytes(shard_bytes(
        [{"__key__": "000000000", "jpg": buffer.getvalue(), "txt": b"x"}]))
    [(_, image, _)] = image_text_pairs([str(tmp_path / "00000.tar")], image_size=10,
                                       handler=SkipBroken())
    assert tuple(image.shape) == (3, 10, 10)
    assert image.float().mean() > 240  # the black sides are cropped away


def test_held_out_split_is_by_key_and_disjoint(tmp_path):
    (tmp_path / "00000.tar").write_bytes(_shard(0, 40))
    url = str(tmp_path / "00000.tar")
    train = [k for k, _, _ in image_text_pairs([url], image_size=8, handler=SkipBroken(),
                                               held_out_fraction=0.25)]
    test = [k for k, _, _ in image_text_pairs([url], image_size=8, handler=SkipBroken(),
                                              held_out_fraction=0.25, split="test",
                                              shuffle=10, seed=3)]
    assert not set(train) & set(test) and len(train) + len(test) == 40
    assert 3 <= len(test) <= 20
    assert all(held_out(k, 0.25) for k in test)


def test_split_by_node_and_resampled(tmp_path, monkeypatch):
    for s in range(4):
        (tmp_path / f"{s:05d}.tar").write_bytes(_shard(s * 10000, 3))
    url = f"{tmp_path}/{{00000..00003}}.tar"
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        seen.append({k[:5] for k, _, _ in image_text_pairs(url, image_size=8,
                                                             handler=SkipBroken())})
    assert seen == [{"00000", "00002"}, {"00001", "00003"}]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    keys, images, captions = take(image_text_pairs(url, image_size=8, handler=SkipBroken(),
                                                   resampled=True, epoch_samples=20, seed=1))
    assert len(keys) == 20 and images.shape == (20, 3, 8, 8)  # with replacement, bounded


@pytest.mark.s3
def test_brace_urls_on_s3(s3_bucket):
    for s in range(2):
        storage.publish_bytes(f"{s3_bucket}/cc/{s:05d}.tar",
                              _shard(s * 10000, 3, {0: "corrupt"} if s else None))
    handler = SkipBroken(limit=3)
    keys, images, captions = take(image_text_pairs(f"{s3_bucket}/cc/{{00000..00001}}.tar",
                                                   image_size=12, handler=handler))
    assert len(keys) == 5 and handler.by_shard == {f"{s3_bucket}/cc/00001.tar": 1}


def test_a_draw_decodes_only_what_it_keeps_and_redraws_past_a_broken_pair(tmp_path, caplog):
    """sample_pairs draws keys without decoding, then decodes the drawn pairs only: a drawn pair
    that does not decode is replaced by a fresh draw without it."""
    from ead_dist.config import ImageTextConfig
    from ead_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo, write_meta
    from ead_dist.data.pairs import sample_pairs

    (tmp_path / "00000.tar").write_bytes(_shard(0, 6, {1: "corrupt"}))
    (tmp_path / "00001.tar").write_bytes(_shard(10000, 6))
    shards = [ShardInfo(str(tmp_path / f"{s:05d}.tar"), 6) for s in range(2)]
    write_meta(str(tmp_path), DatasetMeta(
        name="cc3m", task="image_text", image_shape=[3, 12, 12], mean=[0.5] * 3, std=[0.25] * 3,
        splits={"train": SplitInfo(12, shards)}))
    settings = ImageTextConfig(held_out=0.01, max_broken_samples=5, context_length=16)
    good = [f"{i:09d}" for i in (0, 2, 3, 4, 5)] + [f"{10000 + i:09d}" for i in range(6)]
    decoded_the_corrupt_one = 0
    for seed in range(20):  # 6 of 12 keys: the corrupt one is drawn about half the time
        caplog.clear()
        with caplog.at_level("WARNING", logger="ead_dist.data.pairs"):
            drawn = sample_pairs(str(tmp_path), settings, "train", 6, seed=seed)
        assert len(set(drawn.keys)) == 6 and set(drawn.keys) <= set(good)
        assert drawn.images.shape == (6, 3, 12, 12)
        decoded_the_corrupt_one += "corrupt image" in caplog.text
    assert 0 < decoded_the_corrupt_one < 20  # decoded when drawn, never read past otherwise
    with pytest.raises(TooFewSamplesError):  # 11 decode: 12 is more than there are
        sample_pairs(str(tmp_path), settings, "train", 12, seed=0)

"""Shards written by ead_dist.data.shards read back exactly, locally and over S3, and damaged
shards fail with errors that name the shard and the sample."""

import io

import numpy as np
import pytest
import webdataset as wds

from ead_dist import storage
from ead_dist.data.meta import MetaError, parse_meta, read_meta
from ead_dist.data.pipeline import ShardError, classification_samples, load_classification_tensors
from ead_dist.data.shards import encode_png, write_classification_shard


def _images(n, shape=(28, 28, 1), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


def _write_two_shards(base):
    urls = []
    images, labels = _images(30)
    for i, (start, stop) in enumerate(((0, 17), (17, 30))):
        url = storage.join(base, f"shard-{i:06d}.tar")
        write_classification_shard(url, images[start:stop], labels[start:stop], start)
        urls.append(url)
    return urls, images, labels


def test_local_round_trip_is_exact(tmp_path):
    urls, images, labels = _write_two_shards(str(tmp_path))
    x, y, keys = load_classification_tensors(urls, [1, 28, 28], 10)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images)
    assert np.array_equal(y.numpy(), labels)
    assert keys == [f"{i:09d}" for i in range(30)]


@pytest.mark.s3
def test_s3_round_trip_uses_the_same_code(s3_bucket):
    urls, images, labels = _write_two_shards(storage.join(s3_bucket, "data", "train"))
    assert all(u.startswith("s3://") for u in urls)
    x, y, _ = load_classification_tensors(urls, [1, 28, 28], 10)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images)
    assert np.array_equal(y.numpy(), labels)


def test_rgb_round_trip(tmp_path):
    images, labels = _images(5, (32, 32, 3))
    url = str(tmp_path / "shard-000000.tar")
    write_classification_shard(url, images, labels, 0)
    x, y, _ = load_classification_tensors([url], [3, 32, 32], 10)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images)


def test_shuffle_is_a_permutation_and_seeded(tmp_path):
    urls, _, _ = _write_two_shards(str(tmp_path))
    keys = lambda seed: [k for k, _, _ in classification_samples(urls, shuffle_buffer=8, seed=seed,
                                                                 split_nodes=False)]
    assert sorted(keys(1)) == [f"{i:09d}" for i in range(30)]
    assert keys(1) == keys(1) and keys(1) != keys(2)


def test_split_by_node_partitions_shards(tmp_path, monkeypatch):
    urls, _, _ = _write_two_shards(str(tmp_path))
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({k for k, _, _ in classification_samples(urls)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 30


def test_truncated_tar_names_the_shard(tmp_path):
    urls, _, _ = _write_two_shards(str(tmp_path))
    data = storage.read_bytes(urls[1])
    storage.publish_bytes(urls[1], data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="shard-000001.tar"):
        load_classification_tensors(urls, [1, 28, 28], 10)


def _raw_shard(path, samples):
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for sample in samples:
            writer.write(sample)
    storage.publish_bytes(path, buffer.getvalue())


def test_wrong_image_shape_names_shard_and_key(tmp_path):
    url = str(tmp_path / "shard-000000.tar")
    good, _ = _images(1)
    bad, _ = _images(1, (27, 28, 1))
    _raw_shard(url, [{"__key__": "a", "png": encode_png(good[0]), "cls": b"1"},
                     {"__key__": "b", "png": encode_png(bad[0]), "cls": b"1"}])
    with pytest.raises(ShardError, match=r"shard-000000.tar sample b: image has shape"):
        load_classification_tensors([url], [1, 28, 28], 10)


def test_label_out_of_range_names_the_field(tmp_path):
    url = str(tmp_path / "shard-000000.tar")
    good, _ = _images(1)
    _raw_shard(url, [{"__key__": "k7", "png": encode_png(good[0]), "cls": b"10"}])
    with pytest.raises(ShardError, match=r"sample k7: field cls=10 is outside 0..9"):
        load_classification_tensors([url], [1, 28, 28], 10)


def test_missing_field_and_undecodable_image(tmp_path):
    url = str(tmp_path / "shard-000000.tar")
    _raw_shard(url, [{"__key__": "k1", "png": b"not a png", "cls": b"1"}])
    with pytest.raises(ShardError, match="sample k1: image does not decode"):
        load_classification_tensors([url], [1, 28, 28], 10)
    _raw_shard(url, [{"__key__": "k2", "jpg": b"x"}])
    with pytest.raises(ShardError, match=r"sample k2: expected fields png and cls"):
        load_classification_tensors([url], [1, 28, 28], 10)


def test_missing_meta_names_the_file(tmp_path):
    with pytest.raises(MetaError, match=r"meta.json does not exist"):
        read_meta(str(tmp_path / "nodata"))


def test_malformed_meta_names_the_field():
    raw = {"name": "x", "task": "classification", "image_shape": [1, 28, 28], "mean": [0.5],
           "std": [0.2], "classes": ["a"], "splits": {"train": {"size": 3, "shards": [
               {"name": "shard-000000.tar", "count": 2}]}}}
    with pytest.raises(MetaError, match=r"m.json: field splits.train.size=3 differs"):
        parse_meta(raw, "m.json")
    del raw["std"]
    with pytest.raises(MetaError, match=r"m.json: missing field 'std'"):
        parse_meta(raw, "m.json")


def _drop_last_members(url, count):
    """Rewrite the tar at ``url`` without its last ``count`` members (a cut-off copy)."""
    import tarfile

    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(url, "w") as tar:
        for member, data in members[:-count]:
            tar.addfile(member, io.BytesIO(data))


def test_a_shard_cut_at_a_record_boundary_fails_naming_it_and_both_counts(tmp_path):
    urls, _, _ = _write_two_shards(str(tmp_path))
    _drop_last_members(urls[1], 2 * 3)  # its last three samples, png and cls each
    assert len(load_classification_tensors(urls, [1, 28, 28], 10)[2]) == 27  # unchecked: silent
    with pytest.raises(ShardError, match=f"shard {urls[1]} holds 10 samples, meta.json says "
                                         "13: it is truncated"):
        load_classification_tensors(urls, [1, 28, 28], 10, counts=[17, 13])


def test_a_shard_cut_mid_record_says_it_is_truncated(tmp_path):
    urls, _, _ = _write_two_shards(str(tmp_path))
    _drop_last_members(urls[0], 1)
    with pytest.raises(ShardError, match=f"shard {urls[0]} sample 000000016: the shard is "
                                         "truncated: its last sample has only"):
        load_classification_tensors(urls, [1, 28, 28], 10, counts=[17, 13])


def test_every_stage_reads_shards_checked_against_meta(small_fashion_mnist, tmp_path):
    import shutil

    from ead_dist.data.arrays import class_balanced_sample, load_split

    data = str(tmp_path / "data")
    shutil.copytree(small_fashion_mnist, data)
    shard = storage.join(data, "train", "shard-000001.tar")
    _drop_last_members(shard, 2 * 50)
    for read in (lambda: load_split(data, "train"),
                 lambda: class_balanced_sample(data, "train", 2, seed=0)):
        with pytest.raises(ShardError, match="holds 150 samples, meta.json says 200"):
            read()

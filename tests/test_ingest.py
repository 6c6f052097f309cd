"""Ingest every format end to end: raw files in the real on-disk layout -> shards -> read back
exactly; resume after an interruption; CC3M img2dataset shards validated in place."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import raw_writers
from ead_dist import storage
from ead_dist.cli import main as cli_main
from ead_dist.data.formats import FormatError
from ead_dist.data.image_text import ingest_image_text
from ead_dist.data.ingest import ingest_classification
from ead_dist.data.meta import read_meta, shard_urls
from ead_dist.data.pipeline import ShardError, image_text_samples, load_classification_tensors

WRITERS = {
    "mnist": lambda root: raw_writers.write_idx(root, dataset="mnist", gz=True),
    "fashion_mnist": lambda root: raw_writers.write_idx(root, dataset="fashion_mnist", gz=False,
                                                        layout="torchvision"),
    "svhn": raw_writers.write_svhn,
    "cifar10": raw_writers.write_cifar10,
    "cifar100": raw_writers.write_cifar100,
    "tiny_imagenet": raw_writers.write_tiny_imagenet,
}


def _read_back(data_url, split):
    meta = read_meta(data_url)
    images, labels, _ = load_classification_tensors(shard_urls(data_url, meta, split),
                                                    meta.image_shape, meta.num_classes)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy(), meta


@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_ingest_round_trip_is_exact(dataset, tmp_path):
    source = str(tmp_path / "raw")
    os.makedirs(source)
    expected = WRITERS[dataset](source)
    data_url = str(tmp_path / "data")
    meta = ingest_classification(dataset, source, data_url, shard_size=7, use_ray=False)
    for split in ("train", "test"):
        images, labels, _ = _read_back(data_url, split)
        assert np.array_equal(images, expected[split].images), split
        assert np.array_equal(labels, expected[split].labels), split
        assert meta.splits[split].size == len(expected[split].labels)
    assert meta.classes == expected["train"].classes
    pixels = expected["train"].images.astype(np.float64) / 255
    assert np.allclose(meta.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(meta.std, pixels.std(axis=(0, 1, 2)), atol=1e-9)
    assert meta.image_shape == [expected["train"].images.shape[3],
                                *expected["train"].images.shape[1:3]]


@pytest.mark.cluster
def test_ingest_runs_shards_as_ray_tasks(ray_session, tmp_path):
    source = str(tmp_path / "raw")
    expected = raw_writers.write_cifar10(source)
    data_url = str(tmp_path / "data")
    meta = ingest_classification("cifar10", source, data_url, shard_size=5, use_ray=True)
    assert len(meta.splits["train"].shards) == -(-len(expected["train"].labels) // 5)
    images, labels, _ = _read_back(data_url, "train")
    assert np.array_equal(images, expected["train"].images)
    assert np.array_equal(labels, expected["train"].labels)


@pytest.mark.s3
def test_ingest_to_s3_and_read_back(s3_bucket, tmp_path):
    source = str(tmp_path / "raw")
    expected = raw_writers.write_idx(source, dataset="mnist")
    data_url = storage.join(s3_bucket, "data", "mnist")
    ingest_classification("mnist", source, data_url, shard_size=8, use_ray=False)
    images, labels, meta = _read_back(data_url, "test")
    assert all(u.startswith("s3://") for u in shard_urls(data_url, meta, "test"))
    assert np.array_equal(images, expected["test"].images)
    assert np.array_equal(labels, expected["test"].labels)


def test_interrupted_ingest_resumes_and_keeps_finished_shards(tmp_path):
    source = str(tmp_path / "raw")
    expected = raw_writers.write_cifar100(source)
    data_url = str(tmp_path / "data")
    ingest_classification("cifar100", source, data_url, shard_size=4, use_ray=False)
    train_dir = os.path.join(data_url, "train")
    shards = sorted(os.listdir(train_dir))
    # Simulate a crash after two shards: later shards and meta.json never got published, and
    # one shard was cut off mid-write by something that did not write atomically.
    for name in shards[2:]:
        os.unlink(os.path.join(train_dir, name))
    with open(os.path.join(train_dir, shards[1]), "r+b") as f:
        f.truncate(300)
    os.unlink(os.path.join(data_url, "meta.json"))
    kept = os.stat(os.path.join(train_dir, shards[0])).st_mtime_ns
    ingest_classification("cifar100", source, data_url, shard_size=4, use_ray=False)
    assert os.stat(os.path.join(train_dir, shards[0])).st_mtime_ns == kept  # not rewritten
    assert sorted(os.listdir(train_dir)) == shards  # no temporary files left behind
    images, labels, _ = _read_back(data_url, "train")
    assert np.array_equal(images, expected["train"].images)
    assert np.array_equal(labels, expected["train"].labels)


def test_failed_ingest_publishes_nothing_for_the_failed_split(tmp_path):
    source = str(tmp_path / "raw")
    raw_writers.write_svhn(source)
    os.unlink(os.path.join(source, "test_32x32.mat"))
    data_url = str(tmp_path / "data")
    with pytest.raises(FormatError, match="test_32x32.mat"):
        ingest_classification("svhn", source, data_url, shard_size=4, use_ray=False)
    assert not os.path.exists(os.path.join(data_url, "meta.json"))
    assert not os.path.exists(os.path.join(data_url, "test"))
    leftovers = [n for n in os.listdir(os.path.join(data_url, "train")) if n.startswith(".")]
    assert leftovers == []


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(FormatError, match="unknown dataset 'imagenet21k'"):
        ingest_classification("imagenet21k", str(tmp_path), str(tmp_path / "d"), use_ray=False)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    code = cli_main(["ingest", "--dataset", "cifar10", "--source", str(tmp_path / "none"),
                     "--out", str(tmp_path / "d"), "--no-ray"])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_real_fashion_mnist_ingest(fashion_mnist_root, tmp_path):
    data_url = str(tmp_path / "fmnist")
    meta = ingest_classification("fashion_mnist", "", data_url, use_ray=False)
    assert (meta.splits["train"].size, meta.splits["test"].size) == (60000, 10000)
    assert len(meta.classes) == 10 and meta.image_shape == [1, 28, 28]
    assert abs(meta.mean[0] - 0.2860) < 1e-3 and abs(meta.std[0] - 0.3530) < 1e-3
    assert [s.count for s in meta.splits["train"].shards] == [10000] * 6
    _, labels, _ = load_classification_tensors(shard_urls(data_url, meta, "test"), limit=None)
    assert np.bincount(labels.numpy()).tolist() == [1000] * 10


# --- CC3M: img2dataset shards --------------------------------------------------------------


def _photo(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((base + rng.integers(0, 30, base.shape)).clip(0, 255).astype(np.uint8))


def write_img2dataset_shards(directory, shards=3, per_shard=4, broken=None):
    """Shards as img2dataset writes them: 00000.tar with KEY.jpg/.txt/.json, plus sidecars."""
    os.makedirs(directory, exist_ok=True)
    captions = {}
    for shard in range(shards):
        with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                buffer = io.BytesIO()
                _photo(shard * 100 + i).save(buffer, format="JPEG", quality=90)
                caption = f"a photo number {i} of shard {shard}"
                files = {"jpg": buffer.getvalue(), "txt": caption.encode(),
                         "json": json.dumps({"key": key, "caption": caption, "status":
                                             "success", "width": 48, "height": 40}).encode()}
                if broken == key:
                    files["jpg"] = b"\xff\xd8 not really a jpeg"
                for ext, payload in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                captions[key] = caption
        with open(os.path.join(directory, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"successes": per_shard}, f)
    return captions


def test_cc3m_shards_are_validated_and_read_in_place(tmp_path):
    source = str(tmp_path / "cc3m")
    captions = write_img2dataset_shards(source)
    data_url = str(tmp_path / "data")
    meta = ingest_image_text("cc3m", source, data_url, image_size=16, use_ray=False)
    assert meta.task == "image_text" and meta.image_shape == [3, 16, 16]
    assert (meta.splits["train"].size, meta.splits["test"].size) == (8, 4)
    urls = shard_urls(data_url, meta, "train") + shard_urls(data_url, meta, "test")
    assert all(os.path.dirname(u) == source for u in urls)  # not copied
    seen = {k: c for k, _, c in image_text_samples(urls, image_size=16, split_nodes=False)}
    assert seen == captions


@pytest.mark.s3
def test_cc3m_from_object_storage(s3_bucket, tmp_path):
    local = str(tmp_path / "cc3m")
    captions = write_img2dataset_shards(local, shards=2)
    for name in os.listdir(local):
        storage.publish_bytes(storage.join(s3_bucket, "cc3m", name),
                              open(os.path.join(local, name), "rb").read())
    data_url = storage.join(s3_bucket, "data", "cc3m")
    meta = ingest_image_text("cc3m", storage.join(s3_bucket, "cc3m"), data_url, image_size=16,
                             use_ray=False)
    urls = shard_urls(data_url, meta, "train") + shard_urls(data_url, meta, "test")
    seen = {k: c for k, _, c in image_text_samples(urls, image_size=16, split_nodes=False)}
    assert seen == captions


def test_cc3m_bad_image_names_shard_and_key(tmp_path):
    source = str(tmp_path / "cc3m")
    write_img2dataset_shards(source, broken="000010002")
    with pytest.raises(ShardError, match=r"00001.tar sample 000010002: image does not decode"):
        ingest_image_text("cc3m", source, str(tmp_path / "data"), image_size=16, use_ray=False)
    assert not os.path.exists(tmp_path / "data" / "meta.json")

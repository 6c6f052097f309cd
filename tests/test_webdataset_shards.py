"""A user's own WebDataset shards, with their own keys: re-sharded into ours, images fitted and
labels mapped to classes, from local brace URLs and from S3."""

import io
import os

import numpy as np
import pytest
import webdataset as wds

import raw_writers
from ead_dist import storage
from ead_dist.cli import main as cli_main
from ead_dist.data.formats import FormatError
from ead_dist.data.formats.webdataset_shards import read_webdataset_splits
from test_imagefolder import expected_pixels, read_back


def write_user_shards(directory, images, labels, names, shards=2, label_key="label.txt",
                      label_of=None):
    """Shards ``data-N.tar`` as a user's own tool might write them: ``KEY.jpg`` (or png) +
    ``KEY.<label_key>``; returns {key: (encoded image, class name)}."""
    os.makedirs(directory, exist_ok=True)
    written = {}
    per_shard = -(-len(labels) // shards)
    for shard in range(shards):
        with wds.TarWriter(os.path.join(directory, f"data-{shard}.tar")) as writer:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, len(labels))):
                picture, ext = raw_writers.user_picture(images[i], i % 2)
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG" if ext == "jpg" else "PNG", quality=95)
                name = names[int(labels[i])]
                label = label_of(int(labels[i])) if label_of else name
                key = f"photo{i:04d}"
                writer.write({"__key__": key, "jpg": buffer.getvalue(),
                              label_key: str(label).encode()})
                written[key] = (buffer.getvalue(), name)
    return written


def test_names_as_labels_with_a_classes_file_and_test_shards(few_fashion_mnist, tmp_path):
    images, labels, names = few_fashion_mnist
    train = write_user_shards(str(tmp_path / "train"), images[:24], labels[:24], names)
    test = write_user_shards(str(tmp_path / "test"), images[24:], labels[24:], names, shards=1)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(["Sneaker", "Trouser", "T-shirt_top"]) + "\n")
    data_url = str(tmp_path / "data")
    assert cli_main(["ingest", "webdataset", str(tmp_path / "train" / "data-{0..1}.tar"),
                     "--image-key", "jpg", "--label-key", "label.txt", "--classes",
                     str(classes_file), "--test", str(tmp_path / "test" / "data-0.tar"),
                     "--size", "24", "--out", data_url, "--no-ray"]) == 0
    for split, written in (("train", train), ("test", test)):
        got, got_labels, meta = read_back(data_url, split)
        want = [expected_pixels(io.BytesIO(data), 24, 3) for data, _ in written.values()]
        assert np.array_equal(got, np.stack(want)), split
        assert [meta.classes[i] for i in got_labels] == [n for _, n in written.values()]
    assert meta.classes == ["Sneaker", "Trouser", "T-shirt_top"]  # the file's order
    assert meta.name == "train" and meta.image_shape == [3, 24, 24]


def test_integer_labels_keep_their_values_and_split_by_key(few_fashion_mnist, tmp_path):
    images, labels, names = few_fashion_mnist
    written = write_user_shards(str(tmp_path / "own"), images, labels, names, label_key="cls",
                                label_of=lambda label: label + 1)  # labels 1..3: no class 0
    splits = read_webdataset_splits(str(tmp_path / "own" / "data-{0..1}.tar"), "png;jpg", "cls",
                                    28, 1, test_fraction=0.3)
    assert splits["train"].classes == ["0", "1", "2", "3"]
    sizes = {split: len(data.labels) for split, data in splits.items()}
    assert sizes["train"] + sizes["test"] == len(written) and 0 < sizes["test"] < 18
    seen = np.concatenate([splits["train"].labels, splits["test"].labels])
    assert sorted(seen.tolist()) == sorted((labels + 1).tolist())
    again = read_webdataset_splits(str(tmp_path / "own" / "data-{0..1}.tar"), "jpg", "cls", 28, 1,
                                   test_fraction=0.3)
    assert np.array_equal(again["test"].images, splits["test"].images)  # the same split


def test_label_outside_the_classes_names_the_sample(few_fashion_mnist, tmp_path):
    images, labels, names = few_fashion_mnist
    write_user_shards(str(tmp_path / "own"), images[:6], labels[:6], names, shards=1)
    url = str(tmp_path / "own" / "data-0.tar")
    with pytest.raises(FormatError, match=rf"{url} sample photo0000: label 'T-shirt_top' is not"):
        read_webdataset_splits(url, "jpg", "label.txt", 28, 1, classes=["Trouser", "Sneaker"],
                               test_fraction=0.5)
    with pytest.raises(FormatError, match=r"sample photo0000: no label field 'txt'"):
        read_webdataset_splits(url, "jpg", "txt", 28, 1, test_fraction=0.5)


@pytest.mark.s3
def test_own_shards_on_s3(few_fashion_mnist, s3_bucket, tmp_path):
    images, labels, names = few_fashion_mnist
    local = str(tmp_path / "own")
    written = write_user_shards(local, images, labels, names)
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            storage.publish_bytes(storage.join(s3_bucket, "own", name), f.read())
    splits = read_webdataset_splits(storage.join(s3_bucket, "own", "data-{0..1}.tar"), "jpg",
                                    "label.txt", 28, 3, test_fraction=0.3)
    count = sum(len(data.labels) for data in splits.values())
    assert count == len(written) and splits["train"].classes == sorted(names)

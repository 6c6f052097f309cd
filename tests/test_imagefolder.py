"""A user's own image folder: layout and split, pixels fitted as torchvision would, a bad file
stopping ingest with nothing written, and the folder distilled through the whole pipeline."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

import raw_writers
from conftest import tiny_config
from ead_dist import storage
from ead_dist.cli import main as cli_main
from ead_dist.data.formats import FormatError
from ead_dist.data.formats.imagefolder import list_imagefolder
from ead_dist.data.meta import read_meta, shard_urls
from ead_dist.data.pipeline import load_classification_tensors


def expected_pixels(path, size, channels):
    """What torchvision's Resize(size) + CenterCrop(size) make of the file, as uint8 HWC."""
    with Image.open(path) as image:
        converted = image.convert("L" if channels == 1 else "RGB")
        fitted = transforms.CenterCrop(size)(transforms.Resize(size)(converted))
    return np.asarray(fitted).reshape(size, size, channels)


def read_back(data_url, split):
    meta = read_meta(data_url)
    images, labels, _ = load_classification_tensors(shard_urls(data_url, meta, split),
                                                    meta.image_shape, meta.num_classes)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy(), meta


def held_out(relative, fraction):
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def test_flat_layout_classes_sorted_and_split_by_path_hash(few_fashion_mnist, tmp_path):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "pets")
    written = raw_writers.write_imagefolder(root, images, labels, classes)
    os.makedirs(os.path.join(root, "Trouser", "notes"))
    (tmp_path / "pets" / "Trouser" / "notes" / "readme.txt").write_text("not an image")
    listing = list_imagefolder(root, test_fraction=0.3)
    assert listing.classes == sorted(classes)  # folder names sorted, not the writing order
    by_name = {name: i for i, name in enumerate(sorted(classes))}
    expected = {"train": [], "test": []}
    for path, label in written:
        split = "test" if held_out(os.path.relpath(path, root), 0.3) else "train"
        expected[split].append((path, by_name[classes[label]]))
    assert listing.files == {split: sorted(files) for split, files in expected.items()}
    assert 0 < len(listing.files["test"]) < len(written) // 2
    assert list_imagefolder(root, test_fraction=0.3).files == listing.files  # stable


def test_train_and_test_folders_are_the_split(few_fashion_mnist, tmp_path):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    raw_writers.write_imagefolder(root, images, labels, classes,
                                  split_of=lambda i: "test" if i % 3 == 2 else "train")
    listing = list_imagefolder(root, test_fraction=0.5)  # ignored: there is a test folder
    assert len(listing.files["test"]) == len(range(2, len(labels), 3))
    assert all("/test/" in path for path, _ in listing.files["test"])
    assert all("/train/" in path for path, _ in listing.files["train"])


@pytest.mark.parametrize("size,channels", [(28, 1), (24, 3)])
def test_ingested_pixels_equal_torchvision_resize_and_crop(few_fashion_mnist, tmp_path, size,
                                                           channels):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    written = raw_writers.write_imagefolder(root, images, labels, classes,
                                            split_of=lambda i: "test" if i % 3 == 2 else "train")
    data_url = str(tmp_path / "data")
    assert cli_main(["ingest", "imagefolder", root, "--out", data_url, "--size", str(size),
                     "--channels", str(channels), "--shard-size", "10", "--no-ray"]) == 0
    order = sorted(classes)
    for split in ("train", "test"):
        files = sorted((p, order.index(classes[label])) for p, label in written
                       if f"/{split}/" in p)
        got, got_labels, meta = read_back(data_url, split)
        want = np.stack([expected_pixels(path, size, channels) for path, _ in files])
        assert np.array_equal(got, want), split
        assert got_labels.tolist() == [label for _, label in files]
    assert meta.name == "own" and meta.classes == order
    assert meta.image_shape == [channels, size, size]
    train = read_back(data_url, "train")[0].astype(np.float64) / 255
    assert np.allclose(meta.mean, train.mean(axis=(0, 1, 2)))


def test_corrupt_image_stops_ingest_naming_it_and_writes_nothing(few_fashion_mnist, tmp_path,
                                                                 capsys):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    written = raw_writers.write_imagefolder(root, images[:9], labels[:9], classes)
    bad = written[-1][0]
    with open(bad, "r+b") as f:  # a download cut short: the header survives, the data not
        f.truncate(60)
    data_url = str(tmp_path / "data")
    assert cli_main(["ingest", "imagefolder", root, "--out", data_url, "--size", "28",
                     "--test-fraction", "0.3", "--no-ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ead-dist: error: {bad}: cannot decode image")
    assert not os.path.exists(data_url)


def test_empty_class_folder_is_refused(few_fashion_mnist, tmp_path):
    from ead_dist.data.formats.imagefolder import check_listing

    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    raw_writers.write_imagefolder(root, images, labels, classes)
    os.makedirs(os.path.join(root, "Bag"))
    with pytest.raises(FormatError, match=f"{os.path.join(root, 'Bag')}: class folder holds no"):
        check_listing(list_imagefolder(root))


@pytest.mark.slow
def test_own_folder_distilled_end_to_end(few_fashion_mnist, tmp_path):
    from ead_dist.fingerprint import STAGES
    from ead_dist.run import run_stages

    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "clothes")
    raw_writers.write_imagefolder(root, images, labels, classes)
    data_url, run_url = str(tmp_path / "data"), str(tmp_path / "run")
    assert cli_main(["ingest", "imagefolder", root, "--out", data_url, "--size", "28",
                     "--channels", "1", "--test-fraction", "0.25", "--no-ray"]) == 0
    config = tiny_config(run_url, data_url, {"ray.enabled": False, "data.dataset": "clothes"})
    run_stages(config, STAGES)
    tensors, metadata = storage.load_tensors(storage.join(run_url, "synthetic.safetensors"))
    assert list(tensors["images"].shape) == [2 * 3, 1, 28, 28]
    assert tensors["labels"].shape[1] == 3
    report = storage.read_json(storage.join(run_url, "eval.json"))
    assert 0.0 <= report["results"]["synthetic"]["convnet"]["mean"] <= 1.0


def test_reingest_is_skipped_and_another_shape_refused(few_fashion_mnist, tmp_path, capsys):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    raw_writers.write_imagefolder(root, images[:12], labels[:12], classes)
    data_url = str(tmp_path / "data")
    command = ["ingest", "imagefolder", root, "--out", data_url, "--test-fraction", "0.3",
               "--size", "28", "--no-ray"]
    assert cli_main(command) == 0
    meta_file = os.path.join(data_url, "meta.json")
    before = os.stat(meta_file).st_mtime_ns
    assert cli_main(command) == 0
    assert os.stat(meta_file).st_mtime_ns == before  # done: nothing rewritten
    capsys.readouterr()
    assert cli_main(command[:-2] + ["24", "--no-ray"]) == 2
    assert "of shape [3, 28, 28], not 'own' of shape [3, 24, 24]" in capsys.readouterr().err

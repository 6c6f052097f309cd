import gzip
import os
import pickle

import numpy as np
import pytest
import scipy.io
from PIL import Image

import raw_writers
from ead_dist.data.formats import FormatError, LabelledImages, read_split
from ead_dist.data.formats.idx import DEBIAN_FASHION_MNIST


def assert_same(got: LabelledImages, expected: LabelledImages) -> None:
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64
    assert got.images.shape == expected.images.shape
    np.testing.assert_array_equal(got.images, expected.images)
    np.testing.assert_array_equal(got.labels, expected.labels)
    assert got.classes == expected.classes


# --- round trips through the exact on-disk formats ------------------------------------------

@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout,gz", [("torchvision", True), ("flat", False), ("flat", True)])
def test_idx_round_trip(tmp_path, dataset, layout, gz):
    expected = raw_writers.write_idx(str(tmp_path), layout=layout, gz=gz, dataset=dataset)
    for split in ("train", "test"):
        got = read_split(dataset, str(tmp_path), split)
        assert got.images.shape[1:] == (28, 28, 1)
        assert_same(got, expected[split])
    assert len(got.classes) == 10
    if dataset == "fashion_mnist":
        assert got.classes[0] == "T-shirt/top" and got.classes[9] == "Ankle boot"


def test_cifar10_round_trip(tmp_path):
    expected = raw_writers.write_cifar10(str(tmp_path))
    for split in ("train", "test"):
        assert_same(read_split("cifar10", str(tmp_path), split), expected[split])
    assert len(expected["train"].labels) == 15  # five batches of three
    assert expected["train"].classes[0] == "airplane"


def test_cifar_files_are_python2_pickles(tmp_path):
    # Like the real files: bytes keys, no _codecs.encode, numpy 1.x's _reconstruct path.
    raw_writers.write_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    raw = path.read_bytes()
    assert raw.startswith(b"\x80\x02")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (3, 3072)


def test_cifar_channel_planes(tmp_path):
    # One row of 'data' is the R plane then G then B: pixel (0, 1) of image 0 is data[0, 1],
    # data[0, 1025], data[0, 2049].
    expected = raw_writers.write_cifar10(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        data = pickle.load(f, encoding="bytes")[b"data"]
    got = read_split("cifar10", str(tmp_path), "test")
    assert list(got.images[0, 0, 1]) == [data[0, 1], data[0, 1025], data[0, 2049]]
    assert_same(got, expected["test"])


def test_cifar100_round_trip(tmp_path):
    expected = raw_writers.write_cifar100(str(tmp_path))
    for split in ("train", "test"):
        got = read_split("cifar100", str(tmp_path), split)
        assert_same(got, expected[split])
    assert len(got.classes) == 100 and got.classes[99] == "worm"
    assert set(got.labels.tolist()) == {0, 57, 99}


def test_svhn_round_trip(tmp_path):
    expected = raw_writers.write_svhn(str(tmp_path))
    raw_y = scipy.io.loadmat(tmp_path / "train_32x32.mat")["y"]
    assert 10 in raw_y and 0 not in raw_y
    for split in ("train", "test"):
        got = read_split("svhn", str(tmp_path), split)
        assert_same(got, expected[split])
        assert 0 in got.labels  # 10 became the digit 0


def test_tiny_imagenet_round_trip(tmp_path):
    expected = raw_writers.write_tiny_imagenet(str(tmp_path))
    base = tmp_path / "tiny-imagenet-200"
    # Both the folder itself and its parent are accepted as root.
    for root in (str(tmp_path), str(base)):
        for split in ("train", "test"):
            assert_same(read_split("tiny_imagenet", root, split), expected[split])
    # Classes in sorted-wnid order, named from words.txt; the one wnid it lacks keeps its wnid.
    wnids = sorted((base / "wnids.txt").read_text().split())
    words = dict(line.split("\t") for line in (base / "words.txt").read_text().splitlines())
    assert expected["train"].classes == [words.get(w, w) for w in wnids]
    assert sum(c in wnids for c in expected["train"].classes) == 1


# --- the real Fashion-MNIST installed by Debian ---------------------------------------------

@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="fashion-mnist not installed")
def test_real_fashion_mnist():
    train = read_split("fashion_mnist", "", "train")
    test = read_split("fashion_mnist", None, "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert len(train.classes) == 10
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # Mean and std from a histogram: exact and light on memory.
    counts = np.bincount(train.images.ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert mean == pytest.approx(0.2860, abs=1e-3)
    assert std == pytest.approx(0.3530, abs=1e-3)


# --- malformed input: every error names the file (and the field) ----------------------------

def _raises(match_all, fn, *args):
    with pytest.raises(FormatError) as info:
        fn(*args)
    for text in match_all:
        assert text in str(info.value), str(info.value)
    return str(info.value)


def test_idx_truncated(tmp_path):
    raw_writers.write_idx(str(tmp_path), layout="flat", gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    _raises([str(path), "bytes"], read_split, "mnist", str(tmp_path), "train")


def test_idx_truncated_gzip_stream(tmp_path):
    raw_writers.write_idx(str(tmp_path), layout="flat", gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    _raises([str(path)], read_split, "mnist", str(tmp_path), "test")


def test_idx_wrong_magic(tmp_path):
    raw_writers.write_idx(str(tmp_path), layout="flat", gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    labels = np.zeros(30, np.uint8)
    with gzip.open(path, "wb") as f:  # an images magic on a labels file
        f.write(raw_writers.idx_bytes(0x803, labels))
    _raises([str(path), "magic"], read_split, "mnist", str(tmp_path), "train")


def test_idx_label_out_of_range(tmp_path):
    raw_writers.write_idx(str(tmp_path), layout="flat", gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(raw_writers.idx_bytes(0x801, np.full(20, 10, np.uint8)))
    _raises([str(path), "label 10"], read_split, "mnist", str(tmp_path), "test")


def test_idx_missing(tmp_path):
    _raises(["train-images-idx3-ubyte", str(tmp_path)], read_split, "mnist", str(tmp_path),
            "train")
    raw_writers.write_idx(str(tmp_path), layout="torchvision", dataset="fashion_mnist")
    os.remove(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    _raises(["t10k-labels-idx1-ubyte"], read_split, "fashion_mnist", str(tmp_path), "test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path, capfd):
    raw_writers.write_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    message = _raises([str(path), "posix.system"], read_split, "cifar10", str(tmp_path), "test")
    assert "refusing" in message
    assert "should never run" not in capfd.readouterr().out


def test_cifar_missing_file_and_key(tmp_path):
    raw_writers.write_cifar100(str(tmp_path))
    folder = tmp_path / "cifar-100-python"
    os.remove(folder / "test")
    _raises([str(folder / "test")], read_split, "cifar100", str(tmp_path), "test")
    train = folder / "train"
    with open(train, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    del batch[b"fine_labels"]
    train.write_bytes(raw_writers.python2_pickle(batch))
    _raises([str(train), "fine_labels"], read_split, "cifar100", str(tmp_path), "train")


def test_cifar_wrong_data_shape(tmp_path):
    raw_writers.write_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(raw_writers.python2_pickle(
        {b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}))
    _raises([str(path), "'data'"], read_split, "cifar10", str(tmp_path), "train")


def test_svhn_wrong_x_shape(tmp_path):
    raw_writers.write_svhn(str(tmp_path))
    path = tmp_path / "test_32x32.mat"
    # N first, as someone who transposed the array would write it.
    scipy.io.savemat(path, {"X": np.zeros((10, 32, 32, 3), np.uint8),
                            "y": np.ones((10, 1), np.uint8)}, format="5")
    _raises([str(path), "'X'"], read_split, "svhn", str(tmp_path), "test")


def test_svhn_bad_label(tmp_path):
    raw_writers.write_svhn(str(tmp_path))
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8),
                            "y": np.array([[1], [11]], np.uint8)}, format="5")
    _raises([str(path), "'y'"], read_split, "svhn", str(tmp_path), "test")


def test_svhn_missing(tmp_path):
    _raises([str(tmp_path / "train_32x32.mat")], read_split, "svhn", str(tmp_path), "train")


def test_tiny_imagenet_unknown_wnid(tmp_path):
    raw_writers.write_tiny_imagenet(str(tmp_path))
    path = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    with open(path, "a") as f:
        f.write("val_99.JPEG\tn99999999\t0\t0\t10\t10\n")
    _raises([str(path), "n99999999"], read_split, "tiny_imagenet", str(tmp_path), "test")


def test_tiny_imagenet_wrong_image_size(tmp_path):
    raw_writers.write_tiny_imagenet(str(tmp_path))
    folder = tmp_path / "tiny-imagenet-200" / "train"
    path = sorted(folder.glob("*/images/*.JPEG"))[0]
    Image.new("RGB", (32, 64)).save(path, "JPEG")
    _raises([str(path), "32x64"], read_split, "tiny_imagenet", str(tmp_path), "train")


def test_tiny_imagenet_greyscale_jpeg_becomes_rgb(tmp_path):
    raw_writers.write_tiny_imagenet(str(tmp_path))
    path = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG"
    Image.new("L", (64, 64), 77).save(path, "JPEG")
    got = read_split("tiny_imagenet", str(tmp_path), "test")
    assert (got.images[0] == 77).all()


def test_tiny_imagenet_missing(tmp_path):
    _raises([str(tmp_path / "wnids.txt")], read_split, "tiny_imagenet", str(tmp_path), "train")
    raw_writers.write_tiny_imagenet(str(tmp_path))
    path = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    os.remove(path)
    _raises([str(path)], read_split, "tiny_imagenet", str(tmp_path), "test")


def test_unknown_dataset_and_split(tmp_path):
    _raises(["'imagenet'", "cifar10"], read_split, "imagenet", str(tmp_path), "train")
    _raises(["'val'"], read_split, "mnist", str(tmp_path), "val")


def test_fashion_mnist_without_source_finds_the_torchvision_download(tmp_path, monkeypatch):
    """source "" (pipelines/demo.yaml) on a machine without Debian's package: the Makefile's
    fallback (its own command, run as it is) downloads with torchvision into
    data/raw/FashionMNIST/raw/ of the working dir. torchvision downloads over HTTP from a
    server on loopback that holds the four files, its mirror and checksums pointed there (no
    internet here)."""
    import functools
    import hashlib
    import http.server
    import re
    import subprocess
    import sys
    import threading

    from ead_dist.data.formats import idx

    served = tmp_path / "served"
    expected = raw_writers.write_idx(str(served), layout="flat", dataset="fashion_mnist")
    sums = [(name, hashlib.md5((served / name).read_bytes()).hexdigest())
            for name in sorted(os.listdir(served))]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    makefile = open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()
    [command] = re.findall(r'\$\(VENV\)/bin/python -c "([^"]*FashionMNIST[^"]*)"', makefile)
    redirect = (f"import torchvision.datasets as d; "
                f"d.FashionMNIST.mirrors = ['http://127.0.0.1:{server.server_port}/']; "
                f"d.FashionMNIST.resources = {sums!r}; ")
    work = tmp_path / "clone"
    work.mkdir()
    try:
        subprocess.run([sys.executable, "-c", redirect + command], cwd=work, check=True,
                       capture_output=True, timeout=120,  # loopback never through a proxy
                       env=dict(os.environ, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1"))
    finally:
        server.shutdown()
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))
    monkeypatch.chdir(work)
    for split in ("train", "test"):
        assert_same(read_split("fashion_mnist", "", split), expected[split])


def test_fashion_mnist_without_source_names_both_places_when_missing(tmp_path, monkeypatch):
    from ead_dist.data.formats import idx

    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))
    monkeypatch.chdir(tmp_path)
    _raises(["no-debian-package", str(tmp_path / "data" / "raw" / "FashionMNIST" / "raw")],
            read_split, "fashion_mnist", "", "train")

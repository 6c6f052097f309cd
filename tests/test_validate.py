"""validate lists every problem of an image folder, of WebDataset shards and of an ingested DATA,
each on its own line naming its file, and does not stop at the first."""

import io
import os

import numpy as np
import webdataset as wds
from PIL import Image

import raw_writers
from ead_dist.cli import main as cli_main
from ead_dist.data.validate import check_data, check_imagefolder, check_webdataset


def damaged_folder(tmp_path, few_fashion_mnist):
    """A good folder plus four problems; returns the root and the paths each problem names."""
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    written = raw_writers.write_imagefolder(root, images[:12], labels[:12], classes)
    corrupt = written[3][0]
    with open(corrupt, "r+b") as f:
        f.truncate(60)
    deep = os.path.join(root, classes[0], "deep.png")  # 16-bit greyscale: mode I;16
    Image.fromarray(images[0].astype(np.uint16) * 257).save(deep)
    small = os.path.join(root, classes[1], "thumb.png")
    Image.fromarray(images[1]).resize((10, 10)).save(small)
    empty = os.path.join(root, "Bag")
    os.makedirs(empty)
    return root, {"corrupt": corrupt, "mode": deep, "small": small, "empty": empty}


def test_folder_problems_are_all_listed_each_naming_its_file(few_fashion_mnist, tmp_path):
    root, bad = damaged_folder(tmp_path, few_fashion_mnist)
    report = check_imagefolder(root, size=24, channels=3)
    assert report.checked == 14
    assert len(report.problems) == 4, report.problems
    by_file = {line.split(": ", 1)[0]: line for line in report.problems}
    assert set(by_file) == set(bad.values())
    assert "cannot decode image" in by_file[bad["corrupt"]]
    assert "unsupported image mode I" in by_file[bad["mode"]]
    assert "10x10, smaller than 24" in by_file[bad["small"]]
    assert "holds no image file" in by_file[bad["empty"]]
    assert len(check_imagefolder(root, size=8, channels=1).problems) == 3  # 10x10 fits 8


def test_cli_validate_exit_codes(few_fashion_mnist, tmp_path, capsys):
    root, bad = damaged_folder(tmp_path, few_fashion_mnist)
    assert cli_main(["validate", root, "--size", "24"]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 4 and {line.split(": ", 1)[0] for line in lines} == set(bad.values())
    assert captured.err.strip() == f"ead-dist: error: 4 problems in {root} (14 images checked)"
    images, labels, classes = few_fashion_mnist
    clean = str(tmp_path / "clean")
    raw_writers.write_imagefolder(clean, images[:6], labels[:6], classes)
    assert cli_main(["validate", clean, "--size", "24"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [f"{clean}: 6 images, no problems"]


def test_shard_problems_are_all_listed(few_fashion_mnist, tmp_path):
    images, _, _ = few_fashion_mnist
    url = str(tmp_path / "own-0.tar")
    good = io.BytesIO()
    Image.fromarray(images[0]).save(good, format="PNG")
    with wds.TarWriter(url) as writer:
        writer.write({"__key__": "a", "png": good.getvalue(), "txt": b"Trouser"})
        writer.write({"__key__": "b", "png": good.getvalue()[:50], "txt": b"Trouser"})
        writer.write({"__key__": "c", "png": good.getvalue()})
        writer.write({"__key__": "d", "png": good.getvalue(), "txt": b"Bag"})
    report = check_webdataset(url, "png", "txt", 28, 1, classes=["Trouser", "Sneaker"])
    assert report.checked == 4
    assert [line.split(": ", 1)[0] for line in report.problems] == [
        f"shard {url} sample b", f"shard {url} sample c", f"shard {url} sample d"]
    assert "cannot decode image" in report.problems[0]
    assert "no label field 'txt'" in report.problems[1]
    assert "unknown label 'Bag'" in report.problems[2]


def test_ingested_data_with_a_damaged_shard(few_fashion_mnist, tmp_path, capsys):
    images, labels, classes = few_fashion_mnist
    root = str(tmp_path / "own")
    raw_writers.write_imagefolder(root, images, labels, classes)
    data_url = str(tmp_path / "data")
    assert cli_main(["ingest", "imagefolder", root, "--out", data_url, "--size", "28",
                     "--shard-size", "8", "--test-fraction", "0.3", "--no-ray"]) == 0
    assert check_data(data_url).problems == []
    shard = os.path.join(data_url, "train", "shard-000001.tar")
    with open(shard, "r+b") as f:
        f.truncate(3000)
    report = check_data(data_url)
    assert report.problems and all(line.startswith(shard) for line in report.problems)
    capsys.readouterr()
    assert cli_main(["validate", data_url]) == 2
    assert shard in capsys.readouterr().out

"""``ead-dist export``: every format read back gives the images (normalisation undone) within
1/255 and the soft labels exactly; class names come from DATA/meta.json; an export is whole or
absent."""

import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ead_dist.cli import main
from ead_dist.data.arrays import unnormalise
from ead_dist.data.meta import DatasetMeta, write_meta
from ead_dist.export import WRITERS, ExportError, export_run, folder_names
from ead_dist.synthetic import SyntheticSet, save_synthetic

NAMES = ["T-shirt/top", "Trouser", "Bag"]
CLASSES = torch.tensor([0, 0, 1, 1, 2, 2])


def _synthetic(channels: int) -> tuple[SyntheticSet, dict]:
    generator = torch.Generator().manual_seed(channels)
    mean, std = [0.3, 0.4, 0.5][:channels], [0.2, 0.25, 0.3][:channels]
    # Normalised images as the coordinator leaves them, some beyond the [0, 1] pixel range.
    images = torch.randn(6, channels, 4, 5, generator=generator) * 2
    logits = torch.randn(6, 3, generator=generator)
    metadata = {"dataset": "toy", "method": "ead-matching", "ipc": 2, "num_classes": 3,
                "mean": mean, "std": std, "config": ""}
    return SyntheticSet(images, logits, CLASSES), metadata


@pytest.fixture(params=[1, 3], ids=["gray", "rgb"])
def run(request, tmp_path):
    """A RUN with a synthetic set whose recorded config points at a DATA dir with class names;
    yields (run url, expected pixels in [0, 1], soft labels)."""
    data = tmp_path / "data"
    synthetic, metadata = _synthetic(request.param)
    write_meta(str(data), DatasetMeta(name="toy", task="classification",
                                      image_shape=[request.param, 4, 5], mean=metadata["mean"],
                                      std=metadata["std"], splits={}, classes=NAMES))
    metadata["config"] = json.dumps({"data": {"url": str(data)}})
    save_synthetic(str(tmp_path / "run" / "synthetic.safetensors"), synthetic, metadata)
    pixels = unnormalise(synthetic.images, metadata["mean"], metadata["std"])
    return str(tmp_path / "run"), pixels, synthetic.labels


def _read_png(data: bytes) -> torch.Tensor:
    array = np.asarray(Image.open(io.BytesIO(data)))
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def test_imagefolder_round_trip(run, tmp_path):
    run_url, pixels, labels = run
    out = export_run(run_url, "imagefolder", str(tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert index["class_names"] == NAMES
    assert index["folders"] == ["T-shirt_top", "Trouser", "Bag"]
    assert len(index["soft_labels"]) == 6
    for relative, soft_label in index["soft_labels"].items():
        folder, file_name = relative.split("/")
        i = int(file_name.removesuffix(".png"))
        assert folder == index["folders"][int(CLASSES[i])]
        with open(os.path.join(out, relative), "rb") as f:
            image = _read_png(f.read())
        assert image.shape == pixels[i].shape
        assert (image - pixels[i]).abs().max() <= 1 / 255
        assert torch.equal(torch.tensor(soft_label, dtype=torch.float32), labels[i])


def test_imagefolder_reads_back_with_torchvision(run, tmp_path):
    from torchvision.datasets import ImageFolder

    run_url, pixels, _ = run
    export_run(run_url, "imagefolder", str(tmp_path / "out"))
    folders = json.loads((tmp_path / "out" / "labels.json").read_text())["folders"]
    dataset = ImageFolder(str(tmp_path / "out"))
    assert sorted(dataset.classes) == sorted(folders)
    assert len(dataset) == 6
    for k, (path, target) in enumerate(dataset.samples):
        i = int(os.path.basename(path).removesuffix(".png"))
        assert folders.index(dataset.classes[target]) == int(CLASSES[i])
        image = torch.from_numpy(np.asarray(dataset[k][0]).copy()).permute(2, 0, 1) / 255
        assert (image - pixels[i]).abs().max() <= 1 / 255  # grayscale broadcasts to RGB


def test_webdataset_round_trip(run, tmp_path):
    run_url, pixels, labels = run
    export_run(run_url, "webdataset", str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["shard-000000.tar"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"),
                                  shardshuffle=False))
    assert len(samples) == 6
    for sample in samples:
        i = int(sample["__key__"])
        image = _read_png(sample["png"])
        assert (image - pixels[i]).abs().max() <= 1 / 255
        assert int(sample["cls"]) == int(CLASSES[i])
        soft = json.loads(sample["json"])
        assert torch.equal(torch.tensor(soft["soft_label"], dtype=torch.float32), labels[i])
        assert soft["class_name"] == NAMES[int(CLASSES[i])]


def test_npz_round_trip(run, tmp_path):
    run_url, pixels, labels = run
    export_run(run_url, "npz", str(tmp_path / "out"))
    with np.load(tmp_path / "out" / "synthetic.npz", allow_pickle=False) as arrays:
        assert torch.equal(torch.from_numpy(arrays["images"]), pixels)
        assert arrays["images"].min() >= 0 and arrays["images"].max() <= 1
        assert torch.equal(torch.from_numpy(arrays["labels"]), labels)
        assert arrays["classes"].tolist() == CLASSES.tolist()
        assert arrays["class_names"].tolist() == NAMES


def test_class_names_fall_back_without_a_reachable_meta(tmp_path):
    synthetic, metadata = _synthetic(1)
    metadata["config"] = json.dumps({"data": {"url": str(tmp_path / "nowhere")}})
    save_synthetic(str(tmp_path / "run" / "synthetic.safetensors"), synthetic, metadata)
    export_run(str(tmp_path / "run"), "npz", str(tmp_path / "out"))
    with np.load(tmp_path / "out" / "synthetic.npz") as arrays:
        assert arrays["class_names"].tolist() == ["class_0", "class_1", "class_2"]


def test_data_option_names_the_classes(tmp_path):
    synthetic, metadata = _synthetic(1)
    save_synthetic(str(tmp_path / "run" / "synthetic.safetensors"), synthetic, metadata)
    write_meta(str(tmp_path / "data"), DatasetMeta(
        name="toy", task="classification", image_shape=[1, 4, 5], mean=[0.3], std=[0.2],
        splits={}, classes=["a", "b", "c"]))
    export_run(str(tmp_path / "run"), "npz", str(tmp_path / "out"), str(tmp_path / "data"))
    with np.load(tmp_path / "out" / "synthetic.npz") as arrays:
        assert arrays["class_names"].tolist() == ["a", "b", "c"]


def test_folder_names_are_safe_and_unique():
    assert folder_names(["a/b", "a_b", "..", ""]) == ["a_b", "a_b_1", ".._2", "class_3"]


def test_an_existing_non_empty_out_is_refused_and_left_alone(run, tmp_path, capsys):
    run_url, _, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(run_url, "npz", str(out))
    assert main(["export", run_url, "--format", "imagefolder", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_an_existing_empty_out_is_filled(run, tmp_path):
    run_url, _, _ = run
    (tmp_path / "out").mkdir()
    export_run(run_url, "npz", str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["synthetic.npz"]


def test_a_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    run_url, _, _ = run

    def fail_halfway(directory, *args):
        (open(os.path.join(directory, "half.png"), "wb")).close()
        raise OSError("disk full")

    monkeypatch.setitem(WRITERS, "npz", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        export_run(run_url, "npz", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["data", "run"]  # no partial folder left behind


def test_missing_synthetic_set_names_the_path(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "npz", "--out",
                 str(tmp_path / "out")]) == 2
    assert str(tmp_path / "synthetic.safetensors") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_meta_of_another_dataset_gives_no_names(tmp_path):
    synthetic, metadata = _synthetic(1)
    save_synthetic(str(tmp_path / "run" / "synthetic.safetensors"), synthetic, metadata)
    write_meta(str(tmp_path / "data"), DatasetMeta(
        name="other", task="classification", image_shape=[1, 4, 5], mean=[0.3], std=[0.2],
        splits={}, classes=["a", "b", "c"]))
    export_run(str(tmp_path / "run"), "npz", str(tmp_path / "out"), str(tmp_path / "data"))
    with np.load(tmp_path / "out" / "synthetic.npz") as arrays:
        assert arrays["class_names"].tolist() == ["class_0", "class_1", "class_2"]

"""Pictures of a run: the grid of the synthetic set (a row per class, pixels with the
normalisation undone, titles from the soft labels), the loss curve, the accuracy bars, and
``ead-dist show`` writing them as PNG files."""

import json

import pytest
import torch
from PIL import Image

from ead_dist import storage
from ead_dist.cli import main
from ead_dist.data.arrays import normalise, unnormalise
from ead_dist.pictures import (
    accuracy_bars,
    cell_origin,
    class_rows,
    loss_curve,
    mosaic,
    synthetic_grid,
)
from ead_dist.show import show_run
from ead_dist.synthetic import SyntheticSet, save_synthetic

MEAN, STD = [0.3], [0.4]
NAMES = ["shirt", "shoe", "bag"]
# Set order is deliberately not class-major: rows must follow the classes, not the order.
CLASSES = torch.tensor([2, 0, 1, 0, 2, 1])


def _pixels(channels: int = 1) -> torch.Tensor:
    """uint8 pixels [6, C, 4, 5] (H != W, so a transpose would show), every image distinct."""
    values = torch.arange(6 * channels * 4 * 5) * 7 % 256
    return values.to(torch.uint8).view(6, channels, 4, 5)


def _label_logits() -> torch.Tensor:
    logits = torch.zeros(6, 3)
    logits[torch.arange(6), torch.tensor([1, 0, 1, 2, 2, 0])] = 2.0  # top labels
    return logits


def _metadata(mean=MEAN, std=STD) -> dict:
    return {"dataset": "toy", "method": "ead-matching", "ipc": 2, "num_classes": 3,
            "mean": mean, "std": std, "config": json.dumps({"data": {"url": ""}})}


def test_unnormalise_inverts_normalise_and_clips():
    pixels = _pixels()
    restored = unnormalise(normalise(pixels, MEAN, STD), MEAN, STD)
    assert torch.allclose(restored * 255, pixels.float(), atol=1e-3)
    beyond = torch.tensor([-5.0, 5.0]).view(1, 1, 1, 2)  # a learned image may leave [0, 1]
    assert unnormalise(beyond, MEAN, STD).flatten().tolist() == [0.0, 1.0]


def test_class_rows_follow_the_initial_class_and_cap_per_class():
    assert class_rows(CLASSES, 3, per_class=2) == [[1, 3], [2, 5], [0, 4]]
    assert class_rows(CLASSES, 4, per_class=1) == [[1], [2], [0], []]


def test_grid_has_one_row_per_class():
    pixels = _pixels().float() / 255
    labels = torch.softmax(_label_logits(), 1)
    figure = synthetic_grid(pixels, labels, CLASSES, NAMES, per_class=2)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == NAMES
    grid = axes.images[0].get_array()
    row_height = cell_origin(1, 0, (4, 5))[0] - cell_origin(0, 0, (4, 5))[0]
    assert grid.shape[0] == len(NAMES) * row_height
    assert grid.shape[1] == cell_origin(0, 2, (4, 5))[1] - cell_origin(0, 0, (4, 5))[1]


def test_grid_shows_the_unnormalised_pixels_of_a_known_image():
    original = _pixels()
    images = normalise(original, MEAN, STD)  # as synthetic.safetensors holds them
    figure = synthetic_grid(unnormalise(images, MEAN, STD), torch.softmax(_label_logits(), 1),
                            CLASSES, NAMES, per_class=2)
    grid = figure.axes[0].images[0].get_array()
    # Image 5 is the second image of class 1: row 1, column 1.
    y, x = cell_origin(1, 1, (4, 5))
    expected = original[5, 0].float() / 255
    assert torch.allclose(torch.as_tensor(grid[y:y + 4, x:x + 5]), expected, atol=1e-6)
    # And the cell of image 1 (class 0, column 0) holds image 1, not image 0.
    y, x = cell_origin(0, 0, (4, 5))
    assert torch.allclose(torch.as_tensor(grid[y:y + 4, x:x + 5]), original[1, 0].float() / 255,
                          atol=1e-6)


def test_rgb_grid_keeps_channels_in_place():
    pixels = _pixels(3).float() / 255
    grid = mosaic(pixels, class_rows(CLASSES, 3, 2))
    y, x = cell_origin(2, 1, (4, 5))  # image 4: class 2, second
    assert grid.shape[2] == 3
    assert torch.allclose(torch.as_tensor(grid[y:y + 4, x:x + 5]), pixels[4].permute(1, 2, 0))


def test_titles_name_the_top_soft_label_and_its_probability():
    labels = torch.softmax(_label_logits(), 1)
    figure = synthetic_grid(_pixels().float() / 255, labels, CLASSES, NAMES, per_class=2)
    titles = [t.get_text() for t in figure.axes[0].texts]
    p = float(labels[0].max())  # 2 nats above two others: 0.79
    # Image 1 leads row 0 and its top label is class 0; image 0 leads row 2 with top label 1.
    assert titles[0] == f"shirt {p:.2f}" and titles[4] == f"shoe {p:.2f}"
    assert len(titles) == 6


def test_loss_curve_plots_every_loss_on_a_log_scale_when_positive():
    losses = [4.0, 2.0, 1.0, 0.5]
    axes = loss_curve(losses).axes[0]
    assert list(axes.lines[0].get_ydata()) == losses
    assert list(axes.lines[0].get_xdata()) == [1, 2, 3, 4]
    assert axes.get_yscale() == "log"
    assert loss_curve([1.0, -0.5]).axes[0].get_yscale() == "linear"


def test_accuracy_bars_are_percentages_with_the_distilled_set_first():
    results = {"init": {"convnet": {"mean": 0.70, "std": 0.02}},
               "synthetic": {"convnet": {"mean": 0.81, "std": 0.01}}}
    axes = accuracy_bars(results).axes[0]
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == pytest.approx([81.0, 70.0])
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["distilled", "initial set"]


def _write_run(run, with_optional: bool) -> None:
    synthetic = SyntheticSet(normalise(_pixels(), MEAN, STD), _label_logits(), CLASSES)
    save_synthetic(str(run / "synthetic.safetensors"), synthetic, _metadata())
    if with_optional:
        save_synthetic(str(run / "distill" / "init.safetensors"), synthetic, _metadata())
        for iteration, losses in ((2, [3.0, 2.0]), (4, [3.0, 2.0, 1.5, 1.0])):
            storage.save_tensors(str(run / "distill" / f"state-{iteration:06d}.safetensors"),
                                 {"images": torch.zeros(1)},
                                 {"iteration": iteration, "losses": losses})
        storage.publish_json(str(run / "eval.json"), {"results": {
            "synthetic": {"convnet": {"mean": 0.8, "std": 0.01, "runs": [0.8]}},
            "init": {"convnet": {"mean": 0.7, "std": 0.0, "runs": [0.7]}}}})


def test_show_writes_every_picture_as_png(tmp_path):
    _write_run(tmp_path, with_optional=True)
    written = show_run(str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["accuracy.png", "init.png", "loss.png", "synthetic.png"]
    for name in names:
        with Image.open(tmp_path / "show" / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    with Image.open(tmp_path / "show" / "synthetic.png") as grid:
        # The figure's size in inches times 100 dpi: taller than wide for 3 rows of 2 images.
        assert grid.height > grid.width * 0.8


def test_show_reads_the_newest_state_for_the_loss_curve(tmp_path, monkeypatch):
    _write_run(tmp_path, with_optional=True)
    drawn = []
    monkeypatch.setattr("ead_dist.pictures.loss_curve",
                        lambda losses: drawn.append(losses) or loss_curve(losses))
    show_run(str(tmp_path), out_url=str(tmp_path / "pictures"))
    assert drawn == [[3.0, 2.0, 1.5, 1.0]]
    assert (tmp_path / "pictures" / "loss.png").exists()


def test_show_skips_missing_optional_inputs(tmp_path):
    _write_run(tmp_path, with_optional=False)
    written = show_run(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["synthetic.png"]


def test_show_without_a_synthetic_set_names_the_path(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("ead-dist: error:")
    assert str(tmp_path / "synthetic.safetensors") in message and "\n" not in message

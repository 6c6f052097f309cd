"""``ead-dist show RUN``: read a run's outputs and publish its pictures as PNGs.

Draws (``ead_dist.pictures``) the synthetic set, the initial set, the coordinator's loss curve
and the accuracy against the baselines, each when its input exists (and, for a multi-formation
set, the stored images beside the training images they decode to); only
``RUN/synthetic.safetensors`` is required. Everything is read and written through
``ead_dist.storage``, so RUN and the output folder may be local paths or ``s3://`` URLs.
"""

from __future__ import annotations

import io
import logging

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import pictures, storage
from .data.arrays import unnormalise
from .synthetic import class_names, load_synthetic

log = logging.getLogger(__name__)


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)  # draw with Agg whatever pyplot's backend is
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _set_grid(url: str, title: str, per_class: int, data_url: str | None,
              stored: bool = False) -> Figure:
    """The set's training images, or with ``stored`` its multi-formation stored images (each
    titled with the mean label of the training images it decodes to)."""
    images, labels, classes, metadata = load_synthetic(url)
    if "mean" not in metadata or "std" not in metadata:
        raise storage.StorageError(f"{url}: metadata has no mean and std to undo the "
                                   f"normalisation with")
    names = class_names(metadata, labels.shape[1], data_url)
    what = "images"
    if stored:
        images = storage.load_tensors(url)[0]["stored_images"]
        parts = len(labels) // len(images)
        labels = labels.reshape(len(images), parts, -1).mean(1)
        classes, what = classes[::parts], f"stored images (x{parts})"
    pixels = unnormalise(images, metadata["mean"], metadata["std"])
    return pictures.synthetic_grid(pixels, labels, classes, names, per_class=per_class,
                                   title=f"{title}: {metadata.get('dataset', '?')}, "
                                         f"{metadata.get('method', '?')}, {len(images)} {what}")


def _newest_losses(run_url: str) -> list[float] | None:
    states = storage.list_files(storage.join(run_url, "distill"), "state-*.safetensors")
    if not states:
        return None
    return storage.load_metadata(states[-1]).get("losses") or None  # names sort by iteration


def show_run(run_url: str, out_url: str | None = None, data_url: str | None = None,
             per_class: int = 10) -> list[str]:
    """Publish the run's pictures under ``out_url`` (default ``RUN/show``); their URLs."""
    out_url = out_url or storage.join(run_url, "show")
    synthetic_url = storage.join(run_url, "synthetic.safetensors")
    if not storage.exists(synthetic_url):
        raise storage.StorageError(f"{synthetic_url} does not exist: run the distill stage "
                                   f"first (ead-dist distill CONFIG)")
    figures = {"synthetic.png": _set_grid(synthetic_url, "distilled set", per_class, data_url)}
    if storage.load_metadata(synthetic_url).get("formation", 1) > 1:
        figures["stored.png"] = _set_grid(synthetic_url, "distilled set", per_class, data_url,
                                          stored=True)

    init_url = storage.join(run_url, "distill", "init.safetensors")
    if storage.exists(init_url):
        figures["init.png"] = _set_grid(init_url, "initial set", per_class, data_url)
    else:
        log.info("show: no %s, skipping the initial set", init_url)

    losses = _newest_losses(run_url)
    if losses:
        figures["loss.png"] = pictures.loss_curve(losses)
    else:
        log.info("show: no losses in %s, skipping the loss curve",
                 storage.join(run_url, "distill", "state-*.safetensors"))

    eval_url = storage.join(run_url, "eval.json")
    if storage.exists(eval_url):
        report = storage.read_json(eval_url)
        if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
            raise storage.StorageError(f"{eval_url} has no 'results' mapping")
        figures["accuracy.png"] = pictures.accuracy_bars(report["results"])
    else:
        log.info("show: no %s, skipping the accuracy chart", eval_url)

    written = []
    for name, figure in figures.items():
        url = storage.join(out_url, name)
        storage.publish_bytes(url, png_bytes(figure))
        log.info("show: wrote %s", url)
        written.append(url)
    return written

"""Shared fixtures: a real S3 endpoint over HTTP (moto's server on loopback) and one Ray
instance per test session. Tests that use them are marked ``s3`` / ``cluster``."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_credentials() -> None:
    """Credentials for moto (it accepts any), in this process and the Ray workers it starts."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): tiny
    models and float64 ops on a shared 2-core machine, where a second thread only waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sgd_rates(monkeypatch):
    """The lr of every SGD step taken while the test runs, in order."""
    import torch

    rates = []
    original = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    return rates


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on 127.0.0.1, as s3fs's own tests use it."""
    from moto.server import ThreadedMotoServer

    _moto_credentials()
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields its ``s3://`` URL."""
    import boto3
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name
    )
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs seconds).

    Its workers never see an S3 endpoint in their environment, whichever fixture came first:
    a stage must carry ``storage.s3_endpoint_url`` to them itself.
    """
    import ray

    if not ray.is_initialized():
        _moto_credentials()
        hidden = {name: os.environ.pop(name) for name in ENDPOINT_VARIABLES if name in os.environ}
        try:
            # No RAY_TRAIN_V2_ENABLED here: Ray 2.60's default (Train V2) is what production
            # runs, so the tests run it the same way.
            ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                     log_to_driver=False)
        finally:
            os.environ.update(hidden)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist_root():
    """The real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."""
    if not os.path.isdir(FASHION_MNIST_DEBIAN):
        pytest.fail(
            f"{FASHION_MNIST_DEBIAN} is missing: install the Debian package dataset-fashion-mnist "
            "(the README's test command does this)"
        )
    return FASHION_MNIST_DEBIAN


@pytest.fixture(scope="session")
def few_fashion_mnist(fashion_mnist_root):
    """12 real Fashion-MNIST training items of each of 3 classes (T-shirt, Trouser, Sneaker):
    uint8 images [36, 28, 28], labels 0..2 and folder-safe class names."""
    import numpy as np

    from ead_dist.data.formats.idx import read_fashion_mnist

    data = read_fashion_mnist(fashion_mnist_root, "train")
    chosen = [np.flatnonzero(data.labels == c)[:12] for c in (0, 1, 7)]
    index = np.sort(np.concatenate(chosen))
    labels = np.searchsorted([0, 1, 7], data.labels[index])
    return data.images[index, :, :, 0], labels, ["T-shirt_top", "Trouser", "Sneaker"]


@pytest.fixture(scope="session")
def small_fashion_mnist_raw(fashion_mnist_root, tmp_path_factory):
    """A real Fashion-MNIST subset (600 train, 300 test) as gzipped IDX files: a data.source."""
    import gzip

    import numpy as np

    from ead_dist.data.formats.idx import read_fashion_mnist
    from raw_writers import idx_bytes

    source = tmp_path_factory.mktemp("fmnist_raw")
    for split, prefix, count in (("train", "train", 600), ("test", "t10k", 300)):
        data = read_fashion_mnist(fashion_mnist_root, split)
        for kind, magic, array in (("images-idx3", 0x803, data.images[:count, :, :, 0]),
                                   ("labels-idx1", 0x801, data.labels[:count].astype(np.uint8))):
            with gzip.open(source / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(idx_bytes(magic, array))
    return str(source)


@pytest.fixture(scope="session")
def small_fashion_mnist(small_fashion_mnist_raw, tmp_path_factory):
    """That subset ingested once (600 train in 3 shards, 300 test): its DATA url."""
    from ead_dist.data.ingest import ingest_classification

    data_url = str(tmp_path_factory.mktemp("fmnist_data") / "fashion_mnist")
    ingest_classification("fashion_mnist", small_fashion_mnist_raw, data_url, shard_size=200,
                          use_ray=False)
    return data_url


def tiny_config(run_url: str, data_url: str, overrides: dict | None = None):
    """The tiny end-to-end config (pipelines/tiny_test.yaml) pointed at test directories."""
    import copy
    import pathlib

    import yaml

    from ead_dist.config import parse_config

    path = pathlib.Path(__file__).parent.parent / "pipelines" / "tiny_test.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["run"], raw["data"]["url"] = run_url, data_url
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return parse_config(raw, str(path))


def run_with_real_terms(run_url: str, data_url: str, overrides: dict):
    """A tiny run with its experts and real terms done (in-process, no Ray): the base that
    distill tests copy. Returns its config."""
    from ead_dist.stages.experts import run_experts
    from ead_dist.stages.realgrad import run_realgrad

    config = tiny_config(run_url, data_url, overrides)
    run_experts(config, use_ray=False)
    run_realgrad(config, use_ray=False)
    return config


# The image-text path at its smallest: one clip-tiny expert on 96 scene-caption pairs.
SMALL_PAIRS = {
    "experts": {"count": 1, "epochs": 1, "lr": 0.01, "batch_size": 32, "save_every": 2},
    "distill": {"objective": "trajectory", "iterations": 4, "student_steps": 2,
                "expert_span": 1, "save_every": 2, "threads": 1},
    "evaluate": {"runs": 1, "epochs": 2, "lr": 0.001, "batch_size": 16},
    "image_text": {"model": "clip-tiny", "context_length": 32, "held_out": 0.25,
                   "test_pairs": 20, "train_pairs": 96, "pairs": 8},
    "ray": {"enabled": False},
}


def small_pair_config(run: str, data: str, overrides: dict | None = None):
    """SMALL_PAIRS on the scene captions at ``data``, with ``{"section": {field: value}}``
    overrides."""
    import copy

    from ead_dist.config import parse_config

    raw = {"run": run, "data": {"dataset": "cc3m", "source": data, "url": data,
                                "image_size": 32}, **copy.deepcopy(SMALL_PAIRS)}
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)


def scene_items(root: str):
    from ead_dist.data.formats.idx import read_fashion_mnist

    data = read_fashion_mnist(root, "train")
    return data.images[:2000, :, :, 0], data.labels[:2000]


@pytest.fixture(scope="session")
def scenes(fashion_mnist_root, tmp_path_factory):
    """160 scene captions in 2 img2dataset shards, validated by ingest: the DATA url."""
    from ead_dist.data.caption_scenes import write_caption_scenes
    from ead_dist.data.image_text import ingest_image_text

    root = tmp_path_factory.mktemp("scenes")
    images, labels = scene_items(fashion_mnist_root)
    write_caption_scenes(str(root), images, labels, samples=160, shard_size=80, canvas=64)
    ingest_image_text("cc3m", str(root), str(root), image_size=32, use_ray=False)
    return str(root)


@pytest.fixture(scope="session")
def experts_done(scenes, tmp_path_factory):
    """A run URL holding SMALL_PAIRS' one expert (checkpoints at steps 0, 2 and 3)."""
    import torch

    from ead_dist.stages.experts import run_experts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine
    try:
        run = str(tmp_path_factory.mktemp("pairs") / "base")
        run_experts(small_pair_config(run, scenes), use_ray=False)
    finally:
        torch.set_num_threads(threads)
    return run

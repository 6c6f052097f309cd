"""pipelines/*.yaml: every maintained setting loads and validates; config errors name the file
and the dotted field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ead_dist.config import ConfigError, load_config

PIPELINES = sorted((Path(__file__).resolve().parent.parent / "pipelines").glob("*.yaml"))
DATASETS = ("mnist", "fashion_mnist", "svhn", "cifar10", "cifar100", "tiny_imagenet", "cc3m")
SETTING = re.compile(r"(?P<dataset>[a-z0-9_]+)_ipc(?P<ipc>\d+)")


def test_every_dataset_has_ipc_1_10_50():
    names = {p.stem for p in PIPELINES}
    for dataset in DATASETS[:-1]:
        for ipc in (1, 10, 50):
            assert f"{dataset}_ipc{ipc}" in names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_loads(path):
    config = load_config(str(path))
    assert config.data.dataset in DATASETS
    match = SETTING.fullmatch(path.stem)
    if match:  # DATASET_ipcN.yaml says what it holds
        assert config.name == path.stem
        assert config.data.dataset == match["dataset"]
        assert config.distill.ipc == int(match["ipc"])
        # The DC/MTT ConvNet pads its first layer by 3 only for 28x28 single-channel digits.
        assert (config.model.first_padding == 3) == (config.data.dataset in ("mnist",
                                                                           "fashion_mnist"))
        assert config.model.depth == (4 if config.data.dataset == "tiny_imagenet" else 3)


def test_run_paths_are_distinct():
    runs = [load_config(str(p)).run for p in PIPELINES]
    assert len(set(runs)) == len(runs)


def test_run_paths_live_under_runs():
    for path in PIPELINES:
        raw = yaml.safe_load(path.read_text())
        assert raw["run"].startswith("runs/"), path.name


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, field", [
    ("distill: {ipc: 10, ipcc: 3}\n", "distill.ipcc"),  # unknown field
    ("experts: {count: many}\n", "experts.count"),  # wrong type
    ("distill: {objective: nope}\n", "distill.objective"),  # not one of the choices
    ("model: {norm: layernorm}\n", "model.norm"),
    ("realgrad: {workers: 0}\n", "realgrad.workers"),  # must be positive
], ids=["unknown", "type", "objective", "norm", "positive"])
def test_config_error_names_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert path in str(error.value) and field in str(error.value)


def test_bad_override_names_file_and_field(tmp_path):
    path = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["distill.ipc=abc"])
    assert path in str(error.value) and "distill.ipc" in str(error.value)

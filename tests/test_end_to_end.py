"""The whole pipeline through the command line, on real Fashion-MNIST images, with Ray."""

import json

import pytest

from ead_dist import storage
from ead_dist.cli import main as cli_main


@pytest.mark.cluster
@pytest.mark.slow
def test_cli_run_tiny_pipeline(small_fashion_mnist, tmp_path, ray_session, capsys):
    run = str(tmp_path / "run")
    code = cli_main(["run", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                     "--set", f"data.url={small_fashion_mnist}", "--set", "realgrad.workers=2",
                     "--set", "evaluate.test_samples=300"])
    assert code == 0
    out = capsys.readouterr().out
    assert "distilled S" in out and "random real, hard labels" in out
    report = storage.read_json(storage.join(run, "eval.json"))
    assert set(report["results"]) == {"synthetic", "init", "random_real"}
    for per_model in report["results"].values():
        assert 0.0 <= per_model["convnet"]["mean"] <= 1.0
    assert report["protocol"]["test_samples"] == 300
    index = storage.read_json(storage.join(run, "experts", "index.json"))
    assert len(index["experts"]) == 2
    # A second run finds every stage done and changes nothing.
    before = storage.read_bytes(storage.join(run, "synthetic.safetensors"))
    assert cli_main(["run", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                     "--set", f"data.url={small_fashion_mnist}"]) == 0
    assert storage.read_bytes(storage.join(run, "synthetic.safetensors")) == before


def test_cli_config_error_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {ipc: ten}\n")
    assert cli_main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "distill.ipc" in err

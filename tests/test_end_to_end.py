"""The whole pipeline through the command line, on real Fashion-MNIST images, with Ray: on local
disk, and on S3 with the endpoint given only by the config."""

import json
import os

import pytest

from conftest import ENDPOINT_VARIABLES
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
    # A second run finds every stage done and changes nothing, with one worker as with two.
    before = storage.read_bytes(storage.join(run, "synthetic.safetensors"))
    assert cli_main(["run", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                     "--set", f"data.url={small_fashion_mnist}",
                     "--set", "evaluate.test_samples=300"]) == 0
    assert storage.read_bytes(storage.join(run, "synthetic.safetensors")) == before
    # Another objective on the same run is refused, in one line naming the field: the distill
    # stage runs as a Ray task, whose wrapped error the CLI unwraps.
    capsys.readouterr()
    assert cli_main(["run", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                     "--set", f"data.url={small_fashion_mnist}",
                     "--set", "evaluate.test_samples=300",
                     "--set", "distill.objective=scalar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ead-dist: error: the distill stage at ")
    assert "distill.objective 'matching' -> 'scalar'" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert storage.read_bytes(storage.join(run, "synthetic.safetensors")) == before


@pytest.mark.cluster
@pytest.mark.s3
@pytest.mark.slow
def test_every_ray_task_and_actor_reaches_s3_through_storage_settings_alone(
        small_fashion_mnist_raw, s3_endpoint, s3_bucket, ray_session, monkeypatch):
    # Neither the workers nor this driver know the endpoint from the environment.
    probe = ray_session.remote(lambda: [os.environ.get(n) for n in ENDPOINT_VARIABLES])
    assert ray_session.get(probe.remote()) == [None, None]
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    run, data = storage.join(s3_bucket, "run"), storage.join(s3_bucket, "data")
    try:
        # ingest: Ray tasks; experts: actors; realgrad: Ray Train workers; distill: a task;
        # evaluate: tasks. Each reads or writes s3:// on its own.
        code = cli_main(["run", "pipelines/tiny_test.yaml", "--set", f"run={run}",
                         "--set", f"data.url={data}",
                         "--set", f"data.source={small_fashion_mnist_raw}",
                         "--set", "data.shard_size=200", "--set", "realgrad.workers=2",
                         "--set", f"storage.s3_endpoint_url={s3_endpoint}",
                         "--set", "evaluate.test_samples=300"])
        assert code == 0
        storage.configure({"endpoint_url": s3_endpoint})
        assert len(storage.list_files(storage.join(data, "train"), "shard-*.tar")) == 3
        index = storage.read_json(storage.join(run, "experts", "index.json"))
        assert len(index["experts"]) == 2
        assert len(storage.list_files(storage.join(run, "realgrad"), "ckpt-*.safetensors")) == 4
        assert storage.exists(storage.join(run, "synthetic.safetensors"))
        report = storage.read_json(storage.join(run, "eval.json"))
        assert report["protocol"]["test_samples"] == 300
    finally:
        storage.configure()


def test_cli_config_error_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {ipc: ten}\n")
    assert cli_main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "distill.ipc" in err

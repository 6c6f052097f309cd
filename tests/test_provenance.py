import re

from ead_dist import __version__, storage
from ead_dist.config import RunConfig
from ead_dist.provenance import git_commit, record_run


def test_run_json_holds_the_config_version_and_commit(tmp_path):
    config = RunConfig(run=str(tmp_path / "run"))
    config.distill.ipc = 3
    url = record_run(config, ("distill", "evaluate"))
    record = storage.read_json(url)
    assert url.endswith("/run.json")
    assert record["config"]["distill"]["ipc"] == 3 and record["stages"] == ["distill", "evaluate"]
    assert record["version"] == __version__
    commit = record["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_no_commit_outside_a_git_checkout(tmp_path):
    assert git_commit(str(tmp_path)) is None

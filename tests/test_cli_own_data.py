"""The own-data commands through the installed ``ead-dist`` entry point, in a fresh process."""

import os
import subprocess
import sys

import pytest

from ead_dist.cli_own_data import route

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = os.path.join(os.path.dirname(sys.executable), "ead-dist")


def ead_dist(*args):
    if not os.path.isfile(ENTRY_POINT):
        pytest.fail(f"{ENTRY_POINT} is missing: install the package (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([ENTRY_POINT, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_route_joins_ingest_and_the_form_only():
    assert route(["-v", "ingest", "imagefolder", "x"]) == ["-v", "ingest imagefolder", "x"]
    assert route(["ingest", "webdataset", "u"]) == ["ingest webdataset", "u"]
    assert route(["ingest", "pipelines/demo.yaml"]) == ["ingest", "pipelines/demo.yaml"]
    assert route(["run", "imagefolder"]) == ["run", "imagefolder"]


def test_help_and_a_missing_folder_through_the_entry_point(tmp_path):
    shown = ead_dist("ingest", "imagefolder", "--help")
    assert shown.returncode == 0
    assert shown.stdout.startswith("usage: ead-dist ingest imagefolder")
    assert "--test-fraction" in shown.stdout and "--channels" in shown.stdout
    missing = str(tmp_path / "nowhere")
    failed = ead_dist("ingest", "imagefolder", missing, "--out", str(tmp_path / "d"), "--no-ray")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"ead-dist: error: {missing}: no such folder (expected ROOT/<class>/<images>)"]
    assert not os.path.exists(tmp_path / "d")

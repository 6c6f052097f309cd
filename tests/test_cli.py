"""``ead-dist`` through its installed entry point, in a fresh process: every subcommand's
``--help``, and a bad config or override as one line on stderr with exit code 2."""

import argparse
import os
import subprocess
import sys

import pytest

from ead_dist.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = os.path.join(os.path.dirname(sys.executable), "ead-dist")
# Read from the parser, so a subcommand added later is covered; "ingest imagefolder" is typed as
# two words (cli_own_data.route joins them).
SUBCOMMANDS = sorted(next(action for action in build_parser()._actions
                          if isinstance(action, argparse._SubParsersAction)).choices)


def ead_dist(*args: str) -> subprocess.CompletedProcess:
    if not os.path.isfile(ENTRY_POINT):
        pytest.fail(f"{ENTRY_POINT} is missing: install the package (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([ENTRY_POINT, *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=REPO)


def test_the_subcommands_are_all_there():
    for name in ("ingest", "ingest imagefolder", "ingest webdataset", "validate", "summary",
                 "experts", "realgrad", "distill", "evaluate", "run", "plan", "show", "export",
                 "submit"):
        assert name in SUBCOMMANDS


@pytest.mark.parametrize("command", [""] + SUBCOMMANDS)
def test_help(command):
    done = ead_dist(*command.split(), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: ead-dist {command}".rstrip())
    assert done.stderr == ""


def test_the_command_line_starts_without_torch_or_ray():
    """--help and config errors answer at once: the heavy modules load with the stages."""
    done = subprocess.run([sys.executable, "-c", "import sys, ead_dist.cli; "
                           "print(sorted({'torch', 'ray', 'webdataset'} & set(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_export_formats_offered_are_the_exporters():
    from ead_dist.cli import EXPORT_FORMATS
    from ead_dist.export import FORMATS

    assert EXPORT_FORMATS == FORMATS


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ead-dist: error: "), done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", ["run", "plan", "distill"])
def test_a_bad_config_is_one_line_naming_file_and_field(tmp_path, command):
    path = tmp_path / "bad.yaml"
    path.write_text("distill: {ipc: 10, iterations: 0}\nrealgrad: {real_samples: -1}\n")
    line = _one_error_line(ead_dist(command, str(path)))
    assert line == (f"ead-dist: error: {path}: realgrad.real_samples must be positive, got -1; "
                    "distill.iterations must be positive, got 0")


@pytest.mark.parametrize("override, message", [
    ("distill.ipc.x=3", "distill.ipc is a value, not a section, in --set distill.ipc.x=3"),
    ("distill.lr_images=fast", "distill.lr_images must be float, got 'fast'"),
    ("distill.iterations=-5", "distill.iterations must be positive, got -5"),
])
def test_a_bad_override_is_one_line_naming_file_and_field(override, message):
    line = _one_error_line(ead_dist("run", "pipelines/demo.yaml", "--set", override))
    assert line == f"ead-dist: error: pipelines/demo.yaml: {message}"


def test_a_key_given_twice_is_one_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("distill:\n  ipc: 10\n  ipc: 1\n")
    line = _one_error_line(ead_dist("plan", str(path)))
    assert line == f"ead-dist: error: {path}: distill.ipc is given twice (lines 2 and 3)"

import json

from ead_dist import storage
from ead_dist.metrics import MetricsLog


def test_lines_reach_storage_when_published_and_a_resume_drops_redone_ones(tmp_path):
    directory = str(tmp_path / "distill")
    metrics = MetricsLog(directory)
    for i in range(4):
        metrics.log(iteration=i, loss=1.0 / (i + 1))
    assert not storage.exists(metrics.url)  # buffered until a save point
    metrics.publish()
    metrics.log(iteration=4, loss=0.1)  # logged after the last save point: lost with the process
    resumed = MetricsLog(directory)
    assert [line["iteration"] for line in resumed.lines] == [0, 1, 2, 3]
    resumed.truncate("iteration", 2)  # the state resumed from is iteration 2
    resumed.log(iteration=2, loss=0.3)
    resumed.publish()
    text = storage.read_bytes(storage.join(directory, "metrics.jsonl")).decode()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2] and lines[2]["loss"] == 0.3
    assert all("time" in line for line in lines)


def test_works_on_object_stores_by_republishing_the_whole_file():
    directory = "memory://metrics-test/run/evaluate"
    metrics = MetricsLog(directory)
    metrics.log(set="synthetic", accuracy=0.5)
    metrics.publish()
    metrics.log(set="init", accuracy=0.4)
    metrics.publish()
    assert len(MetricsLog(directory).lines) == 2

"""distill.min_start / max_start: the range of checkpoints the trajectory student starts from."""

import pytest
import torch

from conftest import tiny_config
from ead_dist import storage
from ead_dist.config import ConfigError
from ead_dist.coordinator import Coordinator
from ead_dist.stages.distill import load_segments
from ead_dist.stages.experts import experts_url


def write_experts(run_url: str, experts: int, checkpoints: int) -> None:
    """Experts whose checkpoint c of expert e holds the one tensor [e, c]."""
    index = {"experts": []}
    for expert in range(experts):
        entries = []
        for c in range(checkpoints):
            name = f"expert-{expert:03d}/step-{c:06d}.safetensors"
            storage.save_tensors(storage.join(experts_url(run_url), name),
                                 {"w": torch.tensor([float(expert), float(c)])}, {})
            entries.append({"file": name, "lr": 0.01, "step": c})
        index["experts"].append({"expert": expert, "checkpoints": entries})
    storage.publish_json(storage.join(experts_url(run_url), "index.json"), index)


def starts(segments) -> list[tuple[int, int, int]]:
    """(expert, start, target) of each segment."""
    return [(int(s.theta_start["w"][0]), int(s.theta_start["w"][1]), int(s.theta_target["w"][1]))
            for s in segments]


def test_segments_start_inside_the_range(tmp_path):
    run = str(tmp_path / "run")
    write_experts(run, experts=2, checkpoints=8)
    assert starts(load_segments(run, 2, None)) == [(e, t, t + 2) for e in (0, 1)
                                                  for t in range(6)]
    assert starts(load_segments(run, 2, None, min_start=3)) == [(e, t, t + 2) for e in (0, 1)
                                                               for t in (3, 4, 5)]
    assert starts(load_segments(run, 2, 4, experts=[1], min_start=3)) == [(1, 3, 5), (1, 4, 6)]
    assert load_segments(run, 2, None, min_start=6) == []  # no checkpoint 8 to land on


def test_a_start_range_past_the_trajectories_is_a_clear_error(tmp_path):
    run = str(tmp_path / "run")
    write_experts(run, experts=1, checkpoints=4)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="distill.min_start"):
        Coordinator(model, None, objective="trajectory",
                    segments=load_segments(run, 2, None, min_start=2))


def test_min_start_past_max_start_is_refused_when_loaded(tmp_path):
    with pytest.raises(ConfigError, match="distill.min_start 5 is past distill.max_start 4"):
        tiny_config(str(tmp_path / "r"), str(tmp_path / "d"),
                    {"distill.objective": "trajectory", "distill.min_start": 5,
                     "distill.max_start": 4})
    config = tiny_config(str(tmp_path / "r"), str(tmp_path / "d"),
                         {"distill.objective": "trajectory", "distill.min_start": 4,
                          "distill.max_start": 4})
    assert config.distill.min_start == 4

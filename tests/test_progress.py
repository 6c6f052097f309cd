"""Progress bars: tqdm on a terminal, log lines off one, Ray's own bar inside a Ray task."""

import io
import logging
import sys

import pytest

from ead_dist.progress import LogBar, inside_ray_worker, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_driver_gets_tqdm_with_a_resumed_start_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar("distill", total=10, initial=4)
    bar.update(1)
    bar.set_postfix_str("loss=1.0")
    assert not inside_ray_worker() and bar.n == 5 and bar.total == 10
    bar.close()
    assert "distill" in sys.stderr.getvalue() and "5/10" in sys.stderr.getvalue()


def test_off_a_terminal_the_driver_draws_nothing_and_logs_instead(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    caplog.set_level(logging.INFO, logger="ead_dist.progress")
    bar = progress_bar("distill", total=10)
    bar.update(3)
    bar.close()
    assert sys.stderr.getvalue() == ""
    assert isinstance(bar, LogBar) and [r.getMessage() for r in caplog.records][-1].startswith(
        "distill: 3/10 it (30%)")


def test_the_log_bar_logs_at_most_once_per_interval_with_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="ead_dist.progress")
    now = [100.0]
    bar = LogBar("distill", total=200, initial=40, unit="it", every_s=60, clock=lambda: now[0])
    for _ in range(10):  # 10 steps of 15 s: a line after the 4th (60 s) and the 8th (120 s)
        now[0] += 15
        bar.update(1)
        bar.set_postfix_str("loss=1.0e-01")
    bar.close()
    lines = [record.getMessage() for record in caplog.records]
    # the rate counts only this bar's steps, not the 40 a resumed stage had done before
    assert lines == ["distill: 44/200 it (22%), 15 s/it, about 39 min left, loss=1.0e-01",
                     "distill: 48/200 it (24%), 15 s/it, about 38 min left, loss=1.0e-01",
                     "distill: 50/200 it (25%), 15 s/it, about 38 min left, loss=1.0e-01"]


def test_a_log_bar_closed_without_progress_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="ead_dist.progress")
    LogBar("distill", total=10, initial=10, unit="it").close()  # a stage resumed at its end
    assert caplog.records == []


@pytest.mark.cluster
def test_a_ray_task_gets_rays_bar(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def inside():
        bar = progress_bar("distill", total=10, initial=4)
        bar.update(2)
        bar.set_postfix_str("loss=1.0")
        kind, done = type(bar).__name__, bar.bar.n
        bar.close()
        return inside_ray_worker(), kind, done

    assert ray.get(inside.remote()) == (True, "_RayBar", 6)

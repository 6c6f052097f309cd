"""Progress bars: plain tqdm on the driver, Ray's own inside a Ray task."""

import io
import sys

import pytest

from ead_dist.progress import inside_ray_worker, progress_bar


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


def test_the_driver_draws_nothing_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    bar = progress_bar("distill", total=10)
    bar.update(3)
    bar.close()
    assert sys.stderr.getvalue() == ""


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

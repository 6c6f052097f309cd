"""What a process reports about its memory and the machine's."""

from ead_dist.measure import MEMORY_OVERRIDE, available_memory_mb, peak_memory_mb


def test_available_memory_is_the_machines_unless_overridden(monkeypatch):
    monkeypatch.delenv(MEMORY_OVERRIDE, raising=False)
    assert available_memory_mb() > 0
    monkeypatch.setenv(MEMORY_OVERRIDE, "1234")
    assert available_memory_mb() == 1234.0


def test_peak_memory_grows_with_an_allocation():
    before = peak_memory_mb()
    block = bytearray(64 * 1024**2)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    assert peak_memory_mb() >= before
    assert peak_memory_mb() > 60

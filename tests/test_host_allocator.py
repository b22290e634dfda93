"""The host allocator settings: what is asked of glibc, and that the command line asks it first."""

from __future__ import annotations

from typer.testing import CliRunner

import cli
from reconstruct import host_allocator

M_MMAP_THRESHOLD = -3


class FakeLibc:
    """Records the allocator calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_unpool_fixes_the_mmap_threshold_and_release_trims(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_allocator, "_glibc", lambda: libc)
    host_allocator.unpool_large_allocations()
    host_allocator.release_free_heap()
    assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 1 << 20), ("malloc_trim", 0)]


def test_without_glibc_both_are_no_ops(monkeypatch):
    monkeypatch.setattr(host_allocator, "_glibc", lambda: None)
    host_allocator.unpool_large_allocations()
    host_allocator.release_free_heap()


def test_every_command_unpools_before_it_runs(monkeypatch, tmp_path):
    """Building the skeleton allocates every parameter on the host first: the threshold must already be set."""
    events: list[str] = []
    monkeypatch.setattr("reconstruct.cli.main.unpool_large_allocations", lambda: events.append("unpool"))
    result = CliRunner().invoke(cli.app, ["retrain", "--model", str(tmp_path / "missing"), "--data", "self",
                                          "--out", str(tmp_path / "out")])
    assert result.exit_code == 2  # refused (no such model) after the threshold was set
    assert events == ["unpool"]


class FakeMallinfo2:
    """glibc's ``mallinfo2`` reporting ``free`` bytes in the heaps (ordinary bins; none in fast bins)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.restype = None

    def __call__(self):
        return self.restype(fordblks=self.free, fsmblks=0)


def test_release_with_slack_trims_only_past_it(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_allocator, "_glibc", lambda: libc)
    libc.mallinfo2 = FakeMallinfo2(free=10 << 20)
    host_allocator.release_free_heap(slack=64 << 20)
    assert libc.calls == []  # 10 MiB free: the next block reuses it
    libc.mallinfo2.free = 100 << 20
    host_allocator.release_free_heap(slack=64 << 20)
    assert libc.calls == [("malloc_trim", 0)]

"""chatq.api.auth: the per-source bucket of failed authentications, on a fake clock."""

from __future__ import annotations

from chatq.api import auth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_is_locked_after_its_failures_and_refills_over_the_minute() -> None:
    clock = Clock()
    guard = auth.AuthGuard(6, clock)  # one failure back every 10 s
    for _ in range(6):
        assert guard.refused("10.0.0.1", "guess") == 0.0
        guard.failed("10.0.0.1")
    assert guard.refused("10.0.0.1", "guess") == 10.0
    assert guard.refused("10.0.0.2", "guess") == 0.0  # another source has its own bucket
    clock.now += 4
    assert round(guard.refused("10.0.0.1", "other"), 6) == 6.0
    clock.now += 6
    assert guard.refused("10.0.0.1", "guess") == 0.0
    assert auth.retry_after(0.2) == "1" and auth.retry_after(6.0) == "6"


def test_a_key_that_worked_from_the_source_passes_its_lock() -> None:
    clock = Clock()
    guard = auth.AuthGuard(1, clock)
    guard.succeeded("10.0.0.1", "good")
    guard.failed("10.0.0.1")
    assert guard.refused("10.0.0.1", "good") == 0.0
    assert guard.refused("10.0.0.1", "fresh") > 0
    assert guard.refused("10.0.0.9", "fresh") == 0.0
    clock.now += auth.TRUSTED_SECONDS
    guard.failed("10.0.0.1")
    assert guard.refused("10.0.0.1", "good") > 0  # trusted for an hour, not for ever


def test_off_when_zero_and_bounded_in_sources() -> None:
    guard = auth.AuthGuard(0)
    guard.failed("10.0.0.1")
    assert guard.refused("10.0.0.1", "x") == 0.0
    guard = auth.AuthGuard(1)
    for i in range(auth.MAX_SOURCES + 10):
        guard.failed(f"s{i}")
        guard.succeeded(f"s{i}", "k")
    assert len(guard._buckets) == auth.MAX_SOURCES and len(guard._trusted) == auth.MAX_SOURCES

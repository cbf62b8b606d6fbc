"""The circuit breaker's pure decisions: the record's view, when it opens, the outage window."""

from __future__ import annotations

import pytest
from chatq import breaker


@pytest.mark.parametrize(("fields", "down", "since"), [
    ({}, False, None),
    ({"down_since": "100.5", "failures": "2"}, False, 100.5),  # failing, not yet down
    ({"state": "down", "down_since": "100", "last_error": "x"}, True, 100.0),
])
def test_view(fields: dict[str, str], down: bool, since: float | None) -> None:
    got = breaker.view(fields)
    assert (got.down, got.down_since) == (down, since)


@pytest.mark.parametrize(("failures", "threshold", "unreachable", "opens"), [
    (1, 5, True, True),  # connection refused: down at once
    (4, 5, False, False),
    (5, 5, False, True),
    (9, 5, False, True),
])
def test_opens(failures: int, threshold: int, unreachable: bool, opens: bool) -> None:
    assert breaker.opens(failures, threshold, unreachable) is opens


@pytest.mark.parametrize(("fields", "now", "over"), [
    ({"state": "down", "down_since": "1000"}, 1000 + 59, False),
    ({"state": "down", "down_since": "1000"}, 1000 + 61, True),
    ({"down_since": "1000"}, 1000 + 61, False),  # failing but not down: jobs keep their retries
    ({}, 10**9, False),
])
def test_outage_window(fields: dict[str, str], now: float, over: bool) -> None:
    got = breaker.view(fields)
    assert got.outage_over(now, window=60) is over
    assert got.down_for(now) == (now - 1000 if fields else 0.0)

"""The janitor's rule for one job record, table-driven."""

from __future__ import annotations

import pytest
from chatq import janitor

V = janitor.Verdict
NOW = 1_000.0


@pytest.mark.parametrize(("status", "lease_until", "requeues", "max_requeues", "verdict"), [
    ("queued", 0.0, 0, 1, V.SKIP),            # has its message
    ("succeeded", 0.0, 0, 1, V.SKIP),         # done
    ("cancelled", 0.0, 5, 1, V.SKIP),
    ("running", NOW + 5, 0, 1, V.SKIP),       # a live lease
    ("running", NOW - 5, 0, 1, V.SKIP),       # expired, but the queue redelivers first
    ("running", NOW - 59, 0, 1, V.SKIP),      # not yet stale_seconds past it
    ("running", NOW - 60, 0, 1, V.REQUEUE),   # exactly stale_seconds: stale
    ("running", NOW - 61, 0, 1, V.REQUEUE),   # stale: a new message
    ("running", NOW - 61, 1, 1, V.FAIL),      # requeued once already: give up
    ("running", NOW - 61, 0, 0, V.FAIL),      # requeues off: fail at once
    ("running", NOW - 9999, 2, 3, V.REQUEUE),
    ("running", 0.0, 0, 1, V.REQUEUE),        # never had a lease recorded
])
def test_decide(status: str, lease_until: float, requeues: int, max_requeues: int,
                verdict: janitor.Verdict) -> None:
    assert janitor.decide(status, lease_until, NOW, 60.0, requeues, max_requeues) is verdict

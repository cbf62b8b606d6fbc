"""Status conditions: Kubernetes' conventions, transition times that move only on change."""

from __future__ import annotations

import datetime

from chatq_operator import status
from chatq_operator.status import Condition


def test_now_iso() -> None:
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=datetime.UTC)
    assert status.now_iso(moment) == "2026-01-02T03:04:05Z"


def test_merge_keeps_transition_time_while_status_holds() -> None:
    first = status.merge(None, [Condition("Ready", True, "Scaling", "a"), Condition("Active", False, "Idle")],
                         "T1")
    assert first == [
        {"type": "Active", "status": "False", "reason": "Idle", "message": "", "lastTransitionTime": "T1"},
        {"type": "Ready", "status": "True", "reason": "Scaling", "message": "a", "lastTransitionTime": "T1"},
    ]
    second = status.merge(first, [Condition("Ready", True, "Scaling", "b")], "T2")
    assert second[1] == {"type": "Ready", "status": "True", "reason": "Scaling", "message": "b",
                         "lastTransitionTime": "T1"}
    assert second[0] == first[0]  # conditions not mentioned stay
    third = status.merge(second, [Condition("Ready", False, "TargetNotFound", "gone")], "T3")
    assert third[1]["lastTransitionTime"] == "T3"
    assert third[1]["status"] == "False"


def test_changed_is_a_merge_patch() -> None:
    assert status.changed({"visible": 1, "inFlight": 2}, {"visible": 1, "inFlight": 3, "reason": "x"}) == {
        "inFlight": 3, "reason": "x"}
    assert status.changed({"visible": 1}, {"visible": 1}) == {}

"""Table-driven tests of the QueueScaler decision: every rule of `decision.decide`."""

from __future__ import annotations

import dataclasses

import pytest
from chatq_operator import decision
from chatq_operator.decision import History, Metrics, Reason, Spec

NOW = 10_000.0
BASE = Spec(min_replicas=0, max_replicas=10, messages_per_replica=32, activation_messages=0,
            scale_down_stabilization_seconds=60, idle_seconds_before_zero=300, max_scale_up_step=10)


def spec(**changes: object) -> Spec:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


def history(current: int, *, active_ago: float = 0.0, window: tuple[tuple[float, int], ...] = (),
            errors: int = 0, added: int | None = None) -> History:
    """The history at NOW: activity `active_ago` seconds ago, `window` as (seconds ago, demand)."""
    return History(now=NOW, current_replicas=current, last_active_at=NOW - active_ago,
                   recommendations=tuple((NOW - ago, r) for ago, r in window),
                   source_errors=errors, added_total=added)


# (id, metrics, spec, history, busy, replicas, reason)
CASES = [
    # Counting: visible and in-flight against messagesPerReplica.
    ("visible-plus-in-flight", Metrics(50, 14), spec(), history(1), {}, 2, Reason.SCALE_UP),
    ("exact-multiple", Metrics(64, 0), spec(), history(1), {}, 2, Reason.SCALE_UP),
    ("one-over-a-multiple", Metrics(65, 0), spec(), history(1), {}, 3, Reason.SCALE_UP),
    ("in-flight-not-counted", Metrics(20, 20), spec(include_in_flight=False), history(1), {}, 1,
     Reason.STEADY),
    ("in-flight-counted", Metrics(20, 20), spec(), history(1), {}, 2, Reason.SCALE_UP),
    ("small-messages-per-replica", Metrics(7, 0), spec(messages_per_replica=2), history(1), {}, 4,
     Reason.SCALE_UP),
    ("matches-demand", Metrics(40, 20), spec(), history(2, window=((10, 2),)), {}, 2, Reason.STEADY),
    # Up: at once, with a bounded step, clamped to max.
    ("clamped-to-max", Metrics(10_000, 0), spec(), history(5), {}, 10, Reason.SCALE_UP),
    ("bounded-step", Metrics(30 * 32, 0), spec(max_replicas=50), history(1), {}, 11,
     Reason.SCALE_UP_LIMITED),
    ("step-may-double", Metrics(50 * 32, 0), spec(max_replicas=50), history(20), {}, 40,
     Reason.SCALE_UP_LIMITED),
    ("up-ignores-window", Metrics(5 * 32, 0), spec(), history(2, window=((1, 2),)), {}, 5, Reason.SCALE_UP),
    # From zero: wake within one poll once activationMessages is passed.
    ("wake-on-first-message", Metrics(1, 0), spec(), history(0, active_ago=1000), {}, 1,
     Reason.WAKE_FROM_ZERO),
    ("wake-to-demand", Metrics(100, 0), spec(), history(0, active_ago=1000), {}, 4, Reason.WAKE_FROM_ZERO),
    ("wake-bounded", Metrics(10_000, 0), spec(max_replicas=100, max_scale_up_step=8), history(0), {}, 8,
     Reason.SCALE_UP_LIMITED),
    ("activation-not-passed", Metrics(5, 0), spec(activation_messages=5), history(0), {}, 0,
     Reason.BELOW_ACTIVATION),
    ("activation-passed", Metrics(6, 0), spec(activation_messages=5), history(0), {}, 1,
     Reason.WAKE_FROM_ZERO),
    ("activation-counts-in-flight", Metrics(3, 3), spec(activation_messages=5), history(0), {}, 1,
     Reason.WAKE_FROM_ZERO),
    ("empty-stays-at-zero", Metrics(0, 0), spec(), history(0), {}, 0, Reason.BELOW_ACTIVATION),
    ("activation-ignored-above-zero", Metrics(3, 0), spec(activation_messages=5),
     history(2, window=((10, 2),)), {}, 2,
     Reason.STABILIZING),
    # Down: only after the stabilization window, never below what in-flight needs.
    ("down-waits-for-window", Metrics(10, 0), spec(), history(4, window=((30, 4),)), {}, 4,
     Reason.STABILIZING),
    ("down-after-window", Metrics(10, 0), spec(), history(4, window=((61, 4), (90, 4))), {}, 1,
     Reason.SCALE_DOWN),
    ("down-to-highest-in-window", Metrics(10, 0), spec(), history(4, window=((70, 4), (20, 3), (5, 2))),
     {}, 3, Reason.SCALE_DOWN),
    ("down-no-window", Metrics(10, 0), spec(scale_down_stabilization_seconds=0),
     history(4, window=((1, 4),)), {}, 1, Reason.SCALE_DOWN),
    ("down-floored-by-in-flight", Metrics(0, 96), spec(include_in_flight=False,
                                                     scale_down_stabilization_seconds=0),
     history(5), {}, 3, Reason.SCALE_DOWN),
    ("down-floored-by-busy-pods", Metrics(0, 3), spec(scale_down_stabilization_seconds=0),
     history(5), {"w-a": 1, "w-b": 1, "w-c": 1, "w-d": 0, "w-e": 0}, 3, Reason.SCALE_DOWN),
    ("down-clamped-to-min", Metrics(0, 0), spec(min_replicas=2, scale_down_stabilization_seconds=0),
     history(5), {}, 2, Reason.SCALE_DOWN),
    # Zero: only after idleSecondsBeforeZero without activity; one warm pod until then.
    ("warm-pod-stays", Metrics(0, 0), spec(), history(1, active_ago=100), {}, 1, Reason.KEEP_WARM),
    ("down-keeps-one-warm", Metrics(0, 0), spec(scale_down_stabilization_seconds=0),
     history(4, active_ago=10), {}, 1, Reason.SCALE_DOWN),
    ("zero-after-idle", Metrics(0, 0), spec(), history(1, active_ago=300), {}, 0, Reason.SCALE_TO_ZERO),
    ("zero-skips-window", Metrics(0, 0), spec(), history(3, active_ago=301, window=((10, 3),)), {}, 0,
     Reason.SCALE_TO_ZERO),
    ("visible-is-activity", Metrics(1, 0), spec(), history(1, active_ago=1000), {}, 1, Reason.STEADY),
    ("in-flight-is-activity", Metrics(0, 1), spec(include_in_flight=False), history(1, active_ago=1000),
     {}, 1, Reason.STEADY),
    ("busy-pod-is-activity", Metrics(0, 0), spec(), history(1, active_ago=1000), {"w-a": 2}, 1,
     Reason.STEADY),
    ("added-messages-are-activity", Metrics(0, 0, added_total=12), spec(),
     history(1, active_ago=1000, added=9), {}, 1, Reason.KEEP_WARM),
    ("unchanged-counter-is-idle", Metrics(0, 0, added_total=12), spec(),
     history(1, active_ago=1000, added=12), {}, 0, Reason.SCALE_TO_ZERO),
    ("min-replicas-never-zero", Metrics(0, 0), spec(min_replicas=1), history(1, active_ago=1000), {}, 1,
     Reason.STEADY),
    # Clamp: replicas outside [min, max] come back at once (spec edits take effect).
    ("above-max", Metrics(1000, 0), spec(max_replicas=3), history(8), {}, 3, Reason.CLAMPED_TO_MAX),
    ("below-min", Metrics(0, 0), spec(min_replicas=2), history(1), {}, 2, Reason.CLAMPED_TO_MIN),
    ("zero-below-min", Metrics(0, 0), spec(min_replicas=2), history(0), {}, 2, Reason.CLAMPED_TO_MIN),
    ("max-below-min", Metrics(1000, 0), spec(min_replicas=4, max_replicas=2), history(4), {}, 4,
     Reason.STEADY),
    # Busy counts unknown: no scale-down while jobs run, since the pods to keep are unknown.
    ("busy-unknown-holds-down", Metrics(0, 5), spec(scale_down_stabilization_seconds=0), history(4), None,
     4, Reason.BUSY_UNKNOWN),
    ("busy-unknown-scales-up", Metrics(500, 5), spec(), history(4), None, 10, Reason.SCALE_UP),
    ("busy-unknown-nothing-running", Metrics(0, 0), spec(scale_down_stabilization_seconds=0), history(4),
     None, 1, Reason.SCALE_DOWN),
    # Source errors: hold, then fallbackReplicas.
    ("first-error-holds", None, spec(fallback_replicas=6), history(2), {}, 2, Reason.SOURCE_ERROR_HOLD),
    ("second-error-holds", None, spec(fallback_replicas=6), history(2, errors=1), {}, 2,
     Reason.SOURCE_ERROR_HOLD),
    ("third-error-falls-back", None, spec(fallback_replicas=6), history(2, errors=2), {}, 6,
     Reason.FALLBACK),
    ("fallback-after-custom-count", None, spec(fallback_replicas=6, errors_before_fallback=1), history(2),
     {}, 6, Reason.FALLBACK),
    ("fallback-clamped", None, spec(fallback_replicas=60), history(2, errors=5), {}, 10, Reason.FALLBACK),
    ("fallback-to-zero", None, spec(fallback_replicas=0), history(2, errors=5), {}, 0, Reason.FALLBACK),
    ("no-fallback-holds", None, spec(), history(3, errors=50), {}, 3, Reason.SOURCE_ERROR_HOLD),
    ("hold-within-new-max", None, spec(max_replicas=2), history(5), {}, 2, Reason.SOURCE_ERROR_HOLD),
    ("hold-within-new-min", None, spec(min_replicas=4), history(1), {}, 4, Reason.SOURCE_ERROR_HOLD),
]


@pytest.mark.parametrize(("metrics", "the_spec", "the_history", "busy", "replicas", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(metrics: Metrics | None, the_spec: Spec, the_history: History, busy: dict[str, int] | None,
                replicas: int, reason: Reason) -> None:
    got = decision.decide(metrics, the_spec, the_history, busy)
    assert (got.replicas, got.reason) == (replicas, reason), got.message
    assert got.changes == (replicas != the_history.current_replicas)
    assert got.fallback == (reason is Reason.FALLBACK)
    assert got.message


def test_history_is_carried_over() -> None:
    """The window keeps recent demand only; a good read resets the error count."""
    old = history(4, active_ago=20, window=((90, 9), (30, 4)), errors=2, added=5)
    got = decision.decide(Metrics(0, 0, added_total=5), BASE, old, {})
    assert got.history.recommendations == ((NOW - 30, 4), (NOW, 0))
    assert got.history.source_errors == 0
    assert got.history.last_active_at == NOW - 20
    assert got.history.added_total == 5
    busy = decision.decide(Metrics(0, 0, added_total=5), BASE, old, {"w": 1})
    assert busy.history.last_active_at == NOW


def test_errors_keep_the_rest_of_the_history() -> None:
    old = history(4, active_ago=20, window=((30, 4),), errors=1, added=5)
    got = decision.decide(None, BASE, old, {})
    assert got.history == dataclasses.replace(old, source_errors=2)


def test_first_poll_counts_as_activity() -> None:
    """An operator that just started does not take the last pod away at once."""
    fresh = History(now=NOW, current_replicas=1)
    got = decision.decide(Metrics(0, 0), BASE, fresh, {})
    assert got.reason is Reason.KEEP_WARM
    assert got.history.last_active_at == NOW


def test_burst_then_drain_timeline() -> None:
    """A whole run, poll by poll: up at once, down after the window, zero after the idle time."""
    the_spec = spec(scale_down_stabilization_seconds=30, idle_seconds_before_zero=60)
    mem = History(now=0.0, current_replicas=0)
    replicas = 0
    timeline: dict[int, int] = {}
    for t in range(0, 200, 5):
        # 200 messages arrive at t=10; the pods drain them by t=40.
        visible = 200 if 10 <= t < 25 else 0
        in_flight = 64 if 10 <= t < 40 else 0
        got = decision.decide(Metrics(visible, in_flight), the_spec, mem.at(float(t), replicas), {})
        replicas, mem = got.replicas, got.history
        timeline[t] = replicas
    assert timeline[5] == 0
    assert timeline[10] == 9  # ceil(264 / 32), within one poll of the backlog appearing
    assert timeline[45] == 9  # demand fell to 2 at t=25; 9 was seen within the window
    assert timeline[50] == 2  # window over for the 9s: down to what in-flight needs
    assert timeline[60] == 2
    assert timeline[65] == 1  # nothing left: one warm pod stays
    assert timeline[90] == 1
    assert timeline[95] == 0  # 60 s after the last in-flight message (t=35)
    assert max(timeline.values()) == 9


@pytest.mark.parametrize(("busy", "costs"), [
    ({}, {"a": 0, "b": 0}),
    ({"a": 3}, {"a": 3, "b": 0}),
    ({"a": 3, "b": 1, "stale": 9}, {"a": 3, "b": 1}),
    ({"a": -1, "b": 2**40}, {"a": 0, "b": decision.MAX_DELETION_COST}),
], ids=["no-reports", "one-busy", "stale-keys-ignored", "clamped-to-int32"])
def test_deletion_costs(busy: dict[str, int], costs: dict[str, int]) -> None:
    assert decision.deletion_costs(["a", "b"], busy) == costs


MODEL_DOWN_CASES = [
    # (name, metrics, history, replicas, reason): the backlog waits for the model, not for pods.
    ("down-holds-scale-out", Metrics(500, 5), history(2), 2, Reason.MODEL_DOWN),
    ("down-wakes-one-to-probe", Metrics(500, 0), history(0), 1, Reason.MODEL_DOWN),
    ("down-still-scales-down", Metrics(0, 0), history(4), 1, Reason.SCALE_DOWN),
    ("down-steady", Metrics(64, 0), history(2), 2, Reason.STEADY),
]


@pytest.mark.parametrize(("metrics", "the_history", "replicas", "reason"),
                         [c[1:] for c in MODEL_DOWN_CASES], ids=[c[0] for c in MODEL_DOWN_CASES])
def test_a_down_model_holds_scale_out(metrics: Metrics, the_history: History, replicas: int,
                                      reason: Reason) -> None:
    got = decision.decide(metrics, spec(), the_history, {}, model_down=True)
    assert (got.replicas, got.reason) == (replicas, reason), got.message
    if reason is Reason.MODEL_DOWN:
        assert "the model is down" in got.message
        # The same poll with the model up scales out.
        assert decision.decide(metrics, spec(), the_history, {}).replicas > replicas
# --- rule 8: the rate budget's cap ---------------------------------------------------------

@pytest.mark.parametrize(("visible", "current", "cap", "replicas", "reason"), [
    (320, 2, None, 10, decision.Reason.SCALE_UP),        # no budget known: queue depth alone
    (320, 2, 20, 10, decision.Reason.SCALE_UP),          # a cap above the demand changes nothing
    (320, 2, 3, 3, decision.Reason.RATE_LIMITED),        # 10 wanted, the budget keeps 3 busy
    (320, 6, 3, 3, decision.Reason.RATE_LIMITED),        # already above the cap: back down to it
    (320, 3, 3, 3, decision.Reason.RATE_LIMITED),        # at the cap: held there, said so
    (32, 1, 3, 1, decision.Reason.STEADY),               # the demand is below the cap
    (320, 0, 2, 2, decision.Reason.RATE_LIMITED),        # waking from zero, capped too
    (320, 2, 0, 1, decision.Reason.RATE_LIMITED),        # cap 0 never goes below minReplicas 1
])
def test_budget_cap(visible: int, current: int, cap: int | None, replicas: int,
                    reason: decision.Reason) -> None:
    spec = decision.Spec(min_replicas=1 if cap == 0 else 0, max_replicas=10,
                         messages_per_replica=32)
    history = decision.History(now=100.0, current_replicas=current, last_active_at=100.0,
                               recommendations=((100.0, current),))
    made = decision.decide(decision.Metrics(visible, 0), spec, history, {}, budget_cap=cap)
    assert (made.replicas, made.reason) == (replicas, reason), made.message
    if reason is decision.Reason.RATE_LIMITED:
        assert made.budget_cap == max(spec.min_replicas, cap or 0)
        assert "rate budget" in made.message

"""chatq.fair's pure decisions: the window's size, who gets the freed slots, live workers."""

from __future__ import annotations

import pytest
from chatq import fair


@pytest.mark.parametrize(("slots", "spare", "window"), [
    (0, 8, 8),        # no worker reports: the spare alone (a lone question still goes direct)
    (4, 2, 6),        # few slots: the spare
    (16, 2, 20),      # a quarter of the slots when that is more
    (256, 8, 320),
    (-3, 8, 8),       # nonsense in, no negative window out
])
def test_window_is_the_slots_and_some_spare(slots: int, spare: int, window: int) -> None:
    assert fair.window_size(slots, spare) == window


@pytest.mark.parametrize(("free", "held", "in_flight", "want"), [
    # Nothing free, nothing given.
    (0, {"a": 5}, {}, {}),
    # Nothing held, nothing given, whatever is free.
    (5, {}, {"a": 3}, {}),
    # One key: all the room, up to what it holds.
    (5, {"a": 3}, {}, {"a": 3}),
    # Two keys, a 10:1 backlog, equal in flight: equal shares of the room.
    (4, {"a": 100, "b": 10}, {"a": 2, "b": 2}, {"a": 2, "b": 2}),
    # The key with more in flight waits until the other catches up.
    (3, {"a": 100, "b": 10}, {"a": 6, "b": 2}, {"b": 3}),
    (6, {"a": 100, "b": 10}, {"a": 6, "b": 2}, {"a": 1, "b": 5}),
    # A newcomer (nothing in flight) is served first.
    (1, {"a": 100, "c": 1}, {"a": 4}, {"c": 1}),
    # A key that runs out leaves the rest to the others.
    (5, {"a": 100, "b": 1}, {}, {"a": 4, "b": 1}),
    # Three keys, equal in flight: the room split round-robin.
    (6, {"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 1, "c": 1}, {"a": 2, "b": 2, "c": 2}),
    # In-flight counts of keys with nothing held do not matter.
    (2, {"a": 5}, {"z": 50}, {"a": 2}),
])
def test_release_order_fills_the_least_served_key_first(
        free: int, held: dict[str, int], in_flight: dict[str, int], want: dict[str, int]) -> None:
    assert fair.release_order(free, held, in_flight) == want


def test_release_order_converges_on_equal_service_for_a_ten_to_one_backlog() -> None:
    """Simulated: a window of 8; each tick the oldest released job finishes (FIFO, as the
    queue serves them) and the freed slot is released again. Service per key while both
    have backlog comes out equal, whatever the start."""
    held = {"a": 1000, "b": 100}
    running: list[str] = ["a"] * 8  # the window was filled by A before B arrived
    served = {"a": 0, "b": 0}
    while held["b"] > 0:
        done = running.pop(0)
        served[done] += 1
        in_flight = {k: running.count(k) for k in held}
        for owner, n in fair.release_order(1, held, in_flight).items():
            held[owner] -= n
            running += [owner] * n
    assert served["a"] - served["b"] <= 8 + 1, served  # only the start's head start


def test_live_slots_counts_current_reports_and_names_expired_ones() -> None:
    capacity = {"w1": "32 1000", "w2": "8 1200", "w3": "16 900", "bad": "x"}
    slots, expired = fair.live_slots(capacity, now=1000.0)
    assert slots == 40
    assert sorted(expired) == ["bad", "w3"]

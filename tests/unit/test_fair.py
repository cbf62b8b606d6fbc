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


@pytest.mark.parametrize(("free", "held", "released", "in_flight", "want"), [
    # Nothing free, nothing given.
    (0, {"a": 5}, {}, {}, []),
    # Nothing held, nothing given, whatever is free.
    (5, {}, {"a": 3}, {"a": 3}, []),
    # One key: all the room, up to what it holds.
    (5, {"a": 3}, {}, {}, ["a", "a", "a"]),
    # Two keys, a 10:1 backlog, level: the room alternates between them.
    (4, {"a": 100, "b": 10}, {"a": 7, "b": 7}, {}, ["a", "b", "a", "b"]),
    # The key released to more waits until the other catches up, whatever is in flight.
    (3, {"a": 100, "b": 10}, {"a": 9, "b": 6}, {"a": 0, "b": 6}, ["b", "b", "b"]),
    (5, {"a": 100, "b": 10}, {"a": 9, "b": 7}, {}, ["b", "b", "a", "b", "a"]),
    # Level in releases: the one with fewer in flight first.
    (2, {"a": 100, "b": 10}, {"a": 4, "b": 4}, {"a": 3, "b": 1}, ["b", "a"]),
    # A newcomer starts level with the least served, and nothing in flight: first.
    (2, {"a": 100, "b": 50, "c": 1}, {"a": 40, "b": 30}, {"a": 4, "b": 4}, ["c", "b"]),
    # A newcomer catches up on what the others already have in flight (they will be served
    # those while it waits): b gets the first 3 slots, then they alternate.
    (5, {"a": 100, "b": 50}, {"a": 40}, {"a": 3}, ["b", "b", "b", "a", "b"]),
    # Backlogs that begin together weigh what each already had in the window: 36:4 in
    # flight from the 10:1 arrival, so b gets the next 32 slots.
    (33, {"a": 1000, "b": 100}, {}, {"a": 36, "b": 4}, ["b"] * 32 + ["a"]),
    # A key that runs out leaves the rest to the others.
    (5, {"a": 100, "b": 1}, {}, {}, ["a", "b", "a", "a", "a"]),
    # Three keys, level: round-robin.
    (6, {"a": 9, "b": 9, "c": 9}, {}, {}, ["a", "b", "c", "a", "b", "c"]),
    # Counts of keys with nothing held do not matter (nor set the floor).
    (2, {"a": 5}, {"z": 50}, {"z": 50}, ["a", "a"]),
])
def test_release_order_is_a_round_robin_by_jobs_released(
        free: int, held: dict[str, int], released: dict[str, int], in_flight: dict[str, int],
        want: list[str]) -> None:
    assert fair.release_order(free, held, released, in_flight) == want


def test_release_order_serves_a_ten_to_one_backlog_equally_when_one_key_waits_longer() -> None:
    """Simulated: a window of 6, each tick the oldest released job finishes (FIFO), and
    within each round A's jobs are queued first (as a key that always wins the send order
    would be). Service while both have backlog stays level: releases, not what is in
    flight, decide."""
    held = {"a": 1000, "b": 100}
    released: dict[str, int] = {}
    queue: list[str] = ["a"] * 6  # the window was filled by A before B arrived
    released = fair.level_start(held, released, {"a": 6})  # as the releaser seeds it
    served = {"a": 0, "b": 0}
    while held["b"] > 0:
        for _ in range(2):
            served[queue.pop(0)] += 1
        in_flight = {k: queue.count(k) for k in held}
        released = fair.level_start(held, released, in_flight)
        order = fair.release_order(2, held, released, in_flight)
        for owner in sorted(order):  # A first within the round
            held[owner] -= 1
            released[owner] += 1
            queue.append(owner)
    # Level, A's six jobs in the window before B came included (they were 6 ahead before
    # level_start weighed them).
    assert abs(served["a"] - served["b"]) <= 1, served


def test_live_slots_counts_current_reports_and_names_expired_ones() -> None:
    capacity = {"w1": "32 1000", "w2": "8 1200", "w3": "16 900", "bad": "x"}
    slots, expired = fair.live_slots(capacity, now=1000.0)
    assert slots == 40
    assert sorted(expired) == ["bad", "w3"]

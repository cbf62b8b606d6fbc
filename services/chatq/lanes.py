"""How a worker shares its slots between the interactive lane and the batch lane.

Pure functions, table-tested. Interactive questions and batch lines are the same kind of
job on two queues of the same backend; a worker keeps `reserve` of its slots for
interactive work, so a question never waits behind batch lines for a slot, and takes batch
lines only into the room beyond that.
"""

from __future__ import annotations

# How long an empty batch lane is left alone before a worker asks it again, in seconds.
BATCH_IDLE_SECONDS = 1.0
# How long an interactive receive must have waited (so no question is queued: a receive
# returns at once when one is) before batch lines may take the room it leaves, in seconds.
QUIET_SECONDS = 0.02


def interactive_take(room: int, batch_size: int, reserve: int, batch_flowing: bool) -> int:
    """How many messages the next interactive receive asks for (room > 0).

    While batch lines flow, a long-polling interactive receive holds the slots it asked for,
    so it asks for no more than the reserve (at least one); otherwise for all the room.
    """
    take = min(room, batch_size)
    if batch_flowing:
        take = min(take, max(1, reserve))
    return max(1, take)


def batch_take(room: int, concurrency: int, batch_in_flight: int, reserve: int,
               batch_size: int) -> int:
    """How many batch lines to take now: the free room, minus what the reserve keeps for
    interactive work, never more batch lines in flight than `concurrency - reserve`."""
    spare = min(room, concurrency - reserve - batch_in_flight)
    return max(0, min(spare, batch_size))

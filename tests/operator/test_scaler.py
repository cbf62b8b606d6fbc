"""One poll of a QueueScaler, with an in-memory Kubernetes and queue: the order of the calls,
the status, the Events and the conditions (the decision itself has its own tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from chatq_operator import decision, kube, scaler, sources


class FakeKube(kube.Kube):
    """A Deployment and its pods, in memory; every call is logged in order."""

    def __init__(self, replicas: int | None, pods: Iterable[str] = ()) -> None:
        super().__init__(api=None)
        self.replicas = replicas
        self.costs: dict[str, int | None] = dict.fromkeys(pods)
        self.calls: list[tuple[Any, ...]] = []
        self.status: dict[str, Any] = {}

    async def scale(self, namespace: str, deployment: str) -> kube.Scale | None:
        if self.replicas is None:
            return None
        return kube.Scale(self.replicas, self.replicas, "app=worker")

    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        self.calls.append(("scale", replicas))
        self.replicas = replicas

    async def pods(self, namespace: str, selector: str) -> list[kube.Pod]:
        return [kube.Pod(name, cost) for name, cost in self.costs.items()]

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        self.calls.append(("cost", pod, cost))
        self.costs[pod] = cost

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.calls.append(("status",))
        self.status.update(status)


class FakeSources(sources.Sources):
    """Queue depth and busy counts set by the test; None raises SourceError."""

    def __init__(self) -> None:
        super().__init__()
        self.depth: decision.Metrics | None = decision.Metrics(0, 0)
        self.busy_counts: dict[str, int] | None = {}
        self.held_count: int | None = 0

    async def metrics(self, queue: sources.QueueRef, max_age: float) -> decision.Metrics:
        self.reads[queue] += 1
        if self.depth is None:
            raise sources.SourceError("queue down")
        return self.depth

    async def busy(self, redis_url: str, pods: Iterable[str]) -> dict[str, int]:
        if self.busy_counts is None:
            raise sources.SourceError("redis down")
        return {p: n for p, n in self.busy_counts.items() if p in set(pods)}

    async def held(self, redis_url: str) -> int:
        if self.held_count is None:
            raise sources.SourceError("redis down")
        return self.held_count


# One lane: FakeSources gives every queue the same depth (the batch lane has its own test).
SPEC = {"targetRef": {"name": "worker"}, "queue": {"redis": {"url": "redis://r:6379/0"}},
        "lanes": "interactive",
        "maxReplicas": 10, "messagesPerReplica": 4, "pollSeconds": 1, "scaleDownStabilizationSeconds": 0,
        "idleSecondsBeforeZero": 100, "fallbackReplicas": 2, "errorsBeforeFallback": 2}


@dataclasses.dataclass
class Rig:
    api: FakeKube
    readers: FakeSources
    events: list[tuple[str, str, str]]
    polls: scaler.Scaler
    clock: list[float]

    async def poll(self, spec: Mapping[str, Any] = SPEC, owner: str | None = None, advance: float = 1.0
                   ) -> float:
        self.clock[0] += advance
        return await self.polls.poll(spec, self.api.status, lambda _: owner)

    def condition(self, kind: str) -> dict[str, str]:
        return next(c for c in self.api.status["conditions"] if c["type"] == kind)


def rig(replicas: int | None, pods: Iterable[str] = ()) -> Rig:
    api, readers, events, clock = FakeKube(replicas, pods), FakeSources(), [], [1000.0]
    polls = scaler.Scaler("ns", "qs", api, readers, lambda *e: events.append(e), clock=lambda: clock[0])
    return Rig(api, readers, events, polls, clock)


async def test_scale_up_patches_status_and_posts_an_event() -> None:
    r = rig(1, ["w-a"])
    r.readers.depth = decision.Metrics(30, 6)
    assert await r.poll() == 1.0
    assert r.api.calls == [("scale", 9), ("status",)]
    assert r.events == [("Normal", "ScaleUp", r.events[0][2])]
    assert "1 -> 9 replicas" in r.events[0][2]
    status = r.api.status
    assert (status["visible"], status["inFlight"], status["desiredReplicas"]) == (30, 6, 9)
    assert status["lastScaleTime"].endswith("Z")
    assert r.condition("Ready")["status"] == "True"
    assert r.condition("Active")["status"] == "True"
    assert r.condition("Fallback")["status"] == "False"


async def test_jobs_the_fair_window_holds_count_as_waiting() -> None:
    """chatq.fair keeps a backlog beyond the window in Redis: the scaler counts it as
    visible, or it would only ever want the replicas the window (the current slots) needs."""
    r = rig(2, ["w-a", "w-b"])
    r.readers.depth = decision.Metrics(2, 8)  # the window: 8 running, 2 waiting on the queue
    r.readers.held_count = 30
    await r.poll()
    assert (r.api.status["visible"], r.api.replicas) == (32, 10)
    r.readers.held_count = None  # unreadable: the queue's own depth decides, as before
    r.readers.depth = decision.Metrics(2, 8)
    await r.poll()
    assert r.api.status["visible"] == 2


async def test_costs_are_written_before_replicas_go_down() -> None:
    r = rig(3, ["w-a", "w-b", "w-c"])
    r.readers.depth = decision.Metrics(0, 2)
    r.readers.busy_counts = {"w-b": 2, "gone-pod": 5}
    await r.poll()
    assert sorted(r.api.calls[:3]) == [("cost", "w-a", 0), ("cost", "w-b", 2), ("cost", "w-c", 0)]
    assert r.api.calls[3:] == [("scale", 1), ("status",)]
    r.api.calls.clear()
    r.api.replicas = 3  # someone scaled up again: unchanged costs are not written twice
    await r.poll()
    assert r.api.calls[0] == ("scale", 1)
    assert not [c for c in r.api.calls if c[0] == "cost"]


async def test_nothing_is_patched_when_nothing_changed() -> None:
    r = rig(2)
    r.readers.depth = decision.Metrics(8, 0)
    await r.poll()
    assert r.api.calls == [("status",)]
    r.api.calls.clear()
    await r.poll()
    assert r.api.calls == []


async def test_source_errors_hold_then_fall_back_with_a_condition() -> None:
    r = rig(5)
    r.readers.depth = decision.Metrics(20, 0)
    await r.poll()
    r.readers.depth = None
    await r.poll()
    assert r.api.replicas == 5
    assert (r.condition("Ready")["reason"], r.condition("Fallback")["status"]) == ("SourceError", "False")
    assert r.events[-1][:2] == ("Warning", "SourceError")
    await r.poll()
    assert r.api.replicas == 2
    assert r.condition("Fallback") | {"lastTransitionTime": ""} == {
        "type": "Fallback", "status": "True", "reason": "FallbackReplicas", "lastTransitionTime": "",
        "message": r.condition("Fallback")["message"]}
    assert "fallbackReplicas 2" in r.condition("Fallback")["message"]
    assert r.events[-1][:2] == ("Warning", "Fallback")
    assert r.api.status["visible"] == 20  # the last known numbers stay
    r.readers.depth = decision.Metrics(20, 0)
    await r.poll()
    assert r.api.replicas == 5
    assert (r.condition("Ready")["status"], r.condition("Fallback")["status"]) == ("True", "False")


async def test_busy_counts_unreadable_hold_scale_down() -> None:
    r = rig(4, ["w-a", "w-b", "w-c", "w-d"])
    r.readers.depth = decision.Metrics(0, 3)
    r.readers.busy_counts = None
    await r.poll()
    assert r.api.replicas == 4
    assert r.condition("Ready")["reason"] == "BusyCountsUnknown"


async def test_missing_deployment_and_conflict_are_conditions() -> None:
    r = rig(None)
    assert await r.poll() == 1.0
    assert r.condition("Ready") | {"lastTransitionTime": ""} == {
        "type": "Ready", "status": "False", "reason": "TargetNotFound", "lastTransitionTime": "",
        "message": "Deployment worker does not exist in ns"}
    assert r.events == [("Warning", "TargetNotFound", "Deployment worker does not exist in ns")]
    await r.poll()
    assert len(r.events) == 1  # one Event when the condition turns, not one per poll
    r.api.replicas = 1
    r.readers.depth = decision.Metrics(100, 0)
    await r.poll(owner="older-scaler")
    assert r.api.replicas == 1
    assert r.condition("Ready")["reason"] == "TargetConflict"
    assert "older-scaler" in r.condition("Ready")["message"]
    await r.poll(owner="qs")
    assert r.api.replicas == 10


async def test_invalid_spec_is_a_condition() -> None:
    r = rig(1)
    await r.poll({"targetRef": {"name": "w"}, "queue": {}})
    assert r.condition("Ready")["reason"] == "InvalidSpec"
    assert r.api.calls == [("status",)]


@pytest.mark.parametrize("edit", [{"maxReplicas": 3}, {"messagesPerReplica": 100}])
async def test_spec_edits_take_effect_at_the_next_poll(edit: dict[str, Any]) -> None:
    r = rig(1)
    r.readers.depth = decision.Metrics(40, 0)
    await r.poll()
    assert r.api.replicas == 10
    await r.poll({**SPEC, **edit})
    assert r.api.replicas in (1, 3)


async def test_a_new_target_starts_a_new_history() -> None:
    r = rig(4)
    r.readers.depth = decision.Metrics(16, 0)
    await r.poll({**SPEC, "scaleDownStabilizationSeconds": 300})
    assert r.polls.history is not None and r.polls.target == "worker"
    await r.poll({**SPEC, "scaleDownStabilizationSeconds": 300, "targetRef": {"name": "other"}})
    assert r.polls.target == "other"
    assert r.polls.history is not None
    assert {t for t, _ in r.polls.history.recommendations} == {r.clock[0]}  # nothing from the old target


class LaneSources(FakeSources):
    """A depth per queue (the interactive one and its batch lane)."""

    def __init__(self, depths: dict[str, decision.Metrics]) -> None:
        super().__init__()
        self.depths = depths

    async def metrics(self, queue: sources.QueueRef, max_age: float) -> decision.Metrics:
        assert isinstance(queue, sources.RedisQueueRef)
        if queue.stream not in self.depths:
            raise sources.SourceError("no such stream")
        return self.depths[queue.stream]


@pytest.mark.parametrize(("lanes", "depths", "desired"), [
    ("all", {"chatq-jobs": decision.Metrics(4, 0), "chatq-jobs-batch": decision.Metrics(20, 4)}, 7),
    ("interactive", {"chatq-jobs": decision.Metrics(4, 0), "chatq-jobs-batch": decision.Metrics(20, 4)}, 1),
    ("all", {"chatq-jobs": decision.Metrics(8, 0)}, 2),  # no batch lane yet: the queue alone
])
async def test_the_batch_lane_counts_unless_told_otherwise(
        lanes: str, depths: dict[str, decision.Metrics], desired: int) -> None:
    r = rig(1)
    r.readers = LaneSources(depths)
    r.polls = scaler.Scaler("ns", "qs", r.api, r.readers, lambda *e: None, clock=lambda: r.clock[0])
    await r.poll({**SPEC, "lanes": lanes, "queue": {"redis": {"url": "redis://r:6379/0"}}})
    assert r.api.status["desiredReplicas"] == desired
async def test_the_rate_budget_caps_the_replicas(redis_server: Any) -> None:
    """A real Redis holds the workers' budget: 60 RPM and calls of 8 s keep 8 calls, two
    pods of 4, busy; 320 waiting messages would want all 10."""
    import redis.asyncio as aioredis
    from chatq import budget

    client = aioredis.from_url(redis_server.url, decode_responses=True)
    r = rig(1)
    try:
        shared = budget.Budget(client, "ep1", rpm=60, tpm=None)
        assert (await shared.take(100)).granted
        await shared.settle(budget.Outcome(reserved=100, used=40, model_seconds=8.0))
        r.readers.depth = decision.Metrics(320, 0)
        spec = {**SPEC, "budget": {"redisUrl": redis_server.url}}
        await r.poll(spec)
        assert r.api.replicas == 2
        assert r.events == [("Normal", "RateLimited", r.events[0][2])]
        assert "rate budget keeps only 2 busy" in r.events[0][2]
        limited = r.condition("RateLimited")
        assert (limited["status"], limited["reason"]) == ("True", "BudgetCap")
        # Held at the cap: no second Event while it still applies.
        await r.poll(spec)
        assert r.api.replicas == 2 and len(r.events) == 1
        # Without spec.budget the queue depth alone decides.
        await r.poll(SPEC)
        assert r.api.replicas == 10
        assert r.condition("RateLimited")["status"] == "False"
    finally:
        await r.readers.close()
        await client.aclose()

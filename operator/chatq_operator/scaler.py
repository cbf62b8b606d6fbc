"""One QueueScaler's poll: read the queue and the target, decide, act, report.

The order within a poll matters for busy-aware scale-in: the pods' deletion costs are
written from the busy counts *before* the replicas are lowered, so the ReplicaSet
controller removes idle pods and keeps those in the middle of long jobs.

Nothing here knows kopf: the handlers pass in the spec, the status, who owns the target,
and a function that posts Events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from chatq_operator import config, decision, kube, metrics, sources, status

log = logging.getLogger(__name__)

#: post(type, reason, message): a Kubernetes Event on the QueueScaler.
EventFn = Callable[[str, str, str], None]
#: owner_of(deployment): the QueueScaler that scales it (the oldest of those that name it).
OwnerFn = Callable[[str], str | None]


class Scaler:
    """The polls of one QueueScaler and what they remember (the decision's history)."""

    def __init__(self, namespace: str, name: str, api: kube.Kube, readers: sources.Sources,
                 post: EventFn, default_busy_redis_url: str = "", default_redis_url: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.namespace, self.name = namespace, name
        self.api, self.readers, self.post = api, readers, post
        self.default_busy_redis_url = default_busy_redis_url
        self.default_redis_url = default_redis_url
        self.clock = clock
        self.history: decision.History | None = None
        self.target = ""

    async def poll(self, spec: Mapping[str, Any], current: Mapping[str, Any], owner_of: OwnerFn,
                   generation: int = 0) -> float:
        """One poll; returns the seconds until the next one."""
        started = self.clock()
        try:
            cfg = config.parse(spec, self.default_busy_redis_url, self.default_redis_url)
        except config.InvalidSpec as exc:
            await self._report(current, {}, [status.Condition("Ready", False, "InvalidSpec", str(exc))])
            return config.DEFAULT_POLL_SECONDS
        if cfg.target != self.target:  # a new target: what was learnt about the old one is moot
            self.target, self.history = cfg.target, None
        owner = owner_of(cfg.target)
        if owner is not None and owner != self.name:
            await self._report(current, {}, [status.Condition(
                "Ready", False, "TargetConflict",
                f"Deployment {cfg.target} is already scaled by QueueScaler {owner}; this one does nothing")])
            return cfg.poll_seconds
        scale = await self.api.scale(self.namespace, cfg.target)
        if scale is None:
            self.history = None
            await self._report(current, {}, [status.Condition(
                "Ready", False, "TargetNotFound",
                f"Deployment {cfg.target} does not exist in {self.namespace}")])
            return cfg.poll_seconds
        await self._poll_target(cfg, scale, current, generation)
        metrics.POLL_SECONDS.labels(self.namespace, self.name).observe(self.clock() - started)
        return cfg.poll_seconds

    async def _poll_target(self, cfg: config.ScalerConfig, scale: kube.Scale, current: Mapping[str, Any],
                           generation: int) -> None:
        depth = await self._read(cfg)
        pods = await self.api.pods(self.namespace, scale.selector)
        busy = await self._busy(cfg, [p.name for p in pods])
        now = self.clock()
        history = (self.history.at(now, scale.replicas) if self.history is not None else
                   decision.History(now, scale.replicas, recommendations=((now, scale.replicas),)))
        cap = await self._budget_cap(cfg)
        made = decision.decide(depth, cfg.rules, history, busy, await self._model_down(cfg), cap)
        self.history = made.history
        if made.replicas < scale.replicas:
            await self._protect_busy(pods, busy or {})
        wanted: dict[str, Any] = {"desiredReplicas": made.replicas, "currentReplicas": scale.running,
                                  "reason": str(made.reason), "message": made.message,
                                  "observedGeneration": generation}
        limited = made.reason is decision.Reason.RATE_LIMITED
        was_limited = any(c.get("type") == "RateLimited" and c.get("status") == "True"
                          for c in current.get("conditions") or ())
        if limited and not was_limited and not made.changes:
            self.post("Normal", str(made.reason), f"Deployment {cfg.target}: {made.message}")
        if made.changes:
            log.info("QueueScaler %s/%s: %s %d -> %d (%s)", self.namespace, self.name, cfg.target,
                     scale.replicas, made.replicas, made.message)
            await self.api.set_replicas(self.namespace, cfg.target, made.replicas)
            direction = "up" if made.replicas > scale.replicas else "down"
            metrics.SCALINGS.labels(self.namespace, self.name, direction).inc()
            self.post("Warning" if made.fallback else "Normal", str(made.reason),
                      f"Deployment {cfg.target}: {scale.replicas} -> {made.replicas} replicas: "
                      f"{made.message}")
            wanted["lastScaleTime"] = status.now_iso()
        if depth is not None:
            wanted.update(visible=depth.visible, inFlight=depth.in_flight)
            metrics.VISIBLE.labels(self.namespace, self.name).set(depth.visible)
            metrics.IN_FLIGHT.labels(self.namespace, self.name).set(depth.in_flight)
        metrics.DESIRED.labels(self.namespace, self.name).set(made.replicas)
        metrics.CURRENT.labels(self.namespace, self.name).set(scale.running)
        busy_pods = sum(1 for n in (busy or {}).values() if n > 0)
        metrics.BUSY_PODS.labels(self.namespace, self.name).set(busy_pods)
        conditions = _conditions(made, depth)
        if depth is not None:
            conditions.append(status.Condition(
                "RateLimited", limited, "BudgetCap" if limited else "WithinBudget",
                made.message if limited else "the rate budget allows the replicas wanted"))
        await self._report(current, wanted, conditions)

    async def _read(self, cfg: config.ScalerConfig) -> decision.Metrics | None:
        main = await self._read_one(cfg, cfg.queue)
        if main is not None and cfg.busy_redis_url:
            main = dataclasses.replace(main, visible=main.visible + await self._held(cfg))
        if main is None or cfg.batch_queue is None:
            return main
        batch = await self._read_one(cfg, cfg.batch_queue)
        return decision.Metrics.combined(main, batch) if batch is not None else main

    async def _read_one(self, cfg: config.ScalerConfig, queue: sources.QueueRef
                        ) -> decision.Metrics | None:
        reads = self.readers.reads[queue]
        try:
            # Shared with every QueueScaler of this queue: one read per (shortest) poll.
            return await self.readers.metrics(queue, max_age=cfg.poll_seconds * 0.9)
        except sources.SourceError as exc:
            log.warning("QueueScaler %s/%s: %s", self.namespace, self.name, exc)
            if queue is cfg.batch_queue:
                return None  # no batch lane yet (no batch ever ran): the interactive count stands
            metrics.SOURCE_ERRORS.labels(self.namespace, self.name).inc()
            return None
        finally:
            if self.readers.reads[queue] > reads:
                metrics.QUEUE_READS.labels(str(queue)).inc()

    async def _held(self, cfg: config.ScalerConfig) -> int:
        """Jobs the fair window holds back (waiting, not yet on the queue); unreadable: 0."""
        try:
            return await self.readers.held(cfg.busy_redis_url)
        except sources.SourceError as exc:
            log.debug("QueueScaler %s/%s: %s", self.namespace, self.name, exc)
            return 0

    async def _model_down(self, cfg: config.ScalerConfig) -> bool:
        """The model's health from the workers' Redis; unreadable counts as up (no hold)."""
        try:
            return await self.readers.model_down(cfg.busy_redis_url)
        except sources.SourceError as exc:
            log.debug("QueueScaler %s/%s: %s", self.namespace, self.name, exc)
            return False

    async def _budget_cap(self, cfg: config.ScalerConfig) -> int | None:
        """Replicas the rate budget keeps busy; None without a budget (or unreadable: the
        queue depth alone decides, as before the budget existed)."""
        if not cfg.budget_redis_url:
            return None
        try:
            return await self.readers.budget_cap(cfg.budget_redis_url, cfg.budget_endpoint,
                                                 cfg.rules.messages_per_replica)
        except sources.SourceError as exc:
            log.warning("QueueScaler %s/%s: %s", self.namespace, self.name, exc)
            metrics.SOURCE_ERRORS.labels(self.namespace, self.name).inc()
            return None

    async def _busy(self, cfg: config.ScalerConfig, pods: list[str]) -> dict[str, int] | None:
        """Busy counts of the live pods; {} when none are reported, None when unreadable."""
        if not cfg.busy_redis_url:
            return {}
        try:
            return await self.readers.busy(cfg.busy_redis_url, pods)
        except sources.SourceError as exc:
            log.warning("QueueScaler %s/%s: %s", self.namespace, self.name, exc)
            metrics.SOURCE_ERRORS.labels(self.namespace, self.name).inc()
            return None

    async def _protect_busy(self, pods: list[kube.Pod], busy: Mapping[str, int]) -> None:
        """Write each pod's deletion cost (its in-flight jobs) where it differs."""
        costs = decision.deletion_costs([p.name for p in pods], busy)
        stale = [p.name for p in pods if p.deletion_cost != costs[p.name]]
        await asyncio.gather(*(self.api.set_deletion_cost(self.namespace, pod, costs[pod]) for pod in stale))

    async def _report(self, current: Mapping[str, Any], wanted: dict[str, Any],
                      conditions: list[status.Condition]) -> None:
        """Patch the status where it changed; post an Event when Ready turns False."""
        merged = status.merge(current.get("conditions"), conditions, status.now_iso())
        wanted["conditions"] = merged
        patch = status.changed(current, wanted)
        if not patch:
            return
        was = {c.get("type"): c for c in current.get("conditions") or ()}.get("Ready", {})
        ready = next(c for c in merged if c["type"] == "Ready")
        turned = (was.get("status"), was.get("reason")) != ("False", ready["reason"])
        if ready["status"] == "False" and turned:
            self.post("Warning", ready["reason"], ready["message"])
        await self.api.patch_status(self.namespace, self.name, patch)


def _conditions(made: decision.Decision, depth: decision.Metrics | None) -> list[status.Condition]:
    if depth is None:
        return [status.Condition("Ready", False, "SourceError", made.message),
                status.Condition("Fallback", made.fallback,
                                 "FallbackReplicas" if made.fallback else "Holding", made.message)]
    waiting = depth.visible + depth.in_flight
    unknown = made.reason is decision.Reason.BUSY_UNKNOWN
    return [
        status.Condition("Ready", True, "BusyCountsUnknown" if unknown else "Scaling", made.message),
        status.Condition("Active", waiting > 0, "MessagesWaiting" if waiting else "Idle",
                         f"{depth.visible} visible, {depth.in_flight} in flight"),
        status.Condition("Fallback", False, "SourceReadable", "the queue answers"),
    ]

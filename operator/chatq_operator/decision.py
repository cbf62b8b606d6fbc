"""The scaling decision: one pure function from what was observed to the replicas wanted.

`decide(metrics, spec, history, busy)` knows no Kubernetes and no clock of its own: the
handlers read the queue, the Deployment's scale and the workers' busy counts, call it, and
carry `Decision.history` over to the next poll. The rules, in the order they apply:

1. A failed queue read holds the replicas; after `errors_before_fallback` failures in a row
   it uses `fallback_replicas` (when set).
2. Replicas outside [min, max] are brought back at once (a spec edit takes effect at once).
3. At zero, the Deployment wakes as soon as the counted messages pass `activation_messages`.
4. Demand is `ceil(counted / messages_per_replica)`, where counted is visible plus in-flight
   messages; it never goes below what the in-flight messages and the busy pods need.
5. Up: at once, at most `max(max_scale_up_step, current)` pods more per poll.
6. Down: to the highest demand seen within the stabilization window (as the HPA does),
   keeping one warm pod until the queue has been idle (nothing visible, in flight, busy or
   newly added) for `idle_seconds_before_zero`; then straight to zero.
7. Busy counts that could not be read hold any scale-down while messages are in flight.
8. While the model is down (the workers' shared circuit breaker, `model_down`), no scale-out:
   the backlog waits for the model, not for pods; one pod may still wake from zero, to probe.
9. The model's rate budget caps it all: never more replicas than the budget can keep busy
   (`budget_cap`, see chatq.budget.operator_cap); when the cap is what limits, the reason
   is `RateLimited`. Scaling out into a 429 storm is not possible.

`deletion_costs` is the other pure choice: which pods the ReplicaSet should remove first.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping

#: The largest value of controller.kubernetes.io/pod-deletion-cost (an int32).
MAX_DELETION_COST = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Metrics:
    """One read of a queue."""

    visible: int
    """Messages waiting to be received (SQS ApproximateNumberOfMessages, a group's lag)."""
    in_flight: int
    """Messages received but not yet deleted or acknowledged (NotVisible, a group's pending)."""
    added_total: int | None = None
    """A counter of messages ever added (a stream's entries-added), so that messages taken
    and finished between two polls still count as activity; None where the source has none."""

    @staticmethod
    def combined(a: Metrics, b: Metrics) -> Metrics:
        """Two queues (the interactive and the batch lane) counted as one."""
        added = (None if a.added_total is None or b.added_total is None
                 else a.added_total + b.added_total)
        return Metrics(a.visible + b.visible, a.in_flight + b.in_flight, added)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The scaling part of a QueueScaler's spec, with the CRD's defaults."""

    min_replicas: int = 0
    max_replicas: int = 10
    messages_per_replica: int = 32
    """Messages one pod works on at once: the worker's concurrency (CHATQ_WORKER_CONCURRENCY)."""
    activation_messages: int = 0
    """At zero replicas, wake only when more than this many messages are counted."""
    include_in_flight: bool = True
    """Count in-flight messages as demand (they always count as a floor for scale-down)."""
    scale_down_stabilization_seconds: float = 60.0
    """Scale down to the highest demand seen within this many seconds."""
    idle_seconds_before_zero: float = 300.0
    """Seconds without any activity before the last pod goes (when min_replicas is 0)."""
    fallback_replicas: int | None = None
    """Replicas to run while the queue cannot be read; None holds the current replicas."""
    errors_before_fallback: int = 3
    """Failed reads in a row before fallback_replicas applies."""
    max_scale_up_step: int = 10
    """Pods added per poll at most (or the current replicas, when more: doubling is allowed)."""


@dataclasses.dataclass(frozen=True)
class History:
    """What the decision remembers between polls, plus the time and replicas of this poll."""

    now: float
    """This poll's time in seconds (any monotonic clock; only differences matter)."""
    current_replicas: int
    """The Deployment's replicas (its scale subresource's spec.replicas) at this poll."""
    last_active_at: float | None = None
    """When activity was last seen; None before the first poll (counts as now)."""
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, demand) of the polls within the stabilization window."""
    source_errors: int = 0
    """Failed queue reads in a row."""
    added_total: int | None = None
    """The source's added-messages counter at the last successful read."""

    def at(self, now: float, current_replicas: int) -> History:
        """This history, moved on to the next poll."""
        return dataclasses.replace(self, now=now, current_replicas=current_replicas)


class Reason(enum.StrEnum):
    """Why the decision came out as it did; also the reason of the Event and condition."""

    STEADY = "Steady"
    SCALE_UP = "ScaleUp"
    SCALE_UP_LIMITED = "ScaleUpLimited"
    WAKE_FROM_ZERO = "WakeFromZero"
    BELOW_ACTIVATION = "BelowActivation"
    STABILIZING = "Stabilizing"
    SCALE_DOWN = "ScaleDown"
    KEEP_WARM = "KeepWarm"
    SCALE_TO_ZERO = "ScaleToZero"
    CLAMPED_TO_MIN = "ClampedToMin"
    CLAMPED_TO_MAX = "ClampedToMax"
    BUSY_UNKNOWN = "BusyCountsUnknown"
    SOURCE_ERROR_HOLD = "SourceErrorHold"
    FALLBACK = "Fallback"
    MODEL_DOWN = "ModelDown"
    RATE_LIMITED = "RateLimited"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The replicas wanted, why, and the history to pass to the next poll."""

    replicas: int
    reason: Reason
    message: str
    history: History
    demand: int = 0
    """Pods the counted messages need (before clamping and stabilization)."""
    budget_cap: int | None = None
    """The replicas the rate budget can keep busy, when it is what limited this decision."""

    @property
    def changes(self) -> bool:
        """Whether the Deployment's replicas must be patched."""
        return self.replicas != self.history.current_replicas

    @property
    def fallback(self) -> bool:
        """Whether fallbackReplicas is in use."""
        return self.reason is Reason.FALLBACK


@dataclasses.dataclass(frozen=True)
class _Poll:
    """One successful poll, worked out: what the messages and busy pods need."""

    spec: Spec
    memory: History
    counted: int
    floor: int
    demand: int
    summary: str

    def done(self, replicas: int, reason: Reason, why: str) -> Decision:
        return Decision(replicas, reason, f"{why} ({self.summary})", self.memory, self.demand)

    def up(self, current: int, wanted: int, reason: Reason, why: str) -> Decision:
        """Scale up at once, by a bounded step."""
        step = max(self.spec.max_scale_up_step, current, 1)
        if wanted - current > step:
            return self.done(current + step, Reason.SCALE_UP_LIMITED,
                             f"{why}; {wanted} wanted, adding at most {step} per poll")
        return self.done(wanted, reason, why)


def decide(metrics: Metrics | None, spec: Spec, history: History,
           busy: Mapping[str, int] | None, model_down: bool = False,
           budget_cap: int | None = None) -> Decision:
    """The replicas for this poll; `metrics` is None when the queue could not be read.

    `busy` maps the target's live pods to their in-flight jobs (pods with no report are
    absent or 0); None when the busy counts could not be read, which holds any scale-down
    while messages are in flight (the pods to keep would be unknown). `model_down`: the
    workers say the model is down, so more pods would not serve the backlog. `budget_cap`
    is the replicas the model's rate budget can keep busy (None: no budget known): it lowers
    maxReplicas (never below minReplicas).
    """
    got = _capped(metrics, spec, history, busy, budget_cap)
    current = history.current_replicas
    if model_down and got.replicas > max(current, 1):
        held = max(current, 1)
        return dataclasses.replace(got, replicas=held, reason=Reason.MODEL_DOWN, message=(
            f"holding {held} replicas: the model is down, and more pods would not serve the "
            f"backlog ({got.replicas} wanted: {got.message})"))
    return got


def _capped(metrics: Metrics | None, spec: Spec, history: History,
            busy: Mapping[str, int] | None, budget_cap: int | None) -> Decision:
    """The decision under the rate budget's cap (rule 9)."""
    free = _decide(metrics, spec, history, busy)
    if budget_cap is None:
        return free
    cap = max(spec.min_replicas, min(spec.max_replicas, budget_cap))
    if free.replicas <= cap:
        return free
    capped = _decide(metrics, dataclasses.replace(spec, max_replicas=cap), history, busy)
    return dataclasses.replace(
        capped, reason=Reason.RATE_LIMITED, budget_cap=cap,
        message=f"{free.replicas} replicas wanted, but the model's rate budget keeps only "
                f"{cap} busy ({capped.message})")


def _decide(metrics: Metrics | None, spec: Spec, history: History,
            busy: Mapping[str, int] | None) -> Decision:
    if metrics is None:
        return _on_source_error(spec, history)
    poll = _observe(metrics, spec, history, busy or {})
    current = history.current_replicas
    low, high = spec.min_replicas, max(spec.min_replicas, spec.max_replicas)
    if current > high:
        return poll.done(high, Reason.CLAMPED_TO_MAX, f"{current} replicas is above maxReplicas {high}")
    if current == 0:
        return _from_zero(poll, low, high)
    if current < low:
        return poll.done(low, Reason.CLAMPED_TO_MIN, f"{current} replicas is below minReplicas {low}")
    got = _running(poll, current, low, high)
    if busy is None and metrics.in_flight > 0 and got.replicas < current:
        return poll.done(current, Reason.BUSY_UNKNOWN,
                         f"holding {current} replicas: {metrics.in_flight} messages in flight and "
                         "the busy counts could not be read")
    return got


def _observe(metrics: Metrics, spec: Spec, history: History, busy: Mapping[str, int]) -> _Poll:
    """Demand, floor and activity of this poll, and the history to remember."""
    now = history.now
    per_pod = max(1, spec.messages_per_replica)
    counted = metrics.visible + (metrics.in_flight if spec.include_in_flight else 0)
    busy_pods = sum(1 for n in busy.values() if n > 0)
    added = (metrics.added_total is not None and history.added_total is not None
             and metrics.added_total != history.added_total)
    active = metrics.visible > 0 or metrics.in_flight > 0 or busy_pods > 0 or added
    last_active = now if active or history.last_active_at is None else history.last_active_at
    floor = max(math.ceil(metrics.in_flight / per_pod), busy_pods)
    demand = max(math.ceil(counted / per_pod), floor)
    window = (*((t, r) for t, r in history.recommendations
                if now - t < spec.scale_down_stabilization_seconds), (now, demand))
    memory = dataclasses.replace(history, last_active_at=last_active, recommendations=window,
                                 source_errors=0, added_total=metrics.added_total)
    summary = f"{metrics.visible} visible, {metrics.in_flight} in flight, {busy_pods} busy pods"
    return _Poll(spec, memory, counted, floor, demand, summary)


def _from_zero(poll: _Poll, low: int, high: int) -> Decision:
    """At zero: wake once the messages pass activationMessages."""
    activation = poll.spec.activation_messages
    if poll.counted <= activation and poll.floor == 0:
        if low > 0:
            return poll.done(low, Reason.CLAMPED_TO_MIN, f"0 replicas is below minReplicas {low}")
        why = ("the queue is empty" if poll.counted == 0 else
               f"{poll.counted} messages do not pass activationMessages {activation}")
        return poll.done(0, Reason.BELOW_ACTIVATION, why)
    wanted = _clamp(max(poll.demand, 1), low, high)
    return poll.up(0, wanted, Reason.WAKE_FROM_ZERO,
                   f"{poll.counted} messages passed activationMessages {activation}")


def _running(poll: _Poll, current: int, low: int, high: int) -> Decision:
    """Up at once; down after the window; to zero after the idle time."""
    spec, memory = poll.spec, poll.memory
    window_s, idle_s = spec.scale_down_stabilization_seconds, spec.idle_seconds_before_zero
    last_active = memory.now if memory.last_active_at is None else memory.last_active_at
    idle_for = memory.now - last_active
    if low == 0 and idle_for >= idle_s:
        return poll.done(0, Reason.SCALE_TO_ZERO,
                         f"no activity for {idle_for:.0f}s (idleSecondsBeforeZero {idle_s:g})")
    # Until the queue has been idle long enough, one warm pod stays.
    wanted = _clamp(max(poll.demand, 1), low, high)
    if wanted > current:
        return poll.up(current, wanted, Reason.SCALE_UP, f"{poll.demand} pods needed")
    highest = max(r for _, r in memory.recommendations)
    stabilized = min(current, _clamp(max(highest, 1), low, high))
    if stabilized < current:
        return poll.done(stabilized, Reason.SCALE_DOWN, f"highest demand within {window_s:g}s is {highest}")
    if wanted < current:
        return poll.done(current, Reason.STABILIZING,
                         f"{wanted} pods would do; waiting out the {window_s:g}s scale-down window")
    if poll.demand == 0 and low == 0:
        return poll.done(current, Reason.KEEP_WARM,
                         f"idle for {idle_for:.0f}s of idleSecondsBeforeZero {idle_s:g}")
    return poll.done(current, Reason.STEADY, f"{current} replicas match the demand")


def _on_source_error(spec: Spec, history: History) -> Decision:
    """Hold the replicas, then use fallbackReplicas after repeated failures."""
    errors = history.source_errors + 1
    memory = dataclasses.replace(history, source_errors=errors)
    high = max(spec.min_replicas, spec.max_replicas)
    current = _clamp(history.current_replicas, spec.min_replicas, high)  # spec edits still apply
    if spec.fallback_replicas is None or errors < spec.errors_before_fallback:
        return Decision(current, Reason.SOURCE_ERROR_HOLD,
                        f"queue read failed {errors} time(s) in a row; holding {current} replicas", memory)
    fallback = _clamp(spec.fallback_replicas, spec.min_replicas, high)
    return Decision(fallback, Reason.FALLBACK,
                    f"queue read failed {errors} times in a row; using fallbackReplicas {fallback}", memory)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def deletion_costs(pods: Iterable[str], busy: Mapping[str, int]) -> dict[str, int]:
    """The pod-deletion-cost for each pod: its in-flight jobs, so idle pods (0) go first.

    The ReplicaSet controller removes pods with the lowest cost first (after unscheduled,
    pending and unready ones), so a pod busy with long LLM calls outlives idle ones.
    """
    return {pod: _clamp(busy.get(pod, 0), 0, MAX_DELETION_COST) for pod in pods}

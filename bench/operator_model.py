"""A virtual-time model of a burst of LLM jobs, its workers and an autoscaler.

The same world (a queue, pods with `concurrency` slots, jobs of `job_seconds`) is driven
either by chatq's decision (`chatq_operator.decision.decide`, polled every `poll`) or by a
model of KEDA's SQS scaler with its defaults: the KEDA operator polls every 30 s and wakes
a Deployment from zero to one pod; from one pod up, the HPA syncs every 15 s with
desired = ceil((visible + in flight) / queueLength), its default scale-up policy (4 pods or
100 % per period, whichever is more) and its 300 s scale-down stabilization; the last pod
goes after a 300 s cooldown since the scaler was last active. When pods go, the
ReplicaSet under the HPA removes the newest (it knows nothing of busy pods); under chatq
the pod-deletion-cost puts idle pods first.

Pods start at once in both (kwok pods do too), so the differences are the autoscalers'.
"""

from __future__ import annotations

import dataclasses
import math
import random

from chatq_operator import decision


@dataclasses.dataclass(frozen=True)
class Timings:
    """An autoscaler's timing knobs, in seconds."""

    poll: float
    window: float
    idle: float
    hpa_sync: float = 15.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A burst of jobs on an idle system."""

    burst: int = 200
    concurrency: int = 8
    """Jobs one pod runs at once (= messagesPerReplica / queueLength)."""
    job_seconds: float = 20.0
    max_replicas: int = 10
    trickle_every: float = 10.0
    """After the burst, one more job every this many seconds..."""
    trickle_for: float = 420.0
    """...for this long (the tail during which pods go while some still work)."""

    @property
    def total(self) -> int:
        return self.burst + (int(self.trickle_for / self.trickle_every) if self.trickle_every else 0)

    @property
    def target(self) -> int:
        return min(self.max_replicas, math.ceil(self.burst / self.concurrency))


@dataclasses.dataclass
class Outcome:
    """What one run showed; times in seconds from the burst (`drained`: last job done)."""

    first_pod: float = math.nan
    full_scale: float = math.nan
    drained: float = math.nan
    first_scale_down: float = math.nan
    zero: float = math.nan
    pod_seconds_after_drain: float = 0.0
    pod_seconds: float = 0.0
    """Pods times seconds from the burst to zero: what the run cost."""
    busy_pods_removed: int = 0
    pods_removed: int = 0

    @property
    def down_after_drain(self) -> float:
        return self.first_scale_down - self.drained

    @property
    def zero_after_drain(self) -> float:
        return self.zero - self.drained


class World:
    """The queue and the pods; jobs run on pods' slots and finish after job_seconds."""

    def __init__(self, scenario: Scenario, seed: int = 0) -> None:
        self.s = scenario
        self.rnd = random.Random(seed)
        self.visible = 0
        self.sent = 0
        self.next_trickle = scenario.trickle_every
        self.pods: list[list[float]] = []  # per pod (oldest first): finish times of its jobs
        self.done = 0

    @property
    def in_flight(self) -> int:
        return sum(len(p) for p in self.pods)

    def busy(self) -> dict[str, int]:
        return {f"pod-{i}": len(p) for i, p in enumerate(self.pods)}

    def step(self, now: float) -> None:
        if self.sent == 0:
            self.visible, self.sent = self.s.burst, self.s.burst
        while self.sent < self.s.total and now >= self.next_trickle:
            self.visible, self.sent = self.visible + 1, self.sent + 1
            self.next_trickle += self.s.trickle_every
        for jobs in self.pods:
            finished = [t for t in jobs if t <= now]
            self.done += len(finished)
            jobs[:] = [t for t in jobs if t > now]
        # Receives race: any pod with a free slot may get the next message.
        while self.visible:
            free = [p for p in self.pods if len(p) < self.s.concurrency]
            if not free:
                break
            self.visible -= 1
            self.rnd.choice(free).append(now + self.s.job_seconds)

    def scale(self, replicas: int, busy_aware: bool, out: Outcome) -> None:
        while len(self.pods) < replicas:
            self.pods.append([])
        if len(self.pods) > replicas:
            order = list(range(len(self.pods) - 1, -1, -1))  # the ReplicaSet's own order: newest first
            if busy_aware:
                order = sorted(order, key=lambda i: len(self.pods[i]))  # stable: newest among equals
            victims = set(list(order)[:len(self.pods) - replicas])
            for i in victims:
                out.pods_removed += 1
                if self.pods[i]:
                    out.busy_pods_removed += 1
                    self.visible += len(self.pods[i])  # handed back (SIGTERM) or redelivered
            self.pods = [p for i, p in enumerate(self.pods) if i not in victims]


class ChatqScaler:
    """chatq's decision, polled every `timings.poll`; pods chosen busy-aware."""

    def __init__(self, scenario: Scenario, timings: Timings, phase: float) -> None:
        self.timings, self.next_poll = timings, phase
        self.spec = decision.Spec(min_replicas=0, max_replicas=scenario.max_replicas,
                                  messages_per_replica=scenario.concurrency,
                                  scale_down_stabilization_seconds=timings.window,
                                  idle_seconds_before_zero=timings.idle,
                                  max_scale_up_step=scenario.max_replicas)
        self.history = decision.History(now=0.0, current_replicas=0, last_active_at=-1e9)

    def tick(self, now: float, world: World, out: Outcome) -> None:
        if now + 1e-9 < self.next_poll:
            return
        self.next_poll += self.timings.poll
        made = decision.decide(decision.Metrics(world.visible, world.in_flight), self.spec,
                               self.history.at(now, len(world.pods)), world.busy())
        self.history = made.history
        world.scale(made.replicas, busy_aware=True, out=out)


class KedaScaler:
    """KEDA's SQS scaler and the HPA it drives, with their defaults (see the module's text)."""

    def __init__(self, scenario: Scenario, timings: Timings, phase: float, hpa_phase: float) -> None:
        self.s, self.t = scenario, timings
        self.next_poll, self.next_hpa = phase, hpa_phase
        self.last_active = -1e9
        self.recommendations: list[tuple[float, int]] = []

    def tick(self, now: float, world: World, out: Outcome) -> None:
        messages = world.visible + world.in_flight
        current = len(world.pods)
        if now + 1e-9 >= self.next_poll:  # the KEDA operator: activation and the cooldown
            self.next_poll += self.t.poll
            if messages > 0:
                self.last_active = now
            if current == 0 and messages > 0:
                world.scale(1, busy_aware=False, out=out)
            elif current > 0 and messages == 0 and now - self.last_active >= self.t.idle:
                world.scale(0, busy_aware=False, out=out)
                self.recommendations.clear()
        if now + 1e-9 >= self.next_hpa:  # the HPA, from one pod up
            self.next_hpa += self.t.hpa_sync
            current = len(world.pods)
            if current == 0:
                return
            wanted = max(1, min(self.s.max_replicas, math.ceil(messages / self.s.concurrency)))
            self.recommendations = [(t, r) for t, r in self.recommendations if now - t < self.t.window]
            self.recommendations.append((now, wanted))
            if wanted > current:
                wanted = min(wanted, max(2 * current, current + 4))
            else:
                wanted = min(current, max(r for _, r in self.recommendations))
            world.scale(wanted, busy_aware=False, out=out)


Autoscaler = ChatqScaler | KedaScaler


def simulate(scenario: Scenario, scaler: Autoscaler, dt: float = 0.05, horizon: float = 7200.0,
             seed: int = 0) -> Outcome:
    """Run until the system is back at zero pods after the last job (or the horizon)."""
    world, out = World(scenario, seed), Outcome()
    now = 0.0
    while now < horizon:
        world.step(now)
        before = len(world.pods)
        scaler.tick(now, world, out)
        after = len(world.pods)
        if after and math.isnan(out.first_pod):
            out.first_pod = now
        if after >= scenario.target and math.isnan(out.full_scale):
            out.full_scale = now
        if after < before and math.isnan(out.first_scale_down) and not math.isnan(out.full_scale):
            out.first_scale_down = now
        if world.done >= scenario.total and math.isnan(out.drained):
            out.drained = now
        if not math.isnan(out.drained):
            if after == 0:
                out.zero = now
                break
            out.pod_seconds_after_drain += after * dt
        out.pod_seconds += after * dt
        now += dt
    return out


def average(outcomes: list[Outcome]) -> Outcome:
    """The mean of each figure over runs."""
    n = len(outcomes)
    fields = [f.name for f in dataclasses.fields(Outcome)]
    mean = {f: sum(getattr(o, f) for o in outcomes) / n for f in fields}
    return Outcome(**{f: (round(v) if isinstance(getattr(outcomes[0], f), int) else v)
                      for f, v in mean.items()})


def chatq_model(scenario: Scenario, timings: Timings, runs: int = 40, seed: int = 1) -> Outcome:
    """chatq over `runs` random poll phases."""
    rnd = random.Random(seed)
    return average([simulate(scenario, ChatqScaler(scenario, timings, rnd.uniform(0, timings.poll)),
                             seed=i) for i in range(runs)])


def keda_model(scenario: Scenario, timings: Timings, runs: int = 40, seed: int = 1) -> Outcome:
    """KEDA over `runs` random phases of its poll and of the HPA's sync."""
    rnd = random.Random(seed)
    return average([simulate(scenario, KedaScaler(scenario, timings, rnd.uniform(0, timings.poll),
                                                  rnd.uniform(0, timings.hpa_sync)), seed=i)
                    for i in range(runs)])

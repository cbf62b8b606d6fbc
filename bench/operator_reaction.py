"""QueueScaler: reaction time and a burst-then-drain run, as ratios against KEDA's defaults.

Measured: chatq's operator as a real process (`python -m chatq_operator`) against the local
control plane of k8s-tests (kube-apiserver, controller-manager, scheduler; kwok pods),
ElasticMQ as the SQS queue, and this script playing the workers, since kwok pods run no
code: for each pod that exists it takes messages in flight, reports its busy count to
Redis (`chatq:busy:<pod>`), deletes each message `job_seconds` later, and notes every pod
that goes away while it still has jobs (their messages are handed back, as SIGTERM would).

Modelled (bench/operator_model.py): KEDA's SQS scaler with its defaults (30 s polling, HPA
300 s scale-down window, 300 s cooldown, HPA sync 15 s) on the same scenario, and chatq's
decision on the same model, to check the measurement. Ratios are chatq / KEDA (lower is
better). --quick shrinks every timing of both sides by the same factors, for a CI smoke.

    .venv/bin/python -m bench.operator_reaction               # ~15 min on the control plane
    .venv/bin/python -m bench.operator_reaction --quick       # ~1-2 min
    .venv/bin/python -m bench.operator_reaction --model-only  # no cluster: the models only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.session  # type: ignore[import-untyped,unused-ignore]
import redis
import yaml  # type: ignore[import-untyped,unused-ignore]
from chatq_operator import kube

from bench import harness
from bench import operator_model as model
from tests import servers

REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "charts" / "chatq" / "crds" / "queuescalers.chatq.io.yaml"
NS = f"bench-operator-{uuid.uuid4().hex[:6]}"

#: chatq's QueueScaler defaults and KEDA's (pollingInterval, HPA stabilization, cooldownPeriod).
CHATQ_DEFAULT = model.Timings(poll=5, window=60, idle=300)
KEDA_DEFAULT = model.Timings(poll=30, window=300, idle=300, hpa_sync=15)
FULL = model.Scenario()
QUICK_CHATQ = model.Timings(poll=1, window=3, idle=6)
QUICK = model.Scenario(burst=40, concurrency=4, job_seconds=2, max_replicas=5, trickle_every=1,
                       trickle_for=30)


def scaled(keda: model.Timings, ours: model.Timings, ours_default: model.Timings) -> model.Timings:
    """KEDA's timings shrunk by the factors that took chatq's defaults to `ours`."""
    f_poll = ours.poll / ours_default.poll
    return model.Timings(poll=keda.poll * f_poll, window=keda.window * ours.window / ours_default.window,
                         idle=keda.idle * ours.idle / ours_default.idle, hpa_sync=keda.hpa_sync * f_poll)


# --- the measured run ------------------------------------------------------------------------

@dataclasses.dataclass
class Measured:
    first_pod: list[float] = dataclasses.field(default_factory=list)
    full_scale: list[float] = dataclasses.field(default_factory=list)
    burst: model.Outcome = dataclasses.field(default_factory=model.Outcome)


def wait(check: Callable[[], Any], what: str, timeout: float, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """The local control plane (or the one KUBECONFIG names); yields a kubeconfig path."""
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"]
        return
    sys.path.insert(0, str(REPO / "k8s-tests"))
    import controlplane  # type: ignore[import-not-found,unused-ignore]

    with controlplane.running(controlplane.bin_dir()) as plane:
        yield str(plane.kubeconfig)


@contextlib.contextmanager
def operator_process(kubeconfig: str, busy_url: str) -> Iterator[subprocess.Popen[bytes]]:
    port = servers.free_port()
    env = servers.chatq_env(KUBECONFIG=kubeconfig, CHATQ_OPERATOR_METRICS_PORT=str(port),
                            CHATQ_OPERATOR_BUSY_REDIS_URL=busy_url, AWS_ACCESS_KEY_ID="x",
                            AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    log = Path(f"/tmp/chatq-bench-operator-{uuid.uuid4().hex[:6]}.log")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatq_operator", "--namespace", NS],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        servers.wait_for(lambda: servers.http_ok(f"http://127.0.0.1:{port}/metrics"), "the operator", 60,
                         proc, log)
        harness.say(f"operator running (log {log})")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    """The namespace, the worker Deployment, the queue and the QueueScaler."""

    def __init__(self, api: kube.Kube, mq_url: str, busy: redis.Redis, scenario: model.Scenario,
                 timings: model.Timings) -> None:
        self.api, self.busy, self.s, self.t = api, busy, scenario, timings
        self.sqs = botocore.session.get_session().create_client(
            "sqs", region_name="us-east-1", endpoint_url=mq_url, aws_access_key_id="x",
            aws_secret_access_key="x")
        self.mq_url = mq_url
        self.url = self.sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:6]}")["QueueUrl"]
        self.scale_path = f"/apis/apps/v1/namespaces/{NS}/deployments/worker/scale"

    def setup(self) -> None:
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/queuescalers.chatq.io"
        self.api.request("PATCH", crd_path, yaml.safe_load(CRD.read_text()),
                         query={"fieldManager": "chatq-bench", "force": "true"},
                         content_type="application/apply-patch+yaml")
        def established() -> bool:
            conditions = self.api.request("GET", crd_path).get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait(established, "the CRD", 30)
        with contextlib.suppress(kube.KubeError):
            self.api.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        labels = {"app": "worker"}
        self.api.request("POST", f"/apis/apps/v1/namespaces/{NS}/deployments", {
            "metadata": {"name": "worker"},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "worker", "image": "chatq-worker:kwok"}],
                         "tolerations": [{"operator": "Exists"}]}}}})
        self.api.request("POST", f"/apis/chatq.io/v1alpha1/namespaces/{NS}/queuescalers", {
            "apiVersion": "chatq.io/v1alpha1", "kind": "QueueScaler", "metadata": {"name": "worker"},
            "spec": {"targetRef": {"name": "worker"},
                     "queue": {"sqs": {"url": self.url, "endpoint": self.mq_url}},
                     "maxReplicas": self.s.max_replicas, "messagesPerReplica": self.s.concurrency,
                     "pollSeconds": self.t.poll, "scaleDownStabilizationSeconds": self.t.window,
                     "idleSecondsBeforeZero": self.t.idle, "maxScaleUpStep": self.s.max_replicas}})

    def replicas(self) -> int:
        return int(self.api.request("GET", self.scale_path).get("spec", {}).get("replicas") or 0)

    def reason(self) -> str:
        qs = self.api.request("GET", f"/apis/chatq.io/v1alpha1/namespaces/{NS}/queuescalers/worker")
        return str((qs.get("status") or {}).get("reason") or "")

    def send(self, n: int) -> None:
        for start in range(0, n, 10):
            self.sqs.send_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "MessageBody": "job"} for i in range(min(10, n - start))])

    def reaction(self, rnd: random.Random) -> tuple[float, float]:
        """From zero: seconds until the first replica and until all of them are asked for."""
        wait(lambda: self.replicas() == 0 and self.reason() == "BelowActivation", "an idle scaler at zero",
             60 + 2 * self.t.poll, every=0.2)
        time.sleep(rnd.uniform(0, self.t.poll))  # a random phase against the poll
        self.send(self.s.burst)
        started = time.monotonic()
        wait(lambda: self.replicas() >= 1, "the first replica", 10 * self.t.poll + 10)
        first = time.monotonic() - started
        wait(lambda: self.replicas() >= self.s.target, "all replicas", 10 * self.t.poll + 10)
        full = time.monotonic() - started
        self.sqs.purge_queue(QueueUrl=self.url)
        wait(lambda: self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["All"])["Attributes"][
            "ApproximateNumberOfMessages"] == "0", "the purge", 30)
        self.api.request("PATCH", self.scale_path, {"spec": {"replicas": 0}}, content_type=kube.MERGE_PATCH)
        return first, full

    def burst_then_drain(self, rnd: random.Random, timeout: float) -> model.Outcome:
        """Play the workers through a burst and its trickle; follow the replicas to zero."""
        out = model.Outcome()
        jobs: dict[str, list[tuple[float, str]]] = {}
        sent, done = 0, 0
        started = time.monotonic()
        next_trickle = self.s.trickle_every
        last_replicas = self.replicas()
        self.send(self.s.burst)
        sent = self.s.burst
        last_tick, last_say = started, started
        while time.monotonic() - started < timeout:
            now = time.monotonic() - started
            while sent < self.s.total and now >= next_trickle:
                self.send(1)
                sent, next_trickle = sent + 1, next_trickle + self.s.trickle_every
            pods = self._running_pods()
            for gone in set(jobs) - set(pods):
                out.pods_removed += 1
                if jobs[gone]:
                    out.busy_pods_removed += 1
                    for _, handle in jobs[gone]:  # SIGTERM hands them back
                        with contextlib.suppress(Exception):
                            self.sqs.change_message_visibility(QueueUrl=self.url, ReceiptHandle=handle,
                                                               VisibilityTimeout=0)
                del jobs[gone]
            for pod in pods:
                jobs.setdefault(pod, [])
            done += self._finish(jobs, now)
            self._take(jobs, now, rnd)
            self._report_busy(jobs)
            replicas = self.replicas()
            if self._record(out, now, replicas, last_replicas, done, time.monotonic() - last_tick):
                return out
            last_replicas, last_tick = replicas, time.monotonic()
            if last_tick - last_say > 15:
                harness.say(f"  t={now:.0f}s: {replicas} replicas, {done}/{self.s.total} jobs done, "
                            f"{sum(len(j) for j in jobs.values())} in flight")
                last_say = last_tick
            time.sleep(0.05)
        raise TimeoutError(f"the burst-then-drain run did not end within {timeout:.0f}s")

    def _record(self, out: model.Outcome, now: float, replicas: int, before: int, done: int,
                dt: float) -> bool:
        """Note what this tick shows; True once the run is over (zero after the last job)."""
        if replicas and math.isnan(out.first_pod):
            out.first_pod = now
        if replicas >= self.s.target and math.isnan(out.full_scale):
            out.full_scale = now
        if replicas < before and math.isnan(out.first_scale_down) and not math.isnan(out.full_scale):
            out.first_scale_down = now
        if done >= self.s.total and math.isnan(out.drained):
            out.drained = now
            harness.say(f"  all {done} jobs done at {now:.0f}s; waiting for zero replicas...")
        out.pod_seconds += replicas * dt
        if math.isnan(out.drained):
            return False
        if replicas == 0:
            out.zero = now
            return True
        out.pod_seconds_after_drain += replicas * dt
        return False

    def _running_pods(self) -> list[str]:
        body = self.api.request("GET", f"/api/v1/namespaces/{NS}/pods",
                                query={"labelSelector": "app=worker"})
        return [p["metadata"]["name"] for p in body.get("items", [])
                if not p["metadata"].get("deletionTimestamp")
                and p.get("status", {}).get("phase") == "Running"]

    def _finish(self, jobs: dict[str, list[tuple[float, str]]], now: float) -> int:
        finished = 0
        for pod, held in jobs.items():
            due = [h for t, h in held if t <= now]
            for start in range(0, len(due), 10):
                self.sqs.delete_message_batch(QueueUrl=self.url, Entries=[
                    {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(due[start:start + 10])])
            finished += len(due)
            jobs[pod] = [(t, h) for t, h in held if t > now]
        return finished

    def _take(self, jobs: dict[str, list[tuple[float, str]]], now: float, rnd: random.Random) -> None:
        free = sum(self.s.concurrency - len(held) for held in jobs.values())
        while free > 0:
            reply = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=min(10, free),
                                             VisibilityTimeout=600, WaitTimeSeconds=0)
            messages = reply.get("Messages", [])
            if not messages:
                return
            for m in messages:
                pod = rnd.choice([p for p, held in jobs.items() if len(held) < self.s.concurrency])
                jobs[pod].append((now + self.s.job_seconds, m["ReceiptHandle"]))
            free -= len(messages)

    def _report_busy(self, jobs: dict[str, list[tuple[float, str]]]) -> None:
        with self.busy.pipeline(transaction=False) as pipe:
            for pod, held in jobs.items():
                pipe.set(f"chatq:busy:{pod}", len(held), ex=30)
            pipe.execute()


def measure(scenario: model.Scenario, timings: model.Timings, trials: int, seed: int) -> Measured:
    rnd = random.Random(seed)
    got = Measured()
    with cluster() as kubeconfig, servers.elasticmq_server() as mq, servers.redis_server() as busy_redis:
        api = kube.Kube.connect(kubeconfig)
        busy = redis.Redis.from_url(busy_redis.url)
        bench = Bench(api, mq.url, busy, scenario, timings)
        bench.setup()
        try:
            with operator_process(kubeconfig, busy_redis.url):
                for i in range(trials):
                    first, full = bench.reaction(rnd)
                    harness.say(f"reaction {i + 1}/{trials}: first replica {first:.2f}s, all {full:.2f}s")
                    got.first_pod.append(first)
                    got.full_scale.append(full)
                wait(lambda: bench.replicas() == 0 and bench.reason() == "BelowActivation", "zero", 60, 0.2)
                harness.say("burst then drain, the script playing the workers...")
                horizon = (scenario.trickle_for + scenario.job_seconds * 4 + timings.window + timings.idle
                           + 120)
                got.burst = bench.burst_then_drain(rnd, horizon)
                # Deleted while the operator runs, so that it lifts its finalizer.
                api.request("DELETE", f"/apis/chatq.io/v1alpha1/namespaces/{NS}/queuescalers/worker")
                wait(lambda: not api.request("GET", f"/apis/chatq.io/v1alpha1/namespaces/{NS}/queuescalers")[
                    "items"], "the QueueScaler to go", 30, 0.2)
        finally:
            with contextlib.suppress(kube.KubeError):
                api.request("DELETE", f"/api/v1/namespaces/{NS}")
            busy.close()
            api.close()
    return got


# --- the report ------------------------------------------------------------------------------

def _ratio(ours: float, keda: float) -> str:
    if math.isnan(ours) or math.isnan(keda) or keda == 0:
        return "-"
    return f"{ours / keda:.2f}"


def _fmt(value: float, unit: str = "s") -> str:
    return "-" if math.isnan(value) else f"{value:.1f} {unit}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_reaction",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings on both sides (CI smoke)")
    parser.add_argument("--model-only", action="store_true", help="skip the cluster; models only")
    parser.add_argument("--trials", type=int, default=0, help="reaction trials (default 5, quick 3)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    scenario, ours = (QUICK, QUICK_CHATQ) if args.quick else (FULL, CHATQ_DEFAULT)
    keda = scaled(KEDA_DEFAULT, ours, CHATQ_DEFAULT)
    trials = args.trials or (3 if args.quick else 5)
    harness.say(f"scenario {scenario}; chatq {ours}; KEDA {keda}")
    chatq_m, keda_m = model.chatq_model(scenario, ours), model.keda_model(scenario, keda)
    measured: Measured | None = None
    if not args.model_only:
        measured = measure(scenario, ours, trials, args.seed)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    nan = math.nan
    m = measured.burst if measured else model.Outcome(pod_seconds_after_drain=nan, pod_seconds=nan)
    rows_spec = [
        ("reaction from zero: first replica", mean(measured.first_pod) if measured else nan,
         chatq_m.first_pod, keda_m.first_pod, "s"),
        (f"reaction from zero: all {scenario.target} replicas",
         mean(measured.full_scale) if measured else nan,
         chatq_m.full_scale, keda_m.full_scale, "s"),
        ("burst+trickle: last job done", m.drained, chatq_m.drained, keda_m.drained, "s"),
        ("first scale-down, from the burst", m.first_scale_down, chatq_m.first_scale_down,
         keda_m.first_scale_down, "s"),
        ("zero replicas, after the last job", m.zero_after_drain, chatq_m.zero_after_drain,
         keda_m.zero_after_drain, "s"),
        ("pod-seconds after the last job", m.pod_seconds_after_drain, chatq_m.pod_seconds_after_drain,
         keda_m.pod_seconds_after_drain, "pod-s"),
        ("pod-seconds, burst to zero", m.pod_seconds, chatq_m.pod_seconds, keda_m.pod_seconds, "pod-s"),
        ("busy pods removed at scale-in", float(m.busy_pods_removed) if measured else nan,
         float(chatq_m.busy_pods_removed), float(keda_m.busy_pods_removed), ""),
    ]
    width = max(len(r[0]) for r in rows_spec)
    mode = "quick (timings shrunk alike)" if args.quick else "defaults"
    print(f"\nQueueScaler vs KEDA's SQS scaler, {mode}; ratio = chatq measured (else modelled) / KEDA")
    print(f"  {'':{width}}  {'chatq measured':>15}  {'chatq model':>12}  {'KEDA model':>11}  ratio")
    data: dict[str, Any] = {"scenario": dataclasses.asdict(scenario), "rows": {},
                            "keda_timings": dataclasses.asdict(keda),
                            "chatq_timings": dataclasses.asdict(ours)}
    for label, meas, ours_m, keda_v, unit in rows_spec:
        basis = meas if not math.isnan(meas) else ours_m
        if "busy pods" in label:
            ratio = f"{basis:.0f} vs {keda_v:.1f}"
        else:
            ratio = _ratio(basis, keda_v)
        cells = f"{_fmt(meas, unit):>15}  {_fmt(ours_m, unit):>12}  {_fmt(keda_v, unit):>11}"
        print(f"  {label:{width}}  {cells}  {ratio}")
        data["rows"][label] = {"measured": None if math.isnan(meas) else meas, "chatq_model": ours_m,
                               "keda_model": keda_v, "ratio": ratio}
    if measured:
        data["reaction_trials"] = {"first": measured.first_pod, "full": measured.full_scale}
    harness.RESULTS.mkdir(exist_ok=True)
    name = "operator_reaction_quick" if args.quick else "operator_reaction"
    (harness.RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

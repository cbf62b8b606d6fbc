"""Reading a QueueScaler spec: defaults as in the CRD, and the errors a bad spec gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from chatq_operator import config, decision, sources

CRD = Path(__file__).resolve().parents[2] / "charts" / "chatq" / "crds" / "queuescalers.chatq.io.yaml"


def test_defaults_match_the_crd() -> None:
    """The parser's defaults are the CRD's, so the API server and the operator agree."""
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert (crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]) == (
        config.GROUP, config.VERSION, config.PLURAL)
    cfg = config.parse({"targetRef": {"name": "w"}, "queue": {"redis": {}}})
    rules = cfg.rules
    # Every scaling field of the CRD has decision.Spec's default (the one declaration).
    assert set(config.SPEC_FIELDS) <= set(props)
    for crd_name, field in config.SPEC_FIELDS.items():
        if field.default is None:
            assert "default" not in props[crd_name], crd_name
        else:
            assert props[crd_name]["default"] == field.default, crd_name
    assert props["pollSeconds"]["default"] == cfg.poll_seconds
    redis_props = props["queue"]["properties"]["redis"]["properties"]
    assert "default" not in redis_props["url"]  # the operator's CHATQ_REDIS_URL stands in
    assert cfg.queue == sources.RedisQueueRef("redis://redis:6379/0", redis_props["stream"]["default"],
                                           redis_props["group"]["default"])
    assert decision.Spec() == rules


def test_full_sqs_spec() -> None:
    cfg = config.parse({
        "targetRef": {"kind": "Deployment", "name": "worker"},
        "queue": {"sqs": {"url": "http://mq:9324/000/jobs", "region": "eu-west-1", "endpoint": "http://mq:9324"}},
        "minReplicas": 1, "maxReplicas": 20, "messagesPerReplica": 8, "activationMessages": 2,
        "includeInFlight": False, "pollSeconds": 2, "scaleDownStabilizationSeconds": 30,
        "idleSecondsBeforeZero": 90, "fallbackReplicas": 4, "errorsBeforeFallback": 2, "maxScaleUpStep": 5,
        "busyRedisUrl": "redis://results:6379/0",
    }, default_busy_redis_url="redis://ignored:6379/0")
    assert cfg.target == "worker"
    assert cfg.queue == sources.SqsQueueRef("http://mq:9324/000/jobs", "", "eu-west-1", "http://mq:9324")
    assert cfg.rules == decision.Spec(1, 20, 8, 2, False, 30.0, 90.0, 4, 2, 5)
    assert (cfg.poll_seconds, cfg.busy_redis_url) == (2.0, "redis://results:6379/0")


def test_redis_queue_url_from_the_operator() -> None:
    cfg = config.parse({"targetRef": {"name": "w"}, "queue": {"redis": {"stream": "s"}}},
                       default_redis_url="redis://:secret@r:6379/2")
    assert cfg.queue == sources.RedisQueueRef("redis://:secret@r:6379/2", "s", "chatq-workers")
    assert cfg.busy_redis_url == "redis://:secret@r:6379/2"


@pytest.mark.parametrize(("queue", "busy"), [
    ({"redis": {"url": "redis://q:6379/1"}}, "redis://q:6379/1"),
    ({"sqs": {"name": "jobs"}}, "redis://default:6379/0"),
], ids=["redis-queue-redis", "operator-default"])
def test_busy_redis_url(queue: dict[str, Any], busy: str) -> None:
    cfg = config.parse({"targetRef": {"name": "w"}, "queue": queue}, "redis://default:6379/0")
    assert cfg.busy_redis_url == busy


def test_poll_seconds_has_a_floor() -> None:
    cfg = config.parse({"targetRef": {"name": "w"}, "queue": {"redis": {}}, "pollSeconds": 0.01})
    assert cfg.poll_seconds == config.MIN_POLL_SECONDS


@pytest.mark.parametrize(("spec", "error"), [
    ({"queue": {"redis": {}}}, "targetRef.name is required"),
    ({"targetRef": {"name": "w", "kind": "StatefulSet"}, "queue": {"redis": {}}}, "Deployment only"),
    ({"targetRef": {"name": "w"}, "queue": {}}, "exactly one of sqs or redis"),
    ({"targetRef": {"name": "w"}, "queue": {"redis": {}, "sqs": {"name": "q"}}}, "exactly one"),
    ({"targetRef": {"name": "w"}, "queue": {"sqs": {"region": "x"}}}, "a url or a name"),
    ({"targetRef": {"name": "w"}, "queue": {"redis": {}}, "minReplicas": 5, "maxReplicas": 2},
     "greater than maxReplicas"),
    ({"targetRef": {"name": "w"}, "queue": {"redis": {}}, "messagesPerReplica": 0}, "messagesPerReplica"),
    ({"targetRef": {"name": "w"}, "queue": {"redis": {}}, "maxReplicas": "many"}, "wrong type"),
])
def test_invalid_specs(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(config.InvalidSpec, match=error):
        config.parse(spec)


def test_lanes_count_the_batch_lane_unless_interactive() -> None:
    crd = yaml.safe_load(CRD.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["lanes"]["default"] == "all"
    assert props["batchSuffix"]["default"] == config.DEFAULT_BATCH_SUFFIX
    redis = config.parse({"targetRef": {"name": "w"}, "queue": {"redis": {"stream": "jobs"}}})
    assert redis.batch_queue == sources.RedisQueueRef(stream="jobs-batch")
    sqs = config.parse({"targetRef": {"name": "w"}, "batchSuffix": "-b",
                        "queue": {"sqs": {"url": "http://mq:9324/000/jobs"}}})
    assert sqs.batch_queue == sources.SqsQueueRef(url="http://mq:9324/000/jobs-b")
    only = config.parse({"targetRef": {"name": "w"}, "lanes": "interactive", "queue": {"redis": {}}})
    assert only.batch_queue is None
    with pytest.raises(config.InvalidSpec, match=r"spec\.lanes"):
        config.parse({"targetRef": {"name": "w"}, "lanes": "batch", "queue": {"redis": {}}})


def test_messages_per_replica_defaults_to_the_workers_concurrency() -> None:
    """One number, three places: the worker's concurrency setting, decision.Spec's (and so the
    CRD's) messagesPerReplica, and the chart's config.worker.concurrency."""
    from chatq import settings as settings_mod

    values = yaml.safe_load((CRD.parents[1] / "values.yaml").read_text())
    concurrency = settings_mod.WorkerSettings().concurrency
    assert decision.Spec().messages_per_replica == concurrency
    assert values["config"]["worker"]["concurrency"] == concurrency


def test_the_charts_activation_messages_is_the_crds() -> None:
    """At zero, one waiting job must wake the workers: the chart's activationMessages is the
    CRD's (decision.Spec's) 0, as "more than this many" means. With the chart's former 1 a lone
    job sat queued forever under minReplicas 0 (found on real pods, test_real_pods.py)."""
    values = yaml.safe_load((CRD.parents[1] / "values.yaml").read_text())
    assert values["worker"]["queueScaler"]["activationMessages"] == decision.Spec().activation_messages == 0


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("minReplicas", 2, ("min_replicas", 2)),
    ("includeInFlight", False, ("include_in_flight", False)),
    ("scaleDownStabilizationSeconds", 7, ("scale_down_stabilization_seconds", 7.0)),
    ("fallbackReplicas", 1, ("fallback_replicas", 1)),
    ("fallbackReplicas", None, ("fallback_replicas", None)),
])
def test_each_spec_field_reaches_the_decision(field: str, value: Any,
                                              expected: tuple[str, Any]) -> None:
    cfg = config.parse({"targetRef": {"name": "w"}, "queue": {"redis": {}}, "maxReplicas": 5,
                        field: value})
    assert getattr(cfg.rules, expected[0]) == expected[1]
    assert type(getattr(cfg.rules, expected[0])) is type(expected[1])

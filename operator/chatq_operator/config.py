"""A QueueScaler's spec, read into typed values with the CRD's defaults.

The API server applies the CRD's defaults and validation already; these defaults are the
same, so a spec stored before a field existed (or a test's hand-made body) reads the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from chatq_operator import decision, sources

#: The CRD's coordinates.
GROUP, VERSION, PLURAL, KIND = "chatq.io", "v1alpha1", "queuescalers", "QueueScaler"

DEFAULT_POLL_SECONDS = 5.0
MIN_POLL_SECONDS = 0.5


DEFAULT_METRICS_PORT = 8080
"""The operator's Prometheus port unless --metrics-port or CHATQ_OPERATOR_METRICS_PORT says
otherwise (0: no metrics server)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The operator's command line and environment, read once in `__main__` and handed to
    the handlers in kopf's memo (`memo.options`), never through os.environ."""

    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    redis_url: str = ""
    """CHATQ_REDIS_URL: stands in for a redis queue's url left out of a spec."""
    busy_redis_url: str = ""
    """Where workers report busy counts when a spec names no busyRedisUrl and its queue is not
    a Redis stream (CHATQ_OPERATOR_BUSY_REDIS_URL, else CHATQ_REDIS_URL)."""


class InvalidSpec(ValueError):
    """The spec cannot be used; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class ScalerConfig:
    """Everything one poll of a QueueScaler needs from its spec."""

    target: str
    """The Deployment's name, in the QueueScaler's namespace."""
    queue: sources.QueueRef
    rules: decision.Spec
    poll_seconds: float
    busy_redis_url: str
    """Where the workers' `chatq:busy:<pod>` keys live; empty: busy counts are not read."""
    batch_queue: sources.QueueRef | None = None
    """The batch lane beside `queue`, counted too (`lanes: all`); None: interactive only."""
    budget_redis_url: str = ""
    """Where the workers' shared rate budget lives (`spec.budget`); empty: no cap."""
    budget_endpoint: str = ""
    """The budget's endpoint id (the workers' `endpoint` metric label); empty: the tightest."""


def parse(spec: Mapping[str, Any], default_busy_redis_url: str = "",
          default_redis_url: str = "") -> ScalerConfig:
    """The config of one spec; raises InvalidSpec.

    `default_redis_url` (the operator's CHATQ_REDIS_URL) stands in for a redis queue's url
    left out of the spec, so a password can stay in the operator's Secret.
    """
    target_ref = spec.get("targetRef") or {}
    target = str(target_ref.get("name") or "")
    if not target:
        raise InvalidSpec("spec.targetRef.name is required")
    if target_ref.get("kind", "Deployment") != "Deployment":
        raise InvalidSpec(f"spec.targetRef.kind {target_ref.get('kind')!r} is not supported "
                          "(Deployment only)")
    queue, busy_url = _queue(spec.get("queue") or {}, default_redis_url)
    try:
        rules = decision.Spec(**{
            field.name: _typed(field, spec[crd_name])
            for crd_name, field in SPEC_FIELDS.items() if spec.get(crd_name) is not None})
        poll = float(spec.get("pollSeconds", DEFAULT_POLL_SECONDS))
    except (TypeError, ValueError) as exc:
        raise InvalidSpec(f"spec has a field of the wrong type: {exc}") from None
    if rules.min_replicas < 0 or rules.max_replicas < 1 or rules.messages_per_replica < 1:
        raise InvalidSpec("minReplicas must be >= 0, maxReplicas >= 1 and messagesPerReplica >= 1")
    if rules.min_replicas > rules.max_replicas:
        raise InvalidSpec(f"minReplicas {rules.min_replicas} is greater than "
                          f"maxReplicas {rules.max_replicas}")
    busy = str(spec.get("busyRedisUrl") or busy_url or default_busy_redis_url)
    lanes = spec.get("lanes", "all")
    if lanes not in ("all", "interactive"):
        raise InvalidSpec(f"spec.lanes must be all or interactive, not {lanes!r}")
    batch = None
    if lanes == "all":
        batch = batch_lane(queue, str(spec.get("batchSuffix") or DEFAULT_BATCH_SUFFIX))
    rate: Mapping[str, Any] | None = spec.get("budget")
    budget_url = "" if rate is None else str(rate.get("redisUrl") or busy or default_redis_url)
    endpoint = "" if rate is None else str(rate.get("endpoint") or "")
    return ScalerConfig(target, queue, rules, max(MIN_POLL_SECONDS, poll), busy, batch,
                        budget_url, endpoint)


#: The workers' CHATQ_BATCH_QUEUE_SUFFIX default: the batch lane's queue is `<name>-batch`.
DEFAULT_BATCH_SUFFIX = "-batch"


def batch_lane(queue: sources.QueueRef, suffix: str) -> sources.QueueRef:
    """The batch lane of a queue: the same backend, the name (or URL, whose last part is
    the name) with the suffix, the same consumer group."""
    if isinstance(queue, sources.SqsQueueRef):
        return dataclasses.replace(queue, url=queue.url + suffix if queue.url else "",
                                   name=queue.name + suffix if queue.name else "")
    return dataclasses.replace(queue, stream=queue.stream + suffix)


def _crd_name(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(word.title() for word in rest)


SPEC_FIELDS: dict[str, dataclasses.Field[Any]] = {
    _crd_name(f.name): f for f in dataclasses.fields(decision.Spec)}
"""The spec's scaling fields by their CRD name (camelCase of decision.Spec's): the
defaults are decision.Spec's, and a test holds the CRD's to them."""


def _typed(field: dataclasses.Field[Any], value: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool}.get(str(field.type).split(" ")[0], int)
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"{_crd_name(field.name)} must be true or false, not {value!r}")
    return kind(value)


def _queue(queue: Mapping[str, Any], default_redis_url: str) -> tuple[sources.QueueRef, str]:
    """The queue reference, and the Redis URL it implies for busy counts (redis queues)."""
    sqs: Mapping[str, Any] = queue.get("sqs") or {}
    rds: Mapping[str, Any] = queue.get("redis") or {}
    if ("sqs" in queue) == ("redis" in queue):
        raise InvalidSpec("spec.queue needs exactly one of sqs or redis")
    if "sqs" in queue:
        url, name = str(sqs.get("url") or ""), str(sqs.get("name") or "")
        if not (url or name):
            raise InvalidSpec("spec.queue.sqs needs a url or a name")
        return sources.SqsQueueRef(url=url, name=name, region=str(sqs.get("region") or "us-east-1"),
                                endpoint=str(sqs.get("endpoint") or "")), ""
    ref = sources.RedisQueueRef(url=str(rds.get("url") or default_redis_url or sources.RedisQueueRef.url),
                             stream=str(rds.get("stream") or sources.RedisQueueRef.stream),
                             group=str(rds.get("group") or sources.RedisQueueRef.group))
    return ref, ref.url

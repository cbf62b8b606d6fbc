"""kopf wiring: a daemon per QueueScaler that polls every `pollSeconds`; nothing decides here.

- startup: settings, the API client, the queue readers, the metrics port;
- an index of QueueScalers by target Deployment, to tell who owns a Deployment;
- the daemon: `scaler.Scaler.poll` until the QueueScaler is deleted (kopf then stops it
  and removes its finalizer, so a deleted QueueScaler scales nothing any more).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf

from chatq_operator import config, kube, metrics, scaler, sources

log = logging.getLogger(__name__)

FINALIZER = "chatq.io/queuescaler"
#: Index key: (namespace, deployment) -> values: (creationTimestamp, QueueScaler name).
TargetIndex = kopf.Index[tuple[str, str], tuple[str, str]]


@dataclasses.dataclass
class Runtime:
    """What every handler shares, kept in kopf's memo."""

    api: kube.Kube
    readers: sources.Sources
    default_busy_redis_url: str
    default_redis_url: str


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO  # our kopf.event() calls; kopf's own logs stay off
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    options: config.Options = memo.get("options") or config.Options()
    metrics.serve(options.metrics_port, options.metrics_host)
    memo.runtime = Runtime(kube.Kube.connect(), sources.Sources(),
                           options.busy_redis_url or options.redis_url, options.redis_url)
    log.info("chatq operator started: metrics on port %s", options.metrics_port or "(off)")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    await runtime.readers.close()
    runtime.api.close()


@kopf.index(config.GROUP, config.VERSION, config.PLURAL)
def scalers_by_target(namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta,
                      **_: Any) -> dict[tuple[str, str], tuple[str, str]]:
    target = str((spec.get("targetRef") or {}).get("name") or "")
    if not target or namespace is None:
        return {}
    return {(namespace, target): (str(meta.get("creationTimestamp") or ""), name)}


@kopf.daemon(config.GROUP, config.VERSION, config.PLURAL, cancellation_timeout=10.0)
async def poll(namespace: str | None, name: str, body: kopf.Body, stopped: kopf.DaemonStopped,
               memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    runtime: Runtime = memo.runtime
    index: TargetIndex = kwargs["scalers_by_target"]  # kopf passes indices by their names
    namespace = namespace or "default"

    def post(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])

    def owner_of(deployment: str) -> str | None:
        claims = sorted(index.get((namespace, deployment), []))
        return claims[0][1] if claims else None

    polls = scaler.Scaler(namespace, name, runtime.api, runtime.readers, post,
                          runtime.default_busy_redis_url, runtime.default_redis_url)
    logger.info("polling QueueScaler %s/%s", namespace, name)
    delay = config.DEFAULT_POLL_SECONDS
    try:
        while not stopped:
            try:
                # body is kopf's live view: spec edits show up at the next poll.
                generation = int(body.meta.get("generation") or 0)
                delay = await polls.poll(body.spec, body.status, owner_of, generation)
            except kube.KubeError as exc:
                logger.warning("QueueScaler %s/%s: the Kubernetes API failed: %s", namespace, name, exc)
            except Exception:  # a bug must not stop the scaling of this queue: log it, poll again
                logger.exception("QueueScaler %s/%s: the poll failed", namespace, name)
            await stopped.wait(delay)
    finally:
        metrics.forget(namespace, name)
        logger.info("stopped polling QueueScaler %s/%s (%s)", namespace, name, stopped.reason)

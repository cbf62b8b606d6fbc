"""The operator's Prometheus metrics, served on their own port (`--metrics-port`).

Every series is labelled with the QueueScaler's namespace and name, and dropped when the
QueueScaler goes; `chatq_operator_queue_reads_total` is per queue, so it shows the cache
at work when several QueueScalers share one queue.
"""

from __future__ import annotations

import prometheus_client

SCALER = ("namespace", "name")

VISIBLE = prometheus_client.Gauge(
    "chatq_operator_queue_visible_messages", "Messages waiting in the queue at the last poll.", SCALER)
IN_FLIGHT = prometheus_client.Gauge(
    "chatq_operator_queue_in_flight_messages", "Messages received but not finished at the last poll.", SCALER)
DESIRED = prometheus_client.Gauge(
    "chatq_operator_desired_replicas", "Replicas the decision asked for at the last poll.", SCALER)
CURRENT = prometheus_client.Gauge(
    "chatq_operator_current_replicas", "Pods of the target Deployment at the last poll.", SCALER)
BUSY_PODS = prometheus_client.Gauge(
    "chatq_operator_busy_pods", "Pods of the target reporting in-flight jobs at the last poll.", SCALER)
SOURCE_ERRORS = prometheus_client.Counter(
    "chatq_operator_source_errors_total", "Failed reads of the queue or of the busy counts.", SCALER)
SCALINGS = prometheus_client.Counter(
    "chatq_operator_scalings_total", "Changes of the target's replicas, by direction.",
    (*SCALER, "direction"))
POLL_SECONDS = prometheus_client.Histogram(
    "chatq_operator_poll_seconds", "Time one poll takes: read, decide, patch.", SCALER,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUE_READS = prometheus_client.Counter(
    "chatq_operator_queue_reads_total", "Reads that reached a queue (cached answers not counted).",
    ("queue",))

_PER_SCALER = (VISIBLE, IN_FLIGHT, DESIRED, CURRENT, BUSY_PODS, SOURCE_ERRORS, POLL_SECONDS)


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on a port of its own (0: not at all)."""
    if port:
        prometheus_client.start_http_server(port, addr=host)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted QueueScaler's series."""
    for metric in _PER_SCALER:
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
    for direction in ("up", "down"):
        try:
            SCALINGS.remove(namespace, name, direction)
        except KeyError:
            pass

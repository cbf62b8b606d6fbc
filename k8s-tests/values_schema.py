"""charts/chatq/values.schema.json, generated: `python k8s-tests/values_schema.py` rewrites it.

The `config` part comes from chatq.settings (every setting the chart does not set from its
own values, with its type, bounds and description), so the schema cannot drift from the
code; test_chart_consistency.py checks that the committed file is what this produces.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from chatq.settings import Settings
from pydantic import BaseModel
from pydantic.fields import FieldInfo

SCHEMA = Path(__file__).resolve().parent.parent / "charts" / "chatq" / "values.schema.json"

#: Settings the chart sets from its own structured values (queue, redis, llm, secrets, ports).
MANAGED = {
    "api": {"host", "port", "keys"},
    "worker": {"id", "grace_seconds"},
    "queue": {"backend", "name", "group", "url", "region", "endpoint", "create"},
    "redis": {"url"},
    "files": {"store", "dir", "s3_bucket", "s3_prefix", "s3_endpoint", "s3_region"},
    "llm": {"base_url", "api_key", "model"},
    "llmsim": {"host", "port"},
    "telemetry": {"metrics_host", "metrics_port"},
}

Schema = dict[str, Any]


def typed(kind: str | list[str], description: str = "", **more: Any) -> Schema:
    out: Schema = {"type": kind}
    if description:
        out["description"] = description
    out.update(more)
    return out


def string(description: str = "", **more: Any) -> Schema:
    return typed("string", description, **more)


def integer(description: str = "", **more: Any) -> Schema:
    return typed("integer", description, **more)


def number(description: str = "", **more: Any) -> Schema:
    return typed("number", description, **more)


def boolean(description: str = "") -> Schema:
    return typed("boolean", description)


def enum(values: list[str], description: str = "") -> Schema:
    out: Schema = {"enum": values}
    if description:
        out["description"] = description
    return out


def closed(properties: Schema, description: str = "", required: list[str] | None = None) -> Schema:
    """An object that accepts exactly these properties."""
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        out["description"] = description
    if required:
        out["required"] = required
    return out


def array(description: str, items: Schema | None = None) -> Schema:
    out: Schema = {"type": "array", "description": description}
    if items:
        out["items"] = items
    return out


def string_map(description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def any_object(description: str) -> Schema:
    return {"type": "object", "description": description}


RESOURCES = {
    "type": "object",
    "description": "Container resources (requests/limits).",
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
    "additionalProperties": False,
}
EXTRA_ENV = array("Extra environment variables (EnvVar list).", {"type": "object", "required": ["name"]})
SCHEDULING = {
    "podAnnotations": string_map("Extra pod annotations."),
    "nodeSelector": string_map("Node selector."),
    "tolerations": array("Tolerations.", {"type": "object"}),
    "affinity": any_object("Affinity."),
    "extraEnv": EXTRA_ENV,
}
SPREAD = array("Topology spread constraints.", {"type": "object"})
INTERVAL = string(pattern="^[0-9]+(ms|s|m|h)$")


def chatq_image(description: str) -> Schema:
    tag = string(
        "Tag; empty means the chart's appVersion. `latest` is refused by the templates (pin a version)."
    )
    return closed(
        {"repository": string("Image repository.", minLength=1), "tag": tag},
        description,
        ["repository", "tag"],
    )


def pinned_image(description: str) -> Schema:
    tag = string("Pinned tag.", minLength=1, **{"not": {"const": "latest"}})
    return closed(
        {"repository": string("Image repository.", minLength=1), "tag": tag},
        description,
        ["repository", "tag"],
    )


def setting(field: FieldInfo) -> Schema:
    """One chatq setting: its JSON type, bounds and description."""
    annotation = field.annotation
    description = (field.description or "").strip()
    if typing.get_origin(annotation) is typing.Literal:
        return enum(list(typing.get_args(annotation)), description)
    kinds: dict[Any, str] = {int: "integer", float: "number", bool: "boolean", str: "string"}
    out = typed(kinds[annotation], description)
    for meta in field.metadata:
        for bound, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum")):
            if getattr(meta, bound, None) is not None:
                out[key] = getattr(meta, bound)
    return out


def config() -> Schema:
    groups: Schema = {}
    for group, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        props = {
            name: setting(f)
            for name, f in model.model_fields.items()
            if name not in MANAGED.get(group, set())
        }
        if props:
            doc = (model.__doc__ or "").strip()
            groups[group] = closed(props, f"CHATQ_{group.upper()}_* settings ({doc})")
    return closed(groups, "chatq settings by group and field (as in `chatq --help`).")


def api() -> Schema:
    service = closed(
        {
            "type": enum(["ClusterIP", "NodePort", "LoadBalancer"], "Service type."),
            "port": integer("Service port.", minimum=1, maximum=65535),
            "annotations": string_map("Annotations."),
        },
        "API Service.",
    )
    path = closed(
        {"path": string(pattern="^/"), "pathType": enum(["Prefix", "Exact", "ImplementationSpecific"])},
        required=["path"],
    )
    ingress = closed(
        {
            "enabled": boolean(),
            "className": string("IngressClass."),
            "nginxAnnotations": boolean("Add ingress-nginx annotations."),
            "streamTimeoutSeconds": integer("Long-poll/SSE timeout, seconds.", minimum=1),
            "maxBodySize": string("proxy-body-size.", pattern="^[0-9]+[kKmMgG]?$"),
            "annotations": string_map("Extra annotations."),
            "hosts": array(
                "Hosts and paths.",
                closed({"host": string(), "paths": array("Paths.", path)}, required=["paths"]),
            ),
            "tls": array(
                "TLS blocks.", closed({"secretName": string(), "hosts": array("Hosts.", {"type": "string"})})
            ),
        },
        "API Ingress.",
    )
    route = closed(
        {
            "enabled": boolean(),
            "parentRefs": array("Gateway parentRefs.", {"type": "object", "required": ["name"]}),
            "hostnames": array("Host names.", {"type": "string"}),
            "annotations": string_map("Annotations."),
            "requestTimeout": string("Gateway API duration.", pattern="^([0-9]{1,5}(h|m|s|ms)){0,4}$"),
        },
        "API HTTPRoute (Gateway API).",
    )
    return closed(
        {
            "keys": array(
                "API keys (CHATQ_API_KEYS).", {"type": "string", "minLength": 1, "pattern": "^[^,]+$"}
            ),
            "replicaCount": integer("API replicas.", minimum=0),
            "service": service,
            "resources": RESOURCES,
            "preStopSeconds": integer("Seconds a deleted pod serves on before SIGTERM.", minimum=0),
            "terminationGracePeriodSeconds": integer(
                "Grace from deletion to SIGKILL, seconds; > preStopSeconds.", minimum=1
            ),
            "podDisruptionBudget": closed(
                {"enabled": boolean(), "minAvailable": typed(["integer", "string"], "Count or percentage.")},
                "API PDB.",
            ),
            "autoscaling": closed(
                {
                    "enabled": boolean(),
                    "minReplicas": integer(minimum=1),
                    "maxReplicas": integer(minimum=1),
                    "targetCPUUtilizationPercentage": integer(minimum=1, maximum=100),
                },
                "API HPA on CPU.",
            ),
            "ingress": ingress,
            "httpRoute": route,
            "podLabels": string_map("Extra pod labels."),
            "topologySpreadConstraints": SPREAD,
            **SCHEDULING,
        },
        "The HTTP API.",
    )


def worker() -> Schema:
    scaler = closed(
        {
            "enabled": boolean(),
            "minReplicas": integer(minimum=0),
            "maxReplicas": integer(minimum=1),
            "messagesPerReplica": integer("0: the worker concurrency.", minimum=0),
            "activationMessages": integer(minimum=0),
            "includeInFlight": boolean(),
            "lanes": {"type": "string", "enum": ["all", "interactive"],
                      "description": "all: the batch lane counts too; interactive: the queue alone."},
            "pollSeconds": number(minimum=0.5),
            "scaleDownStabilizationSeconds": number(minimum=0),
            "idleSecondsBeforeZero": number(minimum=0),
            "fallbackReplicas": integer("-1: hold.", minimum=-1),
        },
        "The workers' QueueScaler.",
    )
    return closed(
        {
            "replicaCount": integer("Workers without a QueueScaler.", minimum=0),
            "graceSeconds": number("CHATQ_WORKER_GRACE_SECONDS.", minimum=0),
            "terminationGracePeriodSeconds": integer(
                "Grace after SIGTERM, seconds; > graceSeconds.", minimum=1
            ),
            "resources": RESOURCES,
            "podDisruptionBudget": closed(
                {
                    "enabled": boolean(),
                    "maxUnavailable": typed(["integer", "string"], "Count or percentage."),
                },
                "Worker PDB.",
            ),
            "queueScaler": scaler,
            "podLabels": string_map("Extra pod labels."),
            "topologySpreadConstraints": SPREAD,
            **SCHEDULING,
        },
        "The workers.",
    )


def build() -> Schema:
    """The whole schema."""
    account = closed(
        {"create": boolean(), "name": string(), "annotations": string_map("Annotations (IRSA).")},
        "ServiceAccount.",
    )
    monitor = closed({"enabled": boolean(), "interval": INTERVAL, "labels": string_map("Labels.")})
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "chatq chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": boolean(
                "Read by an umbrella chart's dependency condition (chatq.enabled); ignored here."
            ),
            "global": any_object("Helm's global values (umbrella charts)."),
            "nameOverride": string("Overrides the chart name in resource names."),
            "fullnameOverride": string("Overrides the full resource name prefix."),
            "image": closed(
                {
                    "registry": string("Registry prefix of both images."),
                    "pullPolicy": enum(["Always", "IfNotPresent", "Never"], "Pull policy."),
                    "api": chatq_image("The API image (Dockerfile.api)."),
                    "worker": chatq_image("The worker image (Dockerfile.worker)."),
                },
                "chatq images.",
                ["api", "worker"],
            ),
            "imagePullSecrets": array("Pull secret names.", {"type": "string"}),
            "queue": closed(
                {
                    "backend": enum(["redis", "sqs"], "Queue backend (CHATQ_QUEUE_BACKEND)."),
                    "name": string("Stream or queue name (CHATQ_QUEUE_NAME).", minLength=1),
                    "group": string("Consumer group (CHATQ_QUEUE_GROUP).", minLength=1),
                    "sqs": closed(
                        {
                            "url": string("Queue URL (CHATQ_QUEUE_URL)."),
                            "region": string("AWS region (CHATQ_QUEUE_REGION).", minLength=1),
                            "endpoint": string("Endpoint override (CHATQ_QUEUE_ENDPOINT)."),
                            "create": boolean("Create missing queues (CHATQ_QUEUE_CREATE)."),
                        },
                        "SQS settings.",
                    ),
                },
                "The job queue.",
                ["backend", "name"],
            ),
            "files": closed(
                {
                    "store": enum(["s3", "local"], "File store (CHATQ_FILES_STORE)."),
                    "s3": closed(
                        {
                            "bucket": string("Bucket (CHATQ_FILES_S3_BUCKET)."),
                            "prefix": string("Key prefix (CHATQ_FILES_S3_PREFIX)."),
                            "endpoint": string("Endpoint override (CHATQ_FILES_S3_ENDPOINT)."),
                            "region": string("AWS region (CHATQ_FILES_S3_REGION).", minLength=1),
                        },
                        "S3 settings.",
                    ),
                    "local": closed(
                        {"sizeLimit": string("Size limit of the API pod's files volume.")},
                        "The local store's volume (an emptyDir on the API pod).",
                    ),
                },
                "The file store of /v1/files and /v1/batches.",
                ["store"],
            ),
            "redis": closed(
                {
                    "url": string("Redis URL (CHATQ_REDIS_URL).", pattern="^(rediss?://.*)?$"),
                    "existingSecret": string("Secret with the Redis URL."),
                    "existingSecretKey": string("Key in existingSecret.", minLength=1),
                },
                "Redis.",
            ),
            "llm": closed(
                {
                    "baseUrl": string("CHATQ_LLM_BASE_URL.", pattern="^(https?://.*)?$"),
                    "model": string("CHATQ_LLM_MODEL."),
                    "apiKey": string("CHATQ_LLM_API_KEY (stored in the chart's Secret)."),
                },
                "The model.",
            ),
            "api": api(),
            "worker": worker(),
            "operator": closed(
                {
                    "enabled": boolean(),
                    "replicaCount": integer(minimum=0, maximum=1),
                    "args": array("Arguments.", {"type": "string"}),
                    "resources": RESOURCES,
                    "serviceAccount": account,
                    **SCHEDULING,
                },
                "The QueueScaler operator.",
            ),
            "config": config(),
            "secrets": closed(
                {"existingSecret": string("Existing Secret with llm-api-key / api-keys.")}, "Secrets."
            ),
            "serviceAccount": account,
            "podSecurityContext": any_object("Pod security context."),
            "securityContext": any_object("Container security context."),
            "topologySpread": closed(
                {"enabled": boolean(), "maxSkew": integer(minimum=1)}, "Default topology spread."
            ),
            "otel": closed(
                {
                    "enabled": boolean(),
                    "endpoint": string(),
                    "protocol": enum(["grpc", "http/protobuf", "http/json"]),
                    "resourceAttributes": string_map("Extra resource attributes."),
                    "logs": boolean(),
                    "logsEndpoint": string(),
                },
                "OpenTelemetry export.",
            ),
            "networkPolicy": closed(
                {
                    "enabled": boolean(),
                    "apiFrom": array("Peers allowed to reach the API.", {"type": "object"}),
                    "metricsFrom": array("Peers allowed to scrape metrics.", {"type": "object"}),
                },
                "NetworkPolicies.",
            ),
            "metrics": closed(
                {
                    "serviceMonitor": monitor,
                    "podMonitor": monitor,
                    "prometheusRule": closed(
                        {
                            "enabled": boolean("A PrometheusRule with chatq's alerts."),
                            "labels": string_map("Labels."),
                        }
                    ),
                    "dashboard": closed(
                        {
                            "enabled": boolean(),
                            "labels": string_map("Sidecar labels."),
                            "annotations": string_map("Annotations."),
                        },
                        "Grafana dashboard.",
                    ),
                },
                "Prometheus and Grafana.",
            ),
            "dev": closed(
                {
                    "enabled": boolean("In-chart Redis, ElasticMQ and llmsim."),
                    "redis": closed(
                        {"image": pinned_image("Redis image."), "resources": RESOURCES}, "Dev Redis."
                    ),
                    "elasticmq": closed(
                        {"image": pinned_image("ElasticMQ image."), "resources": RESOURCES}, "Dev ElasticMQ."
                    ),
                    "llmsim": closed({"enabled": boolean(), "resources": RESOURCES}, "Dev llmsim."),
                },
                "Dev cluster extras.",
            ),
            "tests": closed(
                {
                    "enabled": boolean(),
                    "question": string(minLength=1),
                    "timeoutSeconds": integer(minimum=1),
                    "apiKeySecret": closed(
                        {"name": string(), "key": string()}, "Secret with a plain API key."
                    ),
                },
                "helm test.",
            ),
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA}")

"""`python -m chatq_operator`: run the QueueScaler operator.

    python -m chatq_operator --namespace chatq            # one namespace (repeatable)
    python -m chatq_operator --all-namespaces
    CHATQ_OPERATOR_NAMESPACES=a,b python -m chatq_operator

It runs standalone (no kopf peering objects needed); run one replica. Credentials come
from the pod's service account, else KUBECONFIG. The environment also sets
CHATQ_OPERATOR_METRICS_PORT (Prometheus, default 8080, 0 for none), and
CHATQ_OPERATOR_BUSY_REDIS_URL or CHATQ_REDIS_URL: where workers report busy counts when a
QueueScaler names no busyRedisUrl and its queue is not a Redis stream. They are read here
once, into `config.Options`, which the handlers get in kopf's memo.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import kopf
from chatq import telemetry

from chatq_operator import config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chatq_operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to watch (repeatable; glob patterns allowed); "
                             "default: CHATQ_OPERATOR_NAMESPACES, comma-separated")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus port (default CHATQ_OPERATOR_METRICS_PORT or 8080; 0: off)")
    parser.add_argument("--liveness", default=os.environ.get("CHATQ_OPERATOR_LIVENESS", ""),
                        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not args.namespace:
        args.namespace = [n.strip() for n in os.environ.get("CHATQ_OPERATOR_NAMESPACES", "").split(",")
                          if n.strip()]
    if not args.namespace and not args.all_namespaces:
        parser.error("name a namespace (--namespace or CHATQ_OPERATOR_NAMESPACES) or --all-namespaces")
    return args


def options(args: argparse.Namespace, env: Mapping[str, str]) -> config.Options:
    """The handlers' options from the command line, then the environment, then defaults."""
    port = args.metrics_port
    if port is None:
        port = int(env.get("CHATQ_OPERATOR_METRICS_PORT") or config.DEFAULT_METRICS_PORT)
    redis_url = env.get("CHATQ_REDIS_URL", "")
    return config.Options(metrics_port=port,
                            metrics_host=env.get("CHATQ_OPERATOR_METRICS_HOST") or "0.0.0.0",
                            redis_url=redis_url,
                            busy_redis_url=env.get("CHATQ_OPERATOR_BUSY_REDIS_URL") or redis_url)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose)
    # OTLP traces of the Kubernetes and queue calls when OTEL_* asks for them; off otherwise.
    telemetry.start_tracing("chatq-operator")
    # And its log records (kopf's handler stays, for `kubectl logs`) over OTLP too.
    telemetry.start_logs("chatq-operator")
    from chatq_operator import handlers  # registers the handlers with kopf

    del handlers
    settings = kopf.OperatorSettings()
    # Named namespaces need no cluster-wide listing of namespaces and CRDs, so a namespaced
    # Role is enough (the QueueScaler CRD must exist when the operator starts).
    exact = not args.all_namespaces and not any(set(n) & set("*?![]") for n in args.namespace)
    settings.scanning.disabled = exact
    kopf.run(standalone=True, clusterwide=args.all_namespaces,
             namespaces=[] if args.all_namespaces else args.namespace,
             liveness_endpoint=args.liveness or None, settings=settings,
             memo=kopf.Memo(options=options(args, os.environ)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker's own HTTP endpoint, served from its event loop: `/healthz` and `/metrics`.

prometheus-client's `start_http_server` runs in a thread of its own, so it answers even
when the worker's event loop is stuck (a blocking call, a busy loop, SIGSTOP'd tasks
aside) and no job can progress: the kubelet would never restart such a worker. This
server is aiohttp's (already installed by aiobotocore) running in the worker's loop, so a
stuck loop answers nothing and the probe's `timeoutSeconds` fails it, as arq's health
check fails when its loop stops writing it.
"""

from __future__ import annotations

import logging

import prometheus_client
from aiohttp import web

log = logging.getLogger(__name__)

DEFAULT_PORT = 9100
"""The worker's port when CHATQ_TELEMETRY_METRICS_PORT is 0 (the chart's `metrics` port)."""


def port_of(configured: int) -> int:
    """The port the worker listens on: the setting, or DEFAULT_PORT when it is 0."""
    return configured or DEFAULT_PORT


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(),
                        headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def start(host: str, port: int) -> web.AppRunner:
    """Listen on host:port in the running loop; `await runner.cleanup()` stops it."""
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("worker /healthz and /metrics on http://%s:%d", host, port)
    return runner

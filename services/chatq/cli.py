"""The `chatq` command: api, worker, llmsim, up (all on one machine) and ask.

The one place where settings are read and logging is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from pydantic import ValidationError

from chatq import client, probe, telemetry
from chatq import settings as settings_mod


def _settings_help() -> str:
    rows = settings_mod.env_table()
    width = max(len(name) for name, _, _ in rows)
    lines = ["settings (environment variables):"]
    for name, default, doc in rows:
        first = doc.splitlines()[0] if doc else ""
        lines.append(f"  {name.ljust(width)}  {first} [{default or 'empty'}]")
    return "\n".join(lines)


def _load_settings() -> settings_mod.Settings:
    try:
        return settings_mod.Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CHATQ_{'_'.join(str(x) for x in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        if any(tuple(e["loc"]) == ("api", "key") for e in exc.errors()):
            problems += (f" (the key of `chatq ask` is {client.API_KEY_VAR} now; the server's"
                         " keys are CHATQ_API_KEYS)")
        sys.exit(f"chatq: bad setting: {problems}")


def cmd_api(settings: settings_mod.Settings) -> None:
    import uvicorn

    from chatq import api
    from chatq.api import protocol

    telemetry.setup(settings, "chatq-api")
    app = api.create_app(settings)
    # httptools with a header deadline and size cap (chatq.api.protocol); uvicorn's own
    # timeout_keep_alive (5 s) bounds the idle time between requests.
    uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_config=None,
                access_log=False, http=protocol.protocol_for(settings.api),
                forwarded_allow_ips=settings.api.forwarded_allow_ips,
                timeout_graceful_shutdown=int(settings.api.max_wait_seconds) + 5)


def cmd_worker(settings: settings_mod.Settings) -> None:
    from chatq import worker

    worker_id = settings.worker.id or worker.default_worker_id()
    telemetry.setup(settings, "chatq-worker", instance_id=worker_id)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Everything imported so far lives as long as the process: keep it out of the garbage
    # collector's full passes, whose pauses otherwise stall every job in flight.
    gc.freeze()
    asyncio.run(worker.serve(settings, worker_id))


def cmd_llmsim(settings: settings_mod.Settings) -> None:
    import uvicorn

    from chatq import llmsim

    uvicorn.run(llmsim.create_app(settings.llmsim), host=settings.llmsim.host,
                port=settings.llmsim.port, log_config=None, access_log=False)


def _say(message: str) -> None:
    print(f"\033[1m[chatq up]\033[0m {message}", file=sys.stderr, flush=True)


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; its output is above")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s")


class _Children:
    """The processes `chatq up` started, stopped in reverse order."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        """Raise if one has exited."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; stopping the rest")

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                _say(f"stopping {name}...")
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.grace + 5)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _ensure_redis(settings: settings_mod.Settings, children: _Children) -> None:
    """Use the Redis at CHATQ_REDIS_URL, or start a local one there."""
    redis_url = urlparse(settings.redis.url)
    host, port = redis_url.hostname or "localhost", redis_url.port or 6379
    if _port_busy(host, port):
        _say(f"using the Redis already at {host}:{port}")
        return
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` (or run"
                           " scripts/up, which does), or point CHATQ_REDIS_URL at a Redis")
    data = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatq" / "redis"
    data.mkdir(parents=True, exist_ok=True)
    _say(f"starting redis-server on {host}:{port} (data in {data})...")
    proc = children.start("redis-server", [exe, "--port", str(port), "--bind", "127.0.0.1",
                                           "--dir", str(data), "--appendonly", "yes",
                                           "--loglevel", "warning"])
    deadline = time.monotonic() + 15
    while not _port_busy(host, port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("redis-server did not start; its output is above")
        time.sleep(0.05)


def _start_chatq(settings: settings_mod.Settings, children: _Children) -> str:
    """llmsim (when no model is configured), the api and a worker; returns the api's URL."""
    me = [sys.executable, "-m", "chatq"]
    if settings.uses_simulator:
        sim = f"http://{settings.llmsim.host}:{settings.llmsim.port}"
        _say(f"no CHATQ_LLM_API_KEY or CHATQ_LLM_BASE_URL: starting llmsim at {sim}...")
        _wait_http(f"{sim}/healthz", children.start("llmsim", [*me, "llmsim"]), "llmsim")
    else:
        _say(f"model: {settings.llm_model} at {settings.llm_base_url or 'OpenAI'}")
    api_url = f"http://{settings.api.host}:{settings.api.port}"
    if _port_busy(settings.api.host, settings.api.port):
        raise RuntimeError(f"port {settings.api.port} is taken: stop what uses it or set CHATQ_API_PORT")
    _say(f"starting the api at {api_url}...")
    _wait_http(f"{api_url}/readyz", children.start("api", [*me, "api"]), "the api")
    _say(f"starting a worker (concurrency {settings.worker.concurrency})...")
    port = probe.port_of(settings.telemetry.metrics_port)
    metrics = f"http://{settings.telemetry.metrics_host}:{port}/healthz"
    _wait_http(metrics, children.start("worker", [*me, "worker"]), "the worker")
    return api_url


def cmd_up(settings: settings_mod.Settings) -> None:
    """Redis, llmsim (when no model is configured), api and worker; Ctrl-C stops all."""
    children = _Children(settings.worker.grace_seconds)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # A process started in the background of a non-interactive shell (`cmd &` in a script
    # or CI) inherits SIGINT ignored, and Python then keeps it ignored: Ctrl-C (or kill
    # -INT) would never stop chatq up. Ask for it explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ensure_redis(settings, children)
        api_url = _start_chatq(settings, children)
        _say(f"chatq is up at {api_url} (docs at {api_url}/docs). Try:\n"
             f"    curl -s -XPOST {api_url}/v1/chat -H 'content-type: application/json' "
             "-d '{\"message\": \"Why is the sky blue?\"}'\n"
             "    chatq ask 'Why is the sky blue?'\n"
             "Ctrl-C stops everything.")
        while True:
            children.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("stopping...")
        children.stop_all()
        _say("stopped.")
    except RuntimeError as exc:
        _say(f"error: {exc}")
        children.stop_all()
        sys.exit(1)


def cmd_ask(args: argparse.Namespace) -> None:
    """Submit a question, show its status while it waits, print the answer as it streams."""
    api_key = args.api_key or os.environ.get(client.API_KEY_VAR, "")
    out, err = sys.stdout, sys.stderr
    with client.Client(args.url, api_key) as chatq:
        try:
            job = chatq.submit(args.question, model=args.model, system=args.system,
                               max_tokens=args.max_tokens)
            err.write(f"job {job['id']} {job['status']}\n")
            if args.no_stream:
                final = chatq.wait(job["id"], timeout=args.timeout)
                if final.get("answer"):
                    out.write(final["answer"] + "\n")
            else:
                final = _stream(chatq, job["id"], out, err)
        except client.ClientError as exc:
            sys.exit(f"chatq ask: {exc.message}" + (f" ({exc.status} {exc.code})" if exc.status else ""))
        except KeyboardInterrupt:
            err.write(f"\nstopped waiting; the job goes on: chatq ask is done, GET /v1/chat/{job['id']}\n")
            sys.exit(130)
    if final["status"] != "succeeded":
        error = final.get("error") or {}
        sys.exit(f"chatq ask: job {final['status']}: {error.get('message', '')} ({error.get('code', '')})")
    usage = final.get("usage") or {}
    sim = " (simulated by llmsim)" if final.get("simulated") else ""
    err.write(f"[{final.get('model')}{sim}, {usage.get('completion_tokens', '?')} tokens, "
              f"{final.get('attempts')} attempt(s)]\n")


def _stream(chatq: client.Client, job_id: str, out: TextIO, err: TextIO) -> dict[str, Any]:
    last = None
    shown = ""
    status = "queued"
    for _ in range(100):  # reconnects, resuming after the last event seen
        try:
            for event in chatq.events(job_id, last):
                last = event.id or last
                if event.type == "attempt":
                    attempt = int(event.data.get("attempt", 1))
                    if status == "queued":
                        err.write("running...\n")
                        status = "running"
                    if attempt > 1 and shown:
                        err.write(f"\n[attempt {attempt}: starting the answer again]\n")
                        shown = ""
                elif event.type == "delta":
                    text = str(event.data.get("text", ""))
                    shown += text
                    out.write(text)
                    out.flush()
                elif event.type == "done":
                    if shown:
                        out.write("\n")
                    return chatq.wait(job_id, timeout=5)
        except client.ClientError as exc:
            if exc.status:
                raise
            time.sleep(1)
    return chatq.get(job_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatq", description="chatq: asynchronous LLM questions over a queue.",
        epilog=_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter
    sub.add_parser("api", help="run the HTTP API (uvicorn)", epilog=_settings_help(), formatter_class=fmt)
    sub.add_parser("worker", help="run a worker", epilog=_settings_help(), formatter_class=fmt)
    sub.add_parser("llmsim", help="run the OpenAI-compatible model simulator",
                   epilog=_settings_help(), formatter_class=fmt)
    sub.add_parser("up", help="run everything on this machine (redis, llmsim, api, worker)",
                   epilog=_settings_help(), formatter_class=fmt)
    ask = sub.add_parser("ask", help="ask a question and print the answer as it streams")
    ask.add_argument("question")
    ask.add_argument("--url", default=os.environ.get(client.URL_VAR, "http://127.0.0.1:8000"),
                     help=f"the chatq API (env {client.URL_VAR}; default %(default)s)")
    ask.add_argument("--api-key", default="", help=f"API key (env {client.API_KEY_VAR})")
    ask.add_argument("--model", default=None, help="model name (default: the server's)")
    ask.add_argument("--system", default=None, help="a system prompt")
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--no-stream", action="store_true", help="long-poll instead of streaming")
    ask.add_argument("--timeout", type=float, default=600, help="seconds to wait (--no-stream)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "ask":
        try:
            cmd_ask(args)
        except BrokenPipeError:
            # `chatq ask ... | head`: the reader left. Python's documented remedy: point stdout
            # at devnull so the interpreter's final flush does not raise again, and exit quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        return
    settings = _load_settings()
    telemetry.configure_logging(settings.log)
    {"api": cmd_api, "worker": cmd_worker, "llmsim": cmd_llmsim, "up": cmd_up}[args.command](settings)

"""Real servers for tests, each on a free loopback port, always stopped afterwards.

Context managers, so any suite can use them (tests/, k8s-tests/, bench/):
`redis_server()`, `elasticmq_server()` and `chatq_process(...)`, which runs one `chatq`
subcommand (api, worker, llmsim) as a real process and waits until it answers. And the
test helpers every suite shares, once: `poll` (until a value holds), `wait_for` (until a
server answers), `free_port`, `unavailable` (skip, or fail in CI), `ask`/`wait_done`/
`wait_status` (a /v1/chat job).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent


def hand_section(config: pytest.Config, title: str, lines: dict[str, str]) -> None:
    """Under pytest-xdist, give a summary section this worker gathered to the controller,
    which prints it (tests/conftest.py); a worker's own terminal summary is never shown."""
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None and lines:
        workeroutput.setdefault("sections", {})[title] = dict(lines)


# Under pytest-xdist (scripts/test runs `-n`), the tests that share one machine-wide thing
# run on one worker, in order: the Docker engine's images and stacks with the local control
# plane and its real node, which use them; the llama.cpp model; and the benchmarks' smoke runs
# (each loads the box on its own; side by side they would only slow each other). Everything
# else is spread over the workers as they free up (`--dist loadgroup`).
XDIST_GROUPS = {"tests/containers/": "machine", "k8s-tests/": "machine",
                "tests/integration/test_llamacpp.py": "llama", "tests/bench/": "bench"}


def xdist_group(relpath: str) -> str | None:
    """The worker group of a test (its id or path from the repository root), or None."""
    return next((group for prefix, group in XDIST_GROUPS.items() if relpath.startswith(prefix)),
                None)


# tryfirst: pytest-xdist's own hook reads these marks into the test ids, so it must run after.
@pytest.hookimpl(tryfirst=True)
def mark_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """pytest_collection_modifyitems: mark each test with its group (XDIST_GROUPS)."""
    for item in items:
        group = xdist_group(item.path.relative_to(config.rootpath).as_posix())
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def unavailable(message: str) -> NoReturn:
    """A prerequisite is missing: skip, saying why and what to run; in CI (CI=true) fail,
    since nothing an issue asks for may hide behind a skip there."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


T = TypeVar("T")


def poll(fetch: Callable[[], T], until: Callable[[T], object], what: str, timeout: float = 30.0,
         interval: float = 0.1) -> T:
    """Call `fetch()` until `until(value)` holds and return that value; on timeout fail with
    what we waited for and the last value (or the OSError of a server still starting)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fetch()
            if until(value):
                return value
            last = value
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {str(last)[-2000:]}")
        time.sleep(interval)


TERMINAL_JOB = ("succeeded", "failed", "cancelled")


def ask(http: Any, text: str, **extra: Any) -> str:
    """POST a question (made unique, so llmsim counts its calls apart); returns the job id."""
    resp = http.post("/v1/chat", json={"message": f"{text} [{uuid.uuid4().hex[:8]}]", **extra})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def wait_done(http: Any, job_id: str, timeout: float = 40) -> dict[str, Any]:
    """Long-poll a /v1/chat job until it is finished; its record."""
    job: dict[str, Any] = poll(lambda: http.get(f"/v1/chat/{job_id}", params={"wait": 5}).json(),
                               lambda job: job["status"] in TERMINAL_JOB,
                               f"job {job_id} to finish", timeout, interval=0)
    return job


def wait_status(http: Any, job_id: str, status: str, timeout: float = 20) -> None:
    """Poll a /v1/chat job until its status is `status`."""
    poll(lambda: http.get(f"/v1/chat/{job_id}").json(), lambda job: job["status"] == status,
         f"job {job_id} to become {status}", timeout, interval=0.05)


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Call `check()` until it returns truthy; fail with what we waited for and the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def http_ok(url: str) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= int(resp.status) < 300
    except OSError:
        return False


@dataclass
class Server:
    """A started server: its URL, process and log file."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process, wait for it, and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        """What the process has printed so far."""
        return self.log.read_text(errors="replace")


def _popen(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


@contextlib.contextmanager
def redis_server(port: int | None = None, appendfsync: str = "") -> Iterator[Server]:
    """A throwaway redis-server: without persistence, or with `appendfsync` ("always",
    "everysec") an append-only file in its own directory, which `restart_redis` reloads."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run scripts/setup (apt-get install redis-server)")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="chatq-redis-") as tmp:
        log = Path(tmp) / "redis.log"
        aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else [
            "--appendonly", "no"]
        cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof, "--dir", tmp]
        server = Server(f"redis://127.0.0.1:{port}/0", port, _popen(cmd, log), log,
                        {"cmd": "\0".join(cmd)})
        try:
            _wait_redis(server)
            yield server
        finally:
            server.stop()


def _wait_redis(server: Server) -> None:
    wait_for(lambda: socket.create_connection(("127.0.0.1", server.port), 0.2).close() is None,
             f"redis-server on port {server.port}", 15, server.proc, server.log)


def restart_redis(server: Server, down_seconds: float = 0.0, args: tuple[str, ...] = ()) -> None:
    """SIGKILL a `redis_server` (no shutdown save, no final fsync), wait `down_seconds`,
    and start it again on the same port and directory (with `args` added), where it
    reloads what it persisted. Returns once it accepts connections (it may still answer
    LOADING for a while)."""
    server.kill()
    time.sleep(down_seconds)
    server.proc = _popen([*server.extra["cmd"].split("\0"), *args], server.log)
    _wait_redis(server)


def elasticmq_home() -> Path:
    """Where scripts/setup --elasticmq put the ElasticMQ jars."""
    marker = REPO / ".venv" / ".elasticmq-home"
    if not marker.exists():
        raise RuntimeError("ElasticMQ is not set up: run scripts/setup --elasticmq")
    return Path(marker.read_text().strip())


@contextlib.contextmanager
def elasticmq_server(port: int | None = None) -> Iterator[Server]:
    """A real ElasticMQ (SQS-compatible) server, in memory."""
    port = port or free_port()
    home = elasticmq_home()
    with tempfile.TemporaryDirectory(prefix="chatq-elasticmq-") as tmp:
        conf = Path(tmp) / "elasticmq.conf"
        conf.write_text(
            'include classpath("application.conf")\n'
            f'node-address {{ protocol = http, host = "127.0.0.1", port = {port}, context-path = "" }}\n'
            f'rest-sqs {{ enabled = true, bind-port = {port}, bind-hostname = "127.0.0.1",'
            ' sqs-limits = strict }\n'
            "rest-stats { enabled = false }\n"
        )
        log = Path(tmp) / "elasticmq.log"
        proc = _popen(["java", "-Xmx256m", f"-Dconfig.file={conf}", "-cp", f"{home}/lib/*",
                       "org.elasticmq.server.Main"], log)
        url = f"http://127.0.0.1:{port}"
        server = Server(url, port, proc, log)
        try:
            wait_for(lambda: http_ok(f"{url}/?Action=ListQueues"), f"ElasticMQ on port {port}", 60, proc, log)
            yield server
        finally:
            server.stop()


def chatq_env(**overrides: str) -> dict[str, str]:
    """The environment for a chatq process: this one's, minus stray CHATQ_ and OTEL_ vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATQ_", "OTEL_"))}
    env.update(overrides)
    return env


@contextlib.contextmanager
def chatq_process(command: str, env: dict[str, str], *args: str, port_var: str = "",
                  health_path: str = "/healthz", tmp: Path | None = None) -> Iterator[Server]:
    """Run `chatq <command>` as a real process; wait until its health endpoint answers.

    `port_var` names the setting that holds its port (e.g. CHATQ_API_PORT); a free port is
    chosen when the env does not set it.
    """
    env = dict(env)
    port = 0
    if port_var:
        port = int(env.setdefault(port_var, str(free_port())))
    logdir = Path(tmp or tempfile.mkdtemp(prefix=f"chatq-{command}-"))
    log = logdir / f"{command}-{port or os.getpid()}-{time.monotonic_ns()}.log"
    proc = _popen([sys.executable, "-m", "chatq", command, *args], log, env)
    server = Server(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        if port:
            wait_for(lambda: http_ok(f"{server.url}{health_path}"), f"chatq {command} on port {port}",
                     30, proc, log)
        yield server
    finally:
        server.stop()


@dataclass
class Delivery:
    """One request a WebhookReceiver got."""

    path: str
    headers: dict[str, str]
    body: str
    at: float


class WebhookReceiver:
    """A real HTTP server on loopback that records what it is sent; it can be taken down and
    brought back on the same port, and `redirects` maps a path to a 302 Location."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.deliveries: list[Delivery] = []
        self.redirects: dict[str, str] = {}
        self.status = 200
        self._server: http.server.ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                with receiver._lock:
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers.items()),
                                                        body, time.time()))
                target = receiver.redirects.get(self.path)
                self.send_response(302 if target else receiver.status)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: deliveries now meet a refused connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received(self, path: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if path is None or d.path == path]

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
@contextlib.contextmanager
def s3_server(bucket: str = "chatq-files", port: int | None = None) -> Iterator[Server]:
    """A real S3-compatible server (moto's, in memory) with `bucket` made; extra['bucket']."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise RuntimeError("moto's server is not installed: run scripts/setup (it installs moto[server])")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="chatq-s3-") as tmp:
        log = Path(tmp) / "moto.log"
        proc = _popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], log)
        url = f"http://127.0.0.1:{port}"
        server = Server(url, port, proc, log, {"bucket": bucket})
        try:
            wait_for(lambda: http_ok(f"{url}/moto-api/"), f"moto's S3 server on port {port}", 60, proc, log)
            import botocore.session

            s3 = botocore.session.get_session().create_client(
                "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                aws_secret_access_key="x")
            s3.create_bucket(Bucket=bucket)
            yield server
        finally:
            server.stop()
class FaultyLink:
    """A TCP proxy on a free loopback port in front of one server, whose link can be cut
    silently: `blackhole()` keeps accepting connections and keeps every socket open, but
    forwards no byte either way (a dropped route: no RST, no FIN, just silence), until
    `heal()`, when what was held flows again. `reset()` closes every connection instead.

    The proxy runs its own event loop in a thread, so sync and async tests can both use it.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import asyncio
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self.accepted = 0
        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._stop = asyncio.Event()
        self._writers: set[Any] = set()
        self._tasks: set[Any] = set()
        started = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(started,), daemon=True,
                                        name=f"faulty-link-{self.port}")
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"the proxy on port {self.port} did not start")

    def _main(self, started: Any) -> None:
        try:
            self._loop.run_until_complete(self._run(started))
        finally:
            self._loop.close()

    async def _run(self, started: Any) -> None:
        asyncio = self._asyncio
        self._flowing.set()
        server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        started.set()
        await self._stop.wait()
        server.close()
        while self._tasks:  # connections accepted while stopping are ended too
            for w in list(self._writers):
                w.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    def _accept(self, reader: Any, writer: Any) -> None:
        if self._stop.is_set():
            writer.transport.abort()
            return
        task = self._loop.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: Any, writer: Any) -> None:
        asyncio = self._asyncio
        self.accepted += 1
        self._writers.add(writer)
        upstream: Any = None
        try:
            await self._flowing.wait()  # a blackholed link completes no handshake upstream
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._writers.add(upstream)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _pump(self, reader: Any, writer: Any) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self._flowing.wait()  # held, not dropped: a healed link delivers it late
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def _call(self, fn: Callable[[], object]) -> None:
        async def run() -> None:
            fn()

        self._asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def blackhole(self) -> None:
        """Stop forwarding, silently, on every connection, old and new."""
        self._call(self._flowing.clear)

    def heal(self) -> None:
        """Forward again (held bytes included)."""
        self._call(self._flowing.set)

    def reset(self) -> None:
        """Close every connection through the link (peers see the sockets close)."""
        def close_all() -> None:
            for w in list(self._writers):
                w.transport.abort()
        self._call(close_all)

    def close(self) -> None:
        """Stop the proxy and its thread."""
        if self._thread.is_alive():
            self._call(self._stop.set)
            self._thread.join(10)


@contextlib.contextmanager
def faulty_link(target_port: int) -> Iterator[FaultyLink]:
    """A FaultyLink in front of 127.0.0.1:target_port, closed afterwards."""
    link = FaultyLink(target_port)
    try:
        yield link
    finally:
        link.close()

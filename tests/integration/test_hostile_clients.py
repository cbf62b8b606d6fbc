"""Hostile clients against one real api process: slowloris headers, header floods, bodies
over the limit or trickling in, malformed JSON, brute-forced keys, other origins (CORS).

Each case checks the api's limit (408, 431, 413, 400: a 4xx, never a 500 or a hang) and
that another client is served meanwhile: its question is accepted and answered while the
hostile connections are open. The header limits are uvicorn's missing ones, added by
chatq.api.protocol (CHATQ_API_HEADER_TIMEOUT_SECONDS, CHATQ_API_MAX_HEADER_BYTES); the
body limit is CHATQ_API_MAX_BODY_BYTES. Thousands of held long-polls and SSE streams, and
clients that stop reading, are test_held_requests.py's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx

from tests.conftest import Stack, StackFactory
from tests.servers import ask, wait_done

HEADER_TIMEOUT = 2.0
LIMITS = {"CHATQ_API_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT)}


def connect(stack: Stack) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.connect(("127.0.0.1", stack.api.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout bounds the wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def served_meanwhile(stack: Stack) -> None:
    """Another client, on its own connections: a question accepted and answered."""
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        assert wait_done(http, ask(http, "an honest client"))["status"] == "succeeded"


@contextlib.contextmanager
def dribbling(socks: list[socket.socket], every: float = 0.3) -> Iterator[None]:
    """Send one more header byte on every socket each `every` seconds, never finishing."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"a")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_slowloris_headers_get_408_and_others_are_served(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=1, **LIMITS)
    socks = [connect(stack) for _ in range(50)]
    idle = [connect(stack) for _ in range(10)]  # connected, never a byte sent
    try:
        for s in socks:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: chatq\r\nX-Slow: ")
        with dribbling(socks):
            served_meanwhile(stack)
            started = time.monotonic()
            answers = [read_all(s) for s in socks + idle]
        # Every one is answered 408 and closed once its headers are late; a client that is
        # kept past the deadline would make read_all wait on, up to its 10 s timeout.
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
        print(f"\n60 slow connections closed with 408 within {time.monotonic() - started:.1f}s "
              f"(header timeout {HEADER_TIMEOUT}s)")
        served_meanwhile(stack)
    finally:
        for s in socks + idle:
            s.close()


def test_header_flood_gets_431(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=1, **LIMITS)
    with connect(stack) as s:
        # 40 KB of headers, then silence, in one write: on loopback it lands in the server's
        # socket at once, so the server has read all of it when it answers and closes, and the
        # close is a FIN after the 431. Written a line at a time, a busy server could answer
        # halfway, and the lines after its close would be refused (a reset, a broken pipe).
        filler = "".join(f"X-Filler-{i}: {'y' * 1000}\r\n" for i in range(40))
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: chatq\r\n{filler}".encode())
        assert read_all(s).startswith(b"HTTP/1.1 431 ")
    served_meanwhile(stack)


def test_bodies_over_the_limit_trickling_or_malformed(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=1, CHATQ_API_MAX_BODY_BYTES="4096", **LIMITS)
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        # Chunked, no Content-Length: refused once the limit is passed while it streams in.
        def chunks() -> Iterator[bytes]:
            yield b'{"message": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'

        resp = http.post("/v1/chat", content=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large", resp.text
        # OpenAI's routes refuse in OpenAI's error shape.
        resp = http.post("/v1/responses", content=b"{" * 10_000,
                         headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
        for body in (b'{"message": "unterminated', b"\xff\xfe\x00", b"[1, 2", b'{"message": 1e999999}'):
            resp = http.post("/v1/chat", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= resp.status_code < 500 and "error" in resp.json(), (body, resp.text)
            resp = http.post("/v1/responses", content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    # A body trickling in holds its own connection only (at most the body limit in memory).
    with connect(stack) as s:
        s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: chatq\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4000\r\n\r\n{\"message\": \"")
        with dribbling([s], every=0.2):
            served_meanwhile(stack)


def test_cors_is_off_by_default(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0)
    origin = {"Origin": "https://elsewhere.example"}
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        preflight = http.options("/v1/chat", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert not any(h.startswith("access-control-") for h in preflight.headers), preflight.headers
        for resp in (http.get("/healthz", headers=origin),
                     http.post("/v1/chat", json={"message": "hi"}, headers=origin)):
            assert resp.status_code in (200, 202)
            assert not any(h.startswith("access-control-") for h in resp.headers), resp.headers


def test_cors_allows_the_listed_origins_only(stack_factory: StackFactory) -> None:
    listed = "https://app.example"
    stack = stack_factory("redis", workers=0,
                          CHATQ_API_CORS_ORIGINS=f"{listed}, https://other.example")
    ask_preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"}
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        ok = http.options("/v1/chat", headers={"Origin": listed, **ask_preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == listed
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in ok.headers  # bearer keys, no cookies
        refused = http.options("/v1/chat", headers={"Origin": "https://evil.example",
                                                    **ask_preflight})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        created = http.post("/v1/chat", json={"message": "hi"}, headers={"Origin": listed})
        assert created.status_code == 202
        assert created.headers["access-control-allow-origin"] == listed
        assert "location" in created.headers["access-control-expose-headers"].lower()
        other = http.get("/healthz", headers={"Origin": "https://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_brute_forced_keys_get_429_and_keys_that_worked_still_work(
        stack_factory: StackFactory) -> None:
    right, fresh = f"right-{uuid.uuid4().hex}", f"fresh-{uuid.uuid4().hex}"
    per_minute = 30  # one failure back every 2 s
    stack = stack_factory("redis", workers=1, CHATQ_API_KEYS=f"{right},{fresh}",
                          CHATQ_API_AUTH_FAILURES_PER_MINUTE=str(per_minute),
                          CHATQ_LOG_LEVEL="DEBUG")
    guesses = [f"guess-{i}-{uuid.uuid4().hex}" for i in range(per_minute + 20)]

    def as_key(http: httpx.Client, key: str) -> httpx.Response:
        return http.get("/v1/chat/0a", headers={"Authorization": f"Bearer {key}"})

    with httpx.Client(base_url=stack.url, timeout=10) as http:
        assert as_key(http, right).status_code == 404  # authenticated: no such job
        answers = [as_key(http, g) for g in guesses]
        statuses = [a.status_code for a in answers]
        assert statuses[:per_minute] == [401] * per_minute, statuses
        assert set(statuses[per_minute:]) == {429}, statuses
        locked = answers[-1]
        assert locked.json()["error"]["code"] == "too_many_failed_keys"
        assert 1 <= int(locked.headers["Retry-After"]) <= 3
        # The key that worked from this address still works while it is locked...
        with stack.client(right) as good:
            assert wait_done(good, ask(good, "still served"))["status"] == "succeeded"
        # ...a key never used from here waits like a guess (it is not even checked)...
        assert as_key(http, fresh).status_code == 429
        # ...and another address has its own bucket.
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=stack.url, timeout=10, transport=elsewhere) as other:
            assert as_key(other, fresh).status_code == 404
            assert as_key(other, guesses[0]).status_code == 401
        time.sleep(int(locked.headers["Retry-After"]))
        assert as_key(http, fresh).status_code == 404
    logs = stack.api.logs()
    assert "failed authentications a minute from 127.0.0.1" in logs
    leaked = [k for k in (right, fresh, *guesses) if k in logs or k[6:] in logs]
    assert not leaked, f"the api log holds {len(leaked)} presented keys"


def test_failed_keys_are_counted_per_client_behind_a_trusted_proxy_only(
        stack_factory: StackFactory) -> None:
    # The "ingress" connects from 127.0.0.2 and is trusted; a client on 127.0.0.1 is not.
    stack = stack_factory("redis", workers=0, CHATQ_API_KEYS=f"right-{uuid.uuid4().hex}",
                          CHATQ_API_AUTH_FAILURES_PER_MINUTE="3",
                          CHATQ_API_FORWARDED_ALLOW_IPS="127.0.0.2")

    def guesses(http: httpx.Client, forwarded_for: str, n: int = 4) -> list[int]:
        return [http.get("/v1/chat/0a", headers={
            "Authorization": f"Bearer guess-{uuid.uuid4().hex}",
            "X-Forwarded-For": forwarded_for}).status_code for _ in range(n)]

    proxy = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=stack.url, timeout=10, transport=proxy) as ingress:
        # Behind the trusted proxy, each client has its own bucket.
        assert guesses(ingress, "10.0.0.1") == [401, 401, 401, 429]
        assert guesses(ingress, "10.0.0.2", 1) == [401]
    with httpx.Client(base_url=stack.url, timeout=10) as direct:
        # From an untrusted address the header is the client's word: rotating it helps
        # nobody, all count as 127.0.0.1.
        assert [guesses(direct, f"10.1.0.{i}", 1)[0] for i in range(4)] == [401, 401, 401, 429]
    logs = stack.api.logs()
    assert "failed authentications a minute from 10.0.0.1" in logs
    assert "from 127.0.0.1" in logs and "from 10.1.0." not in logs

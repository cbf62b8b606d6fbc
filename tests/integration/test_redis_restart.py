"""Redis killed (SIGKILL) and restarted mid-load, with its append-only file on
`appendfsync always`, on both queue backends.

The promise (README, "Guarantees"): every job the api accepted (a 202) before, during or
after the restart is answered exactly once, or fails with a clear code; nothing accepted
is lost; a call made while Redis is down or loading is a 503 with `Retry-After`, never a
500 or a hang; `BUSY LOADING` while the restarted Redis reads its file is waited out, not
reported as a failure. With the Redis queue the stream and its consumer group live in the
same file as the records; with SQS the queue survives the restart and Redis holds only
the records.

`appendfsync always` is the setting tested: Redis writes and fsyncs each command before it
answers, so an acknowledged job survives even a crash of the machine. `everysec` survives a
kill of the process the same way (the command is written to the file before the reply), but
a machine crash loses up to the last second (two when the disk stalls): see the README.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
import redis.exceptions

from tests import servers
from tests.conftest import BACKENDS, StackFactory

# Jobs of about 0.4 s, so a dozen are mid-answer when Redis dies.
JOB = "llmsim:ttft_ms=50 llmsim:itl_ms=25 llmsim:tokens=14"
# Filler commands in the file, each costing this much to load (µs): the restarted Redis
# answers LOADING for a second or so (between batches of 1024 commands it serves clients,
# with that error), which the api and the workers must wait out.
FILLER_KEYS = 20_000
LOAD_DELAY_US = "50"
# Codes a job may end with here other than success; anything else is a defect.
CLEAR_FAILURES = {"too_many_deliveries", "abandoned"}


@pytest.fixture
def redis_server() -> Iterator[servers.Server]:
    """This module's stacks run on a Redis with its append-only file fsynced per write."""
    try:
        cm = servers.redis_server(appendfsync="always")
        server = cm.__enter__()
    except RuntimeError as exc:
        servers.unavailable(f"redis-server is not available ({exc}); run scripts/setup")
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@dataclass
class Load:
    """Posts questions at a steady pace from a thread; records what each POST got."""

    url: str
    per_second: float = 20.0
    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[float, int, str]] = field(default_factory=list)
    wrong: list[tuple[int, str]] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    resp = http.post("/v1/chat", json={"message": f"q{n} {JOB}"})
                except httpx.HTTPError as exc:
                    self.wrong.append((0, repr(exc)))
                    continue
                if resp.status_code == 202:
                    self.accepted.append(resp.json()["id"])
                    self.accepted_at.append(time.monotonic())
                elif resp.status_code == 503 and resp.headers.get("retry-after"):
                    self.refused.append((time.monotonic(), 503, resp.json()["error"]["code"]))
                else:
                    self.wrong.append((resp.status_code, resp.text[:200]))
                self._stop.wait(1 / self.per_second)

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def fill(url: str) -> None:
    """Make the file long enough that reloading it takes a while (keys expire in minutes)."""
    with redis.Redis.from_url(url) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(FILLER_KEYS):
            pipe.set(f"test:filler:{i}", "x", ex=600)
        pipe.execute()


def saw_loading(url: str, timeout: float = 10) -> bool:
    """True once the restarted Redis answered LOADING (then ready), False if it never did."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    deadline, loading = time.monotonic() + timeout, False
    try:
        while time.monotonic() < deadline:
            try:
                client.ping()
                return loading
            except redis.exceptions.BusyLoadingError:
                loading = True
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.02)
    finally:
        client.close()
    raise AssertionError("the restarted Redis did not become ready")


def settle(http: httpx.Client, ids: list[str], timeout: float = 90) -> dict[str, dict[str, object]]:
    """Every job's final record (long-polled); a job still open at the deadline fails."""
    deadline, final = time.monotonic() + timeout, {}
    for job_id in ids:
        while True:
            resp = http.get(f"/v1/chat/{job_id}", params={"wait": 5})
            assert resp.status_code in (200, 503), (job_id, resp.status_code, resp.text)
            if resp.status_code == 200 and resp.json()["status"] in ("succeeded", "failed"):
                final[job_id] = resp.json()
                break
            assert time.monotonic() < deadline, f"job {job_id} not settled: {resp.text}"
    return final


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
def test_redis_killed_and_restarted_mid_load(stack_factory: StackFactory,
                                             redis_server: servers.Server, backend: str) -> None:
    stack = stack_factory(backend, workers=2, CHATQ_REDIS_TIMEOUT_SECONDS="1")
    with Load(stack.url) as load:
        servers.wait_for(lambda: len(load.accepted) >= 40, "40 jobs accepted before the kill", 30)
        before = len(load.accepted)
        fill(redis_server.url)
        servers.restart_redis(redis_server, down_seconds=1.0, args=("--key-load-delay", LOAD_DELAY_US))
        restarted = time.monotonic()
        loading = saw_loading(redis_server.url)
        servers.wait_for(lambda: load.accepted_at and load.accepted_at[-1] > restarted,
                         "the api to accept a job after the restart", 30)
        recovered = load.accepted_at[-1] - restarted
        n = len(load.accepted)
        servers.wait_for(lambda: len(load.accepted) >= n + 40, "40 more jobs after the restart", 30)
    assert not load.wrong, f"answers other than 202 or 503 with Retry-After: {load.wrong[:5]}"
    assert load.refused, "the kill was not seen by the api: no 503 while Redis was down"
    assert {code for _, _, code in load.refused} <= {"store_unavailable", "redis_unavailable",
                                                     "queue_unavailable"}, load.refused
    assert loading, "the restarted Redis never answered LOADING: the test did not exercise it"

    with stack.client() as http:
        final = settle(http, load.accepted)
    failed = {i: j for i, j in final.items() if j["status"] == "failed"}
    assert all(j["error"]["code"] in CLEAR_FAILURES for j in failed.values()), [
        (j["error"], j.get("attempt_errors")) for j in failed.values()]  # type: ignore[index]
    # Exactly one answer per job: one `done` event in its stream, whatever the deliveries.
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        dones = {i: sum(1 for _, e in r.xrange(f"chatq:job:{i}:events") if e.get("type") == "done")
                 for i in load.accepted}
    finally:
        r.close()
    assert all(n == 1 for n in dones.values()), {i: n for i, n in dones.items() if n != 1}
    retried = sum(1 for j in final.values() if int(j["attempts"]) > 1)  # type: ignore[call-overload]
    assert retried, "no job was mid-answer at the kill: the test did not exercise it"
    print(f"\n[{backend}] accepted {len(load.accepted)} ({before} before the kill), lost 0, "
          f"failed {len(failed)}, duplicate answers 0, retried after the kill {retried}, "
          f"refused with 503 {len(load.refused)}, first 202 {recovered:.1f}s after the restart")

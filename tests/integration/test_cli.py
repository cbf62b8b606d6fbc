"""The `chatq` command as a user runs it: ask (streaming and long-poll) and up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from chatq import llmsim

from tests import servers
from tests.conftest import StackFactory


def chatq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatq", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_ask_streams_the_answer(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", CHATQ_API_KEYS="secret")
    env = servers.chatq_env(CHATQ_CLIENT_URL=stack.url, CHATQ_CLIENT_API_KEY="secret")
    out = chatq("ask", "What is a queue? llmsim:tokens=8", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(llmsim.PREFIX) and len(out.stdout.split()) >= 8
    assert "queued" in out.stderr and "running" in out.stderr
    assert "simulated by llmsim" in out.stderr and "8 tokens" in out.stderr
    polled = chatq("ask", "--no-stream", "again llmsim:tokens=5", env=env)
    assert polled.returncode == 0 and polled.stdout.startswith(llmsim.PREFIX)


def test_ask_into_a_reader_that_leaves_exits_quietly(stack_factory: StackFactory) -> None:
    """`chatq ask ... | head -c 20`: no BrokenPipeError traceback once the reader is gone."""
    stack = stack_factory("redis")
    env = servers.chatq_env(CHATQ_CLIENT_URL=stack.url)
    proc = subprocess.Popen([sys.executable, "-m", "chatq", "ask", "a long one llmsim:tokens=300"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(20).startswith(llmsim.PREFIX[:20].encode())
    proc.stdout.close()  # as head does: the rest of the answer meets a closed pipe
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()


def test_ask_reports_failures_clearly(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", CHATQ_API_KEYS="secret", CHATQ_LLM_MAX_ATTEMPTS="1")
    env = servers.chatq_env(CHATQ_CLIENT_URL=stack.url, CHATQ_CLIENT_API_KEY="secret")
    failed = chatq("ask", "llmsim:fail=400", env=env)
    assert failed.returncode == 1 and "job failed" in failed.stderr and "model_error_400" in failed.stderr
    wrong = chatq("ask", "hi", "--api-key", "nope", env={**env, "CHATQ_CLIENT_API_KEY": ""})
    assert wrong.returncode == 1 and "401 unauthorized" in wrong.stderr
    port = servers.free_port()
    nobody = chatq("ask", "hi", "--url", f"http://127.0.0.1:{port}", env=env)
    assert nobody.returncode == 1 and "cannot reach chatq" in nobody.stderr


def test_up_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: str(servers.free_port()) for name in ("api", "sim", "metrics", "redis")}
    env = servers.chatq_env(
        CHATQ_API_PORT=ports["api"], CHATQ_LLMSIM_PORT=ports["sim"],
        CHATQ_TELEMETRY_METRICS_PORT=ports["metrics"],
        CHATQ_REDIS_URL=f"redis://127.0.0.1:{ports['redis']}/0",
        CHATQ_LLMSIM_TTFT_MS="20", CHATQ_LLMSIM_ITL_MS="2", XDG_CACHE_HOME=str(tmp_path),
        # The client's variables in the same shell: the api and worker must not mind them.
        CHATQ_CLIENT_URL=f"http://127.0.0.1:{ports['api']}", CHATQ_CLIENT_API_KEY="unused")
    log = tmp_path / "up.log"
    with log.open("w") as out:
        # Started with SIGINT ignored, as `chatq up &` in a script or a backgrounded CI job
        # inherits it: Ctrl-C (SIGINT) must stop it all the same.
        proc = subprocess.Popen([sys.executable, "-m", "chatq", "up"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        servers.wait_for(lambda: "chatq is up" in log.read_text(), "chatq up", 60, proc, log)
        text = log.read_text()
        for step in ("starting redis-server", "starting llmsim", "starting the api",
                     "starting a worker", "curl"):
            assert step in text, text
        ask = chatq("ask", "hello", env=env)  # finds the api through CHATQ_CLIENT_URL
        assert ask.returncode == 0 and ask.stdout.startswith(llmsim.PREFIX), ask.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            # Nothing may outlive the test (its children are in its own session).
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError("chatq up did not stop within 90 s of Ctrl-C:\n"
                                 + log.read_text()[-3000:]) from None
    text = log.read_text()
    assert code == 0, text
    assert "stopped." in text
    time.sleep(0.2)
    for port in ports.values():
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            raise AssertionError(f"something still listens on {port}")
        except httpx.TransportError:
            pass


def test_the_old_client_key_variable_is_explained() -> None:
    # CHATQ_API_KEY reads as a setting `api.key`, which the server refuses: it says what to
    # use instead rather than only "Extra inputs are not permitted".
    out = chatq("api", env=servers.chatq_env(CHATQ_API_KEY="secret"), timeout=30)
    assert out.returncode != 0
    assert "CHATQ_API_KEY" in out.stderr and "CHATQ_CLIENT_API_KEY" in out.stderr, out.stderr

"""POST /v1/chat on one uvicorn process with the redis queue: top throughput, and latency
at a fixed 500 requests/s; against the seed design's minimal FastAPI route (bench.seed_api)
measured in the same run. The load comes from vegeta (Go), built once if missing.

    .venv/bin/python -m bench.api_post [--seconds 10] [--rate 500] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import harness
from tests import servers

VEGETA = "github.com/tsenart/vegeta/v12@v12.13.0"


def vegeta() -> str:
    """The vegeta binary, built with `go install` into ~/.cache/chatq/bin if missing."""
    found = shutil.which("vegeta")
    if found:
        return found
    bindir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatq" / "bin"
    exe = bindir / "vegeta"
    if not exe.exists():
        harness.say(f"building vegeta ({VEGETA}) with go install, once...")
        subprocess.run(["go", "install", VEGETA], check=True,
                       env={**os.environ, "GOBIN": str(bindir)})
    return str(exe)


def attack(url: str, path: str, rate: int, seconds: float, body: dict[str, Any]) -> dict[str, Any]:
    """One vegeta run; its JSON report (latencies in ns)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body.json").write_text(json.dumps(body))
        target = f"POST {url}{path}\nContent-Type: application/json\n@{tmp}/body.json\n"
        opts = ["-rate", str(rate), "-duration", f"{seconds}s", "-timeout", "10s"]
        if rate == 0:
            opts += ["-max-workers", "64"]
        hit = subprocess.run([vegeta(), "attack", *opts], input=target.encode(),
                             capture_output=True, check=True)
        rep = subprocess.run([vegeta(), "report", "-type", "json"], input=hit.stdout,
                             capture_output=True, check=True)
    result: dict[str, Any] = json.loads(rep.stdout)
    return result


def measure(url: str, path: str, seconds: float, rate: int) -> dict[str, float]:
    attack(url, path, 0, 2, {"message": "warm up"})
    top = attack(url, path, 0, seconds, {"message": "Why is the sky blue?"})
    fixed = attack(url, path, rate, seconds, {"message": "Why is the sky blue?"})
    return {"max_rps": top["throughput"], "max_success": top["success"],
            "p50_ms_at_rate": fixed["latencies"]["50th"] / 1e6,
            "p99_ms_at_rate": fixed["latencies"]["99th"] / 1e6,
            "success_at_rate": fixed["success"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2
    vegeta()
    with servers.redis_server() as redis:
        env = servers.chatq_env(CHATQ_REDIS_URL=redis.url, CHATQ_LOG_LEVEL="WARNING")
        harness.say("chatq api: one uvicorn process, redis queue, no worker...")
        with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api:
            mine = measure(api.url, "/v1/chat", args.seconds, args.rate)
        harness.say("peer: the seed design's FastAPI route...")
        port = servers.free_port()
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "seed.log"
            with log.open("w") as out:
                proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.seed_api:app",
                                         "--port", str(port), "--log-level", "warning"],
                                        env=env, stdout=out, stderr=subprocess.STDOUT)
            seed = servers.Server(f"http://127.0.0.1:{port}", port, proc, log)
            try:
                servers.wait_for(lambda: servers.http_ok(f"{seed.url}/healthz"), "seed api", 30,
                                 proc, log)
                peer = measure(seed.url, "/chat", args.seconds, args.rate)
            finally:
                seed.stop()
    harness.report("api_post", [
        ("chatq POST /v1/chat, max", f"{mine['max_rps']:.0f} req/s",
         f"target >= 1500; success {mine['max_success']:.1%}"),
        ("seed POST /chat, max (peer)", f"{peer['max_rps']:.0f} req/s", ""),
        ("ratio chatq / peer", f"{mine['max_rps'] / peer['max_rps']:.2f}", ""),
        (f"chatq p50 / p99 at {args.rate}/s",
         f"{mine['p50_ms_at_rate']:.1f} / {mine['p99_ms_at_rate']:.1f} ms", "target p99 < 50 ms"),
        (f"seed p50 / p99 at {args.rate}/s",
         f"{peer['p50_ms_at_rate']:.1f} / {peer['p99_ms_at_rate']:.1f} ms", ""),
    ], {"chatq": mine, "peer": peer, "seconds": args.seconds, "rate": args.rate})


if __name__ == "__main__":
    main()

"""A webhook receiver in its own process, for the benchmarks: each POST is answered 200 and
written to a file as `<arrival unix time> <body>`, one line each.

In the load generator's process, a receiver's handler threads wait for the GIL behind the
SDK client's event loop, so its arrival stamps would carry the benchmark's own delays; a
real receiver is another service. It speaks HTTP/1.1 and keeps connections open, as the
servers that receive webhooks in practice do.

    .venv/bin/python -m bench.receiver --port 8123 --out deliveries.txt
"""

from __future__ import annotations

import argparse
import http.server
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests import servers


@dataclass
class Arrival:
    """One delivery as the receiver saw it."""

    at: float
    body: str


def serve(port: int, out: Path) -> None:
    lock = threading.Lock()
    sink = out.open("a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            at = time.time()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            with lock:
                sink.write(f"{at:.6f} {body.decode()}\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class Receiver:
    """A receiver process on a free loopback port; `arrivals()` reads what it got so far."""

    def __init__(self, tmp: Path) -> None:
        self.port = servers.free_port()
        self.out = tmp / "deliveries.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self.out.touch()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port",
                                      str(self.port), "--out", str(self.out)], cwd=servers.REPO)
        servers.wait_for(self._listening, f"the webhook receiver on port {self.port}", 30,
                         self.proc)
        return self

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def arrivals(self) -> list[Arrival]:
        """Every delivery written so far (complete lines only)."""
        out = []
        for line in self.out.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                at, body = line.rstrip("\n").split(" ", 1)
                out.append(Arrival(float(at), body))
        return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.out)

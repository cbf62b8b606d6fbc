"""Fixtures for the containers tier: a real Docker engine, chatq's images and the compose stack.

`chatq_images` builds Dockerfile.api and Dockerfile.worker once per session, through
compose.yaml + compose.ci.yaml (so on the local base image that scripts/setup-docker made);
`stack` runs the whole compose stack under a project name of its own, on a free host port,
and takes it down (volumes included) at the end. Outside CI a missing engine skips, saying
what to run; in CI (CI=true) it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("CHATQ_BASE_IMAGE", "chatq-base/python:3.11-bookworm")
LOCAL_IMAGES = ["chatq-ci/nginx:local", "chatq-ci/redis:local", "chatq-ci/elasticmq:local"]
#: One tag for the images the tests build, so a second run reuses the first one's layers
#: (CHATQ_TEST_IMAGE_TAG: a tag of one's own, on a machine that others' tests share).
IMAGE_TAG = os.environ.get("CHATQ_TEST_IMAGE_TAG", "ci")
IMAGES = {"api": f"chatq-api:{IMAGE_TAG}", "worker": f"chatq-worker:{IMAGE_TAG}"}

#: Figures for the summary at the end of the run: image sizes, build and start times.
REPORT: dict[str, str] = {}


def _unavailable(message: str) -> None:
    """Outside CI a missing prerequisite skips (saying why); in CI it fails."""
    servers.unavailable(message + (
        "; run scripts/setup-docker (it installs Debian's docker.io, starts dockerd"
        " and builds the local base images)"))


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, fail the test with its output."""
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} took longer than {timeout}s:\n{exc.stdout}\n{exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def compose_command() -> list[str]:
    """`docker compose` (v2) where installed, else Debian's `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    _unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def docker() -> list[str]:
    """A Docker engine that answers, the local base images, and a compose command."""
    if not shutil.which("docker"):
        _unavailable("the docker command is not installed")
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, check=False
    )
    if info.returncode != 0:
        _unavailable(f"no Docker engine answers ({info.stderr.strip()[:200]})")
    for image in [BASE_IMAGE, *LOCAL_IMAGES]:
        if (
            subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode
            != 0
        ):
            _unavailable(f"the local image {image} is missing")
    REPORT["engine"] = f"Docker {info.stdout.strip()}"
    return compose_command()



def compose_env(**extra: str) -> dict[str, str]:
    """This environment minus chatq's own variables (so none leak into the stack), plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATQ_", "OTEL_"))}
    env.update(CHATQ_IMAGE_TAG=IMAGE_TAG, CHATQ_BASE_IMAGE=BASE_IMAGE, **extra)
    # docker-compose v1 builds through the docker CLI, not through its own Python client, which
    # walks the whole tree (.venv included) to apply .dockerignore: 2 minutes instead of 2 s.
    # The classic builder, since Debian's engine comes without buildx.
    env.update(COMPOSE_DOCKER_CLI_BUILD="1", DOCKER_BUILDKIT="0")
    return env


def image_size_mb(image: str) -> float:
    out = run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout
    return int(out.strip()) / 1e6


@pytest.fixture(scope="session")
def chatq_images(docker: list[str]) -> dict[str, str]:
    """chatq-api and chatq-worker, built from the Dockerfiles on the local base image."""
    cmd = [*docker, "-f", "compose.yaml", "-f", "compose.ci.yaml", "build", "worker", "api-1"]
    start = time.monotonic()
    run(cmd, env=compose_env(), timeout=900)
    REPORT["build (this run)"] = f"{time.monotonic() - start:.0f} s"
    for image in IMAGES.values():
        REPORT[f"image {image}"] = f"{image_size_mb(image):.0f} MB"
    return IMAGES


# The test's own knobs, on top of compose.yaml and compose.ci.yaml: a slow model, so there
# is time to kill a worker mid-answer, and a short lease, so another worker takes the job soon.
TEST_OVERRIDE = """\
services:
  llmsim:
    environment:
      CHATQ_LLMSIM_TTFT_MS: "300"
      CHATQ_LLMSIM_ITL_MS: "{itl_ms}"
  api-1:
    environment: {{CHATQ_QUEUE_VISIBILITY_SECONDS: "{visibility}"}}
  api-2:
    environment: {{CHATQ_QUEUE_VISIBILITY_SECONDS: "{visibility}"}}
  worker:
    restart: "no"
    environment: {{CHATQ_QUEUE_VISIBILITY_SECONDS: "{visibility}"}}
"""


@dataclass
class Stack:
    """One compose project: its command line, host port and helpers to drive it."""

    compose: list[str]
    project: str
    port: int
    env: dict[str, str]
    files: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cmd(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [x for f in self.files for x in ("-f", f)]
        return run(
            [*self.compose, "-p", self.project, *files, *args], env=self.env, timeout=timeout, check=check
        )

    def container(self, service: str) -> str:
        """The id of the service's (one) container."""
        ids = self.cmd("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return self.cmd("logs", "--no-color", service).stdout

    def request(self, method: str, path: str, body: Any = None, timeout: float = 90) -> tuple[int, Any]:
        """One HTTP request through nginx; the status and the decoded JSON body."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ask(self, message: str) -> str:
        status, body = self.request("POST", "/v1/chat", {"message": message})
        assert status == 202, body
        return str(body["id"])

    def wait_status(self, job_id: str, wanted: set[str], timeout: float) -> dict[str, Any]:
        """Poll the job until its status is one of `wanted`."""
        def fetch() -> dict[str, Any]:
            status, job = self.request("GET", f"/v1/chat/{job_id}")
            assert status == 200, job
            return job

        return servers.poll(fetch, lambda job: job["status"] in wanted,
                            f"job {job_id} to reach {wanted}", timeout, interval=0.2)

    def wait_healthy(self, timeout: float = 120) -> None:
        """Wait until nginx answers and the API behind it is ready (Redis and the queue)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                status, body = self.request("GET", "/readyz", timeout=5)
                if status == 200:
                    return
                last = f"{status} {body}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        pytest.fail(
            f"the stack on {self.url} was not ready in {timeout}s (last: {last})\n"
            + self.cmd("ps", check=False).stdout
        )

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run(["docker", "ps", "-aq", "--filter", label]).stdout.split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split(),
        }

    def down(self) -> None:
        self.cmd("down", "-v", "--remove-orphans", "--timeout", "40", timeout=180)


@pytest.fixture(scope="module")
def stack(
    docker: list[str], chatq_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole compose stack (nginx, api x2, worker, llmsim, redis, ElasticMQ), up and ready."""
    tmp = tmp_path_factory.mktemp("compose")
    override = tmp / "compose.test.yaml"
    override.write_text(TEST_OVERRIDE.format(itl_ms=400, visibility=6))
    port = free_port()
    st = Stack(
        compose=docker,
        project=f"chatqtest{uuid.uuid4().hex[:8]}",
        port=port,
        env=compose_env(CHATQ_HTTP_PORT=str(port)),
        files=["compose.yaml", "compose.ci.yaml", str(override)],
    )
    start = time.monotonic()
    try:
        st.cmd("up", "-d", "--build", timeout=600)
        st.wait_healthy()
        REPORT["compose up --build (images cached) to ready"] = f"{time.monotonic() - start:.0f} s"
        yield st
    finally:
        st.down()


def pytest_sessionfinish(session: pytest.Session) -> None:
    servers.hand_section(session.config, "containers tier", REPORT)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("containers tier")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")

"""chatq's two images on their own: non-root, the CLI inside, no build tools, labels, health."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import pytest

from tests.containers.conftest import run
from tests.servers import free_port, http_ok, wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(params=["api", "worker"])
def image(request: pytest.FixtureRequest, chatq_images: dict[str, str]) -> str:
    return chatq_images[request.param]


def inspect(image: str) -> dict[str, Any]:
    return json.loads(run(["docker", "image", "inspect", image]).stdout)[0]


def test_runs_as_a_non_root_user(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] not in ("", "0", "root"), config["User"]
    uid = run(["docker", "run", "--rm", "--entrypoint", "id", image, "-u"]).stdout.strip()
    assert uid == "10001"


def test_the_cli_works_inside(image: str) -> None:
    out = run(["docker", "run", "--rm", image, "--help"]).stdout
    for command in ("api", "worker", "llmsim", "ask"):
        assert command in out
    ask = run(["docker", "run", "--rm", image, "ask", "--help"]).stdout
    assert "--url" in ask


def test_entrypoint_is_exec_form_with_a_healthcheck_and_labels(image: str) -> None:
    config = inspect(image)["Config"]
    # Exec form: chatq itself is PID 1 and receives SIGTERM (no /bin/sh -c in between).
    assert config["Entrypoint"] == ["chatq"]
    assert config["Cmd"] in (["api"], ["worker"])
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_no_build_tools_in_the_final_stage(image: str) -> None:
    probe = (
        "import shutil, importlib.util; "
        "print([t for t in ('gcc', 'cc', 'make', 'g++', 'pip', 'pip3') if shutil.which(t)], "
        "importlib.util.find_spec('pip') is not None)"
    )
    out = run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe]).stdout
    assert out.strip() == "[] False", out


def test_worker_image_carries_the_operator(chatq_images: dict[str, str]) -> None:
    # The chart runs `python -m chatq_operator` from this image (the `operator` extra).
    python = ["docker", "run", "--rm", "--entrypoint", "python", chatq_images["worker"]]
    run([*python, "-c", "import kopf, kubernetes"])
    out = run([*python, "-m", "chatq_operator", "--help"]).stdout
    assert "QueueScaler" in out, out


def test_worker_metrics_are_reachable_from_outside(chatq_images: dict[str, str]) -> None:
    # Probes and Prometheus come from outside the container: a loopback bind would fail them.
    port = free_port()
    name = f"chatq-metrics-{uuid.uuid4().hex[:8]}"
    run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:9100",
         "-e", "CHATQ_REDIS_URL=redis://127.0.0.1:1/0", chatq_images["worker"]])
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/metrics"),
                 "the worker's /metrics through a published port", 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"chatq_worker_concurrency" in resp.read()
    finally:
        run(["docker", "rm", "-f", name], check=False)

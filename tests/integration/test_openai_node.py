"""The official `openai` npm package, run with the machine's Node.js, as a chatq client on
both queue backends: create in background, poll, stream, resume with starting_after."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from chatq import llmsim

from tests import servers
from tests.conftest import BACKENDS, StackFactory

CLIENT = Path(__file__).parent / "node" / "responses_client.cjs"
pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def sdk_home() -> Path:
    """Where scripts/setup-node installed the npm package."""
    marker = servers.REPO / ".venv" / ".node-openai-home"
    node = shutil.which("node")
    if node is None or not marker.exists():
        servers.unavailable("the openai npm package is not set up: run scripts/setup-node")
    home = Path(marker.read_text().strip())
    if not (home / "node_modules" / "openai").is_dir():
        servers.unavailable(f"{home} lacks node_modules/openai: run scripts/setup-node")
    return home


def test_node_sdk_background_poll_and_stream(stack_factory: StackFactory, backend: str) -> None:
    home = sdk_home()
    stack = stack_factory(backend, CHATQ_API_KEYS="js-key")
    out = subprocess.run(["node", str(CLIENT)], capture_output=True, text=True, timeout=90,
                         env=servers.chatq_env(OPENAI_NODE_HOME=str(home), CHATQ_URL=stack.url,
                                               CHATQ_KEY="js-key"))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["created"]["id"].startswith("resp_") and got["created"]["status"] == "queued"
    assert got["created"]["background"] is True
    assert got["polled"]["status"] == "completed"
    assert got["polled"]["text"].startswith(llmsim.PREFIX)  # the JS SDK's own output_text
    assert got["polled"]["usage"]["output_tokens"] == 12
    stream = got["stream"]
    assert stream["seqs"] == list(range(len(stream["seqs"]))), "resumed without loss or repeat"
    assert stream["types"][0] == "response.created" and stream["types"][-1] == "response.completed"
    assert stream["types"].count("response.output_text.delta") > 3  # some before the cut, some after
    assert stream["text"] == stream["final"] and stream["text"].startswith(llmsim.PREFIX)
    assert got["notFound"] == {"name": "NotFoundError", "status": 404, "code": "not_found"}

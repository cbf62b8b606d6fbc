"""The code stays lint-clean (ruff, complexity capped) and type-checked (mypy strict)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import REPO


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tool", [
    ["ruff", "check", "services", "operator", "tests", "k8s-tests", "bench"],
    ["mypy"],
])
def test_static_checks(tool: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", *tool], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]

"""`python -m chatq_operator`: which namespaces it watches, and its refusal to guess."""

from __future__ import annotations

import subprocess
import sys

import pytest
from chatq_operator import __main__ as cli


def test_namespaces_from_args_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATQ_OPERATOR_NAMESPACES", raising=False)
    assert cli.parse_args(["-n", "a", "--namespace", "b"]).namespace == ["a", "b"]
    monkeypatch.setenv("CHATQ_OPERATOR_NAMESPACES", "x, y,")
    assert cli.parse_args([]).namespace == ["x", "y"]
    assert cli.parse_args(["-A"]).all_namespaces


def test_no_namespace_is_an_error_that_says_what_to_do() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "chatq_operator"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert "--namespace" in proc.stderr and "--all-namespaces" in proc.stderr

"""`python -m chatq_operator`: which namespaces it watches, and its refusal to guess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from chatq_operator import __main__ as cli
from chatq_operator import config


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


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["-A"], {}, config.Options()),
    (["-A", "--metrics-port", "0"], {"CHATQ_OPERATOR_METRICS_PORT": "9"}, config.Options(metrics_port=0)),
    (["-A"], {"CHATQ_OPERATOR_METRICS_PORT": "9", "CHATQ_OPERATOR_METRICS_HOST": "127.0.0.1"},
     config.Options(metrics_port=9, metrics_host="127.0.0.1")),
    (["-A"], {"CHATQ_REDIS_URL": "redis://r"},
     config.Options(redis_url="redis://r", busy_redis_url="redis://r")),
    (["-A"], {"CHATQ_REDIS_URL": "redis://r", "CHATQ_OPERATOR_BUSY_REDIS_URL": "redis://b"},
     config.Options(redis_url="redis://r", busy_redis_url="redis://b")),
])
def test_options_come_from_args_then_env(argv: list[str], env: dict[str, str],
                                         expected: config.Options) -> None:
    before = dict(os.environ)
    assert cli.options(cli.parse_args(argv), env) == expected
    assert dict(os.environ) == before  # handed over in kopf's memo, not the environment

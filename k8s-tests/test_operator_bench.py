"""The QueueScaler benchmark's smoke run (`--quick`) on this session's cluster.

No timing is asserted (figures belong in the README); what is asserted is that it runs end
to end, reports its table and keeps its figures, and that under chatq no pod was removed
while it still had jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_operator_bench_quick(kube: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATQ_", "OTEL_"))}
    env["KUBECONFIG"] = str(kube.kubeconfig)
    out = subprocess.run([sys.executable, "-m", "bench.operator_reaction", "--quick", "--trials", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "ratio = chatq measured" in out.stdout, out.stdout
    figures = json.loads((REPO / "bench" / "results" / "operator_reaction_quick.json").read_text())
    rows = figures["rows"]
    assert len(figures["reaction_trials"]["first"]) == 2
    assert rows["busy pods removed at scale-in"]["measured"] == 0, rows
    assert rows["zero replicas, after the last job"]["measured"] is not None, rows

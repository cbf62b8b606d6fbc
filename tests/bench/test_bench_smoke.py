"""The benchmarks' short smoke runs (`--quick`): they run end to end and report a ratio
against their peer. No timing is asserted here; figures belong in the notes and README.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.servers import REPO, chatq_env


@pytest.mark.timeout(1200)  # the peers' first run installs their venvs
@pytest.mark.parametrize(("module", "ratio_line"), [
    ("bench.worker_throughput", "ratio chatq / peer"),
    ("bench.api_post", "ratio chatq / peer"),
    ("bench.overhead", "ratio chatq p50 / peer p50"),
    ("bench.responses", "ratio responses / chat p50"),
    ("bench.batches", "ratio batch / interactive"),
    ("bench.rate_budget", "ratio chatq / peer (use)"),
    ("bench.peers.run", "ratio chatq / best peer, answers per CPU-s"),
    ("bench.soak", "ratio answered / accepted"),
    ("bench.held", "ratio held / none"),
])
def test_bench_quick(module: str, ratio_line: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--quick"], cwd=REPO, env=chatq_env(),
                         capture_output=True, text=True, timeout=1100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ratio_line in out.stdout, out.stdout
    name = module.split(".")[1]
    figures = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
    assert figures, "the run kept its figures"

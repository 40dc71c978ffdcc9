"""The benchmark scripts run end to end (tiny sizes: this checks the scripts, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_flows_runs_every_flow_and_reports_finite_rates(tmp_path, tiny_bc_zoo):
    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_flows.py"), "--zoo", str(zoo), "--modes", "eager", "--couplings",
         "ot-perm", "--d-model", "8", "--layers", "1", "--steps", "2", "--warmup", "1", "--sample-n", "3",
         "--sample-steps", "2", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    rows = json.loads(out.stdout)["rows"]
    assert [r["flow"] for r in rows] == ["euclidean", "normalized", "geometric"]
    for r in rows:
        assert r["coupling"] == "ot-perm" and r["mode"] == "eager" and r["sample_finite"]
        assert r["loop_steps_per_s"] > 0 and r["field_steps_per_s"] > 0 and r["sample_s"] > 0
        assert r["coupling_ms"] > 0  # ot-perm does work; independent would be ~0


def test_bench_flows_rejects_a_missing_zoo(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "bench_flows.py"), "--zoo", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no zoo file" in out.stderr

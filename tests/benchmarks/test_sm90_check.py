"""`make sm90-check` stays alive: one kernel compiles offline for sm_90a (no GPU) and lands in the table.

The script must run without the interpreter (it compiles), so it runs in a subprocess: the test session has
TRITON_INTERPRET=1 (tests/conftest.py), under which triton.jit returns interpreted functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the offline compile needs the triton package")
ROOT = Path(__file__).resolve().parents[2]


def test_one_kernel_compiles_for_sm90(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.sm90_check", "--d", "16", "--dtype", "fp32", "--kernels",
           "_main_state_fwd_kernel", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "sm90_check.json").read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["_main_state_fwd_kernel"]
    (row,) = rows
    assert row["registers"] > 0 and row["shared_bytes"] > 0 and row["wgmma"]
    assert row["grid"] == [8 * 16, 1] and row["programs"] == 128  # B x H programs, one BV tile at d = 16
    assert "| `_main_state_fwd_kernel` | linear | 16 | fp32 |" in (tmp_path / "sm90_check.md").read_text()

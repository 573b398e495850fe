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


def test_update_replaces_only_the_recompiled_rows(tmp_path) -> None:
    """--update keeps the table's other rows and puts a recompiled row where it was."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    table = tmp_path / "sm90_check.json"

    def run(kernel: str, *extra: str) -> list:
        cmd = [sys.executable, "-m", "benchmarks.sm90_check", "--d", "16", "--dtype", "fp32", "--kernels", kernel,
               "--out", str(tmp_path), *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(table.read_text())["rows"]

    run("_main_state_fwd_kernel")
    rows = run("_main_out_fwd_kernel", "--update")
    assert [r["kernel"] for r in rows] == ["_main_state_fwd_kernel", "_main_out_fwd_kernel"]
    first = rows[0]
    doctored = json.loads(table.read_text())
    doctored["rows"][0]["registers"] = -1  # a stale figure that the update must replace
    table.write_text(json.dumps(doctored))
    rows = run("_main_state_fwd_kernel", "--update")
    assert [r["kernel"] for r in rows] == ["_main_state_fwd_kernel", "_main_out_fwd_kernel"]
    assert rows[0]["registers"] == first["registers"] > 0
    assert "Met by" in (tmp_path / "sm90_check.md").read_text()

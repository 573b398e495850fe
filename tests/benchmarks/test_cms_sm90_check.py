"""benchmarks/cms_sm90_check.py: the offline sm_90a compile of the CMS kernels records the runtime's launches and
reads ptxas' report (in a subprocess: the script turns Triton's interpreter off for its whole process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the offline compile needs the triton package")
ROOT = Path(__file__).resolve().parents[2]


def test_compiles_one_kernel_for_sm90(tmp_path):
    out = tmp_path / "cms_sm90_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.cms_sm90_check", "--presets", "tiny", "--dtypes", "bf16",
                           "--kernels", "_step_y_kernel", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["_step_y_kernel"]
    (row,) = rows
    # tiny: D = 128 over 64-wide D tiles, B = 8 sequences; a matrix-vector kernel: no tensor cores
    assert row["grid"] == [2, 8] and row["D"] == 128 and row["registers"] > 0 and row["wgmma"] is False
    assert row["shared_bytes"] <= json.loads(out.read_text())["smem_limit_bytes"]
    assert "| `_step_y_kernel` | tiny (128," in done.stdout

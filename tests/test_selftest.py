"""``vpeft selftest`` without a GPU: it says so and runs the interpreter checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the selftest runs the real-size checks")
def test_selftest_on_cpu_runs_interpreter_checks(tmp_path):
    out = tmp_path / "selftest.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "vpeft.cli", "selftest", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "no CUDA GPU is visible" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pass"] and report["device"].startswith("cpu")
    names = [r["case"] for r in report["numerics"]]
    assert any(n.startswith("st_adapter") for n in names) and any("dropout" in n for n in names)
    assert any(n.startswith("token_shift_attention") for n in names)
    # every gradient was compared, and the fused numbers are not the reference's own
    for r in report["numerics"]:
        assert len(r["errors"]) >= 8
        assert any(e["fused"] > 0 for e in r["errors"])

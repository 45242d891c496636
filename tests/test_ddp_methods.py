"""torchrun --nproc_per_node 2 (gloo, CPU) trains each of the five methods for a few steps."""
import json
import os
import subprocess
import sys

import pytest

from vpeft.data.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_torchrun_two_processes_train_every_method(tmp_path):
    data = write_synthetic(str(tmp_path / "syn"), num_train=8, num_val=4, size=32, frames=4, progress=False)
    (tmp_path / "data.json").write_text(json.dumps(data))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_methods.py"), str(tmp_path / "data.json"), str(tmp_path / "runs")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["method"] for x in rows] == ["linear_probe", "full_finetune", "st_adapter", "msta", "side4video"]
    for x in rows:
        assert x["world"] == 2 and x["steps"] >= 2, x
        assert x["same_weights_on_every_rank"], x

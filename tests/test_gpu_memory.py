"""GPU checks of the memory work (skipped without CUDA: they measure GPU memory).

The CPU tests (test_side4video_memory.py, test_plan.py) cover the logic; these run the
real configurations where a GPU exists.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (measures GPU memory)")]


def test_vit_e14_side4video_32x576_trains_at_8_frames_in_40gb():
    from vpeft import profiling

    rec = profiling.measure("side4video_light", "EVA02-E-14", 8, device="cuda", backend="fused", rounds=1,
                            warmup=1, count_flops=False, budget_gb=40.0)
    assert rec["batch"] == 16 and rec["options"]["stream"] and rec["options"]["checkpointing"]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["peak_reserved_gb"] <= 40.0


def test_plan_finds_the_cap_on_a_tiny_model():
    from vpeft import plan

    res = plan.plan("side4video_light", "tiny-vit", 4, 2e9, max_batch=8, log=lambda s: None)
    assert res["batch"] == 8 and res["first_failure"] is None
    assert res["record"]["status"] == "ok" and res["record"]["peak_allocated_gb"] <= 2.0

"""The benchmark machinery on the CPU: a measured record, out-of-memory records, result
writers (JSON merge, Markdown, PNG), the README section and collection of bench_*.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, report  # noqa: E402
from vpeft import profiling  # noqa: E402


def _rec(backbone="ViT-B-16", method="side4video_light", frames=8, backend="eager", status="ok", **kw):
    r = dict(backbone=backbone, method=method, frames=frames, batch=32, backend=backend, dtype="bfloat16",
             device_type="cuda", status=status, budget_gb=None, trainable_params=4_500_000,
             peak_allocated_gb=5.0, peak_reserved_gb=5.5, clips_per_s=100.0, flops_per_clip=1e12,
             attention="sdpa", op_backends={"ladder_projection": [backend]})
    r.update(kw)
    return r


def test_measure_tiny_case_on_cpu():
    rec = profiling.measure("side4video_light", "tiny-eva", 4, device="cpu", dtype=torch.float32,
                            rounds=1, warmup=1)
    assert rec["status"] == "ok"
    assert rec["options"] == dict(side_layers=2, side_width=64, stream=True, checkpointing=True)
    assert rec["clips_per_s"] > 0 and len(rec["step_times_s"]) == 1
    assert rec["trainable_params"] > rec["trainable_params_no_head"] > 0
    assert rec["flops_per_clip"] > 0
    assert rec["peak_allocated_gb"] is None  # no CUDA allocator statistics on the CPU
    assert rec["op_backends"]["ladder_projection"] == ["eager"]
    assert "scaled_dot_product_attention" in rec["attention"]


def test_flops_per_clip_does_not_depend_on_batch():
    a = profiling.measure("linear_probe", "tiny-vit", 4, 1, device="cpu", dtype=torch.float32, rounds=1, warmup=1)
    b = profiling.measure("linear_probe", "tiny-vit", 4, 3, device="cpu", dtype=torch.float32, rounds=1, warmup=1)
    assert a["flops_per_clip"] == pytest.approx(b["flops_per_clip"], rel=1e-6)


@pytest.mark.parametrize("where", ["build", "steps"])
def test_out_of_memory_is_recorded_not_raised(monkeypatch, where):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    if where == "build":
        monkeypatch.setattr(profiling, "build_case", boom)
    else:
        monkeypatch.setattr(profiling.TrainingStep, "__call__", boom)
    rec = profiling.measure("linear_probe", "tiny-vit", 4, device="cpu", dtype=torch.float32, rounds=1,
                            warmup=1, count_flops=False)
    assert rec["status"] == "oom" and "out of memory" in rec["error"]
    assert rec["oom_phase"] == ("build" if where == "build" else "steps")


def test_other_errors_propagate(monkeypatch):
    monkeypatch.setattr(profiling, "build_case", lambda *a, **k: (_ for _ in ()).throw(KeyError("x")))
    with pytest.raises(KeyError):
        profiling.measure("linear_probe", "tiny-vit", 4, device="cpu")


def test_presets_on_backbones():
    e14 = profiling.BACKBONES["EVA02-E-14"]
    assert profiling.method_options("side4video_light", e14) == (
        "side4video", dict(side_layers=32, side_width=576, stream=True, checkpointing=True))
    assert e14.budget_gb == 40.0 and e14.batch == 16
    assert profiling.BACKBONES["ViT-B-16"].batch == 32 and profiling.BACKBONES["ViT-L-14"].batch == 16
    assert profiling.method_options("side4video", profiling.BACKBONES["ViT-L-14"])[1]["side_width"] == 512
    with pytest.raises(ValueError, match="defines no side4video configuration for EVA02-E-14"):
        profiling.method_options("side4video", e14)


def test_merge_records_replaces_same_case_and_keeps_others(tmp_path):
    key = lambda r: (r["backbone"], r["method"], str(r["frames"]), r["backend"])  # noqa: E731
    path = tmp_path / "e2e.json"
    common.merge_records(path, [_rec(), _rec(backend="fused", clips_per_s=150.0)], key, {"env": {"device": "A"}})
    data = common.merge_records(path, [_rec(clips_per_s=120.0), _rec(frames=16)], key, {"env": {"device": "B"}})
    assert json.loads(path.read_text()) == data
    assert data["env"]["device"] == "B" and len(data["records"]) == 3
    eager8 = [r for r in data["records"] if r["frames"] == 8 and r["backend"] == "eager"]
    assert [r["clips_per_s"] for r in eager8] == [120.0]


def test_device_files_and_targets(tmp_path):
    recs = [_rec(), _rec(backend="fused", clips_per_s=140.0, peak_allocated_gb=4.0),
            _rec(method="st_adapter_12x384", peak_allocated_gb=15.0),
            _rec(method="st_adapter_12x384", backend="fused", clips_per_s=110.0),
            _rec(backbone="EVA02-E-14", batch=16, status="oom", oom_phase="steps", budget_gb=40.0)]
    data = {"env": {"device": "NVIDIA H100 80GB HBM3", "command": "pytest benchmarks/ --benchmark-only"},
            "records": recs}
    md, png = report.write_device(data, tmp_path)
    text = md.read_text()
    assert "NVIDIA H100" in text and "**OOM** in 40 GB (steps)" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    targets = "\n".join(report.targets_markdown(data))
    assert "Side4Video light B/16, batch 32, 8 frames: peak <= 6 GB: met: 4.00 GB" in targets
    assert "ST-Adapter B/16, batch 32, 8 frames: peak <= 14 GB: met: 5.00 GB" in targets
    assert "ST-Adapter B/16: fused >= 1.3x eager clips/s: **not met**: 1.10x" in targets
    assert "E/14 32x576, batch 16, 8 frames: trains within 40 GB: **not met** (out of memory)" in targets
    assert "L/14 24x512, batch 16, 8 frames: peak <= 25 GB: not measured" in targets


def test_readme_section_says_when_there_are_no_gpu_results(tmp_path):
    section = report.readme_section(tmp_path)
    assert "No GPU results are committed yet" in section and "GB |" not in section
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / report.FILE).write_text(json.dumps({"env": {}, "records": [
        _rec(backbone="tiny-vit", device_type="cpu", peak_allocated_gb=None, peak_reserved_gb=None)]}))
    section = report.readme_section(tmp_path)
    assert "No GPU results are committed yet" in section and "not comparable" in section
    assert "| Side4Video light | tiny-vit | 32 | n/m / - | 100.00 / - |" in section
    (tmp_path / "nvidia-h100").mkdir()
    (tmp_path / "nvidia-h100" / report.FILE).write_text(json.dumps({"env": {"device": "H100"},
                                                                     "records": [_rec()]}))
    section = report.readme_section(tmp_path)
    assert "No GPU results" not in section and "| 5.00 / - |" in section and "8.9 GB |" in section


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n")
    report.update_readme(f"{report.BEGIN}\nA\n{report.END}", readme)
    report.update_readme(f"{report.BEGIN}\nB\n{report.END}", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and "B" in text and "\nA\n" not in text and text.count(report.BEGIN) == 1


@pytest.mark.parametrize("target", ["benchmarks/", "benchmarks/bench_e2e.py"])
def test_benchmarks_collect_bench_files_once(target):
    out = subprocess.run([sys.executable, "-m", "pytest", target, "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line for line in out.stdout.splitlines() if "bench_e2e.py::test_training_step[" in line]
    assert any("EVA02-E-14-side4video_light-T8-fused" in i for i in ids)
    assert any("tiny-vit-msta-T16-eager" in i for i in ids)
    assert len(ids) == 3 * 7 * 2 * 2 + (7 + 1) * 2 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the suite")
def test_gpu_sized_case_is_skipped_with_a_reported_reason(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "-k", "test_training_step and ViT-B-16-linear_probe-T8-eager"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout
    assert "SKIPPED" in out.stdout and "needs a CUDA device" in out.stdout

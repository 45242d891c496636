"""End-to-end training-step benchmark: memory, throughput, parameters and FLOPs per method.

    pytest benchmarks/ --benchmark-only                    # everything this machine can run
    pytest benchmarks/bench_e2e.py --benchmark-only -k "ViT-B-16 and T8"

One case = one full training step (forward, backward, AdamW step) of one method on one
backbone at 8 or 16 frames with the papers' batch sizes (B/16: 32 clips, L/14 and
E/14: 16 clips) in bf16, with the ops on the eager backend or fused where available
(``VPEFT_BACKEND=eager`` / ``auto``). Each case records peak allocated and reserved
CUDA memory, clips/s (median step), trainable parameters, FLOPs per clip, the frozen
tower's attention and which backend every op ran on. A case that does not fit is
recorded as out of memory. ViT-E/14 cases run under a 40 GB budget
(``torch.cuda.set_per_process_memory_fraction``); ``VPEFT_BENCH_BUDGET_GB`` imposes a
budget on the other GPU cases too.

Results (merged with earlier runs by case) go to ``benchmarks/results/<device>/e2e.json``
with ``e2e.md`` and ``e2e.png`` beside them; see :mod:`benchmarks.report`.

Without CUDA the GPU-sized cases are skipped (the reason is printed) and tiny random
backbones run the same code on the CPU: ``tiny-vit`` (every method) and ``tiny-eva``
(Side4Video light with ViT-E's settings: post-norm, streaming, checkpointing).

Every case also records the estimate of the same step by :mod:`vpeft.memory` (exact
tensor accounting on fake tensors; allocator overhead not included), with the ratio
measured / estimated where the GPU measured. ``test_estimated_step`` estimates the
paper-sized cases (B/16 batch 32, L/14 and E/14 batch 16, 8 frames, eager and fused)
on any machine; they go to ``benchmarks/results/estimate/memory.json`` (and
``memory.md``, ``memory.png``).
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common, report
from vpeft import memory, profiling

GPU_BACKBONES = ("ViT-B-16", "ViT-L-14", "EVA02-E-14")
CPU_BACKBONES = ("tiny-vit", "tiny-eva")
CPU_PRESETS = {"tiny-vit": profiling.METHOD_PRESETS, "tiny-eva": ("side4video_light",)}
FRAMES = (8, 16)
BACKENDS = ("eager", "fused")
NO_CUDA = "GPU-sized case: needs a CUDA device, this machine has none (the tiny CPU cases run instead)"
HAS_CUDA = "tiny CPU case: runs only where there is no CUDA device (the GPU-sized cases run instead)"


def _cases():
    for bb in GPU_BACKBONES + CPU_BACKBONES:
        presets = profiling.METHOD_PRESETS if bb in GPU_BACKBONES else CPU_PRESETS[bb]
        for preset in presets:
            for frames in FRAMES:
                for backend in BACKENDS:
                    yield pytest.param(bb, preset, frames, backend, id=f"{bb}-{preset}-T{frames}-{backend}")


def _key(r: dict) -> tuple:
    return (r["backbone"], r["method"], str(r["frames"]), r["backend"], str(r["batch"]), str(r.get("budget_gb")))


def _collect(slug, file_name: str, key, header: dict, write, what: str):
    """A module fixture's body: yields the list the cases append to; once all ran (and only if
    any did), merges it into ``results/<slug>/file_name`` by ``key`` (slug None: this device)
    and lets ``write(data, directory)`` render it."""
    records = []
    yield records
    if not records:
        return
    directory = common.results_dir(slug)
    data = common.merge_records(directory / file_name, records, key, header)
    write(data, directory)
    print(f"\n{what}: {len(records)} case(s) written to {directory}")


@pytest.fixture(scope="module")
def e2e_records(bench_env):
    """Collects this module's records; writes JSON, Markdown and PNG once all cases ran."""
    header = {"suite": "vpeft end-to-end training step (benchmarks/bench_e2e.py)", "env": bench_env}
    if bench_env["device_type"] == "cpu":
        header["label"] = "CPU, tiny random backbones: not comparable to GPU results or the papers"
    yield from _collect(None, report.FILE, _key, header, report.write_device, "vpeft e2e")


@pytest.mark.parametrize("backbone,preset,frames,backend", list(_cases()))
def test_training_step(benchmark, e2e_records, bench_env, backbone, preset, frames, backend):
    spec = profiling.BACKBONES[backbone]
    cuda = torch.cuda.is_available()
    if spec.gpu and not cuda:
        pytest.skip(NO_CUDA)
    if not spec.gpu and cuda:
        pytest.skip(HAS_CUDA)
    try:
        profiling.method_options(preset, spec)
    except ValueError as exc:
        pytest.skip(str(exc))
    budget = spec.budget_gb
    if budget is None and cuda and os.environ.get("VPEFT_BENCH_BUDGET_GB"):
        budget = float(os.environ["VPEFT_BENCH_BUDGET_GB"])
    rounds, warmup = (5, 2) if cuda else (2, 1)  # on the CPU the FLOP-counting step is the only warm-up

    def runner(step, n, _warm):
        benchmark.pedantic(step, rounds=n, iterations=1, warmup_rounds=0)

    benchmark.group = f"e2e {backbone} T{frames}"
    rec = profiling.measure(preset, backbone, frames, device="cuda" if cuda else "cpu", backend=backend,
                            rounds=rounds, warmup=warmup, budget_gb=budget, runner=runner)
    rec["env"] = {k: bench_env[k] for k in ("device", "torch", "triton", "git_commit", "date_utc", "command")}
    rec["flash_attn"] = profiling.flash_attn_status()
    benchmark.extra_info.update({k: rec.get(k) for k in (
        "status", "batch", "peak_allocated_gb", "peak_reserved_gb", "clips_per_s", "trainable_params",
        "flops_per_clip", "attention")})
    est = memory.estimate_step(preset, backbone, frames, rec["batch"], backend=backend, count_flops=False)
    rec["estimate"] = est.summary()
    if rec["status"] == "ok" and rec.get("peak_allocated_gb"):
        rec["measured_over_estimated"] = rec["peak_allocated_gb"] * profiling.GB / est.peak_allocated_bytes
    e2e_records.append(rec)
    if rec["status"] == "ok":
        assert rec["clips_per_s"] > 0 and rec["trainable_params"] > 0
        if cuda:
            assert rec["peak_allocated_gb"] > 0


ESTIMATE_FRAMES = 8


def _estimate_cases():
    for bb in GPU_BACKBONES:
        for preset in profiling.METHOD_PRESETS:
            for backend in BACKENDS:
                yield pytest.param(bb, preset, ESTIMATE_FRAMES, backend, id=f"{bb}-{preset}-T{ESTIMATE_FRAMES}-{backend}")


OPTION_CASES = (
    # (backbone, preset, frames, adapt options over the preset's): the recompute options at the
    # papers' batch, each beside the preset's own step (its row in the main table)
    ("ViT-B-16", "st_adapter_12x384", 8, {"recompute_adapters": True}),
    ("ViT-B-16", "st_adapter_12x384", 8, {"checkpoint_every": 2}),
    ("ViT-B-16", "st_adapter_12x384", 8, {"checkpointing": True}),
    ("ViT-B-16", "side4video_light", 8, {"checkpointing": True}),
    ("ViT-B-16", "side4video_light", 8, {"checkpointing": True, "recompute_levels": True}),
    ("ViT-L-14", "side4video", 8, {"checkpointing": True}),
    ("ViT-L-14", "side4video", 8, {"checkpointing": True, "recompute_levels": True}),
    ("EVA02-E-14", "side4video_light", 8, {"tower_chunk": 16}),
    ("EVA02-E-14", "side4video_light", 16, {}),
    ("EVA02-E-14", "side4video_light", 16, {"tower_chunk": 32}),
)
"""The recompute-option rows of the estimate report (``benchmarks.report.options_markdown``)."""


def _variant(options: dict) -> str:
    return ",".join(f"{k}={options[k]}" for k in sorted(options))


def _estimate_key(r: dict) -> tuple:
    return (r["backbone"], r["method"], str(r["frames"]), r["backend"], str(r["batch"]), r.get("variant", ""))


@pytest.fixture(scope="module")
def estimate_records(bench_env):
    """Collects the paper-sized estimates; writes them to results/estimate/ once all ran."""
    header = {"suite": "vpeft estimated training step (benchmarks/bench_e2e.py::test_estimated_step)",
              "label": report.ESTIMATE_LABEL, "env": bench_env}
    yield from _collect(report.ESTIMATE_DIR, report.ESTIMATE_FILE, _estimate_key, header,
                        report.write_estimates, "vpeft estimates")


@pytest.mark.parametrize("backbone,preset,frames,backend", list(_estimate_cases()))
def test_estimated_step(benchmark, estimate_records, bench_env, backbone, preset, frames, backend):
    """One paper-sized training step estimated by vpeft.memory on fake tensors (any machine)."""
    spec = profiling.BACKBONES[backbone]
    try:
        profiling.method_options(preset, spec)
    except ValueError as exc:
        pytest.skip(str(exc))
    _estimate(benchmark, estimate_records, bench_env, f"estimate {backbone} T{frames}", backbone, preset, frames,
              backend)


def _estimate(benchmark, records, env, group, backbone, preset, frames, backend, options=None):
    """Estimate one step with vpeft.memory as a benchmark case and collect its record
    (with ``options``: a recompute-option row, marked by its ``variant``)."""
    benchmark.group = group
    rep = benchmark.pedantic(lambda: memory.estimate_step(preset, backbone, frames, backend=backend, options=options),
                             rounds=1, iterations=1, warmup_rounds=0)
    rec = rep.summary()
    if options is not None:
        rec["variant"] = _variant(options) or "preset"
    rec["env"] = {k: env[k] for k in ("device", "torch", "git_commit", "date_utc", "command")}
    benchmark.extra_info.update({k: rec.get(k) for k in ("batch", "peak_allocated_gb", "saved_bytes", "flops")})
    records.append(rec)
    assert rep.peak_allocated_bytes >= rep.categories["weights"] > 0


def _option_cases():
    for bb, preset, frames, options in OPTION_CASES:
        for backend in BACKENDS:
            yield pytest.param(bb, preset, frames, options, backend,
                               id=f"{bb}-{preset}-T{frames}-{_variant(options) or 'preset'}-{backend}")


@pytest.mark.parametrize("backbone,preset,frames,options,backend", list(_option_cases()))
def test_estimated_option_step(benchmark, estimate_records, bench_env, backbone, preset, frames, options, backend):
    """A paper-sized step with a recompute option over the preset's, estimated on fake tensors (any machine)."""
    _estimate(benchmark, estimate_records, bench_env, f"estimate {backbone} T{frames} options", backbone, preset,
              frames, backend, options)

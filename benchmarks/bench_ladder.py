"""Ladder projection: compiled extension vs the eager per-level loop.

    pytest benchmarks/bench_ladder.py --benchmark-only

Cases (Side4Video ladder: L frozen backbone levels, each LayerNorm + Linear(D -> d)):
* ``cpu-tiny``: 4 levels, M = 2 x 4 x 17, D = 64 -> d = 32, fp32 on the CPU, one
  thread, so the benchmark always runs something (CPU numbers say nothing about the
  GPU targets).
* ``B16``: 12 levels, D = 768 -> d = 320, M = 32 x 8 x 197, bf16 on CUDA (CLIP, pre-norm).
* ``E14``: 32 levels, D = 1792 -> d = 576, M = 16 x 8 x 257, bf16 on CUDA, pre-norm and
  post-norm (EVA's order). Skipped without a GPU, with the reason.

Each case runs ``fwd`` (training forward, graph built), ``bwd`` (backward only, the
forward in untimed setup) and ``fwdbwd``, for ``eager`` and ``extension``. The backbone
features are frozen (no gradient into z, as in Side4Video); gradients go to every
LayerNorm and projection parameter. ``extra_info`` records ``saved_bytes`` (all tensors
autograd saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``,
inputs included), ``saved_beyond_inputs_bytes`` (saved tensors that are not the inputs
or parameters themselves) and, on CUDA, ``peak_bytes`` (peak allocated during one
fwd+bwd above what was allocated before it).

A run on a GPU writes ``benchmarks/results/<device>/ladder.json`` (device, versions,
command, every case with median times, memory and extension/eager ratios). CPU runs
write no results file.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common

import vpeft_kernels as vk

CASES = {
    "cpu-tiny": dict(levels=4, lead=(2 * 4, 17), dim=64, dout=32, device="cpu", dtype=torch.float32),
    "B16": dict(levels=12, lead=(32 * 8, 197), dim=768, dout=320, device="cuda", dtype=torch.bfloat16),
    "E14": dict(levels=32, lead=(16 * 8, 257), dim=1792, dout=576, device="cuda", dtype=torch.bfloat16),
}
CASE_NORMS = [("cpu-tiny", "pre"), ("cpu-tiny", "post"), ("B16", "pre"), ("E14", "pre"), ("E14", "post")]
IMPLS = ["eager", "extension"]
PASSES = ["fwd", "bwd", "fwdbwd"]

_RECORDS = []


def _skip_reason(case, impl, norm, args):
    if case["device"] == "cuda" and not torch.cuda.is_available():
        return "GPU shape: needs a CUDA device (none here)"
    if impl == "extension":
        why = vk.not_supported_reasons("ladder_projection", *args, norm=norm)["extension"]
        if why:
            return "extension cannot run this case: " + "; ".join(why)
    return None


def _make_inputs(case, norm):
    dev, dt = case["device"], case["dtype"]
    levels, dim, dout = case["levels"], case["dim"], case["dout"]
    n_ln = dim if norm == "pre" else dout
    g = torch.Generator(device=dev).manual_seed(0)
    z = [torch.randn(*case["lead"], dim, device=dev, dtype=dt, generator=g) for _ in range(levels)]

    def p(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=dev, dtype=torch.float32, generator=g) * scale + shift
        return t.to(dt).requires_grad_(True)

    params = [p(levels, n_ln, scale=0.1, shift=1.0), p(levels, n_ln, scale=0.1),
              p(levels, dout, dim, scale=dim ** -0.5), p(levels, dout, scale=0.1)]
    return z, params


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _forward(impl, z, params, norm):
    return vk.ladder_projection(z, *params, norm=norm, backend=impl)


def _saved_bytes(impl, z, params, norm):
    known = {t.data_ptr() for t in z + params}
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.data_ptr() in known and t.numel() > 0))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _forward(impl, z, params, norm)
    del out
    total = sum(s for s, _ in sizes)
    beyond = sum(s for s, is_input in sizes if not is_input)
    return total, beyond


def _peak_bytes(impl, z, params, norm, grad):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _forward(impl, z, params, norm)
    torch.autograd.grad(out, params, grad)
    del out
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def _one_cpu_thread(request):
    """CPU cases run on one thread: the tiny shapes gain nothing from more, and on a
    shared machine OpenMP barriers turn other processes' load into outliers."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name,norm", CASE_NORMS, ids=[f"{c}-{n}" for c, n in CASE_NORMS])
def test_ladder(benchmark, case_name, norm, impl, pass_, request):
    case = CASES[case_name]
    if case["device"] == "cpu":
        request.getfixturevalue("_one_cpu_thread")
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU shape: needs a CUDA device (none here)")
    z, params = _make_inputs(case, norm)
    why = _skip_reason(case, impl, norm, (z, *params))
    if why:
        pytest.skip(why)
    dev = case["device"]
    out = _forward(impl, z, params, norm)
    grad = torch.randn_like(out)
    del out
    benchmark.group = f"ladder {case_name} {norm} {pass_}"
    rounds = 20 if dev == "cuda" else 50

    if pass_ == "fwd":
        def run():
            out = _forward(impl, z, params, norm)
            _sync(dev)
            return out
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
    elif pass_ == "bwd":
        def setup():
            out = _forward(impl, z, params, norm)
            _sync(dev)
            return (out,), {}

        def run(out):
            torch.autograd.grad(out, params, grad)
            _sync(dev)
        benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=2)
    else:
        def run():
            out = _forward(impl, z, params, norm)
            torch.autograd.grad(out, params, grad)
            _sync(dev)
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)

    saved, beyond = _saved_bytes(impl, z, params, norm)
    inputs = sum(t.numel() * t.element_size() for t in z)
    info = dict(case=case_name, norm=norm, impl=impl, pass_=pass_, device=dev, dtype=str(case["dtype"]),
                levels=case["levels"], rows=int(torch.Size(case["lead"]).numel()), dim=case["dim"],
                dout=case["dout"], saved_bytes=saved, saved_beyond_inputs_bytes=beyond, input_bytes=inputs,
                peak_bytes=_peak_bytes(impl, z, params, norm, grad) if dev == "cuda" else None)
    benchmark.extra_info.update(info)
    stats = benchmark.stats.stats
    _RECORDS.append(dict(info, median_s=stats.median, min_s=stats.min, mean_s=stats.mean, rounds=stats.rounds))


def _ratios(records):
    out = []
    by_key = {(r["case"], r["norm"], r["pass_"], r["impl"]): r for r in records}
    for (case, norm, pass_, impl), r in sorted(by_key.items()):
        e = by_key.get((case, norm, pass_, "eager"))
        if impl != "extension" or e is None:
            continue
        out.append(dict(case=case, norm=norm, pass_=pass_,
                        speedup_vs_eager=e["median_s"] / r["median_s"],
                        saved_bytes_ratio_vs_eager=r["saved_bytes"] / e["saved_bytes"],
                        peak_bytes_ratio_vs_eager=(r["peak_bytes"] / e["peak_bytes"]
                                                   if r["peak_bytes"] and e["peak_bytes"] else None)))
    return out


def write_results(records):
    """Write the GPU records to results/<device>/ladder.json; returns the path."""
    path = common.results_dir() / "ladder.json"
    doc = dict(common.environment(common.command_line()), extension=vk.extension_status()["summary"],
               records=records, ratios=_ratios(records))
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


@pytest.fixture(scope="module", autouse=True)
def _results_file():
    yield
    gpu = [r for r in _RECORDS if r["device"] == "cuda"]
    if gpu:  # only a real GPU run leaves a results file
        write_results(gpu)

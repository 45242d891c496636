"""Benchmark: Side4Video token-shift attention, eager vs SDPA-with-concatenation vs fused.

Run: ``python -m pytest benchmarks/bench_token_shift_attention.py --benchmark-only``
(or ``pytest benchmarks/ --benchmark-only``).

Three implementations of the same op (:func:`vpeft_kernels.reference.token_shift_attention`):

* ``eager``: the reference, MultiheadAttention-style math (materialises the
  ``N x (N+1)`` attention matrix per head);
* ``sdpa_concat``: eager with ``F.scaled_dot_product_attention`` over the shifted [CLS]
  concatenated in front of the N patch tokens (written here as a baseline);
* ``fused``: ``backend="triton"`` (the fused kernels).

Modes: ``fwd``, ``bwd`` (backward only; the forward runs in the untimed setup),
``fwdbwd``. Besides time, each case records in ``extra_info``:
``saved_for_backward_MiB`` (bytes autograd keeps between forward and backward, beyond
the op's own inputs; any device) and on CUDA ``peak_MiB`` (peak allocated memory of one
forward+backward above what the inputs take).

Shapes: the Side4Video configurations in bf16 on CUDA (skipped, with the reason, on a
machine without one), and tiny fp32 shapes on the CPU, where the fused kernels run in
Triton's interpreter, so this file never silently measures nothing. On CPU the fused
numbers time the interpreter, not a kernel: they are no guide to GPU speed.

At the end of the module the same-run ratios are printed; on CUDA the results, the
device name, torch/triton versions and the command are also written to
``benchmarks/results/<device>/token_shift_attention.json``. No GPU number is ever
written without a GPU run.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import common
import torch.nn.functional as F

import vpeft_kernels
from vpeft_kernels import reference

try:
    import triton
    TRITON_VERSION = triton.__version__
except Exception:  # pragma: no cover - reported in the results
    TRITON_VERSION = None

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def sdpa_concat(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, *, num_frames, num_heads, eps=1e-5):
    """Baseline: concatenate the shifted [CLS] in front of the patch tokens, then SDPA."""
    bt, n, d = s.shape
    hd = d // num_heads
    x = torch.cat([reference.token_shift(c, num_frames)[:, None], s + pos], dim=1)   # (BT, N+1, d)
    if ln_weight is not None:
        x = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
    qkv = F.linear(x, w_qkv, b_qkv).view(bt, n + 1, 3, num_heads, hd)
    q = qkv[:, 1:, 0].transpose(1, 2)
    k = qkv[:, :, 1].transpose(1, 2)
    v = qkv[:, :, 2].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v)
    return F.linear(o.transpose(1, 2).reshape(bt, n, d), w_out, b_out)


def eager(*args, **kw):
    return reference.token_shift_attention(*args, **kw)


def fused(*args, **kw):
    return vpeft_kernels.token_shift_attention(*args, **kw, backend="triton")


IMPLS = {"eager": eager, "sdpa_concat": sdpa_concat, "fused": fused}

# name: (B, T, N, d, dtype, device)
SHAPES = {
    "B16-light": (32, 8, 196, 192, torch.bfloat16, "cuda"),
    "B16": (32, 8, 196, 320, torch.bfloat16, "cuda"),
    "L14": (16, 8, 256, 512, torch.bfloat16, "cuda"),
    "E14": (16, 8, 256, 576, torch.bfloat16, "cuda"),
    "cpu-tiny": (1, 2, 20, 64, torch.float32, "cpu"),
    "cpu-small": (1, 4, 36, 128, torch.float32, "cpu"),
}
MODES = ("fwd", "bwd", "fwdbwd")

RESULTS: dict = {}


def _inputs(b, t, n, d, dtype, device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    return [r(b * t, n, d), r(b * t, d), r(n, d, scale=0.02), r(d, scale=0.1, shift=1.0), r(d, scale=0.1),
            r(3 * d, d, scale=d ** -0.5), r(3 * d, scale=0.02), r(d, d, scale=d ** -0.5), r(d, scale=0.02)]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _skip_reason(shape, impl):
    device = SHAPES[shape][5]
    if device == "cuda" and not CUDA:
        return "GPU shape: needs a CUDA device (none here); no GPU number is measured or estimated"
    if impl == "fused":
        why = vpeft_kernels.not_supported_reasons("token_shift_attention", *_inputs(1, 1, 4, 64, torch.float32, device),
                                                  num_frames=1, num_heads=1)["triton"]
        if why:
            return "fused backend cannot run here: " + "; ".join(why)
    return None


def _saved_bytes(fn, leaves, kw):
    """Bytes autograd saves for backward, beyond the op's inputs (unique storages)."""
    seen, total = set(), 0
    inputs = {a.untyped_storage().data_ptr() for a in leaves if a is not None}

    def pack(x):
        nonlocal total
        st = x.untyped_storage()
        key = st.data_ptr()
        if key not in seen and key not in inputs:
            seen.add(key)
            total += st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(*leaves, **kw)
    return total


def _peak_bytes(fn, leaves, kw, grad):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*leaves, **kw).backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for a in leaves:
        if a is not None:
            a.grad = None
    return peak


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if not RESULTS:
        return
    lines = []
    write = lines.append
    dev = torch.cuda.get_device_name() if CUDA else "cpu (fused = Triton interpreter; not a speed measurement)"
    write("")
    write(f"token_shift_attention, same-run medians on {dev}; (Nx) = baseline time / fused time "
          f"(torch {torch.__version__}, triton {TRITON_VERSION}):")
    rows = []
    for shape in SHAPES:
        for mode in MODES:
            r = {impl: RESULTS.get((shape, mode, impl)) for impl in IMPLS}
            if r["fused"] is None:
                continue
            line = f"  {shape:10s} {mode:7s} fused {r['fused']['median_ms']:.3f} ms"
            for base in ("eager", "sdpa_concat"):
                if r[base] is not None:
                    line += f" | {base} {r[base]['median_ms']:.3f} ms ({r[base]['median_ms'] / r['fused']['median_ms']:.2f}x)"
            if mode == "fwdbwd":
                for key in ("peak_MiB", "saved_for_backward_MiB"):
                    vals = {i: r[i][key] for i in IMPLS if r[i] is not None and r[i].get(key) is not None}
                    if "fused" in vals:
                        line += f" | {key} " + ", ".join(f"{i} {v:.2f}" for i, v in vals.items())
            write(line)
            rows.append(line.strip())
    if CUDA:
        out = common.results_dir() / "token_shift_attention.json"
        out.write_text(json.dumps(dict(
            common.environment(common.command_line()), op="token_shift_attention",
            results=[{"shape": s, "mode": m, "impl": i, **v} for (s, m, i), v in RESULTS.items()],
            ratios=rows), indent=2, default=str))
        write(f"  results written to {out}")
    # print past pytest's output capture, so the ratios show without -s
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or capman is None:
        print("\n".join(lines))
        return
    with capman.global_and_fixture_disabled():
        for line in lines:
            tr.write_line(line)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_shift_attention(benchmark, shape, mode, impl):
    why = _skip_reason(shape, impl)
    if why:
        pytest.skip(why)
    b, t, n, d, dtype, device = SHAPES[shape]
    heads = d // 64
    kw = dict(num_frames=t, num_heads=heads)
    fn = IMPLS[impl]
    args = _inputs(b, t, n, d, dtype, device)
    leaves = [a.requires_grad_() for a in args]
    grad = torch.randn(b * t, n, d, device=device, dtype=dtype)

    # the baseline and the kernel must compute the op before they are timed
    with torch.no_grad():
        want = eager(*args, **kw).float()
        got = fn(*args, **kw).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item()), \
        f"{impl} does not match the reference"

    benchmark.group = f"token_shift_attention {shape} {mode}"
    benchmark.extra_info.update(shape=shape, mode=mode, impl=impl, B=b, T=t, N=n, d=d, heads=heads,
                                dtype=str(dtype).replace("torch.", ""), device=device)
    rounds, warmup = (20, 3) if device == "cuda" else (5, 1)

    if mode == "fwd":
        def target():
            with torch.no_grad():
                fn(*leaves, **kw)
            _sync(device)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    elif mode == "bwd":
        def setup():
            for a in leaves:
                a.grad = None
            out = fn(*leaves, **kw)
            _sync(device)
            return (out,), {}

        def target(out):
            out.backward(grad)
            _sync(device)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:
        def target():
            for a in leaves:
                a.grad = None
            fn(*leaves, **kw).backward(grad)
            _sync(device)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)

    info = {}
    if mode == "fwdbwd":
        info["saved_for_backward_MiB"] = _saved_bytes(fn, leaves, kw) / 2 ** 20
        info["peak_MiB"] = _peak_bytes(fn, leaves, kw, grad) / 2 ** 20 if device == "cuda" else None
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        RESULTS[(shape, mode, impl)] = {"median_ms": stats.stats.median * 1e3, **info}

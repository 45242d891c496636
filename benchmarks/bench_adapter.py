"""Speed and memory of the ST-Adapter and MSTA adapter ops: eager reference,
torch.compile(reference) and the fused Triton kernels.

Run:  python -m pytest benchmarks/bench_adapter.py --benchmark-only

Cases
-----
* ``cpu-tiny``: B=1, T=3, N=7, D=48, r=16, fp32 on the CPU (Triton through its
  interpreter). Runs everywhere so the benchmark never silently does nothing; its
  times say nothing about GPU speed (the interpreter is a Python emulator).
* ``vitb16``: 32 videos x 8 frames x 197 tokens, D=768, ST-Adapter r=384, MSTA r=128;
  ``vitl14``: 16 x 8 x 257, D=1024, same r. bf16 on CUDA; skipped without a GPU.

For every case it times forward, backward and forward+backward (pytest-benchmark) and
measures memory: ``saved_bytes`` (bytes of tensors autograd keeps for backward that are
not inputs: the extra activation memory, all devices), and on CUDA ``held_bytes``
(memory still allocated after the forward, output included) and ``peak_bytes`` (peak
during forward+backward), both above what was allocated before. On CUDA it also prints
the roofline bound ``max(FLOPs / 800 TFLOP/s, bytes / 3.0 TB/s)`` of the forward next to
the measured forward time, and the speed-ups over eager and torch.compile; everything is
written with the device name, torch/triton versions and the command to
``benchmarks/results/<device>/adapter.json``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import common

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: Triton kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vpeft_kernels as vk  # noqa: E402
from vpeft_kernels import reference  # noqa: E402

CUDA = torch.cuda.is_available()
PEAK_FLOPS = 800e12  # H100 bf16 dense matmul, measured (shared/ENVIRONMENT.md)
PEAK_BYTES = 3.0e12  # H100 device-to-device copy bandwidth, measured

CASES = {
    "cpu-tiny": dict(B=1, T=3, N=7, D=48, r_st=16, r_msta=16, device="cpu", dtype=torch.float32),
    "vitb16": dict(B=32, T=8, N=196, D=768, r_st=384, r_msta=128, device="cuda", dtype=torch.bfloat16),
    "vitl14": dict(B=16, T=8, N=256, D=1024, r_st=384, r_msta=128, device="cuda", dtype=torch.bfloat16),
}
IMPLS = ["eager", "compile", "triton"]
MODES = ["fwd", "bwd", "fwdbwd"]
MSTA_SCALE = 0.005  # the released runs' scale; no dropout (timing the deterministic path)

_RESULTS = []
_COMPILED = {}


def _skip_reason(case, impl):
    c = CASES[case]
    if c["device"] == "cuda" and not CUDA:
        return f"{case} is a GPU-sized case and needs CUDA; no CUDA device here"
    if c["device"] == "cpu" and impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set only where no NVIDIA driver exists)"
    return None


def _inputs(op, c):
    dev, dt = c["device"], c["dtype"]
    b, t, n, d = c["B"], c["T"], c["N"], c["D"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dt).requires_grad_()

    x = rnd(b * t, 1 + n, d)
    if op == "st":
        r = c["r_st"]
        return [x, rnd(r, d, std=d ** -0.5), rnd(r, std=0.02), rnd(r, 3, std=0.5), rnd(r, std=0.02),
                rnd(d, r, std=r ** -0.5), rnd(d, std=0.02)]
    r = c["r_msta"]
    return [x, rnd(r, d, std=d ** -0.5), rnd(r, std=0.02), rnd(r, r, std=r ** -0.5), rnd(r, std=0.02),
            rnd(d, r, std=r ** -0.5), rnd(d, std=0.02), rnd(d, 3, std=0.5), rnd(d, std=0.02)]


def _fn(op, impl, c):
    t = c["T"]
    if op == "st":
        ref = lambda *a: reference.st_adapter(*a, num_frames=t)  # noqa: E731
        tri = lambda *a: vk.st_adapter(*a, num_frames=t, backend="triton")  # noqa: E731
    else:
        ref = lambda *a: reference.msta_adapter(*a, scale=MSTA_SCALE, num_frames=t)  # noqa: E731
        tri = lambda *a: vk.msta_adapter(*a, scale=MSTA_SCALE, num_frames=t, backend="triton")  # noqa: E731
    if impl == "eager":
        return ref
    if impl == "triton":
        return tri
    key = (op, id(c))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(ref)
    return _COMPILED[key]


def _sync(c):
    if c["device"] == "cuda":
        torch.cuda.synchronize()


def _flops_bytes(op, c):
    """Forward work of an ideal fused implementation: the GEMMs, and one read of the
    input, one write of the output plus the weights."""
    b, t, n, d = c["B"], c["T"], c["N"], c["D"]
    e = torch.tensor([], dtype=c["dtype"]).element_size()
    m, mp = b * t * (1 + n), b * t * n
    if op == "st":
        r = c["r_st"]
        flops = 4 * mp * d * r + 6 * mp * r + 2 * mp * d
        weights = 2 * d * r + 5 * r + d
    else:
        r = c["r_msta"]
        flops = 4 * m * d * r + 2 * m * r * r + 6 * mp * d + m * d
        weights = 2 * d * r + r * r + 2 * r + 5 * d
    return flops, (2 * m * d + weights) * e


def _saved_bytes(fn, inputs):
    """Bytes of non-input tensors autograd keeps for backward (None if not measurable)."""
    storages = {}
    inputs_ptrs = {a.untyped_storage().data_ptr() for a in inputs}

    def pack(s):
        st = s.untyped_storage()
        if st.data_ptr() not in inputs_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return s

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            out = fn(*inputs)
        del out
    except Exception:  # saved-tensor hooks are not supported everywhere under torch.compile
        return None
    return sum(storages.values())


def _cuda_memory(fn, inputs, dy):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    out.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for a in inputs:
        a.grad = None
    return held, peak


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["st", "msta"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapter(benchmark, case, op, impl, mode, adapter_results):
    why = _skip_reason(case, impl)
    if why:
        pytest.skip(why)
    c = CASES[case]
    fn = _fn(op, impl, c)
    inputs = _inputs(op, c)
    dy = torch.randn_like(inputs[0])
    for _ in range(2):  # warm up: compile / autotune / first-launch costs stay out of the timing
        fn(*inputs).backward(dy)
    for a in inputs:
        a.grad = None
    rounds = 3 if c["device"] == "cpu" else 20
    if mode == "fwd":
        def target():
            out = fn(*inputs)
            _sync(c)
            return out
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1)
    elif mode == "bwd":
        def setup():
            out = fn(*inputs)
            _sync(c)
            return (out,), {}

        def target(out):
            out.backward(dy)
            _sync(c)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    else:
        def target():
            fn(*inputs).backward(dy)
            _sync(c)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1)
    for a in inputs:
        a.grad = None

    row = dict(case=case, op=op, impl=impl, mode=mode, dtype=str(c["dtype"]).replace("torch.", ""),
               shape=dict(B=c["B"], T=c["T"], N=c["N"], D=c["D"], r=c["r_st"] if op == "st" else c["r_msta"]))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        row["median_s"] = stats.stats.median
        row["min_s"] = stats.stats.min
    if mode == "fwdbwd":
        row["saved_bytes"] = _saved_bytes(fn, inputs)
        if c["device"] == "cuda":
            row["held_bytes"], row["peak_bytes"] = _cuda_memory(fn, inputs, dy)
    if mode == "fwd" and c["device"] == "cuda":
        flops, nbytes = _flops_bytes(op, c)
        row["flops"], row["bytes"] = flops, nbytes
        row["roofline_s"] = max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "shape"})
    adapter_results.append(row)


def _size(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _summary(rows):
    """Lines comparing the three implementations per (case, op, mode)."""
    lines = []
    by = {(r["case"], r["op"], r["mode"], r["impl"]): r for r in rows}
    for case in CASES:
        for op in ("st", "msta"):
            for mode in MODES:
                tri = by.get((case, op, mode, "triton"))
                if tri is None or "median_s" not in tri:
                    continue
                eag = by.get((case, op, mode, "eager"), {}).get("median_s")
                cmp_ = by.get((case, op, mode, "compile"), {}).get("median_s")
                t = tri["median_s"]
                parts = [f"{case:8s} {op:4s} {mode:6s} triton {t * 1e3:9.3f} ms"]
                if eag:
                    parts.append(f"eager {eag * 1e3:9.3f} ms, triton speed-up {eag / t:5.2f}x")
                if cmp_:
                    parts.append(f"compile {cmp_ * 1e3:9.3f} ms, triton speed-up {cmp_ / t:5.2f}x")
                if "roofline_s" in tri:
                    parts.append(f"roofline {tri['roofline_s'] * 1e3:.3f} ms "
                                 f"({100 * tri['roofline_s'] / t:.0f}% of bound)")
                if mode == "fwdbwd":
                    for impl in IMPLS:
                        r = by.get((case, op, mode, impl), {})
                        mem = [f"saved {_size(r.get('saved_bytes'))}"]
                        if "peak_bytes" in r:
                            mem.append(f"held {_size(r['held_bytes'])}")
                            mem.append(f"peak {_size(r['peak_bytes'])}")
                        parts.append(f"{impl}: " + ", ".join(mem))
                lines.append(" | ".join(parts))
    return lines


@pytest.fixture(scope="module")
def adapter_results(request):
    rows = []
    yield rows
    if not rows:
        return
    import triton
    lines = _summary(rows)
    env = common.environment(common.command_line())
    device = env["device"]
    path = common.results_dir() / "adapter.json"
    payload = dict(env, peak_flops=PEAK_FLOPS if CUDA else None, peak_bytes_per_s=PEAK_BYTES if CUDA else None,
                   rows=rows)
    path.write_text(json.dumps(payload, indent=1, default=str))
    header = (f"adapter benchmark on {device} (torch {torch.__version__}, triton {triton.__version__})"
              + ("; CPU times use Triton's interpreter and say nothing about GPU speed" if not CUDA else ""))
    # output is captured while fixtures tear down: print from the terminal-summary hook
    request.config.pluginmanager.register(_Summary([header, *lines, f"results written to {path}"]),
                                          "vpeft-bench-adapter-summary")


class _Summary:
    def __init__(self, lines):
        self.lines = lines

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("adapter benchmark summary")
        for line in self.lines:
            terminalreporter.write_line(line)

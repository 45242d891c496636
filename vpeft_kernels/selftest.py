"""``vpeft selftest`` / ``python -m vpeft_kernels.selftest``: are the fused kernels right
and fast on this machine's GPU?

On a CUDA GPU (a few minutes on an H100/H200):

1. numerics at real sizes in bf16 (B=2, T=8, N=196, D=768): every fused op against
   the eager reference, output and every gradient. Errors are measured against the
   reference run in fp32 on the same (bf16-rounded) inputs; a case passes when the
   fused error is at most twice eager bf16's error (plus a hair for exact zeros).
   Cases: ST-Adapter r=384, one with rows*D > 2**31; MSTA vision r=128 with dropout
   (the reference applies the kernel's own keep mask), MSTA text; token-shift
   attention d=320 (5 heads) and d=768 (12 heads); the ladder pre and post at D=768
   and an odd D.
2. timings with CUDA events (median of repeats): fused, eager, ``torch.compile`` of
   the reference, and for the attention SDPA on the concatenated key; forward,
   backward and forward+backward, with ratios, and the peak memory of one fwd+bwd.
3. every Triton kernel compiled in the run: registers and spills as the driver loaded it.

A table on screen and a JSON file (``--json``, default ``$OUT/selftest.json`` when
``$OUT`` is set, else ``selftest.json``). Exit status 1 when a numerics case fails.

Without a GPU it says so and runs the interpreter checks instead (Triton's CPU
interpreter, small shapes, fp32: outputs and every gradient against the reference).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- inputs


def _rand(g, *shape, std=1.0, shift=0.0, device="cuda", dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * std + shift).to(device=device, dtype=dtype)


def st_case(b, t, n, d, r, device, dtype, seed=0):
    """Inputs of the ST-Adapter op (x, w_down, b_down, w_conv, b_conv, w_up, b_up)."""
    g = torch.Generator().manual_seed(seed)
    return [_rand(g, b * t, 1 + n, d, device=device, dtype=dtype), _rand(g, r, d, std=d ** -0.5, device=device,
            dtype=dtype), _rand(g, r, std=0.1, device=device, dtype=dtype),
            _rand(g, r, 3, std=0.5, device=device, dtype=dtype), _rand(g, r, std=0.1, device=device, dtype=dtype),
            _rand(g, d, r, std=r ** -0.5, device=device, dtype=dtype), _rand(g, d, std=0.1, device=device,
                                                                             dtype=dtype)]


def msta_case(rows, d, r, device, dtype, vision=True, seed=0):
    """Inputs of the MSTA op; ``rows`` is (B*T, 1+N) for vision, (B, L) for text."""
    g = torch.Generator().manual_seed(seed)
    xs = [_rand(g, *rows, d, device=device, dtype=dtype), _rand(g, r, d, std=d ** -0.5, device=device, dtype=dtype),
          _rand(g, r, std=0.1, device=device, dtype=dtype), _rand(g, r, r, std=r ** -0.5, device=device, dtype=dtype),
          _rand(g, r, std=0.1, device=device, dtype=dtype), _rand(g, d, r, std=r ** -0.5, device=device, dtype=dtype),
          _rand(g, d, std=0.1, device=device, dtype=dtype)]
    if vision:
        xs += [_rand(g, d, 3, std=0.5, device=device, dtype=dtype), _rand(g, d, std=0.1, device=device, dtype=dtype)]
    return xs


def tsa_case(b, t, n, d, device, dtype, seed=0):
    """Inputs of token_shift_attention (s, c, pos, ln_w, ln_b, w_qkv, b_qkv, w_out, b_out)."""
    g = torch.Generator().manual_seed(seed)
    return [_rand(g, b * t, n, d, device=device, dtype=dtype), _rand(g, b * t, d, device=device, dtype=dtype),
            _rand(g, n, d, std=0.1, device=device, dtype=dtype),
            _rand(g, d, std=0.1, shift=1.0, device=device, dtype=dtype), _rand(g, d, std=0.1, device=device,
                                                                              dtype=dtype),
            _rand(g, 3 * d, d, std=d ** -0.5, device=device, dtype=dtype),
            _rand(g, 3 * d, std=0.1, device=device, dtype=dtype),
            _rand(g, d, d, std=d ** -0.5, device=device, dtype=dtype), _rand(g, d, std=0.1, device=device,
                                                                            dtype=dtype)]


def ladder_case(levels, rows, big, small, norm, device, dtype, seed=0):
    """Inputs of ladder_projection (z list, ln_w, ln_b, w_proj, b_proj)."""
    g = torch.Generator().manual_seed(seed)
    ln = small if norm == "post" else big
    return [[_rand(g, rows, big, device=device, dtype=dtype) for _ in range(levels)],
            _rand(g, levels, ln, std=0.1, shift=1.0, device=device, dtype=dtype),
            _rand(g, levels, ln, std=0.1, device=device, dtype=dtype),
            _rand(g, levels, small, big, std=big ** -0.5, device=device, dtype=dtype),
            _rand(g, levels, small, std=0.1, device=device, dtype=dtype)]


def msta_reference_with_mask(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, *, mask, p,
                             scale, num_frames):
    """The reference MSTA vision math with a given (rows, r) keep mask in place of F.dropout."""
    from .reference import grad_scale, temporal_taps
    x = grad_scale(u, scale)
    h = F.relu(F.linear(F.relu(F.linear(x, w_down, b_down)), w_shared, b_shared))
    h = h * mask.view(*h.shape).to(h.dtype) / (1 - p)
    a = F.linear(h, w_up, b_up)
    bt, n1, d = u.shape
    r = w_down.shape[0]
    hp = h[:, 1:].repeat_interleave(d // r, dim=-1).reshape(bt // num_frames, num_frames, n1 - 1, d)
    tt = temporal_taps(hp, w_tconv, b_tconv).reshape(bt, n1 - 1, d)
    a = torch.cat([a[:, :1], a[:, 1:] + tt], dim=1)
    return grad_scale(scale * a, 1.0 / scale)


# ----------------------------------------------------------------------------- cases


class Case:
    """One op at one size: ``fused(*leaves)``, ``eager(*leaves)`` and the input list."""

    def __init__(self, name: str, make: Callable, fused: Callable, eager: Callable, sdpa: Optional[Callable] = None,
                 time_it: bool = True):
        self.name, self.make, self.fused, self.eager, self.sdpa, self.time_it = name, make, fused, eager, sdpa, time_it


def _flatten(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


def _rebuild(args, flat):
    it = iter(flat)
    return [[next(it) for _ in a] if isinstance(a, list) else next(it) for a in args]


def _run(fn, args, dy=None):
    """Output and the gradient of every tensor input for the cotangent dy."""
    flat = [None if a is None else a.detach().clone().requires_grad_() for a in _flatten(args)]
    out = fn(*_rebuild(args, flat))
    if dy is None:
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [t for t in flat if t is not None], dy)
    return [out.detach()] + [g.detach() for g in grads], dy


def _errors(got, ref):
    return [(a.double() - b.double()).abs().max().item() for a, b in zip(got, ref)]


def cases(device, dtype, big: bool = True) -> List[Case]:
    """The selftest's cases (``big=False``: small shapes for the interpreter)."""
    import vpeft_kernels as vk
    from . import adapter, reference

    b, t, n, d = (2, 8, 196, 768) if big else (1, 3, 7, 48)
    r_st, r_m = (384, 128) if big else (24, 16)
    out = []
    out.append(Case(f"st_adapter B{b} T{t} N{n} D{d} r{r_st}", lambda: st_case(b, t, n, d, r_st, device, dtype),
                    lambda *a: vk.st_adapter(*a, num_frames=t, backend="triton"),
                    lambda *a: reference.st_adapter(*a, num_frames=t)))
    if big:  # rows * D > 2**31: 64-bit offsets in every kernel
        frames = (2 ** 31 // (197 * d)) + 8
        frames -= frames % 8
        out.append(Case(f"st_adapter rows*D>2^31 ({frames * 197} rows) D{d} r{r_st}",
                        lambda: st_case(frames // 8, 8, 196, d, r_st, device, dtype),
                        lambda *a: vk.st_adapter(*a, num_frames=8, backend="triton"),
                        lambda *a: reference.st_adapter(*a, num_frames=8), time_it=False))
    p = 0.1

    def msta_fused(*a):
        torch.manual_seed(123)  # the fused op draws its Philox seed from torch's RNG
        return vk.msta_adapter(*a, scale=0.5, num_frames=t, dropout_p=p, backend="triton")

    def msta_eager(*a):
        torch.manual_seed(123)
        seed = torch.randint(0, 2 ** 31 - 1, (1,), device=a[0].device, dtype=torch.int64)
        rows = a[0].shape[0] * a[0].shape[1]
        mask = adapter.dropout_keep_mask(seed, rows, a[1].shape[0], p)
        return msta_reference_with_mask(*a, mask=mask, p=p, scale=0.5, num_frames=t)

    out.append(Case(f"msta vision dropout={p} B{b} T{t} N{n} D{d} r{r_m}",
                    lambda: msta_case((b * t, 1 + n), d, r_m, device, dtype), msta_fused, msta_eager))
    tb, tl_, td = (b * 16, 77, d // 2) if big else (2, 5, d)
    out.append(Case(f"msta text B{tb} L{tl_} D{td} r{r_m}",
                    lambda: msta_case((tb, tl_), td, r_m, device, dtype, vision=False),
                    lambda *a: vk.msta_adapter(*a, scale=0.5, backend="triton"),
                    lambda *a: reference.msta_adapter(*a, scale=0.5)))
    for dd, heads in ((320, 5), (768, 12)) if big else ((64, 2),):
        def sdpa(s, c, pos, lw, lb, wq, bq, wo, bo, _h=heads):
            # the eager formulation with the extra key concatenated, attention by SDPA
            bt, nn, ww = s.shape
            x = F.layer_norm(torch.cat([reference.token_shift(c, t)[:, None], s + pos], 1), (ww,), lw, lb)
            q = F.linear(x[:, 1:], wq[:ww], bq[:ww]).view(bt, nn, _h, -1).transpose(1, 2)
            kv = F.linear(x, wq[ww:], bq[ww:]).view(bt, nn + 1, 2, _h, -1).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, kv[0], kv[1])
            return F.linear(o.transpose(1, 2).reshape(bt, nn, ww), wo, bo)

        out.append(Case(f"token_shift_attention B{b} T{t} N{n} d{dd} h{heads}",
                        lambda dd=dd: tsa_case(b, t, n, dd, device, dtype),
                        lambda *a, _h=heads: vk.token_shift_attention(*a, num_frames=t, num_heads=_h, backend="triton"),
                        lambda *a, _h=heads: reference.token_shift_attention(*a, num_frames=t, num_heads=_h),
                        sdpa=sdpa))
    for norm in ("pre", "post"):
        for big_d in ((768, 771) if big else (48, 51)):
            levels, rows, small = (4, b * t * (1 + n), 320) if big else (2, 40, 16)
            out.append(Case(f"ladder {norm} L{levels} rows{rows} D{big_d} d{small}",
                            lambda norm=norm, big_d=big_d, levels=levels, rows=rows, small=small:
                            ladder_case(levels, rows, big_d, small, norm, device, dtype),
                            lambda *a, norm=norm: vk.ladder_projection(*a, norm=norm, backend="extension"),
                            lambda *a, norm=norm: reference.ladder_projection(*a, norm=norm)))
    return out


def check_numerics(case: Case, dtype) -> Dict[str, object]:
    """Fused and eager in ``dtype`` against the reference in fp32 on the same inputs."""
    args = case.make()
    args32 = [[t.float() for t in a] if isinstance(a, list) else (None if a is None else a.float()) for a in args]
    ref, dy = _run(case.eager, args32)
    fused, _ = _run(case.fused, args, dy.to(dtype))
    names = ["out"] + [f"grad{i}" for i in range(len(fused) - 1)]
    if dtype == torch.float32:
        eager = ref
        e_fused = _errors(fused, ref)
        ok = [ef <= 1e-3 * max(rr.abs().max().item(), 1e-6) for ef, rr in zip(e_fused, ref)]
        e_eager = [0.0] * len(ref)
    else:
        eager, _ = _run(case.eager, args, dy.to(dtype))
        e_fused, e_eager = _errors(fused, ref), _errors(eager, ref)
        ok = [ef <= 2 * ee + 1e-6 * max(rr.abs().max().item(), 1e-6) for ef, ee, rr in zip(e_fused, e_eager, ref)]
    del args, args32, ref, fused, eager
    return {"case": case.name, "pass": all(ok),
            "errors": [{"tensor": nm, "fused": ef, "eager": ee, "pass": o}
                       for nm, ef, ee, o in zip(names, e_fused, e_eager, ok)]}


# ----------------------------------------------------------------------------- timing


def _time(fn, reps=10, warmup=3) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def time_case(case: Case) -> Dict[str, object]:
    """fwd / bwd / fwd+bwd milliseconds and the fwd+bwd peak memory of each implementation."""
    from . import reference  # noqa: F401
    args = case.make()
    impls = {"fused": case.fused, "eager": case.eager}
    try:
        impls["compiled"] = torch.compile(case.eager)
    except Exception as exc:  # pragma: no cover - depends on the GPU's toolchain
        impls["compiled"] = None
        print(f"  torch.compile unavailable: {exc}", file=sys.stderr)
    if case.sdpa is not None:
        impls["sdpa"] = case.sdpa
    res = {}
    for name, fn in impls.items():
        if fn is None:
            continue
        try:
            flat = [None if a is None else a.detach().requires_grad_() for a in _flatten(args)]
            leaves = _rebuild(args, flat)
            params = [t for t in flat if t is not None]
            out = fn(*leaves)
            dy = torch.randn_like(out)

            def fwd():
                with torch.no_grad():
                    fn(*leaves)

            def fwd_bwd():
                torch.autograd.grad(fn(*leaves), params, dy)

            def bwd_only():
                o = fn(*leaves)
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.autograd.grad(o, params, dy)
                b.record()
                torch.cuda.synchronize()
                return a.elapsed_time(b)

            t_fwd = _time(fwd)
            t_fb = _time(fwd_bwd)
            t_bwd = sorted(bwd_only() for _ in range(7))[3]
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            res[name] = {"fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_fb,
                         "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    f = res.get("fused", {})
    for name, v in res.items():
        if name != "fused" and "fwd_bwd_ms" in v and "fwd_bwd_ms" in f:
            v["fused_speedup_fwd_bwd"] = v["fwd_bwd_ms"] / f["fwd_bwd_ms"]
    return {"case": case.name, "timings": res}


def triton_kernels_loaded() -> List[Dict[str, object]]:
    """Registers and spills of every Triton kernel this process compiled (GPU only)."""
    import importlib
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    rows = []
    for mod_name in ("adapter", "token_shift_attention"):
        mod = importlib.import_module(f"vpeft_kernels.{mod_name}")
        for attr, obj in vars(mod).items():
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            if not isinstance(fn, JITFunction) or not attr.endswith("_kernel"):
                continue
            for dev, caches in getattr(fn, "device_caches", {}).items():
                for key, k in caches[0].items():
                    try:
                        k._init_handles()
                    except Exception:
                        pass
                    rows.append({"kernel": attr, "regs": getattr(k, "n_regs", None),
                                 "spills": getattr(k, "n_spills", None),
                                 "shared": getattr(k.metadata, "shared", None),
                                 "warps": getattr(k.metadata, "num_warps", None)})
    return rows


# ----------------------------------------------------------------------------- main


def _print_numerics(results):
    for r in results:
        print(f"{'PASS' if r['pass'] else 'FAIL'}  {r['case']}")
        for e in r["errors"]:
            print(f"        {e['tensor']:<7} fused err {e['fused']:.3e}   eager err {e['eager']:.3e}"
                  f"{'' if e['pass'] else '   <-- more than 2x eager'}")


def run_gpu(args) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "numerics": [], "timings": [], "kernels": []}
    t0 = time.time()
    all_cases = cases("cuda", dtype)
    for c in all_cases:
        print(f"numerics: {c.name} ...", file=sys.stderr, flush=True)
        try:
            report["numerics"].append(check_numerics(c, dtype))
        except torch.cuda.OutOfMemoryError as exc:
            report["numerics"].append({"case": c.name, "pass": False, "errors": [], "error": str(exc)[:200]})
        torch.cuda.empty_cache()
    _print_numerics(report["numerics"])
    if not args.no_timing:
        for c in all_cases:
            if not c.time_it:
                continue
            print(f"timing: {c.name} ...", file=sys.stderr, flush=True)
            report["timings"].append(time_case(c))
            torch.cuda.empty_cache()
        print(f"\n{'case':<52} {'impl':<9} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'peak MB':>8} {'x fused':>8}")
        for t in report["timings"]:
            for name, v in t["timings"].items():
                if "error" in v:
                    print(f"{t['case'][:52]:<52} {name:<9} {v['error']}")
                    continue
                print(f"{t['case'][:52]:<52} {name:<9} {v['fwd_ms']:>8.3f} {v['bwd_ms']:>8.3f} "
                      f"{v['fwd_bwd_ms']:>8.3f} {v['peak_mb']:>8.0f} {v.get('fused_speedup_fwd_bwd', 1.0):>8.2f}")
    report["kernels"] = triton_kernels_loaded()
    print(f"\n{'triton kernel':<34} {'regs':>5} {'spills':>6} {'shared':>7} {'warps':>5}")
    for k in report["kernels"]:
        print(f"{k['kernel']:<34} {str(k['regs']):>5} {str(k['spills']):>6} {str(k['shared']):>7} {str(k['warps']):>5}")
    report["seconds"] = round(time.time() - t0, 1)
    report["pass"] = all(r["pass"] for r in report["numerics"])
    _write(args, report)
    print(f"selftest: {'PASS' if report['pass'] else 'FAIL'} in {report['seconds']} s")
    return 0 if report["pass"] else 1


def run_interpreter_checks() -> Dict[str, object]:
    """Small-shape fp32 checks of every fused op through Triton's CPU interpreter
    (this process must have been started with TRITON_INTERPRET=1)."""
    from ._triton_common import INTERPRET
    if not INTERPRET:
        raise RuntimeError("run_interpreter_checks needs TRITON_INTERPRET=1 set before triton is imported")
    res = []
    for c in cases("cpu", torch.float32, big=False):
        if c.name.startswith("ladder"):
            continue  # the ladder is the compiled extension, not Triton: tests/test_ladder_extension.py
        print(f"interpreter: {c.name} ...", file=sys.stderr, flush=True)
        res.append(check_numerics(c, torch.float32))
    return {"device": "cpu (Triton interpreter)", "dtype": "float32", "numerics": res,
            "pass": all(r["pass"] for r in res)}


def _write(args, report):
    path = args.json or os.path.join(os.environ.get("OUT", "."), "selftest.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"selftest: results written to {path}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="vpeft selftest", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The selftest's options for ``python -m`` (``vpeft selftest`` declares the same two in
    vpeft/cli.py, so the CLI does not import torch to build its parser)."""
    ap.add_argument("--json", help="write the results here (default $OUT/selftest.json or ./selftest.json)")
    ap.add_argument("--no-timing", action="store_true", help="numerics only")
    ap.add_argument("--interpreter-checks", action="store_true", help=argparse.SUPPRESS)


def run(args) -> int:
    """Run the selftest for parsed ``args``; returns the exit status."""
    if args.interpreter_checks:
        report = run_interpreter_checks()
        _print_numerics(report["numerics"])
        _write(args, report)
        return 0 if report["pass"] else 1
    if torch.cuda.is_available():
        return run_gpu(args)
    print("vpeft selftest: no CUDA GPU is visible; the numbers and timings it exists for need one.\n"
          "Running the interpreter checks instead (Triton's CPU interpreter, small shapes, fp32).", flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "vpeft_kernels.selftest", "--interpreter-checks"]
    if args.json:
        cmd += ["--json", args.json]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

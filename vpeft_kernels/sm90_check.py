"""Ahead-of-time compilation of every Triton kernel of vpeft for an H100/H200 (sm_90).

No GPU and no driver are needed: ``triton.compile`` with a CUDA target lowers each
kernel to PTX and Triton's bundled ``ptxas`` assembles it for ``sm_90a``. Each kernel
module lists the launches it can make on a GPU (:func:`variants`: every constexpr
specialisation the launchers use, in every dtype they accept, at every GPU config the
launcher or its autotuner may pick), and this module compiles each one and reads
``ptxas -v``: registers, spill stores/loads, stack frame, plus Triton's shared-memory
figure. A kernel that spills or needs more shared memory than a Hopper block can have
(227 KB) fails :func:`check`.

Run it in a process WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the kernels
and the GPU config tables by the single interpreter config)::

    python -m vpeft_kernels.sm90_check            # table on screen, exit 1 on a failure
    python -m vpeft_kernels.sm90_check --json F   # the same as JSON

Compiled kernels land in Triton's cache (``~/.triton/cache``), so a second run takes
seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

H100_MAX_SHARED = 227 * 1024  # bytes one block may use (opt-in limit of sm_90)

_PTR_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


@dataclass
class Variant:
    """One compilable launch: a ``@triton.jit`` function, its argument types and constexprs.

    ``types`` maps each non-constexpr argument to a Triton signature type
    (``"*bf16"``, ``"i32"``, ``"fp32"``); ``aligned`` names the pointer/int arguments
    the launchers pass 16-byte aligned / divisible by 16 (Triton specialises on that at
    launch, so the check compiles what a launch would).
    """
    label: str
    fn: object
    types: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    aligned: tuple = ()
    result: Dict[str, object] = field(default_factory=dict)


def ptr(dtype) -> str:
    """Signature type of a pointer to ``dtype`` (a torch dtype or its name)."""
    name = str(dtype).replace("torch.", "")
    return "*" + _PTR_TYPES[name]


def expand(label, fn, types, constexprs, configs, aligned=()):
    """Variants of ``fn`` for each ``triton.Config`` in ``configs`` (block sizes from the config)."""
    out = []
    for cfg in configs:
        consts = dict(constexprs, **cfg.kwargs)
        tag = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
        out.append(Variant(f"{label}[{tag},w{cfg.num_warps},s{cfg.num_stages}]", fn, dict(types), consts,
                           cfg.num_warps, cfg.num_stages, tuple(aligned)))
    return out


DEFAULT_DTYPES = ("float32", "bfloat16")


def variants(dtypes=DEFAULT_DTYPES) -> List[Variant]:
    """Every GPU launch variant of every Triton kernel in vpeft_kernels, for ``dtypes``
    (names of torch dtypes). fp16 takes the same code paths and configs as bf16, so
    the default list leaves it out to halve the compile time; ``--dtypes`` adds it."""
    import torch
    dts = [getattr(torch, d) for d in dtypes]
    from . import _triton_common
    if _triton_common.INTERPRET:
        raise RuntimeError("sm90_check must run without TRITON_INTERPRET=1: under the interpreter the "
                           "kernels and their GPU configs are replaced by the interpreter's")
    import importlib
    # by module path: the package binds the name token_shift_attention to the public op
    mods = [importlib.import_module(f"vpeft_kernels.{m}") for m in ("adapter", "token_shift_attention")]
    return [v for m in mods for v in m.sm90_variants(dts)]


def _ptxas() -> str:
    from triton import knobs
    return knobs.nvidia.ptxas.path


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_report(ptx: str) -> Dict[str, int]:
    target = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags Triton's own ptxas call uses (backends/nvidia/compiler.py)
        proc = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    out = {"arch": target}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(proc.stderr)
        out[key] = int(m.group(1)) if m else 0
    return out


def compile_variant(v: Variant, capability: int = 90) -> Dict[str, object]:
    """Compile one variant for ``sm_<capability>``; returns registers, spills, stack and shared bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.autotuner import Autotuner
    fn = v.fn.fn if isinstance(v.fn, Autotuner) else v.fn  # an Autotuner wraps the JITFunction
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in v.types:
            sig[name] = v.types[name]
            if name in v.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{v.label}: no type for argument {name!r}")
    t0 = time.time()
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(v.constexprs), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    rep = _ptxas_report(k.asm["ptx"])
    rep.update(shared=int(k.metadata.shared), seconds=round(time.time() - t0, 2),
               wgmma="wgmma" in k.asm["ptx"])
    return rep


def problems(rep: Dict[str, object]) -> List[str]:
    """What is wrong with one compiled variant (empty when it passes)."""
    why = []
    if rep["spill_stores"] or rep["spill_loads"]:
        why.append(f"spills {rep['spill_stores']} B stored / {rep['spill_loads']} B loaded")
    if rep["shared"] > H100_MAX_SHARED:
        why.append(f"shared memory {rep['shared']} B > {H100_MAX_SHARED} B")
    return why


def check(selected: Optional[List[Variant]] = None, jobs: int = 2, progress=None) -> List[Variant]:
    """Compile ``selected`` (default: all :func:`variants`) and fill each ``result``."""
    vs = variants() if selected is None else selected

    def one(v):
        try:
            v.result = compile_variant(v)
            v.result["problems"] = problems(v.result)
        except Exception as exc:  # a compile failure is a finding, reported with the rest
            v.result = {"problems": [f"compile failed: {type(exc).__name__}: {str(exc)[:400]}"]}
        if progress:
            progress(v)
        return v

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, vs))


def table(vs: List[Variant]) -> str:
    """The results as a fixed-width text table."""
    rows = [f"{'kernel variant':<100} {'regs':>4} {'spill':>6} {'stack':>5} {'shared':>7} {'wgmma':>5}  status"]
    for v in vs:
        r = v.result
        if "regs" in r:
            rows.append(f"{v.label:<100} {r['regs']:>4} {r['spill_stores']:>6} {r['stack']:>5} "
                        f"{r['shared']:>7} {str(r['wgmma']):>5}  {'; '.join(r['problems']) or 'ok'}")
        else:
            rows.append(f"{v.label:<100} {'':>4} {'':>6} {'':>5} {'':>7} {'':>5}  {'; '.join(r['problems'])}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("VPEFT_SM90_JOBS", "2")),
                    help="compile this many variants at once (default 2)")
    ap.add_argument("--filter", default="", help="only variants whose label contains this text")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                    help="comma-separated dtypes to compile (default %(default)s; float16 also works)")
    args = ap.parse_args(argv)
    vs = [v for v in variants(tuple(args.dtypes.split(","))) if args.filter in v.label]
    done = [0]

    def progress(v):
        done[0] += 1
        print(f"[{done[0]}/{len(vs)}] {v.label}: {'; '.join(v.result['problems']) or 'ok'}", file=sys.stderr,
              flush=True)

    check(vs, jobs=args.jobs, progress=progress)
    print(table(vs))
    bad = [v for v in vs if v.result["problems"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"label": v.label, **v.result} for v in vs], f, indent=1)
    compiled = [v.result for v in vs if "regs" in v.result]
    if compiled:
        print(f"max registers {max(r['regs'] for r in compiled)}, max spill stores "
              f"{max(r['spill_stores'] for r in compiled)} B, max shared memory {max(r['shared'] for r in compiled)} B "
              f"(limit {H100_MAX_SHARED} B)")
    print(f"{len(vs)} variants compiled for sm_90, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

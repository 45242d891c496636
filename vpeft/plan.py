"""``vpeft plan``: the largest batch that trains within a GPU memory budget, found by measurement.

    vpeft plan --method side4video_light --backbone EVA02-E-14 --frames 8 --budget 40GB
    python -m vpeft.plan --method st_adapter_12x384 --backbone ViT-B-16 --frames 8 --budget 24GiB

The budget is imposed on a larger card with ``torch.cuda.set_per_process_memory_fraction``
(budget / the card's total memory), so an 80 GB H100 answers for a 40 GB A100. The
search builds the model once and runs real training steps (forward, backward, AdamW)
at candidate batch sizes: it doubles the batch until a step runs out of memory (or
``--max-batch`` is reached), then bisects between the last batch that fitted and the
first that did not, recovering from each out-of-memory error. Finally it measures
memory and clips/s at the batch it found, with a fresh model. Memory grows with the
batch, so a batch that fits means every smaller one fits too (the search relies on it).

Needs a CUDA device: it measures GPU memory, and without one it stops with an error.
The CLI (``vpeft/cli.py``) registers the subcommand with :func:`add_plan_parser`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

GB = 1e9
GIB = 2 ** 30


class PlanError(RuntimeError):
    """The plan cannot be made (no CUDA device, nothing fits, bad arguments)."""


def parse_budget(text: str) -> float:
    """``"40GB"`` -> 40e9 bytes, ``"24GiB"`` -> 24 * 2**30, ``"500MB"``, or a plain number of GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|[KMGT])?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the budget {text!r}; expected e.g. 40GB, 24GiB or 40 (GB)")
    value, unit = float(m.group(1)), (m.group(2) or "GB").upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    if "I" in unit:
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit[0]]
    if value <= 0:
        raise ValueError(f"the budget must be positive, got {text!r}")
    return value * scale


@dataclass
class SearchResult:
    """``best``: the largest batch that fitted (0: none). ``probes``: (batch, fitted) in order."""

    best: int
    probes: List[Tuple[int, bool]] = field(default_factory=list)
    first_failure: Optional[int] = None


def largest_fitting_batch(fits: Callable[[int], bool], *, start: int = 1, max_batch: int = 4096) -> SearchResult:
    """Largest ``b`` in ``[1, max_batch]`` with ``fits(b)``, assuming ``fits`` is monotone.

    Doubles from ``start`` while batches fit, then bisects between the last fit and the
    first failure. ``fits`` is called at most once per batch. If ``start`` itself does
    not fit, bisects below it. Returns ``best == 0`` when even batch 1 does not fit.
    """
    if start < 1 or max_batch < 1:
        raise ValueError(f"start and max_batch must be >= 1, got {start}, {max_batch}")
    start = min(start, max_batch)
    res = SearchResult(best=0)
    known = {}

    def probe(b: int) -> bool:
        if b not in known:
            known[b] = bool(fits(b))
            res.probes.append((b, known[b]))
        return known[b]

    lo, hi = 0, None  # lo: largest known fit (0 = none); hi: smallest known failure
    b = start
    while True:
        if probe(b):
            lo = b
            if b >= max_batch:
                break
            b = min(2 * b, max_batch)
        else:
            hi = b
            break
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
    res.best = lo
    res.first_failure = hi
    return res


def batch_fits(vm, frames: int, image_size: int, device, dtype, num_classes: int,
               log: Callable[[str], None] = print) -> Callable[[int], bool]:
    """The ``fits(batch)`` oracle of the search: two real training steps of ``vm`` at ``batch``.

    Two steps, because the optimizer state is allocated in the first. An out-of-memory
    error means "does not fit": everything the failed step held is released (gradients,
    optimizer state, cached blocks) before the next probe. Other errors propagate.
    """
    from . import profiling

    def fits(batch: int) -> bool:
        step = None
        ok = True
        try:
            step = profiling.TrainingStep(vm, batch, frames, image_size, device, dtype, num_classes)
            step()
            step()
        except Exception as exc:  # noqa: BLE001
            if not profiling.is_oom(exc):
                raise
            ok = False
        finally:
            step = None
            vm.zero_grad(set_to_none=True)
            profiling.release(torch_device(device))
        log(f"  batch {batch}: {'fits' if ok else 'out of memory'}")
        return ok

    return fits


def torch_device(device):
    import torch

    return torch.device(device)


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise PlanError("vpeft plan measures GPU memory and needs a CUDA device; torch.cuda.is_available() is "
                        "False on this machine (no GPU, or a CPU-only torch build)")
    return torch


def plan(method: str, backbone: str, frames: int, budget_bytes: float, *, max_batch: int = 1024,
         backend: str = "fused", dtype: str = "bf16", start: int = 1, rounds: int = 3,
         log: Callable[[str], None] = print) -> dict:
    """Find the largest batch within ``budget_bytes`` on this CUDA device and measure it.

    Returns a dict with ``batch``, the search ``probes``, and the measured record
    (peak memory, clips/s, trainable parameters) at that batch.
    """
    torch = _require_cuda()
    from . import profiling

    if backbone not in profiling.BACKBONES:
        raise PlanError(f"unknown backbone {backbone!r}; expected one of {sorted(profiling.BACKBONES)}")
    if method not in profiling.METHOD_PRESETS:
        raise PlanError(f"unknown method {method!r}; expected one of {profiling.METHOD_PRESETS}")
    spec = profiling.BACKBONES[backbone]
    try:
        profiling.method_options(method, spec)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes > total:
        raise PlanError(f"the budget {budget_bytes / GB:.1f} GB is more than this GPU has "
                        f"({total / GB:.1f} GB, {torch.cuda.get_device_name(device)})")
    env_backend = "auto" if backend == "fused" else backend
    log(f"plan: {method} on {backbone}, {frames} frames, {dtype}, backend {backend}, budget "
        f"{budget_bytes / GB:.1f} GB of {total / GB:.1f} GB ({torch.cuda.get_device_name(device)})")

    with profiling.memory_budget(device, budget_bytes), profiling.vpeft_backend(env_backend):
        try:
            vm = profiling.build_case(method, backbone, frames, device, tdtype)
        except Exception as exc:  # noqa: BLE001
            if not profiling.is_oom(exc):
                raise
            vm = None
        if vm is None:
            profiling.release(device)
            raise PlanError(f"the frozen model alone does not fit in {budget_bytes / GB:.1f} GB")

        fits = batch_fits(vm, frames, spec.image_size, device, tdtype, spec.num_classes, log)
        search = largest_fitting_batch(fits, start=start, max_batch=max_batch)
        vm = None
        profiling.release(device)
    out = dict(method=method, backbone=backbone, frames=frames, dtype=dtype, backend=backend,
               budget_gb=budget_bytes / GB, device=torch.cuda.get_device_name(device),
               batch=search.best, first_failure=search.first_failure, probes=search.probes,
               max_batch=max_batch)
    if search.best == 0:
        out["record"] = None
        return out
    out["record"] = profiling.measure(method, backbone, frames, search.best, device=device, dtype=tdtype,
                                      backend=backend, rounds=rounds, warmup=2, count_flops=False,
                                      budget_gb=budget_bytes / GB)
    return out


def format_plan(result: dict) -> str:
    lines = [f"{result['method']} on {result['backbone']}, {result['frames']} frames, {result['dtype']}, "
             f"budget {result['budget_gb']:.1f} GB on {result['device']}:"]
    if result["batch"] == 0:
        lines.append("  not even batch 1 fits")
        return "\n".join(lines)
    capped = " (the --max-batch limit)" if result["first_failure"] is None else ""
    lines.append(f"  largest batch that fits: {result['batch']}{capped}")
    rec = result.get("record") or {}
    if rec.get("status") == "ok":
        lines.append(f"  peak allocated {rec['peak_allocated_gb']:.2f} GB, peak reserved "
                     f"{rec['peak_reserved_gb']:.2f} GB, {rec['clips_per_s']:.2f} clips/s, "
                     f"{rec['trainable_params']:,} trainable parameters")
    elif rec:
        lines.append(f"  the final measurement at batch {result['batch']} ran out of memory "
                     f"({rec.get('oom_phase')}); fragmentation differs between runs, try one batch less")
    return "\n".join(lines)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object (for ``vpeft/cli.py``)."""
    from .profiling import BACKBONES, METHOD_PRESETS

    p = subparsers.add_parser("plan", help="largest batch that trains within a GPU memory budget (measured)",
                              description="Find the largest batch that trains within a GPU memory budget, "
                                          "by measurement, and report its memory and throughput.")
    p.add_argument("--method", required=True, choices=METHOD_PRESETS)
    p.add_argument("--backbone", required=True, choices=sorted(BACKBONES))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--budget", default="40GB", help="GPU memory budget: 40GB (10^9 bytes), 24GiB (2^30), ...")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--start", type=int, default=1, help="first batch tried (then doubled)")
    p.add_argument("--backend", choices=("eager", "fused"), default="fused",
                   help="fused: VPEFT_BACKEND=auto (fused kernels where available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args) -> int:
    try:
        budget = parse_budget(args.budget)
        result = plan(args.method, args.backbone, args.frames, budget, max_batch=args.max_batch,
                      backend=args.backend, dtype=args.dtype, start=args.start,
                      log=lambda s: print(s, file=sys.stderr))
    except (PlanError, ValueError) as exc:
        print(f"vpeft plan: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vpeft")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plan":
        argv = ["plan"] + argv  # ``python -m vpeft.plan --method ...``
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

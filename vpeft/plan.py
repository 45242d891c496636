"""``vpeft plan``: the largest batch that trains within a GPU memory budget; ``vpeft estimate``.

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

Without a CUDA device (or with ``--estimate``) every probe is an estimate instead: the
bytes one training step allocates, counted exactly on fake tensors by :mod:`vpeft.memory`
(no GPU, no real allocation; allocator overhead not included). The estimate-based
search probes the papers' batch first, guesses the answer by a straight line through it
and the bytes that do not grow with the batch, refines the guess by secant steps, and
confirms the boundary around it: three to five probes. It prints the breakdown at the batch
found, then which of the method's own options (checkpointing, streaming, the fused
backend, fewer frames) would fit a larger batch. With a CUDA device the plan measures,
and prints the estimate beside the measurement with their ratio.

``vpeft estimate`` prints the breakdown of one case (:func:`add_estimate_parser`).
The CLI (``vpeft/cli.py``) registers both subcommands.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

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


def largest_fitting_batch(fits: Callable[[int], bool], *, start: int = 1, max_batch: int = 4096,
                          guess: Optional[Callable[[Callable[[int], bool]], int]] = None) -> SearchResult:
    """Largest ``b`` in ``[1, max_batch]`` with ``fits(b)``, assuming ``fits`` is monotone.

    Doubles from ``start`` while batches fit, then bisects between the last fit and the
    first failure. ``fits`` is called at most once per batch. If ``start`` itself does
    not fit, bisects below it. Returns ``best == 0`` when even batch 1 does not fit.

    ``guess(probe)``: a predicted answer, computed with the same (memoised) ``probe``;
    the search then gallops from the guess (steps 1, 2, 4, ... up while batches fit, or
    down while they do not) and bisects the bracket found: two probes when the guess
    is right.
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
    if guess is not None:
        g = max(1, min(int(guess(probe)), max_batch))
        step = 1
        if probe(g):
            lo = g
            while lo < max_batch:
                b = min(lo + step, max_batch)
                if not probe(b):
                    hi = b
                    break
                lo, step = b, 2 * step
        else:
            hi = g
            while hi > 1:
                b = max(hi - step, 1)
                if probe(b):
                    lo = b
                    break
                hi, step = b, 2 * step
    else:
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
        raise PlanError("measuring needs a CUDA device; torch.cuda.is_available() is False on this machine "
                        "(no GPU, or a CPU-only torch build); leave out --measure to estimate instead")
    return torch


DTYPES = ("bf16", "fp16", "fp32")


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise PlanError(f"unknown dtype {name!r}; expected one of {DTYPES}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _check_case(method: str, backbone: str):
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
    return spec


def _backend_name(backend: str) -> str:
    if backend not in ("eager", "fused", "auto"):
        raise PlanError(f"unknown backend {backend!r}; expected eager, fused or auto (= fused)")
    return "fused" if backend == "auto" else backend


def plan(method: str, backbone: str, frames: int, budget_bytes: float, *, max_batch: int = 1024,
         backend: str = "fused", dtype: str = "bf16", start: int = 1, rounds: int = 3,
         estimate: Optional[bool] = None, options: Optional[dict] = None, alternatives: bool = True,
         log: Callable[[str], None] = print) -> dict:
    """Find the largest batch within ``budget_bytes``.

    ``estimate``: None (default) estimates when there is no CUDA device and measures
    when there is one; True always estimates (:func:`plan_estimate`); False always
    measures (needs CUDA). A measured plan also carries the estimate at the batch found
    (``estimate``) and ``measured_over_estimated``.
    """
    import torch

    _check_case(method, backbone)
    backend = _backend_name(backend)
    if estimate is None:
        estimate = not torch.cuda.is_available()
    if estimate:
        return plan_estimate(method, backbone, frames, budget_bytes, max_batch=max_batch, backend=backend,
                             dtype=dtype, options=options, alternatives=alternatives, log=log)
    out = plan_measure(method, backbone, frames, budget_bytes, max_batch=max_batch, backend=backend, dtype=dtype,
                       start=start, rounds=rounds, log=log)
    if out["batch"]:
        from . import memory

        log(f"estimating batch {out['batch']} too (vpeft.memory, fake tensors)")
        rep = memory.estimate_step(method, backbone, frames, out["batch"], backend=backend,
                                   dtype=_torch_dtype(dtype), options=options)
        out["estimate"] = rep.to_dict()
        rec = out.get("record") or {}
        if rec.get("status") == "ok" and rep.peak_allocated_bytes:
            out["measured_over_estimated"] = rec["peak_allocated_gb"] * GB / rep.peak_allocated_bytes
    return out


def plan_measure(method: str, backbone: str, frames: int, budget_bytes: float, *, max_batch: int = 1024,
                 backend: str = "fused", dtype: str = "bf16", start: int = 1, rounds: int = 3,
                 log: Callable[[str], None] = print) -> dict:
    """Find the largest batch within ``budget_bytes`` on this CUDA device and measure it.

    Returns a dict with ``batch``, the search ``probes``, and the measured record
    (peak memory, clips/s, trainable parameters) at that batch.
    """
    torch = _require_cuda()
    from . import profiling

    spec = _check_case(method, backbone)
    tdtype = _torch_dtype(dtype)
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
               budget_gb=budget_bytes / GB, device=torch.cuda.get_device_name(device), measured=True,
               batch=search.best, first_failure=search.first_failure, probes=search.probes,
               max_batch=max_batch)
    if search.best == 0:
        out["record"] = None
        return out
    out["record"] = profiling.measure(method, backbone, frames, search.best, device=device, dtype=tdtype,
                                      backend=backend, rounds=rounds, warmup=2, count_flops=False,
                                      budget_gb=budget_bytes / GB)
    rec = out["record"]
    if rec.get("status") == "ok":
        out["peak_allocated_bytes"] = int(rec["peak_allocated_gb"] * GB)
    return out


def memory_saving_alternatives(method: str, backbone: str, options: dict, backend: str,
                               frames: int, batch: Optional[int] = None) -> List[Tuple[str, dict]]:
    """The method's own memory-saving choices not taken yet: ``(label, changes)`` where
    ``changes`` has adapt ``options`` and/or ``backend`` / ``frames`` (``batch``: the step
    they are for, which sizes ``tower_chunk``)."""
    from .memory_options import untaken
    from .methods import get_method
    from .profiling import BACKBONES, method_options

    name = method_options(method, BACKBONES[backbone])[0]
    allowed = set(get_method(name).options)
    out = [(label, {"options": extra}) for label, extra in untaken(name, options, batch=batch, frames=frames)
           if set(extra) <= allowed]
    if backend == "eager":
        out.append(("backend fused", {"backend": "fused"}))
    if frames > 1:
        out.append((f"frames {frames // 2}", {"frames": frames // 2}))
    return out


def plan_estimate(method: str, backbone: str, frames: int, budget_bytes: float, *, max_batch: int = 1024,
                  backend: str = "fused", dtype: str = "bf16", options: Optional[dict] = None,
                  alternatives: bool = True, log: Callable[[str], None] = print,
                  on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """The largest batch whose estimated peak (:mod:`vpeft.memory`) fits ``budget_bytes``; no GPU needed.

    Probes the papers' batch, guesses from it (see ``guess`` inside), refines by secant
    steps on the estimated peaks (a few probes), then confirms the boundary with :func:`largest_fitting_batch`. The result carries the
    estimate at the batch found (``estimate``, with ``peak_allocated_bytes``,
    ``saved_bytes``, ``flops`` and ``breakdown`` at top level) and, with
    ``alternatives``, for every memory-saving option of the method not taken yet,
    the estimated peak at the first batch that does not fit now.
    ``on_result(result)`` is called before the alternatives are estimated (so a caller
    can print the answer early).
    """
    import time

    from . import memory

    _check_case(method, backbone)
    backend = _backend_name(backend)
    tdtype = _torch_dtype(dtype)
    t0 = time.perf_counter()
    log(f"plan (estimate, no GPU used): {method} on {backbone}, {frames} frames, {dtype}, backend {backend}, "
        f"budget {budget_bytes / GB:.1f} GB")
    try:
        est = memory.StepEstimator(method, backbone, frames, backend=backend, dtype=tdtype, options=options)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    log(f"  built the model on fake tensors in {est.build_seconds:.1f} s")
    reports: Dict[int, "memory.MemoryReport"] = {}

    def fits(batch: int) -> bool:
        rep = est.run(batch, warmup="optimizer")
        reports[batch] = rep
        ok = rep.peak_allocated_bytes <= budget_bytes
        log(f"  batch {batch}: estimated peak {rep.peak_gb:.2f} GB, {'fits' if ok else 'does not fit'} "
            f"({rep.seconds - est.build_seconds:.1f} s)")
        return ok

    def guess(probe) -> int:
        """A first probe at the papers' batch, a straight line through it and the bytes that do
        not grow with the batch (weights, optimizer state, gradients), then secant steps through
        the largest batch known to fit and the smallest known not to (or the two nearest probes)."""
        b0 = max(1, min(est.spec.batch, max_batch))
        probe(b0)
        r0 = reports[b0]
        fixed = r0.categories.get("weights", 0) + r0.categories.get("optimizer_state", 0) + est.trainable_bytes
        slope = (r0.peak_allocated_bytes - fixed) / b0
        if slope <= 0:  # nothing grows with the batch at this size: probe twice as many
            g = 2 * b0
        else:
            g = int((budget_bytes - fixed) // slope)
        g = max(1, min(g, max_batch))
        if g != b0:
            probe(g)
        for _ in range(4):
            fit = sorted(b for b, r in reports.items() if r.peak_allocated_bytes <= budget_bytes)
            fail = sorted(b for b, r in reports.items() if r.peak_allocated_bytes > budget_bytes)
            lo, hi = (fit[-1] if fit else 0), (fail[0] if fail else None)
            if lo >= max_batch or (hi is not None and hi == lo + 1) or hi == 1:
                break
            if lo and hi is not None:
                b1, b2 = lo, hi
            elif hi is None:
                b1, b2 = fit[-2], lo
            else:
                b1, b2 = hi, fail[1] if len(fail) > 1 else None
                if b2 is None:  # one failure and no fit: scale down by the bytes over the fixed part
                    p = reports[hi].peak_allocated_bytes
                    g = max(1, int(hi * max(budget_bytes - fixed, 0) // max(p - fixed, 1)))
                    g = min(g, hi - 1)
                    if g in reports:
                        break
                    probe(g)
                    continue
            p1, p2 = reports[b1].peak_allocated_bytes, reports[b2].peak_allocated_bytes
            g = b1 + int((budget_bytes - p1) * (b2 - b1) // max(p2 - p1, 1))
            g = max(lo + 1, min(g, (hi - 1) if hi is not None else max_batch))
            if g in reports:
                break
            probe(g)
        fits_known = [b for b, r in reports.items() if r.peak_allocated_bytes <= budget_bytes]
        return max(fits_known) if fits_known else 1

    search = largest_fitting_batch(fits, max_batch=max_batch, guess=guess)
    out = dict(method=method, backbone=backbone, frames=frames, dtype=dtype, backend=backend,
               budget_gb=budget_bytes / GB, device="estimate (vpeft.memory on fake tensors; no GPU used)",
               measured=False, batch=search.best, first_failure=search.first_failure, probes=search.probes,
               max_batch=max_batch, options=dict(est.options),
               probe_peaks_gb={b: r.peak_gb for b, r in sorted(reports.items())})
    if search.best:
        rep = reports[search.best]
        out.update(estimate=rep.to_dict(), peak_allocated_bytes=rep.peak_allocated_bytes,
                   saved_bytes=rep.saved_bytes, flops=rep.flops, breakdown=dict(rep.categories))
    else:
        weights = reports[1].categories.get("weights", 0) if 1 in reports else 0
        out.update(estimate=reports[1].to_dict() if 1 in reports else None, peak_allocated_bytes=None,
                   saved_bytes=None, flops=None, breakdown=None, weights_gb=weights / GB)
    out["search_seconds"] = time.perf_counter() - t0
    out["alternatives"] = []
    if on_result is not None:
        on_result(out)
    target = search.first_failure
    if alternatives and target is not None:
        log(f"checking which options would fit batch {target}:")
        for label, change in memory_saving_alternatives(method, backbone, est.options, backend, frames, target):
            opts = {**(options or {}), **change.get("options", {})}
            try:
                alt = memory.StepEstimator(method, backbone, change.get("frames", frames),
                                           backend=change.get("backend", backend), dtype=tdtype, options=opts)
            except ValueError as exc:
                log(f"  {label}: not possible ({exc})")
                continue
            alt.stepped = est.stepped
            rep = alt.run(target, warmup="optimizer")
            ok = rep.peak_allocated_bytes <= budget_bytes
            log(f"  {label}: batch {target} estimated {rep.peak_gb:.2f} GB, {'fits' if ok else 'does not fit'}")
            out["alternatives"].append(dict(change=label, batch=target, peak_allocated_bytes=rep.peak_allocated_bytes,
                                            fits=ok, flops=rep.flops))
    out["seconds"] = time.perf_counter() - t0
    return out


def _gb(b) -> str:
    return "?" if b is None else f"{b / GB:.2f} GB"


def format_plan(result: dict, alternatives: bool = True) -> str:
    lines = [f"{result['method']} on {result['backbone']}, {result['frames']} frames, {result['dtype']}, "
             f"backend {result['backend']}, budget {result['budget_gb']:.1f} GB, {result['device']}:"]
    if result["batch"] == 0:
        lines.append("  not even batch 1 fits" + (f" (the weights alone are {result['weights_gb']:.2f} GB)"
                                                   if result.get("weights_gb") else ""))
        return "\n".join(lines)
    capped = " (the --max-batch limit)" if result["first_failure"] is None else ""
    lines.append(f"  largest batch that fits: {result['batch']}{capped}")
    rec = result.get("record") or {}
    if rec.get("status") == "ok":
        lines.append(f"  measured: peak allocated {rec['peak_allocated_gb']:.2f} GB, peak reserved "
                     f"{rec['peak_reserved_gb']:.2f} GB, {rec['clips_per_s']:.2f} clips/s, "
                     f"{rec['trainable_params']:,} trainable parameters")
    elif rec:
        lines.append(f"  the final measurement at batch {result['batch']} ran out of memory "
                     f"({rec.get('oom_phase')}); fragmentation differs between runs, try one batch less")
    est = result.get("estimate")
    if est:
        from .memory import MemoryReport

        text = MemoryReport(**est).format()
        lines += ["  " + line for line in text.splitlines()[1:]]
        if result.get("measured_over_estimated"):
            lines.append(f"  measured / estimated peak allocated: {result['measured_over_estimated']:.3f}")
    if alternatives and result.get("alternatives") is not None and not result.get("measured"):
        lines += format_alternatives(result)
    return "\n".join(lines)


def format_alternatives(result: dict) -> List[str]:
    alts = result.get("alternatives") or []
    if result.get("first_failure") is None:
        return []
    if not alts:
        return [f"  no memory-saving option of {result['method']} is left to try"]
    from .memory_options import flops_ratio

    lines = [f"  options that would fit batch {result['first_failure']} (estimated; FLOPs per clip over the "
             "plan's step, vpeft.memory_options says what each saves and costs):"]
    for a in alts:
        # fused custom ops have no FLOP formula, so a backend change has no comparable count
        ratio = None if a["change"].startswith("backend") else flops_ratio(a.get("flops"), a["batch"],
                                                                           result.get("flops"), result["batch"])
        lines.append(f"    {a['change']:<26} {_gb(a['peak_allocated_bytes'])}  "
                     f"{'fits' if a['fits'] else 'does not fit':<13}"
                     + ("" if ratio is None else f" {ratio:.2f}x FLOPs"))
    return lines


def parse_options(pairs: Optional[List[str]]) -> dict:
    """``["checkpointing=true", "side_width=320"]`` -> ``{"checkpointing": True, "side_width": 320}``."""
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        low = text.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[key.strip()] = value
    return out


def _case_arguments(p, batch: bool) -> None:
    from .profiling import BACKBONES, METHOD_PRESETS

    p.add_argument("--method", required=True, choices=METHOD_PRESETS)
    p.add_argument("--backbone", required=True, choices=sorted(BACKBONES))
    p.add_argument("--frames", type=int, default=8)
    if batch:
        p.add_argument("--batch", type=int, default=None, help="default: the papers' batch for the backbone")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an adapt option over the preset's, e.g. checkpointing=true (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object (for ``vpeft/cli.py``)."""
    p = subparsers.add_parser("plan", help="largest batch that trains within a GPU memory budget "
                                           "(estimated without a GPU, measured with one)",
                              description="Find the largest batch that trains within a GPU memory budget. "
                                          "Without a CUDA device (or with --estimate) every probe is an exact "
                                          "tensor-accounting estimate (vpeft.memory); with one it measures "
                                          "and prints the estimate beside.")
    _case_arguments(p, batch=False)
    p.add_argument("--budget", default="40GB", help="GPU memory budget: 40GB (10^9 bytes), 24GiB (2^30), ...")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--start", type=int, default=1, help="measured search: first batch tried (then doubled)")
    p.add_argument("--backend", choices=("eager", "fused", "auto"), default="fused",
                   help="fused (= auto): the fused kernels where available")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--estimate", dest="estimate", action="store_const", const=True, default=None,
                      help="estimate even when a CUDA device is present")
    mode.add_argument("--measure", dest="estimate", action="store_const", const=False,
                      help="measure on the CUDA device (the default when there is one)")
    p.add_argument("--no-alternatives", action="store_true",
                   help="do not estimate which of the method's options would fit more")
    p.set_defaults(func=run_plan)
    return p


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_plan(args) -> int:
    try:
        budget = parse_budget(args.budget)
        options = parse_options(args.option)
        printed = []

        def early(result):  # the answer first; the options' estimates follow
            if not args.json:
                print(format_plan(result, alternatives=False), flush=True)
                printed.append(True)

        import torch

        estimate = args.estimate if args.estimate is not None else not torch.cuda.is_available()
        if estimate:
            result = plan_estimate(args.method, args.backbone, args.frames, budget, max_batch=args.max_batch,
                                   backend=args.backend, dtype=args.dtype, options=options,
                                   alternatives=not args.no_alternatives, log=_stderr, on_result=early)
        else:
            result = plan(args.method, args.backbone, args.frames, budget, max_batch=args.max_batch,
                          backend=args.backend, dtype=args.dtype, start=args.start, estimate=False,
                          options=options, log=_stderr)
    except (PlanError, ValueError) as exc:
        print(f"vpeft plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    elif printed:
        print("\n".join(format_alternatives(result)))
    else:
        print(format_plan(result))
    return 0


def add_estimate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``estimate`` (one case's memory breakdown, no GPU needed) for ``vpeft/cli.py``."""
    p = subparsers.add_parser("estimate", help="memory breakdown of one training step, estimated without a GPU",
                              description="Estimate the GPU memory of one training step (forward, backward, "
                                          "AdamW) by exact tensor accounting on fake tensors (vpeft.memory).")
    _case_arguments(p, batch=True)
    p.add_argument("--backend", choices=("eager", "fused", "auto"), default="eager",
                   help="eager ops, or the fused kernels (auto = fused) through their fake implementations")
    p.add_argument("--no-flops", action="store_true", help="do not count FLOPs")
    p.set_defaults(func=run_estimate)
    return p


def run_estimate(args) -> int:
    from . import memory

    try:
        _check_case(args.method, args.backbone)
        options = parse_options(args.option)
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        _stderr(f"estimating {args.method} on {args.backbone} (fake tensors, no GPU used)...")
        rep = memory.estimate_step(args.method, args.backbone, args.frames, args.batch,
                                   backend=_backend_name(args.backend), dtype=_torch_dtype(args.dtype),
                                   options=options, count_flops=not args.no_flops)
    except (PlanError, ValueError) as exc:
        print(f"vpeft estimate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = rep.to_dict()
        out["breakdown"] = out["categories"]
        print(json.dumps(out, default=str))
    else:
        print(rep.format())
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

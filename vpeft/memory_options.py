"""What each memory option of a method saves and what it costs, measured.

For a benchmark case (method preset, backbone, frames, batch) :func:`compare` estimates
one training step with :func:`vpeft.memory.estimate_step` (fake tensors, no GPU) for the
preset as it is and for each of the method's recompute options added on top, one after
the other, and reports per row the peak allocated bytes, the bytes saved for backward
and the FLOPs of the step (``torch.utils.flop_counter.FlopCounterMode``, counted on the
same fake step) with their ratio to the first row. ``vpeft plan`` prints this table.

The options (:data:`OPTIONS`; their mechanics are in :mod:`vpeft.methods.recompute`):

========================  ==============================================  ==============================
option                    saves                                           costs
========================  ==============================================  ==============================
``checkpointing``         everything an adapted block (ST-Adapter, MSTA)  one more forward of each
                          or side block (Side4Video) keeps for backward,  recomputed block per step
                          except its inputs                               (ST-Adapter B/16: 1.34x FLOPs)
``checkpoint_every=k``    the same for every k-th block only              1/k of that forward
``recompute_levels``      Side4Video: the backbone level inputs the       a second frozen tower forward
                          ladder keeps for its weight gradients           in backward (up to the last
                          (``D``-wide, one per side block); keeps their   ladder level), and the level
                          output gradients (``d``-wide) during backward   projections again
``stream``                Side4Video: with ``recompute_levels`` (its      nothing
                          default) only the tower's current token
                          stream is alive, not every level at once
``tower_chunk=n``         Side4Video: the frozen tower's transients (MLP  nothing (same FLOPs; smaller
                          hidden layer, attention) are those of n frames  matmuls)
========================  ==============================================  ==============================
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

OPTIONS: Dict[str, List[Tuple[str, dict]]] = {
    "st_adapter": [("checkpoint_every=2", {"checkpoint_every": 2}), ("checkpointing", {"checkpointing": True})],
    "msta": [("checkpointing", {"checkpointing": True})],
    "side4video": [("checkpointing", {"checkpointing": True}),
                   ("recompute_levels + stream", {"recompute_levels": True, "stream": True}),
                   ("tower_chunk=16", {"tower_chunk": 16})],
}
"""Per method, the recompute options tried, in the order they are added (cumulative)."""


def candidates(method: str, base: Optional[dict] = None) -> List[Tuple[str, dict]]:
    """``[(label, adapt options), ...]``: the preset (``base``), then each option of
    :data:`OPTIONS` added on top of the previous row. Options the preset already has
    are skipped."""
    rows = [("preset", dict(base or {}))]
    current = dict(base or {})
    for label, extra in OPTIONS.get(method, []):
        if all(current.get(k) == v for k, v in extra.items()):
            continue
        if "checkpoint_every" in current and "checkpointing" in extra:
            current.pop("checkpoint_every")
        current = {**current, **extra}
        rows.append((label, dict(current)))
    return rows


def compare(preset: str, backbone: str, frames: int, batch: int, *, backend: str = "eager",
            log: Callable[[str], None] = lambda s: None, estimate=None) -> List[dict]:
    """Estimate the step of ``preset`` for every row of :func:`candidates`; one dict per row
    with ``label``, ``options``, ``peak_allocated_bytes``, ``saved_bytes``, ``flops`` and
    ``flops_ratio`` (to the preset row; FLOPs of fused custom ops count 0 in every row).
    ``estimate``: :func:`vpeft.memory.estimate_step` (a stand-in for tests)."""
    from . import profiling

    if estimate is None:
        from .memory import estimate_step as estimate
    method, base = profiling.method_options(preset, profiling.BACKBONES[backbone])
    rows = []
    for label, options in candidates(method, base):
        log(f"  estimating {preset} with {label} ...")
        rep = estimate(preset, backbone, frames=frames, batch=batch, backend=backend, options=options)
        rows.append(dict(label=label, options=options, peak_allocated_bytes=rep.peak_allocated_bytes,
                         saved_bytes=rep.saved_bytes, flops=rep.flops))
    first = rows[0]["flops"]
    for r in rows:
        r["flops_ratio"] = (r["flops"] / first) if (first and r["flops"] is not None) else None
    return rows


def format_rows(rows: List[dict], budget_bytes: Optional[float] = None) -> str:
    """The table ``vpeft plan`` prints (GB = 10^9 bytes)."""
    lines = ["  memory options (estimated; each row adds one option to the row above):",
             f"    {'option':<28}{'peak GB':>9}{'saved GB':>10}{'TFLOP':>9}{'x FLOPs':>9}"
             + ("   fits" if budget_bytes else "")]
    for r in rows:
        flops = "-" if r["flops"] is None else f"{r['flops'] / 1e12:.1f}"
        ratio = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.2f}"
        fits = ""
        if budget_bytes:
            fits = "   yes" if r["peak_allocated_bytes"] <= budget_bytes else "   no"
        lines.append(f"    {r['label']:<28}{r['peak_allocated_bytes'] / 1e9:>9.2f}{r['saved_bytes'] / 1e9:>10.2f}"
                     f"{flops:>9}{ratio:>9}{fits}")
    return "\n".join(lines)

"""What each memory option of a method saves and what it costs, measured.

``vpeft plan`` (estimating, no GPU) tries each option of :data:`OPTIONS` the method
does not use yet (:func:`untaken`) at the first batch that does not fit, and prints
its estimated peak and the FLOPs of its step (``torch.utils.flop_counter.FlopCounterMode``
on the same fake step) over those of the step without it (:func:`flops_ratio`). One
step is estimated with ``vpeft estimate --method ... --option checkpointing=true``.

The options (:data:`OPTIONS`; their mechanics are in :mod:`vpeft.methods.recompute`):

========================  ==============================================  ==============================
option                    saves                                           costs
========================  ==============================================  ==============================
``checkpointing``         everything an adapted block (ST-Adapter, MSTA)  one more forward of each
                          or side block (Side4Video) keeps for backward,  recomputed block per step
                          except its inputs                               (ST-Adapter B/16: 1.34x FLOPs)
``recompute_adapters``    ST-Adapter: the input of the norm after each    one more forward of each
                          adapter (and its statistics; on the eager path  adapter and that norm (B/16
                          also the adapter's internals); keeps the        12x384: 1.04x FLOPs)
                          adapter's input
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

from typing import Dict, List, Optional, Tuple

OPTIONS: Dict[str, List[Tuple[str, dict]]] = {
    "st_adapter": [("recompute_adapters", {"recompute_adapters": True}),
                   ("checkpoint_every=2", {"checkpoint_every": 2}), ("checkpointing", {"checkpointing": True})],
    "msta": [("checkpointing", {"checkpointing": True})],
    "side4video": [("checkpointing", {"checkpointing": True}),
                   ("recompute_levels + stream", {"recompute_levels": True, "stream": True}),
                   ("tower_chunk=16", {"tower_chunk": 16})],
}
"""Per method, the recompute options ``vpeft plan`` tries (one at a time, over the preset's)."""


TOWER_CHUNKS = 4
"""With a batch given, :func:`untaken` sizes ``tower_chunk`` so the frozen tower runs in this
many chunks of whole clips: most of the transient saving, and an estimate that stays fast
(a 16-frame chunk at batch 129 x 8 frames is 65 passes of the tower, each one more
set of ops to account)."""


def untaken(method: str, options: Optional[dict] = None, *, batch: Optional[int] = None,
            frames: Optional[int] = None) -> List[Tuple[str, dict]]:
    """``[(label, adapt options to add), ...]``: the options of :data:`OPTIONS` that
    ``options`` does not already have (``vpeft plan`` estimates each of them).
    ``batch`` and ``frames``: the step the options are for; ``tower_chunk`` is then
    ``frames`` x ceil(batch / :data:`TOWER_CHUNKS`) (at least its default)."""
    options = dict(options or {})
    if method == "side4video":  # adapt's default: recompute_levels follows stream
        options.setdefault("recompute_levels", options.get("stream", False))
    out = []
    for label, extra in OPTIONS.get(method, []):
        if all(options.get(k) == v for k, v in extra.items()):
            continue
        if "checkpoint_every" in extra and (options.get("checkpointing") is True or "checkpoint_every" in options):
            continue  # already recomputing every block, or already chose k
        if "recompute_adapters" in extra and options.get("checkpointing") is True:
            continue  # every block is recomputed whole already
        if "tower_chunk" in extra and batch and frames:
            chunk = max(extra["tower_chunk"], frames * -(-batch // TOWER_CHUNKS))
            label, extra = f"tower_chunk={chunk}", {**extra, "tower_chunk": chunk}
        out.append((label, dict(extra)))
    return out


def flops_ratio(alternative_flops: Optional[int], alternative_batch: int, flops: Optional[int],
                batch: int) -> Optional[float]:
    """FLOPs per clip of an alternative over those of the plan's own step (None when unknown)."""
    if not alternative_flops or not flops:
        return None
    return (alternative_flops / alternative_batch) / (flops / batch)

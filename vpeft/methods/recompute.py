"""Recompute instead of keeping: the activation-checkpointing regions of the methods.

One place for what every method's ``checkpointing`` option does:

* :func:`checkpointed_blocks` reads the user's ``checkpointing`` / ``checkpoint_every``
  options into the set of block indices whose forward is recomputed in backward;
* :func:`run_region` runs one region under a non-reentrant
  :func:`torch.utils.checkpoint.checkpoint` (RNG state preserved, so a dropout inside
  draws the same mask when recomputed);
* :func:`recomputing` tells a module whether it is being run by such a recomputation,
  so state that a forward updates (BatchNorm running statistics) is updated once per
  step and not again by the backward pass.

What a region saves for backward is its inputs only (and whatever it closes over that
autograd needed anyway: parameters); everything computed inside is dropped after the
forward and computed again, one region at a time, when backward reaches it. The price
is one more forward of the region per step.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional, Sequence, Set, Union

import torch
from torch.utils.checkpoint import checkpoint

_STATE = threading.local()


def recomputing() -> bool:
    """True while a forward runs as a recomputation inside the backward pass.

    That is :func:`run_region`'s recomputation, or any forward autograd runs during a
    backward pass on this thread (another activation-checkpoint wrapper, reentrant or
    not, re-runs the checkpointed forward from inside backward).
    """
    return getattr(_STATE, "depth", 0) > 0 or torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def _mark_recompute() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _contexts():
    return contextlib.nullcontext(), _mark_recompute()


def run_region(fn: Callable[..., torch.Tensor], *args, **kwargs):
    """``fn(*args, **kwargs)``, recomputed in backward instead of keeping its internals.

    Non-reentrant checkpoint (keyword arguments and non-tensor arguments allowed, works
    when no input requires grad but a parameter inside does), RNG state preserved.
    Without grad mode there is nothing to save, so ``fn`` simply runs.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts, **kwargs)


CheckpointOption = Union[bool, Sequence[int], None]


def checkpointed_blocks(checkpointing: CheckpointOption, checkpoint_every: Optional[int], depth: int,
                        adapted: Optional[Sequence[int]] = None) -> Set[int]:
    """0-based indices of the blocks to recompute, from a method's options.

    Args:
        checkpointing: ``False``/``None`` (none), ``True`` (every adapted block), or a
            list of 0-based block indices (each must be an adapted block).
        checkpoint_every: ``k``: every ``k``-th adapted block, starting with the first
            (``k=1`` is ``checkpointing=True``, ``k=2`` half of them). Cannot be combined
            with a list.
        depth: number of blocks of the tower.
        adapted: the indices of the blocks the method wraps (default: all).
    """
    adapted = list(range(depth)) if adapted is None else list(adapted)
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int (recompute every k-th adapted block), "
                             f"got {checkpoint_every!r}")
        if isinstance(checkpointing, (list, tuple)):
            raise ValueError("give either checkpointing=[block indices] or checkpoint_every=k, not both")
        if checkpointing is False:
            raise ValueError("checkpoint_every=k recomputes blocks, but checkpointing=False asks for none")
        return set(adapted[::checkpoint_every])
    if checkpointing is None or checkpointing is False:
        return set()
    if checkpointing is True:
        return set(adapted)
    if isinstance(checkpointing, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in checkpointing):
        bad = sorted(set(checkpointing) - set(adapted))
        if bad:
            raise ValueError(f"checkpointing lists block(s) {bad} that are not adapted blocks of this model; "
                             f"expected 0-based indices among {adapted}")
        return set(checkpointing)
    raise ValueError(f"checkpointing must be True, False or a list of 0-based block indices, got {checkpointing!r}")


def _checkpoint_spec(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v))


def _options():
    from .registry import Option, positive_int

    return {
        "checkpointing": Option(None, (bool, list, tuple), "recompute blocks in backward instead of keeping their "
                                "activations: True (every adapted block; side4video: every side block) or a list "
                                "of 0-based block indices (None: none, unless checkpoint_every)", valid=_checkpoint_spec,
                                expected="True, False, None or a list of 0-based block indices"),
        "checkpoint_every": positive_int("recompute every k-th adapted block (instead of a list)", None),
    }


CHECKPOINT_OPTIONS = _options()
"""The ``checkpointing`` / ``checkpoint_every`` options, as each method that recomputes declares them."""


def _adapters_option():
    from .registry import Option

    return {"recompute_adapters": Option(False, bool, "recompute each ST-Adapter and the norm after it in backward: "
                                         "keeps the adapter's input only (not the norm's input nor the eager "
                                         "adapter's internals); ignored in blocks that checkpointing recomputes whole")}


RECOMPUTE_ADAPTERS_OPTION = _adapters_option()
"""ST-Adapter's ``recompute_adapters`` option: each adapter and the norm of the branch after it
form one recomputation region (:func:`run_region`); the cheapest of the recompute options."""

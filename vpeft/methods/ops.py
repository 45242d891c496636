"""How the method modules call vpeft's functional ops: with their ``backend``, and observably.

Every module that calls an op (:class:`~vpeft.methods.st_adapter.STAdapter`,
:class:`~vpeft.methods.msta.FusedMSTA`, :class:`~vpeft.methods.side4video.SideBlock`,
:class:`~vpeft.methods.side4video.LadderProjection`) holds a ``backend`` (None: the
``VPEFT_BACKEND`` environment variable, else ``auto``; see :mod:`vpeft_kernels._backend`)
and calls the op through :func:`call`. Inside :func:`record_backends`, each call also
asks :func:`vpeft_kernels._backend.chosen_backend` which implementation these inputs
take, and records it: that is how profiling reports the backend every op ran on.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Set

import vpeft_kernels
from vpeft_kernels import _backend

__all__ = ["call", "record_backends"]

_RECORDERS: List[Dict[str, Set[str]]] = []


def call(op: str, *args, backend: Optional[str] = None, **kwargs):
    """``vpeft_kernels.<op>(*args, backend=backend, **kwargs)``, recorded when a recorder is active."""
    if _RECORDERS:
        name = _backend.chosen_backend(op, backend, *args, **kwargs)
        for seen in _RECORDERS:
            seen.setdefault(op, set()).add(name)
    return getattr(vpeft_kernels, op)(*args, backend=backend, **kwargs)


@contextlib.contextmanager
def record_backends(seen: Dict[str, Set[str]]) -> Iterator[Dict[str, Set[str]]]:
    """Within the block, add ``{op: {backend, ...}}`` for every op call of the method modules to ``seen``."""
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)

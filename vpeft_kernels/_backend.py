"""Per-call backend selection for vpeft's functional ops.

Every op (``st_adapter``, ``msta_adapter``, ``token_shift_attention``,
``ladder_projection``) has an eager PyTorch implementation (``reference.py``) and
may have faster ones registered by other modules of this package:

* ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set before triton is imported);
* ``"extension"``: the compiled C++/CUDA extension in ``csrc/``;
* ``"eager"``: the reference, always available.

A backend is chosen per call from the ``backend=`` keyword of the op, else from the
``VPEFT_BACKEND`` environment variable (``auto|triton|extension|eager``), else
``auto``. ``auto`` walks :data:`PRIORITY` and takes the first backend that is
registered for the op and has no reason to refuse these inputs; an explicitly
named backend that cannot run raises :class:`BackendUnavailableError` listing why.

Implementations register themselves with :func:`register`; a backend that failed
to load as a whole (triton not importable, extension not built) records a one-line
reason with :func:`mark_unavailable`, shown by :func:`backend_status`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

BACKENDS = ("triton", "extension", "eager")
"""Backend names, in the order ``auto`` tries them."""
PRIORITY = BACKENDS
CHOICES = ("auto",) + BACKENDS
OPS = ("st_adapter", "msta_adapter", "token_shift_attention", "ladder_projection")

ReasonFn = Callable[..., List[str]]


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run an op on the given inputs."""


@dataclass
class _Impl:
    fn: Callable
    reasons: Optional[ReasonFn]
    auto_reasons: Optional[ReasonFn]  # extra reasons that apply only to ``auto``


_REGISTRY: Dict[str, Dict[str, _Impl]] = {op: {} for op in OPS}
_UNAVAILABLE: Dict[str, str] = {}
_NOTES: Dict[str, str] = {}
_OVERRIDE: Dict[str, str] = {}


def register(op: str, backend: str, fn: Callable, reasons: Optional[ReasonFn] = None,
             *, auto_reasons: Optional[ReasonFn] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``reasons(*args, **kwargs)`` returns a list of human-readable reasons why this
    implementation cannot take the given inputs (empty list: it can).
    ``auto_reasons(*args, **kwargs)`` adds reasons that only keep ``auto`` from
    picking it (e.g. the Triton interpreter on CPU tensors runs only when asked for).
    """
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[op][backend] = _Impl(fn, reasons, auto_reasons)


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why a whole backend could not be loaded (shown in every error)."""
    _UNAVAILABLE[backend] = reason


def set_note(backend: str, note: str) -> None:
    """Attach a one-line note to an available backend (e.g. the versions it was built
    for), shown by :func:`backend_status`."""
    _NOTES[backend] = note


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: the keyword if given, else ``$VPEFT_BACKEND``, else auto."""
    source = "backend="
    if backend is None:
        backend = os.environ.get("VPEFT_BACKEND", "auto") or "auto"
        source = "VPEFT_BACKEND="
    name = backend.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"{source}{backend!r} is not a backend; expected one of {CHOICES}")
    return name


def _reasons(op: str, backend: str, args, kwargs) -> List[str]:
    impl = _REGISTRY[op].get(backend)
    if impl is None:
        why = _UNAVAILABLE.get(backend)
        if why:
            return [why]
        return [f"no {backend} implementation of {op} is included in this build of vpeft"]
    if impl.reasons is None:
        return []
    return list(impl.reasons(*args, **kwargs))


def not_supported_reasons(op: str, *args, **kwargs) -> Dict[str, List[str]]:
    """For each backend, the reasons it cannot run ``op`` on these inputs (empty: it can)."""
    return {b: _reasons(op, b, args, kwargs) for b in BACKENDS}


@contextlib.contextmanager
def override(choices: Dict[str, str]):
    """Within the block, :func:`select` returns the ``choices[op]`` implementation of these ops
    without asking it for reasons (used by :mod:`vpeft.memory`, which estimates a CUDA run's
    choices on fake CPU tensors). Not for computing: a kernel may not run on these inputs."""
    for op, b in choices.items():
        if b not in _REGISTRY[op]:
            raise BackendUnavailableError(f"backend {b!r} cannot run {op}: " + "; ".join(_reasons(op, b, (), {})))
    old = dict(_OVERRIDE)
    _OVERRIDE.update(choices)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def select(op: str, backend: Optional[str], *args, **kwargs) -> Callable:
    """Return the implementation of ``op`` that runs these inputs."""
    if op in _OVERRIDE:
        return _REGISTRY[op][_OVERRIDE[op]].fn
    name = requested_backend(backend)
    if name != "auto":
        why = _reasons(op, name, args, kwargs)
        if why:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {op}: " + "; ".join(why))
        return _REGISTRY[op][name].fn
    tried = []
    for b in PRIORITY:
        impl = _REGISTRY[op].get(b)
        why = _reasons(op, b, args, kwargs)
        if impl is not None and not why and impl.auto_reasons is not None:
            why = list(impl.auto_reasons(*args, **kwargs))
        if not why:
            return impl.fn
        tried.append(f"{b}: " + "; ".join(why))
    raise BackendUnavailableError(f"no backend can run {op}: " + " | ".join(tried))


def chosen_backend(op: str, backend: Optional[str], *args, **kwargs) -> str:
    """Name of the backend :func:`select` would use for these inputs."""
    fn = select(op, backend, *args, **kwargs)
    for b, impl in _REGISTRY[op].items():
        if impl.fn is fn:
            return b
    raise AssertionError("selected implementation is not registered")  # pragma: no cover


def backend_status() -> Dict[str, str]:
    """One line per backend: which ops it implements, or why it is unavailable."""
    out = {}
    for b in BACKENDS:
        ops = [op for op in OPS if b in _REGISTRY[op]]
        if ops:
            out[b] = "available for " + ", ".join(ops)
            if b in _NOTES:
                out[b] += " (" + _NOTES[b] + ")"
        else:
            out[b] = "unavailable: " + _UNAVAILABLE.get(b, "no implementation included in this build")
    return out

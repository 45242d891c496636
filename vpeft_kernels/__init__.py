"""vpeft_kernels: functional ops for parameter-efficient video adaptation.

Public ops (same signature whatever the backend):
:func:`st_adapter`, :func:`msta_adapter`, :func:`token_shift_attention`,
:func:`ladder_projection`. Choose a backend per call with ``backend=`` or globally
with ``VPEFT_BACKEND=auto|triton|extension|eager``; :func:`backend_status` says which
backends are available and why not.
"""
from ._backend import (BACKENDS, BackendUnavailableError, backend_status, chosen_backend,
                       not_supported_reasons)
from .api import ladder_projection, msta_adapter, st_adapter, token_shift_attention
from . import reference

try:  # the Triton backend registers itself on import; without triton, eager still works
    from . import adapter  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the installed triton
    from ._backend import mark_unavailable as _mark_unavailable
    _mark_unavailable("triton", f"vpeft_kernels.adapter could not be imported ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})")

__all__ = [
    "st_adapter", "msta_adapter", "token_shift_attention", "ladder_projection",
    "reference", "BACKENDS", "BackendUnavailableError", "backend_status", "chosen_backend",
    "not_supported_reasons",
]

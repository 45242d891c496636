"""vpeft_kernels: functional ops for parameter-efficient video adaptation.

Public ops (same signature whatever the backend):
:func:`st_adapter`, :func:`msta_adapter`, :func:`token_shift_attention`,
:func:`ladder_projection`. Choose a backend per call with ``backend=`` or globally
with ``VPEFT_BACKEND=auto|triton|extension|eager``; :func:`backend_status` says which
backends are available and why not; :func:`extension_status` details the compiled
extension (the versions it was built for, whether CUDA kernels are in it).
"""
from ._backend import (BACKENDS, BackendUnavailableError, backend_status, chosen_backend,
                       not_supported_reasons)
from .api import ladder_projection, msta_adapter, st_adapter, token_shift_attention
from . import reference

try:  # the compiled ladder extension: registers itself, or records why it can't
    from .ladder import extension_status
except Exception as _exc:  # never let a broken build break the import
    from . import _backend as _b

    _b.mark_unavailable("extension", f"failed to initialise: {type(_exc).__name__}: {_exc}")
    _reason = _b.backend_status()["extension"]

    def extension_status() -> dict:
        """Where the compiled extension stands (here: it failed to initialise)."""
        return {"available": False, "cuda": False, "summary": _reason, "reason": _reason,
                "cuda_reason": None, "build": {}, "running": {}}

__all__ = [
    "st_adapter", "msta_adapter", "token_shift_attention", "ladder_projection",
    "reference", "BACKENDS", "BackendUnavailableError", "backend_status", "chosen_backend",
    "not_supported_reasons", "extension_status",
]

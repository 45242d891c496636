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
from . import _backend

# Triton implementations register themselves with _backend when imported. A missing or
# broken triton must not break the package: the backend is marked unavailable with the
# reason instead. These imports come BEFORE ``from .api import ...``: importing the
# submodule ``token_shift_attention`` binds that name on this package to the module, and
# the api import below rebinds it to the public function.
try:
    from . import token_shift_attention as _token_shift_attention_triton  # noqa: F401
except Exception as exc:  # ImportError, or triton failing to initialise
    _backend.mark_unavailable("triton", f"Triton kernels could not be loaded ({type(exc).__name__}: {exc})")
from .api import ladder_projection, msta_adapter, st_adapter, token_shift_attention
from . import reference

try:  # the Triton backend registers itself on import; without triton, eager still works
    from . import adapter  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the installed triton
    from ._backend import mark_unavailable as _mark_unavailable
    _mark_unavailable("triton", f"vpeft_kernels.adapter could not be imported ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})")

try:  # the compiled ladder extension: registers itself, or records why it can't
    from .ladder import extension_status
except Exception as _exc:  # never let a broken build break the import
    _backend.mark_unavailable("extension", f"failed to initialise: {type(_exc).__name__}: {_exc}")
    _reason = _backend.backend_status()["extension"]

    def extension_status() -> dict:
        """Where the compiled extension stands (here: it failed to initialise)."""
        return {"available": False, "cuda": False, "summary": _reason, "reason": _reason,
                "cuda_reason": None, "build": {}, "running": {}}

__all__ = [
    "st_adapter", "msta_adapter", "token_shift_attention", "ladder_projection",
    "reference", "BACKENDS", "BackendUnavailableError", "backend_status", "chosen_backend",
    "not_supported_reasons", "extension_status",
]

"""Loader for the compiled extension (``csrc/``): find it, check it was built for the
torch that is running, load it, and say in one line why not when it can't.

Two libraries: ``vpeft_kernels._C`` (op schemas ``torch.ops.vpeft_ext.*`` and CPU
kernels) and ``vpeft_kernels._C_cuda`` (CUDA kernels for the same ops). setup.py
embeds a JSON record of the build (torch version, torch's CUDA version, whether and
why not the CUDA kernels were built) after the marker ``VPEFT_BUILD_INFO:`` in each
binary. The loader reads it from the file first and refuses to load a library built
for another torch ("built for torch X / CUDA Y, running Z"): loading one could fail
with undefined symbols or, worse, crash later. Nothing here raises; every failure
ends as a reason string and the ops fall back to eager.

``VPEFT_DISABLE_EXTENSION=1`` skips loading (reason recorded as such).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

MARKER = b"VPEFT_BUILD_INFO:"
REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` (torch installed first)"


@dataclass
class ExtensionState:
    available: bool = False          # CPU library loaded, ops registered
    cuda: bool = False               # CUDA kernels loaded too
    reason: Optional[str] = None     # why not available (one line)
    cuda_reason: Optional[str] = None  # why no CUDA kernels (one line)
    build: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line: what was loaded, with the versions, or why not."""
        if not self.available:
            return self.reason or "not loaded"
        built = describe(self.build)
        if self.cuda:
            return f"compiled CPU + CUDA kernels, built for {built}"
        return f"compiled CPU kernels, built for {built}; no CUDA kernels: {self.cuda_reason}"


def describe(info: dict) -> str:
    return f"torch {info.get('torch', '?')} / CUDA {info.get('torch_cuda') or 'none'}"


def running_versions() -> dict:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda}


def read_build_info(path: str) -> Optional[dict]:
    """The build record embedded in a compiled library, without loading it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    start = data.find(MARKER)
    if start < 0:
        return None
    start += len(MARKER)
    end = data.find(b"\0", start)
    try:
        return json.loads(data[start:end if end >= 0 else None].decode())
    except (ValueError, UnicodeDecodeError):
        return None


def mismatch(build: dict, running: dict) -> Optional[str]:
    """Why a library built as ``build`` can't run under ``running``, or None."""
    if build.get("torch") != running.get("torch") or (build.get("torch_cuda") or None) != (running.get("torch_cuda") or None):
        return f"built for {describe(build)}, running {describe(running)}; {REBUILD_HINT}"
    return None


def _origin(module: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _load_one(module: str, running: dict):
    """(build info, None) after importing ``module``, or (info or {}, reason)."""
    path = _origin(module)
    if path is None:
        return {}, (f"{module} is not built; install with `pip install --no-build-isolation -e .` "
                    "after torch (or `python setup.py build_ext --inplace`)")
    info = read_build_info(path)
    if info is None:
        return {}, f"{module} ({path}) carries no vpeft build record; {REBUILD_HINT}"
    why = mismatch(info, running)
    if why:
        return info, f"{module}: {why}"
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError from registration
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return info, f"{module} (built for {describe(info)}) failed to load: {first}"
    return info, None


def load() -> ExtensionState:
    state = ExtensionState(running=running_versions())
    if os.environ.get("VPEFT_DISABLE_EXTENSION", "").strip() in ("1", "true", "yes"):
        state.reason = "disabled by VPEFT_DISABLE_EXTENSION=1"
        return state
    state.build, state.reason = _load_one("vpeft_kernels._C", state.running)
    if state.reason:
        return state
    state.available = True
    if not state.build.get("cuda_kernels", False):
        state.cuda_reason = state.build.get("cuda_skip_reason") or "CUDA kernels not built"
        return state
    _, state.cuda_reason = _load_one("vpeft_kernels._C_cuda", state.running)
    state.cuda = state.cuda_reason is None
    return state

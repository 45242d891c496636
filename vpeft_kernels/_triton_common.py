"""What every Triton backend of vpeft checks before it takes a call, and how it treats autocast.

* Tensors of one call share a device and a dtype (float32, float16, bfloat16). Under
  ``torch.autocast`` the inputs are cast to the autocast dtype first (as autocast does
  for a matmul; the casts are differentiable), so a model with float32 parameters and
  bfloat16 activations still gets the fused kernels.
* CUDA tensors run on the GPU; CPU tensors only through Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported), never in bfloat16 there (the
  interpreter computes bf16 wrongly), and only when ``backend="triton"`` is asked for.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, List, Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on this device type, or None when autocast is off."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_inputs(tensors: Iterable[Optional[torch.Tensor]], device_type: str) -> List[Optional[torch.Tensor]]:
    """Contiguous inputs, cast to the autocast dtype when autocast is on (None stays None)."""
    amp = autocast_dtype(device_type)
    return [None if t is None else (t if amp is None else t.to(amp)).contiguous() for t in tensors]


def common_reasons(tensors: Iterable[Optional[torch.Tensor]]) -> List[str]:
    """Reasons a Triton kernel cannot take these tensors (device, dtype, interpreter)."""
    ts = [t for t in tensors if t is not None]
    why = []
    devices = {t.device for t in ts}
    if len(devices) > 1:
        why.append(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    dev = ts[0].device.type
    amp = autocast_dtype(dev)
    dtypes = {t.dtype for t in ts}
    if not dtypes <= set(FLOAT_DTYPES):
        why.append(f"dtypes {sorted(str(d) for d in dtypes - set(FLOAT_DTYPES))} are not supported "
                   "(float32, float16, bfloat16)")
    elif amp is None and len(dtypes) > 1:
        why.append(f"all tensors must share one dtype (or run under autocast), got {sorted(str(d) for d in dtypes)}")
    dtype = amp if amp is not None else ts[0].dtype
    if dev == "cpu":
        if not INTERPRET:
            why.append("CPU tensors run only through Triton's interpreter: set TRITON_INTERPRET=1 before "
                       "triton is imported")
        elif dtype == torch.bfloat16:
            why.append("bfloat16 is not computed correctly by Triton's CPU interpreter"
                       + (" (it is the autocast dtype here)" if amp is not None else ""))
    elif dev != "cuda":
        why.append(f"device type {dev!r} is not supported (cuda, or cpu through the interpreter)")
    return why


def cuda_only(first: torch.Tensor, *args, **kwargs) -> List[str]:
    """``auto_reasons`` of every Triton backend: auto takes it for CUDA tensors only."""
    if first.device.type != "cuda":
        return [f"auto picks the Triton kernels only for CUDA tensors (on {first.device.type} they run through "
                "the interpreter when backend='triton' is asked for)"]
    return []


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s device for the launches."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` in vpeft's kernels for inputs of ``dtype``.

    fp32 must not silently become tf32 (about 1e-3 off the fp32 reference): on the GPU
    it is ``"tf32x3"`` (three tf32 products, close to fp32 accuracy, on the tensor cores;
    ``"ieee"`` would be plain FMA and spills at every useful tile size on sm_90), in the
    interpreter ``"ieee"`` (numpy fp32). fp16/bf16 ignore it.
    """
    if dtype == torch.float32:
        return "ieee" if INTERPRET else "tf32x3"
    return "tf32"

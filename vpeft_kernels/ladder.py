"""Ladder projection, compiled backend ("extension").

Math (the contract is :func:`vpeft_kernels.reference.ladder_projection`): for each of
L levels ``z[l]`` ``(..., D)`` with its own LayerNorm and Linear ``(D -> d)``,
``norm="pre"``: ``out[l] = LN_l(z[l]) @ W[l].T + b[l]``; ``norm="post"`` (EVA):
``out[l] = LN_l(z[l] @ W[l].T + b[l])``. Returns ``(L, ..., d)``.

The kernels live in ``csrc/`` and are registered as ``torch.ops.vpeft_ext.ladder_forward``
(returns the projection and the fp32 LayerNorm statistics mean, rstd ``(L, M)``) and
``torch.ops.vpeft_ext.ladder_backward``. This module adds what torch needs from Python:
fake (meta) implementations, so the ops trace under ``torch.compile(fullgraph=True)``,
and the autograd formula. For backward it saves only the inputs (the caller's level
tensors themselves, as passed: no reshaped or stacked copy), the parameters and the
statistics: no normalised copy of z (pre norm: the LayerNorm is folded into the GEMM
and the backward works from z and the statistics) and no Linear output (post norm: it
is recomputed). Design and traffic: ``csrc/README.md``.

Importing this module loads the library (:mod:`vpeft_kernels._extension`) and
registers the "extension" backend of ``ladder_projection``; when the library is
missing or was built for another torch it records the one-line reason instead
(``vpeft_kernels.backend_status()["extension"]``, :func:`extension_status`).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

import torch

from . import _backend, _extension

__all__ = ["ladder_projection_extension", "extension_status"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_STATE = _extension.load()


def extension_status() -> dict:
    """Where the compiled extension stands: ``available``, ``cuda`` (bools), ``summary``
    (one line: "compiled CPU kernels, built for torch X / CUDA Y; ..." or why it is not
    used, e.g. "built for torch X / CUDA Y, running torch Z / CUDA W; rebuild with ..."),
    ``reason``, ``cuda_reason``, ``build`` (the record embedded at build time) and
    ``running`` (this process's torch and CUDA versions)."""
    s = _STATE
    return {"available": s.available, "cuda": s.cuda, "summary": s.summary(), "reason": s.reason,
            "cuda_reason": s.cuda_reason, "build": dict(s.build), "running": dict(s.running)}


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _levels(z) -> List[torch.Tensor]:
    return list(z.unbind(0)) if isinstance(z, torch.Tensor) else list(z)


def _register_ops() -> None:
    @torch.library.register_fake("vpeft_ext::ladder_forward")
    def _forward_fake(z, ln_weight, ln_bias, w_proj, b_proj, post, eps):
        m = math.prod(z[0].shape[:-1])
        st = _stats_dtype(z[0].dtype)
        out = z[0].new_empty((len(z), m, w_proj.shape[1]))
        return out, z[0].new_empty((len(z), m), dtype=st), z[0].new_empty((len(z), m), dtype=st)

    @torch.library.register_fake("vpeft_ext::ladder_backward")
    def _backward_fake(grad_out, z, ln_weight, ln_bias, w_proj, b_proj, mean, rstd, post, eps, input_grad):
        dim = z[0].shape[-1]
        m = math.prod(z[0].shape[:-1])
        grad_z = z[0].new_empty((len(z), m, dim)) if input_grad else z[0].new_empty((0,))
        return (grad_z, torch.empty_like(ln_weight), torch.empty_like(ln_bias),
                torch.empty_like(w_proj), torch.empty_like(b_proj))

    def _setup_context(ctx, inputs, output):
        z, ln_weight, ln_bias, w_proj, b_proj, post, eps = inputs
        _, mean, rstd = output
        ctx.levels = len(z)
        ctx.post = post
        ctx.eps = eps
        ctx.input_grad = any(t.requires_grad for t in z)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(*z, ln_weight, ln_bias, w_proj, b_proj, mean, rstd)

    def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
        saved = ctx.saved_tensors
        z = list(saved[:ctx.levels])
        ln_weight, ln_bias, w_proj, b_proj, mean, rstd = saved[ctx.levels:]
        if grad_out is None:
            grad_out = z[0].new_zeros((ctx.levels, math.prod(z[0].shape[:-1]), w_proj.shape[1]))
        grad_z, g_lw, g_lb, g_w, g_b = torch.ops.vpeft_ext.ladder_backward(
            grad_out, z, ln_weight, ln_bias, w_proj, b_proj, mean, rstd, ctx.post, ctx.eps,
            ctx.input_grad)
        grad_list = ([g.view(z[0].shape) for g in grad_z.unbind(0)] if ctx.input_grad
                     else [None] * ctx.levels)
        return grad_list, g_lw, g_lb, g_w, g_b, None, None

    torch.library.register_autograd("vpeft_ext::ladder_forward", _backward, setup_context=_setup_context)


def ladder_projection_extension(z: Union[Sequence[torch.Tensor], torch.Tensor], ln_weight, ln_bias,
                                w_proj, b_proj, *, norm="pre", eps=1e-5):
    """The compiled ladder projection; same arguments and result as
    :func:`vpeft_kernels.reference.ladder_projection` (arguments already checked by
    :func:`vpeft_kernels.ladder_projection`)."""
    levels = [t.contiguous() for t in _levels(z)]  # no-ops for contiguous inputs
    lead = tuple(levels[0].shape[:-1])
    out, _, _ = torch.ops.vpeft_ext.ladder_forward(
        levels, ln_weight.contiguous(), ln_bias.contiguous(), w_proj.contiguous(), b_proj.contiguous(),
        norm == "post", float(eps))
    return out.view((len(levels),) + lead + (w_proj.shape[1],))


def _reasons(z, ln_weight, ln_bias, w_proj, b_proj, *, norm="pre", eps=1e-5) -> List[str]:
    levels = _levels(z)
    if not levels:
        return ["z is empty"]
    t0 = levels[0]
    why = []
    if t0.device.type not in ("cpu", "cuda"):
        why.append(f"device {t0.device} is not supported (cpu, cuda)")
    elif t0.device.type == "cuda" and not _STATE.cuda:
        why.append(f"no CUDA kernels in this build: {_STATE.cuda_reason}")
    if t0.dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {t0.dtype} is not supported (float32, float64, float16, bfloat16)")
    tensors = levels + [ln_weight, ln_bias, w_proj, b_proj]
    if any(t.dtype != t0.dtype for t in tensors):
        why.append("z and the parameters must share one dtype, got "
                   + ", ".join(sorted({str(t.dtype) for t in tensors})))
    if any(t.device != t0.device for t in tensors):
        why.append("z and the parameters must be on one device, got "
                   + ", ".join(sorted({str(t.device) for t in tensors})))
    return why


def _auto_reasons(z, *args, **kwargs) -> List[str]:
    levels = _levels(z)
    dev = levels[0].device.type if levels else "cpu"
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        # Eager under autocast runs the Linear in the autocast dtype and the LayerNorm in
        # fp32; the compiled op computes in the inputs' dtype. Auto keeps eager's numbers.
        return [f"autocast is enabled on {dev}: auto keeps the eager path's autocast numerics"]
    return []


if _STATE.available:
    _register_ops()
    _backend.register("ladder_projection", "extension", ladder_projection_extension, reasons=_reasons,
                      auto_reasons=_auto_reasons)
    _backend.set_note("extension", _STATE.summary())
else:
    _backend.mark_unavailable("extension", _STATE.reason or "not loaded")

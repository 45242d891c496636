"""Public functional API of vpeft_kernels: shape checks, then backend dispatch.

Each function checks its arguments once (so every backend sees valid inputs and every
user gets the same error for the same mistake), picks a backend with
:func:`vpeft_kernels._backend.select`, and calls it. The math of each op is
documented on its eager reference in :mod:`vpeft_kernels.reference`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, reference

_backend.register("st_adapter", "eager", reference.st_adapter)
_backend.register("msta_adapter", "eager", reference.msta_adapter)
_backend.register("token_shift_attention", "eager", reference.token_shift_attention)
_backend.register("ladder_projection", "eager", reference.ladder_projection)


def _shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def _tokens(name, x):
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B*T, 1+N, D), got shape {tuple(x.shape)}")


def st_adapter(x, w_down, b_down, w_conv, b_conv, w_up, b_up, *, num_frames, backend: Optional[str] = None):
    """ST-Adapter on ``x`` ``(B*T, 1+N, D)``; see :func:`vpeft_kernels.reference.st_adapter`."""
    _tokens("x", x)
    d = x.shape[-1]
    r = w_down.shape[0]
    _shape("w_down", w_down, (r, d))
    _shape("b_down", b_down, (r,))
    _shape("w_conv", w_conv, (r, 3))
    _shape("b_conv", b_conv, (r,))
    _shape("w_up", w_up, (d, r))
    _shape("b_up", b_up, (d,))
    reference._frames(x.shape[0], num_frames, "x")
    args = (x, w_down, b_down, w_conv, b_conv, w_up, b_up)
    fn = _backend.select("st_adapter", backend, *args, num_frames=num_frames)
    return fn(*args, num_frames=num_frames)


def msta_adapter(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv=None, b_tconv=None, *,
                 scale, num_frames=None, dropout_p=0.0, layout="bt", backend: Optional[str] = None):
    """MSTA branch ``scale * A(u)``; see :func:`vpeft_kernels.reference.msta_adapter`.

    ``layout="bt"`` (default): vision ``u`` is ``(B*T, 1+N, D)`` with a [CLS] per frame.
    ``layout="nt"``: vision ``u`` is ``(B, 1+N*T, D)``, one [CLS] then patches in
    ``(n t)`` order (ViCLIP). The text branch ignores it.
    """
    if layout not in ("bt", "nt"):
        raise ValueError(f"layout must be 'bt' or 'nt', got {layout!r}")
    _tokens("u", u)
    d = u.shape[-1]
    r = w_down.shape[0]
    _shape("w_down", w_down, (r, d))
    _shape("b_down", b_down, (r,))
    _shape("w_shared", w_shared, (r, r))
    _shape("b_shared", b_shared, (r,))
    _shape("w_up", w_up, (d, r))
    _shape("b_up", b_up, (d,))
    if (w_tconv is None) != (b_tconv is None):
        raise ValueError("w_tconv and b_tconv must be given together (vision) or both be None (text)")
    if w_tconv is not None:
        _shape("w_tconv", w_tconv, (d, 3))
        _shape("b_tconv", b_tconv, (d,))
        if d % r:
            raise ValueError(f"bottleneck r={r} must divide the vision width D={d} (grouped temporal conv)")
        if num_frames is None:
            raise ValueError("num_frames is required for the vision adapter (w_tconv given)")
        if layout == "bt":
            reference._frames(u.shape[0], num_frames, "u")
        else:
            reference._patches_nt(u.shape[1] - 1, num_frames)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if float(scale) == 0.0:
        raise ValueError("scale must be non-zero (gradient scaling divides by it)")
    args = (u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv)
    kw = dict(scale=scale, num_frames=num_frames, dropout_p=float(dropout_p), layout=layout)
    fn = _backend.select("msta_adapter", backend, *args, **kw)
    return fn(*args, **kw)


def token_shift_attention(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, *,
                          num_frames, num_heads, eps=1e-5, backend: Optional[str] = None):
    """Side4Video token-shift attention; see :func:`vpeft_kernels.reference.token_shift_attention`."""
    if s.dim() != 3:
        raise ValueError(f"s must be 3-D (B*T, N, d), got shape {tuple(s.shape)}")
    bt, n, d = s.shape
    _shape("c", c, (bt, d))
    if tuple(pos.shape) not in ((n, d), (n + 1, d)):
        raise ValueError(f"pos has shape {tuple(pos.shape)}, expected {(n, d)} (patches) or {(n + 1, d)} "
                         "(a [CLS] row first)")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be given or both be None")
    if ln_weight is not None:
        _shape("ln_weight", ln_weight, (d,))
        _shape("ln_bias", ln_bias, (d,))
    _shape("w_qkv", w_qkv, (3 * d, d))
    _shape("b_qkv", b_qkv, (3 * d,))
    _shape("w_out", w_out, (d, d))
    _shape("b_out", b_out, (d,))
    if not isinstance(num_heads, int) or num_heads < 1 or d % num_heads:
        raise ValueError(f"num_heads={num_heads!r} must be a positive divisor of the side width d={d}")
    reference._frames(bt, num_frames, "s")
    args = (s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out)
    kw = dict(num_frames=num_frames, num_heads=num_heads, eps=eps)
    fn = _backend.select("token_shift_attention", backend, *args, **kw)
    return fn(*args, **kw)


def ladder_projection(z, ln_weight, ln_bias, w_proj, b_proj, *, norm="pre", eps=1e-5,
                      backend: Optional[str] = None):
    """Multi-level ladder projection; see :func:`vpeft_kernels.reference.ladder_projection`."""
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
    if isinstance(z, torch.Tensor):
        if z.dim() < 2:
            raise ValueError(f"stacked z must be (L, ..., D), got shape {tuple(z.shape)}")
        levels, shape = z.shape[0], tuple(z.shape[1:])
    else:
        z = list(z)
        if not z:
            raise ValueError("z is an empty list; expected L >= 1 feature tensors")
        levels, shape = len(z), tuple(z[0].shape)
        for i, zi in enumerate(z):
            if tuple(zi.shape) != shape:
                raise ValueError(f"z[{i}] has shape {tuple(zi.shape)}, expected {shape} like z[0]")
    if w_proj.dim() != 3 or w_proj.shape[0] != levels or w_proj.shape[2] != shape[-1]:
        raise ValueError(f"w_proj has shape {tuple(w_proj.shape)}, expected ({levels}, d, {shape[-1]})")
    dd = w_proj.shape[1]
    _shape("b_proj", b_proj, (levels, dd))
    ln_dim = shape[-1] if norm == "pre" else dd
    _shape("ln_weight", ln_weight, (levels, ln_dim))
    _shape("ln_bias", ln_bias, (levels, ln_dim))
    args = (z, ln_weight, ln_bias, w_proj, b_proj)
    kw = dict(norm=norm, eps=eps)
    fn = _backend.select("ladder_projection", backend, *args, **kw)
    return fn(*args, **kw)

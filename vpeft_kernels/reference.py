"""Eager PyTorch reference of every vpeft op.

This file is the single definition of the numbers: the CPU fallback, the oracle the
fused kernels are tested against, and the baseline the benchmarks compare with are
all this code. The math follows ``shared/METHODS.md``.

Layout conventions
------------------
* Video tokens from a per-frame backbone are ``(B*T, 1+N, D)`` with frames stacked in
  ``(b t)`` order (frame ``t`` of video ``b`` is row ``b*T + t``) and the [CLS] token
  first.
* A *temporal tap* tensor ``w`` of shape ``(C, 3)`` defines the zero-padded 3-tap
  cross-correlation over frames
  ``out[t] = w[:, 0] * in[t-1] + w[:, 1] * in[t] + w[:, 2] * in[t+1] + b``,
  i.e. exactly ``Conv3d(..., kernel_size=(3, 1, 1)).weight[:, 0, :, 0, 0]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "temporal_taps",
    "grad_scale",
    "st_adapter",
    "msta_adapter",
    "token_shift",
    "token_shift_attention",
    "ladder_projection",
]


def _frames(rows: int, num_frames: int, what: str) -> int:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if rows % num_frames:
        raise ValueError(
            f"{what} has {rows} rows, which is not a multiple of num_frames={num_frames}; "
            "expected (B*T, ...) with frames in (b t) order")
    return rows // num_frames


def _patches_nt(tokens: int, num_frames: int) -> int:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if tokens % num_frames:
        raise ValueError(
            f"u has {tokens} patch tokens after the [CLS], which is not a multiple of num_frames={num_frames}; "
            "expected (B, 1+N*T, D) with patches in (n t) order for layout='nt'")
    return tokens // num_frames


def temporal_taps(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """3-tap temporal cross-correlation with zero padding along dim 1.

    ``h`` is ``(B, T, ..., C)``, ``w`` is ``(C, 3)``, ``b`` is ``(C,)`` or None.
    Returns ``w0*h[t-1] + w1*h[t] + w2*h[t+1] (+ b)`` with ``h[-1] = h[T] = 0``.
    """
    zero = torch.zeros_like(h[:, :1])
    prev = torch.cat([zero, h[:, :-1]], dim=1)
    nxt = torch.cat([h[:, 1:], zero], dim=1)
    out = prev * w[:, 0] + h * w[:, 1] + nxt * w[:, 2]
    return out if b is None else out + b


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def grad_scale(x: torch.Tensor, c: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``c``."""
    return _GradScale.apply(x, c)


def st_adapter(x, w_down, b_down, w_conv, b_conv, w_up, b_up, *, num_frames):
    """ST-Adapter: ``x + fc2(dwconv_t(fc1(x)))`` on the patch tokens, [CLS] unchanged.

    Args:
        x: ``(B*T, 1+N, D)`` tokens, frames in ``(b t)`` order, [CLS] first.
        w_down, b_down: ``fc1``, ``(r, D)`` and ``(r,)``.
        w_conv, b_conv: depthwise temporal taps ``(r, 3)`` and bias ``(r,)``.
        w_up, b_up: ``fc2``, ``(D, r)`` and ``(D,)``.
        num_frames: ``T``.

    Returns:
        ``(B*T, 1+N, D)``: token 0 equals ``x[:, 0]``; tokens ``1..N`` are
        ``x + fc2(taps_t(fc1(x)))`` where ``taps_t`` mixes frames ``t-1, t, t+1`` of
        the same token with zero padding at the clip ends.
    """
    bt, n1, d = x.shape
    b = _frames(bt, num_frames, "x")
    patches = x[:, 1:]
    h = F.linear(patches, w_down, b_down)                      # (BT, N, r)
    h = h.reshape(b, num_frames, n1 - 1, -1)
    h = temporal_taps(h, w_conv, b_conv).reshape(bt, n1 - 1, -1)
    out = patches + F.linear(h, w_up, b_up)
    return torch.cat([x[:, :1], out], dim=1)


def msta_adapter(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv=None, b_tconv=None,
                 *, scale, num_frames=None, dropout_p=0.0, layout="bt"):
    """MSTA adapter branch ``scale * A(u)`` with MSTA's gradient scaling.

    ``h = dropout(relu(shared(relu(down(u)))))``. Text (``w_tconv is None``):
    ``A(u) = up(h)`` on every token of ``u`` ``(B, L, D)``. Vision (``w_tconv`` given):
    ``u`` is ``(B*T, 1+N, D)``; ``A(u) = up_s(h) + up_t(h)`` on patch tokens and
    ``up_s(h)`` on [CLS], where ``up_t`` is the grouped temporal up-projection:
    output channel ``o`` reads bottleneck channel ``o // (D / r)`` through the taps
    ``w_tconv[o]`` ``(D, 3)`` plus bias ``b_tconv[o]``.

    Gradient scaling: the result is ``g(scale * A(g(u, scale)), 1/scale)`` where
    ``g(z, c)`` is the identity forward and multiplies the gradient by ``c`` backward:
    weights get gradients as if ``scale = 1``; the gradient into ``u`` is scaled by
    ``scale``.

    Shapes: ``w_down (r, D)``, ``b_down (r,)``, ``w_shared (r, r)``, ``b_shared (r,)``,
    ``w_up (D, r)``, ``b_up (D,)``. Dropout (``dropout_p > 0``) uses torch's RNG.

    ``layout`` says how the vision tokens are arranged (ignored for text):

    * ``"bt"`` (per-frame backbones such as CLIP): ``u`` is ``(B*T, 1+N, D)``, frames in
      ``(b t)`` order, one [CLS] per frame;
    * ``"nt"`` (video backbones with joint space-time attention such as ViCLIP): ``u``
      is ``(B, 1+N*T, D)``: one [CLS] for the whole clip, then the patch tokens in
      ``(n t)`` order (token ``1 + n*T + t`` is patch ``n`` of frame ``t``). The temporal
      taps mix the ``T`` adjacent tokens of each patch position; the [CLS] gets
      ``up_s(h)`` only.
    """
    s = float(scale)
    if s == 0.0:
        raise ValueError("scale must be non-zero (gradient scaling divides by it)")
    r, d = w_down.shape
    x = grad_scale(u, s)
    h = F.relu(F.linear(x, w_down, b_down))
    h = F.relu(F.linear(h, w_shared, b_shared))
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    a = F.linear(h, w_up, b_up)
    if w_tconv is not None:
        if num_frames is None:
            raise ValueError("num_frames is required with the temporal up-projection (vision adapter)")
        if d % r:
            raise ValueError(f"bottleneck r={r} must divide the width D={d} for the grouped temporal conv")
        if layout == "bt":
            bt, n1, _ = u.shape
            bsz = _frames(bt, num_frames, "u")
            hp = h[:, 1:].repeat_interleave(d // r, dim=-1).reshape(bsz, num_frames, n1 - 1, d)
            t = temporal_taps(hp, w_tconv, b_tconv).reshape(bt, n1 - 1, d)
        elif layout == "nt":
            bsz, nt1, _ = u.shape
            n = _patches_nt(nt1 - 1, num_frames)
            # (B, N*T, r) in (n t) order -> (B, T, N, D_v) so the taps run over frames
            hp = h[:, 1:].repeat_interleave(d // r, dim=-1).reshape(bsz, n, num_frames, d).transpose(1, 2)
            t = temporal_taps(hp, w_tconv, b_tconv).transpose(1, 2).reshape(bsz, n * num_frames, d)
        else:
            raise ValueError(f"layout must be 'bt' or 'nt', got {layout!r}")
        a = torch.cat([a[:, :1], a[:, 1:] + t], dim=1)
    return grad_scale(s * a, 1.0 / s)


def token_shift(c: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Side4Video [CLS] token shift on ``c`` ``(B*T, d)``.

    Channels ``[0, d//2)`` of frame ``t`` take frame ``t+1``'s value (zero for the last
    frame); channels ``[d//2, d)`` take frame ``t-1``'s value (zero for the first).
    """
    bt, d = c.shape
    b = _frames(bt, num_frames, "c")
    c = c.reshape(b, num_frames, d)
    h = d // 2
    zero = c.new_zeros(b, 1, d)
    fwd = torch.cat([c[:, 1:, :h], zero[..., :h]], dim=1)
    bwd = torch.cat([zero[..., h:], c[:, :-1, h:]], dim=1)
    return torch.cat([fwd, bwd], dim=-1).reshape(bt, d)


def token_shift_attention(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, *,
                          num_frames, num_heads, eps=1e-5):
    """Side4Video attention of the N patch tokens over themselves plus the shifted [CLS].

    ``x = LN(cat([token_shift(c), s] + pos))`` (``N+1`` tokens per frame; LayerNorm
    skipped when ``ln_weight is None``, as in post-norm side blocks), ``q`` from the N
    patch rows of ``x``, ``k, v`` from all ``N+1`` rows, ``num_heads`` heads of width
    ``d / num_heads``, softmax attention with scale ``head_dim ** -0.5``, then the
    output projection.

    Args:
        s: ``(B*T, N, d)`` side tokens. c: ``(B*T, d)`` projected [CLS] per frame,
        before the shift. pos: ``(N, d)``, added to the patches only, or ``(N+1, d)``,
        whose row 0 is added to the shifted [CLS] (the released retrieval side network).
        ln_weight, ln_bias: ``(d,)`` or None.
        w_qkv: ``(3d, d)``, b_qkv: ``(3d,)`` (rows q, k, v). w_out: ``(d, d)``, b_out: ``(d,)``.

    Returns:
        ``(B*T, N, d)``, the attention output for the patch queries, without residual.
    """
    bt, n, d = s.shape
    if d % num_heads:
        raise ValueError(f"side width d={d} is not divisible by num_heads={num_heads}")
    hd = d // num_heads
    cs = token_shift(c, num_frames)
    if pos.shape[0] == n + 1:
        x = torch.cat([cs[:, None], s], dim=1) + pos            # (BT, N+1, d)
    else:
        x = torch.cat([cs[:, None], s + pos], dim=1)
    if ln_weight is not None:
        x = F.layer_norm(x, (d,), ln_weight, ln_bias, eps)
    q = F.linear(x[:, 1:], w_qkv[:d], b_qkv[:d])
    k = F.linear(x, w_qkv[d:2 * d], b_qkv[d:2 * d])
    v = F.linear(x, w_qkv[2 * d:], b_qkv[2 * d:])
    q = q.reshape(bt, n, num_heads, hd).transpose(1, 2)
    k = k.reshape(bt, n + 1, num_heads, hd).transpose(1, 2)
    v = v.reshape(bt, n + 1, num_heads, hd).transpose(1, 2)
    att = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
    o = (att @ v).transpose(1, 2).reshape(bt, n, d)
    return F.linear(o, w_out, b_out)


def ladder_projection(z: Union[Sequence[torch.Tensor], torch.Tensor], ln_weight, ln_bias, w_proj, b_proj,
                      *, norm="pre", eps=1e-5):
    """Side4Video ladder: project L backbone levels into the side width, each on its own.

    ``norm="pre"``: ``out[l] = LN_l(z[l]) @ w_proj[l].T + b_proj[l]`` with
    ``ln (L, D)``. ``norm="post"`` (EVA): ``out[l] = LN_l(z[l] @ w_proj[l].T + b_proj[l])``
    with ``ln (L, d)``. ``z`` is a list of L tensors ``(..., D)`` of one shape, or a
    stacked ``(L, ..., D)`` tensor; ``w_proj (L, d, D)``, ``b_proj (L, d)``.
    Returns ``(L, ..., d)``.
    """
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
    levels = list(z.unbind(0)) if isinstance(z, torch.Tensor) else list(z)
    dd, big = w_proj.shape[1], w_proj.shape[2]
    outs = []
    for i, zi in enumerate(levels):
        if norm == "pre":
            y = F.linear(F.layer_norm(zi, (big,), ln_weight[i], ln_bias[i], eps), w_proj[i], b_proj[i])
        else:
            y = F.layer_norm(F.linear(zi, w_proj[i], b_proj[i]), (dd,), ln_weight[i], ln_bias[i], eps)
        outs.append(y)
    return torch.stack(outs)

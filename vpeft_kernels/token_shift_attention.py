"""Side4Video token-shift attention with a fused Triton attention core.

What it computes is defined by :func:`vpeft_kernels.reference.token_shift_attention`
(``shared/METHODS.md`` section 3, side block steps 2-3): the ``N`` patch tokens of a
frame attend to themselves plus ONE extra key/value, the [CLS] token shifted in from
the neighbouring frames. The eager reference concatenates that token into an
``N+1`` sequence; this implementation never does:

* patch tokens: ``x = s + pos``, ``xs = LN(x)`` (skipped when ``ln_weight is None``),
  ``qkv = xs @ w_qkv.T + b_qkv`` -> ``(B*T, N, 3d)`` holding q, k, v of all heads;
* the [CLS] token, one row per frame: ``cs = token_shift(c)``, ``xc = LN(cs)`` (same rule),
  ``kv_cls = xc @ w_qkv[d:].T + b_qkv[d:]`` -> ``(B*T, 2d)``, the extra key and value
  of every head in a small buffer of its own;
* the fused kernel: each query block runs an online softmax (fp32 statistics) over the
  extra key first and then over the ``N`` patch keys in blocks, so no ``N x N`` (or
  ``N x (N+1)``) matrix ever exists in memory; it writes ``o`` and the logsumexp;
* ``out = o @ w_out.T + b_out``.

For the backward pass only flash-attention's set is saved: ``qkv`` (q, k, v), ``o``,
the logsumexp, and the per-frame ``kv_cls`` buffer, besides the op's inputs ``s``,
``c``, ``pos`` and the weights (``s`` stands in for the LayerNorm input eager autograd
would keep). The LayerNorm of ``s + pos`` is recomputed in the backward pass instead
of its input and output being stored. One backward kernel per (frame, head) gives dQ,
dK/dV of the patch keys and the extra token's dK/dV (flash-attention 2's
non-sequence-parallel scheme, five matmuls per block pair, no atomics, deterministic;
no probabilities are saved or written); the extra token's
gradient then flows through its projection and LayerNorm and back through the shift
to the [CLS] channels of the neighbouring frames.

Registration: the forward and backward are the custom ops
``vpeft::token_shift_attention_fwd`` and ``vpeft::token_shift_attention_bwd`` (with
fake implementations and autograd), so ``torch.compile(fullgraph=True)`` treats the
whole block as one opaque op; the backend ``"triton"`` of the public op
:func:`vpeft_kernels.token_shift_attention` calls them. CUDA tensors are picked by
``auto``; CPU tensors run through Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported) only when ``backend="triton"`` is asked for.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _backend
from ._triton_common import (INTERPRET as _INTERPRET, cast_inputs, common_reasons, cuda_only, device_guard,
                             dot_precision)

__all__ = ["token_shift_attention_triton", "attention_core", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# Block sizes. The interpreter costs about the same per program instance whatever the
# block size, and it cannot autotune over several configs without a GPU, so it gets one
# small config (which also makes tiny test shapes span several blocks and a tail).
# On the GPU each (kernel, fp32 or 16-bit, head dim) has its own table of configs
# (BLOCK_M, BLOCK_N, warps, stages): those that compile for sm_90 without register
# spills and within 227 KB of shared memory (`python -m vpeft_kernels.sm90_check
# --filter _tsa`); the autotuner only ever sees that table (_prune_attention), and the
# sm_90 check compiles exactly it. fp32 dots are 3xTF32 (three operand splits), so fp32
# takes smaller tiles; at head dim 128 the fp32 backward also computes dq in a pass of
# its own (SPLIT_DQ), with one clean tile. Every (dtype, supported head dim) has configs.

_F16 = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)]
_B16 = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (128, 64, 8, 2),
        (32, 32, 8, 2)]
_GPU_TABLES = {  # (kernel, fp32) -> {head dim: configs}
    ("fwd", False): {16: _F16, 32: _F16, 64: _F16, 128: [c for c in _F16 if c != (128, 64, 4, 2)]},
    ("fwd", True): {16: _F16[:2] + _F16[3:], 32: _F16[:2] + _F16[3:],
                    64: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)], 128: [(64, 32, 4, 3)]},
    ("bwd", False): {16: [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
                     32: _B16, 64: [c for c in _B16 if c != (64, 32, 4, 2)], 128: [(32, 32, 8, 2)]},
    ("bwd", True): {16: [(32, 64, 4, 2), (32, 32, 8, 2)], 32: [(16, 32, 4, 2), (16, 16, 4, 2), (16, 32, 8, 2)],
                    64: [(16, 16, 8, 2), (16, 16, 4, 2), (16, 32, 8, 2)], 128: [(16, 16, 8, 1)]},  # SPLIT_DQ
}


def _gpu_table(kernel: str, dtype: torch.dtype, head_dim: int):
    """The GPU configs ``kernel`` ("fwd"/"bwd") may be tuned over for this dtype and head dim."""
    return _GPU_TABLES[kernel, dtype == torch.float32].get(head_dim, [])


def _configs(kernel):
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    table = dict.fromkeys(c for fp32 in (False, True) for cs in _GPU_TABLES[kernel, fp32].values() for c in cs)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for (m, n, w, st) in table]


def _prune_attention(kernel):
    """``early_config_prune`` of the autotuner: the configs of this call's table."""
    def prune(configs, named_args, **kwargs):
        table = set(_gpu_table(kernel, named_args["QKV"].dtype, kwargs["HEAD_DIM"]))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in table]
    return prune


def _split_dq(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the backward computes dq in a pass of its own (``SPLIT_DQ``): fp32 at head
    dim 128, where dq, dk and dv together spill at every tile size on sm_90."""
    return dtype == torch.float32 and head_dim >= 128


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs("fwd"), key=["N", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune_attention("fwd")})
@triton.jit
def _tsa_fwd_kernel(QKV, KVC, O, LSE, sm_scale: tl.float32, N, H,
                    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Forward attention of one (query block, frame, head) over N patch keys + 1 extra key.

    Grid ``(cdiv(N, BLOCK_M), F*H)``: the query block is on ``program_id(0)``, so the
    programs running together share one head's K/V through L2.

    Layouts (all contiguous), with ``d = H * HEAD_DIM`` and ``f`` the frame row:
      QKV ``(F, N, 3d)``: q, k, v of head ``h`` at columns ``h*HEAD_DIM + [0, d, 2d]``;
      KVC ``(F, 2d)``: the extra (shifted [CLS]) key at ``h*HEAD_DIM``, its value at
      ``d + h*HEAD_DIM``; O ``(F, N, d)``; LSE ``(F, H, N)`` fp32.

    Math, for query row i and scale ``a = sm_scale``:
      ``s_i0 = a * q_i . kc``, ``s_ij = a * q_i . k_j`` (j < N),
      ``lse_i = log(exp(s_i0) + sum_j exp(s_ij))``,
      ``o_i = exp(s_i0 - lse_i) * vc + sum_j exp(s_ij - lse_i) * v_j``.
    The running max and sum are fp32 and kept in base 2 (scores times log2(e)); the
    extra key seeds them, so every row has a finite max before the first patch block.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_fh = tl.program_id(1).to(tl.int64)
    f = pid_fh // H
    h = pid_fh % H
    d = H * HEAD_DIM
    row_stride = 3 * d

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < N

    q_base = QKV + f * N * row_stride + h * HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * row_stride + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    kvc_base = KVC + f * 2 * d + h * HEAD_DIM
    kc = tl.load(kvc_base + offs_d).to(tl.float32)
    vc = tl.load(kvc_base + d + offs_d).to(tl.float32)

    qk_scale = sm_scale * 1.4426950408889634  # work in base 2
    # extra key first: its score is the initial running max, its weight exp2(0) = 1
    m_i = tl.sum(q.to(tl.float32) * kc[None, :], axis=1) * qk_scale
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32) + vc[None, :]

    k_base = q_base + d
    v_base = q_base + 2 * d
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < N
        k = tl.load(k_base + cols[:, None] * row_stride + offs_d[None, :],
                    mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * row_stride + offs_d[None, :],
                    mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp
    o_ptrs = O + f * N * d + h * HEAD_DIM + offs_m[:, None] * d + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + pid_fh * N + offs_m, lse, mask=m_valid)


@triton.autotune(configs=_configs("bwd"), key=["N", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune_attention("bwd")})
@triton.jit
def _tsa_bwd_kernel(QKV, KVC, O, DO, LSE, DQKV, DQ, DELTA, PART, sm_scale: tl.float32, N, H,
                    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_DQ: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole attention backward of one (frame, head) in one program (grid ``(F*H,)``).

    Flash-attention 2's non-sequence-parallel scheme, with the extra key handled in a
    first pass: N <= a few hundred, so one program per head keeps the machine busy at
    F*H programs and needs neither atomics nor a second kernel.

    1. Over query blocks: ``delta_i = dO_i . O_i`` (to DELTA ``(F*H, N)`` fp32), the
       extra key's probabilities ``p_i0``, ``ds_i0 = p_i0 (dO_i . vc - delta_i)``,
       ``dq_i = ds_i0 kc`` (to the fp32 scratch DQ ``(F*H, N, HEAD_DIM)``), and the
       extra key's ``dkc = a sum_i ds_i0 q_i``, ``dvc = sum_i p_i0 dO_i`` (to PART
       ``(F*H, 2, HEAD_DIM)`` fp32).
    2. Per block of patch keys, over all query blocks, five matmuls:
       ``s = q k^T``, ``dp = dO v^T``, ``dv += p^T dO``, ``dk += ds^T q``, ``dq += ds k``
       (dq read-modify-written in DQ; dk, dv stay in registers and are written once).
    3. ``dq * a`` to the q columns of DQKV ``(F, N, 3d)``; dk, dv went to its k, v columns.
    ``SPLIT_DQ`` (fp32 at head dim 128, see :func:`_split_dq`): step 2 leaves dq out (four
    matmuls) and step 3 is a pass of its own per query block over the key blocks that
    recomputes s and dp (three matmuls), so dq never shares registers with dk and dv.
    Layouts as in the forward kernel.
    """
    pid_fh = tl.program_id(0).to(tl.int64)
    f = pid_fh // H
    h = pid_fh % H
    d = H * HEAD_DIM
    row_stride = 3 * d
    qk_scale = sm_scale * 1.4426950408889634
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_base = QKV + f * N * row_stride + h * HEAD_DIM
    od_base = f * N * d + h * HEAD_DIM
    dq_base = DQ + pid_fh * N * HEAD_DIM
    kvc_base = KVC + f * 2 * d + h * HEAD_DIM
    kc = tl.load(kvc_base + offs_d).to(tl.float32)
    vc = tl.load(kvc_base + d + offs_d).to(tl.float32)

    dkc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    dvc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m0
        m_valid = rows < N
        q = tl.load(q_base + rows[:, None] * row_stride + offs_d[None, :], mask=m_valid[:, None],
                    other=0.0).to(tl.float32)
        do = tl.load(DO + od_base + rows[:, None] * d + offs_d[None, :], mask=m_valid[:, None],
                     other=0.0).to(tl.float32)
        o = tl.load(O + od_base + rows[:, None] * d + offs_d[None, :], mask=m_valid[:, None],
                    other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=1)
        tl.store(DELTA + pid_fh * N + rows, delta, mask=m_valid)
        lse2 = tl.load(LSE + pid_fh * N + rows, mask=m_valid, other=0.0) * 1.4426950408889634
        p0 = tl.where(m_valid, tl.exp2(tl.sum(q * kc[None, :], axis=1) * qk_scale - lse2), 0.0)
        ds0 = p0 * (tl.sum(do * vc[None, :], axis=1) - delta)
        tl.store(dq_base + rows[:, None] * HEAD_DIM + offs_d[None, :], ds0[:, None] * kc[None, :],
                 mask=m_valid[:, None])
        dkc += tl.sum(ds0[:, None] * q, axis=0)
        dvc += tl.sum(p0[:, None] * do, axis=0)
    tl.store(PART + pid_fh * 2 * HEAD_DIM + offs_d, dkc * sm_scale)
    tl.store(PART + pid_fh * 2 * HEAD_DIM + HEAD_DIM + offs_d, dvc)
    tl.debug_barrier()  # DELTA and DQ written above are read below by other threads

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n0
        n_valid = cols < N
        k = tl.load(q_base + d + cols[:, None] * row_stride + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(q_base + 2 * d + cols[:, None] * row_stride + offs_d[None, :], mask=n_valid[:, None],
                    other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            rows = start_m + offs_m0
            m_valid = rows < N
            q = tl.load(q_base + rows[:, None] * row_stride + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            do = tl.load(DO + od_base + rows[:, None] * d + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            lse2 = tl.load(LSE + pid_fh * N + rows, mask=m_valid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + pid_fh * N + rows, mask=m_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
            if not SPLIT_DQ:
                dq_ptrs = dq_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
                dq = tl.load(dq_ptrs, mask=m_valid[:, None], other=0.0)
                dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
                tl.store(dq_ptrs, dq, mask=m_valid[:, None])
        out = DQKV + f * N * row_stride + h * HEAD_DIM + cols[:, None] * row_stride + offs_d[None, :]
        tl.store(out + d, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=n_valid[:, None])
        tl.store(out + 2 * d, dv.to(DQKV.dtype.element_ty), mask=n_valid[:, None])
        if not SPLIT_DQ:
            tl.debug_barrier()  # the next key block re-reads DQ

    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m0
        m_valid = rows < N
        dq = tl.load(dq_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        if SPLIT_DQ:  # dq = ds0 kc (step 1) + sum over key blocks of ds k
            q = tl.load(q_base + rows[:, None] * row_stride + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            do = tl.load(DO + od_base + rows[:, None] * d + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            lse2 = tl.load(LSE + pid_fh * N + rows, mask=m_valid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + pid_fh * N + rows, mask=m_valid, other=0.0)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + offs_n0
                n_valid = cols < N
                k = tl.load(q_base + d + cols[:, None] * row_stride + offs_d[None, :], mask=n_valid[:, None],
                            other=0.0)
                v = tl.load(q_base + 2 * d + cols[:, None] * row_stride + offs_d[None, :], mask=n_valid[:, None],
                            other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                ds = (p * (dp - delta[:, None])).to(q.dtype)
                dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
        tl.store(DQKV + f * N * row_stride + h * HEAD_DIM + rows[:, None] * row_stride + offs_d[None, :],
                 (dq * sm_scale).to(DQKV.dtype.element_ty), mask=m_valid[:, None])


# --------------------------------------------------------------------------- launchers


def attention_core(qkv: torch.Tensor, kv_cls: torch.Tensor, num_heads: int):
    """Run the fused forward kernel: ``(o, lse)`` from ``qkv (F, N, 3d)`` and ``kv_cls (F, 2d)``.

    ``o`` is ``(F, N, d)`` in the input dtype, ``lse`` is ``(F, num_heads, N)`` fp32.
    """
    fr, n, d3 = qkv.shape
    d = d3 // 3
    hd = d // num_heads
    o = torch.empty((fr, n, d), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((fr, num_heads, n), device=qkv.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), fr * num_heads)  # noqa: E731
    with device_guard(qkv):
        _tsa_fwd_kernel[grid](qkv, kv_cls, o, lse, float(hd ** -0.5), n, num_heads,
                              HEAD_DIM=hd, DOT_PRECISION=dot_precision(qkv.dtype))
    return o, lse


def _attention_core_backward(qkv, kv_cls, o, lse, do, num_heads):
    """Gradients of the attention core: ``dqkv (F, N, 3d)`` and ``dkv_cls (F, 2d)`` fp32."""
    fr, n, d3 = qkv.shape
    d = d3 // 3
    hd = d // num_heads
    dqkv = torch.empty_like(qkv)
    dq = torch.empty((fr * num_heads, n, hd), device=qkv.device, dtype=torch.float32)  # fp32 scratch
    delta = torch.empty((fr * num_heads, n), device=qkv.device, dtype=torch.float32)
    part = torch.empty((fr * num_heads, 2, hd), device=qkv.device, dtype=torch.float32)
    with device_guard(qkv):
        _tsa_bwd_kernel[(fr * num_heads,)](qkv, kv_cls, o, do, lse, dqkv, dq, delta, part, float(hd ** -0.5),
                                           n, num_heads, HEAD_DIM=hd, DOT_PRECISION=dot_precision(qkv.dtype),
                                           SPLIT_DQ=_split_dq(qkv.dtype, hd))
    # (F*H, 2, hd) -> (F, 2, H, hd) -> (F, 2d): the same layout as kv_cls
    dkv_cls = part.view(fr, num_heads, 2, hd).transpose(1, 2).reshape(fr, 2 * d)
    return dqkv, dkv_cls


# --------------------------------------------------------------------------- host math


def _shift_cls(c: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[CLS] shift on ``c (B*T, d)``: channels ``[0, d//2)`` from frame t+1, the rest from t-1."""
    bt, d = c.shape
    h = d // 2
    x = c.view(bt // num_frames, num_frames, d)
    out = torch.zeros_like(x)
    out[:, :-1, :h] = x[:, 1:, :h]
    out[:, 1:, h:] = x[:, :-1, h:]
    return out.view(bt, d)


def _unshift_cls(g: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Adjoint of :func:`_shift_cls`: send each frame's gradient back to its source frame."""
    bt, d = g.shape
    h = d // 2
    x = g.view(bt // num_frames, num_frames, d)
    out = torch.zeros_like(x)
    out[:, 1:, :h] = x[:, :-1, :h]
    out[:, :-1, h:] = x[:, 1:, h:]
    return out.view(bt, d)


def _layer_norm(x, weight, bias, eps):
    """``(y, mean, rstd)``; ``y = x`` (and no statistics) when there is no LayerNorm."""
    if weight is None:
        return x, None, None
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)


def _layer_norm_backward(dy, x, mean, rstd, weight, bias):
    """``(dx, dweight, dbias)``; identity when there is no LayerNorm."""
    if weight is None:
        return dy, None, None
    return torch.ops.aten.native_layer_norm_backward(
        dy, x, [x.shape[-1]], mean, rstd, weight, bias, [True, True, True])


def _forward(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, num_frames, num_heads, eps):
    d = s.shape[-1]
    xs, _, _ = _layer_norm(s + pos, ln_weight, ln_bias, eps)
    qkv = F.linear(xs, w_qkv, b_qkv)                                   # (F, N, 3d)
    xc, _, _ = _layer_norm(_shift_cls(c, num_frames), ln_weight, ln_bias, eps)
    kv_cls = F.linear(xc, w_qkv[d:], b_qkv[d:])                        # (F, 2d)
    o, lse = attention_core(qkv, kv_cls, num_heads)
    out = F.linear(o, w_out, b_out)
    return out, qkv, o, lse, kv_cls


def _backward(grad_out, s, c, pos, ln_weight, ln_bias, w_qkv, w_out, qkv, o, lse, kv_cls,
              num_frames, num_heads, eps):
    fr, n, d = s.shape
    g2 = grad_out.reshape(fr * n, d)
    d_w_out = g2.t() @ o.reshape(fr * n, d)
    d_b_out = g2.sum(0)
    do = (g2 @ w_out).view(fr, n, d)

    dqkv, dkv_cls = _attention_core_backward(qkv, kv_cls, o, lse, do, num_heads)
    del do  # the temporaries below are dropped as soon as they are used: lower peak memory
    dkv_cls = dkv_cls.to(s.dtype)

    # patch tokens: recompute LN(s + pos) rather than having saved it
    x = s + pos
    xs, mean, rstd = _layer_norm(x, ln_weight, ln_bias, eps)
    dq2 = dqkv.view(fr * n, 3 * d)
    del dqkv
    d_w_qkv = dq2.t() @ xs.reshape(fr * n, d)
    del xs
    d_b_qkv = dq2.sum(0)
    dxs = (dq2 @ w_qkv).view(fr, n, d)
    del dq2
    dx, d_lnw, d_lnb = _layer_norm_backward(dxs, x, mean, rstd, ln_weight, ln_bias)
    del dxs, x

    # the extra token: its k/v projection, its LayerNorm, then back through the shift
    cs = _shift_cls(c, num_frames)
    xc, mean_c, rstd_c = _layer_norm(cs, ln_weight, ln_bias, eps)
    d_w_qkv[d:] += dkv_cls.t() @ xc
    d_b_qkv[d:] += dkv_cls.sum(0)
    dcs, d_lnw_c, d_lnb_c = _layer_norm_backward(dkv_cls @ w_qkv[d:], cs, mean_c, rstd_c,
                                                 ln_weight, ln_bias)
    dc = _unshift_cls(dcs, num_frames)
    if ln_weight is None:
        d_lnw, d_lnb = s.new_empty(0), s.new_empty(0)  # two tensors: outputs may not alias
    else:
        d_lnw = d_lnw + d_lnw_c
        d_lnb = d_lnb + d_lnb_c
    return dx, dc, dx.sum(0), d_lnw, d_lnb, d_w_qkv, d_b_qkv, d_w_out, d_b_out


# --------------------------------------------------------------------------- torch.library


def _no_autocast(x):
    """The op computes in its inputs' dtype: autocast must not re-cast its LayerNorm/GEMMs."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()


@torch.library.custom_op("vpeft::token_shift_attention_fwd", mutates_args=())
def _fwd_op(s: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, ln_weight: Optional[torch.Tensor],
            ln_bias: Optional[torch.Tensor], w_qkv: torch.Tensor, b_qkv: torch.Tensor,
            w_out: torch.Tensor, b_out: torch.Tensor, num_frames: int, num_heads: int,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, qkv, o, lse, kv_cls)``; all but ``out`` are kept for the backward pass."""
    with _no_autocast(s):
        return _forward(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out,
                        num_frames, num_heads, eps)


@_fwd_op.register_fake
def _(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, num_frames, num_heads, eps):
    fr, n, d = s.shape
    return (s.new_empty((fr, n, d)), s.new_empty((fr, n, 3 * d)), s.new_empty((fr, n, d)),
            s.new_empty((fr, num_heads, n), dtype=torch.float32), s.new_empty((fr, 2 * d)))


@torch.library.custom_op("vpeft::token_shift_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, s: torch.Tensor, c: torch.Tensor, pos: torch.Tensor,
            ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], w_qkv: torch.Tensor,
            w_out: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            kv_cls: torch.Tensor, num_frames: int, num_heads: int, eps: float) -> List[torch.Tensor]:
    """Gradients of s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out (empty LN
    gradients when there is no LayerNorm)."""
    with _no_autocast(s):
        return list(_backward(grad_out.contiguous(), s, c, pos, ln_weight, ln_bias, w_qkv, w_out,
                              qkv, o, lse, kv_cls, num_frames, num_heads, eps))


@_bwd_op.register_fake
def _(grad_out, s, c, pos, ln_weight, ln_bias, w_qkv, w_out, qkv, o, lse, kv_cls,
      num_frames, num_heads, eps):
    d = s.shape[-1]
    ln = (lambda: s.new_empty((d,))) if ln_weight is not None else (lambda: s.new_empty(0))
    return [torch.empty_like(s), torch.empty_like(c), torch.empty_like(pos), ln(), ln(),
            s.new_empty((3 * d, d)), s.new_empty((3 * d,)), s.new_empty((d, d)), s.new_empty((d,))]


def _setup_context(ctx, inputs, output):
    s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, num_frames, num_heads, eps = inputs
    _, qkv, o, lse, kv_cls = output
    ctx.mark_non_differentiable(qkv, o, lse, kv_cls)
    ctx.save_for_backward(s, c, pos, ln_weight, ln_bias, w_qkv, w_out, qkv, o, lse, kv_cls)
    ctx.num_frames, ctx.num_heads, ctx.eps = num_frames, num_heads, eps


def _autograd_backward(ctx, grad_out, *unused):
    s, c, pos, ln_weight, ln_bias, w_qkv, w_out, qkv, o, lse, kv_cls = ctx.saved_tensors
    grads = torch.ops.vpeft.token_shift_attention_bwd(
        grad_out, s, c, pos, ln_weight, ln_bias, w_qkv, w_out, qkv, o, lse, kv_cls,
        ctx.num_frames, ctx.num_heads, ctx.eps)
    ds, dc, dpos, d_lnw, d_lnb, d_w_qkv, d_b_qkv, d_w_out, d_b_out = grads
    if ln_weight is None:
        d_lnw = d_lnb = None
    return ds, dc, dpos, d_lnw, d_lnb, d_w_qkv, d_b_qkv, d_w_out, d_b_out, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backend


def token_shift_attention_triton(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, *,
                                 num_frames, num_heads, eps=1e-5):
    """Backend ``"triton"`` of :func:`vpeft_kernels.token_shift_attention` (same signature).

    Under ``torch.autocast`` every input is cast to the autocast dtype (as autocast does
    for a matmul; the casts are differentiable, so gradients reach the inputs in their
    own dtypes) and the op itself runs with autocast off, all in that one dtype.
    """
    args = cast_inputs((s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out), s.device.type)
    out = torch.ops.vpeft.token_shift_attention_fwd(*args, int(num_frames), int(num_heads), float(eps))
    return out[0]


def _reasons(s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out, *, num_frames, num_heads,
             eps=1e-5) -> List[str]:
    why = common_reasons((s, c, pos, ln_weight, ln_bias, w_qkv, b_qkv, w_out, b_out))
    d = s.shape[-1]
    if num_heads and d % num_heads == 0 and d // num_heads not in SUPPORTED_HEAD_DIMS:
        why.append(f"head dim {d // num_heads} is not one of {SUPPORTED_HEAD_DIMS}")
    if s.shape[1] < 1:
        why.append("needs at least one patch token (N >= 1)")
    if pos.shape[0] != s.shape[1]:
        why.append("supports a patch-only position embedding (N, d), not one with a [CLS] row (N+1, d)")
    return why


_backend.register("token_shift_attention", "triton", token_shift_attention_triton,
                  reasons=_reasons, auto_reasons=cuda_only)


# --------------------------------------------------------------------------- sm_90 variants


def sm90_variants(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Every GPU launch of the attention kernels for :mod:`vpeft_kernels.sm90_check`: each
    supported head dim, fp32/fp16/bf16, each autotune config that survives the autotuner's
    prune for that dtype and head dim."""
    from types import SimpleNamespace

    from .sm90_check import expand, ptr
    out = []
    f32, i32 = ptr(torch.float32), "i32"
    for dtype in dtypes:
        p, prec, name = ptr(dtype), dot_precision(dtype), str(dtype).replace("torch.", "")
        for hd in SUPPORTED_HEAD_DIMS:
            consts = dict(HEAD_DIM=hd, DOT_PRECISION=prec)
            args = {"QKV": SimpleNamespace(dtype=dtype)}  # what the autotuner's prune reads
            out += expand(f"_tsa_fwd_kernel[{name},hd={hd}]", _tsa_fwd_kernel,
                          dict(QKV=p, KVC=p, O=p, LSE=f32, sm_scale="fp32", N=i32, H=i32), dict(consts),
                          _prune_attention("fwd")(_tsa_fwd_kernel.configs, args, HEAD_DIM=hd),
                          aligned=("QKV", "KVC", "O", "LSE"))
            out += expand(f"_tsa_bwd_kernel[{name},hd={hd}]", _tsa_bwd_kernel,
                          dict(QKV=p, KVC=p, O=p, DO=p, LSE=f32, DQKV=p, DQ=f32, DELTA=f32, PART=f32, sm_scale="fp32",
                               N=i32, H=i32),
                          dict(consts, SPLIT_DQ=_split_dq(dtype, hd)),
                          _prune_attention("bwd")(_tsa_bwd_kernel.configs, args, HEAD_DIM=hd),
                          aligned=("QKV", "KVC", "O", "DO", "LSE", "DQKV", "DQ"))
    return out

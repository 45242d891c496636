"""Fused Triton kernels for the ST-Adapter and MSTA adapter branches.

The numbers are those of :func:`vpeft_kernels.reference.st_adapter` and
:func:`vpeft_kernels.reference.msta_adapter` (``shared/METHODS.md`` sections 1 and 2).
This module holds the kernels, their host launchers, the autograd wiring, the
``torch.library`` registration (namespace ``vpeft::``) and the ``"triton"`` backend
registration of both ops.

Layout used by every kernel
---------------------------
Tokens are viewed as a row-major ``(M, D)`` matrix with ``M = B*T*(1+N)`` (vision) or
``M = B*L`` (text). Row ``m`` is token ``m % (1+N)`` of frame ``m // (1+N)``; frames are
in ``(b t)`` order, so the same token of frame ``t-1`` / ``t+1`` of the same clip is row
``m - (1+N)`` / ``m + (1+N)``, present when ``t > 0`` / ``t < T-1`` with
``t = (m // (1+N)) % T``. Token 0 of each frame is [CLS] and never takes the temporal
path. Nothing is permuted or copied to build the temporal neighbours: kernels read the
neighbour rows directly.

Forward (ST-Adapter), two launches:
  1. ``h = x @ Wd^T + bd``                      -> (M, r), kept in x's dtype
  2. ``y = x + (taps_t(h) @ Wu^T + bu)`` on patch rows, ``y = x`` on [CLS] rows; the
     3-tap depthwise temporal mix of ``h`` is formed inside the K loop of the up GEMM.
Forward (MSTA), two launches:
  1. ``hd = dropout(relu(relu(u @ Wd^T + bd) @ Ws^T + bs))`` with the whole (rows, r)
     tile on chip between the two GEMMs; dropout from Philox (``tl.rand``) keyed by a
     seed tensor and the element index, so backward regenerates the same mask.
  2. ``out = scale * (hd @ Wu^T + bu + up_t(hd))``, ``up_t`` the grouped temporal
     up-projection added in the epilogue (patch rows only): output channel ``o`` reads
     bottleneck channel ``o // (D/r)`` of rows ``m - (1+N), m, m + (1+N)``.
Backward recomputes the bottleneck from the saved input (no (M, r) or (M, D)
activation is saved; the saved tensors are the op's inputs), reduces weight gradients
in fp32 (split over rows into fp32 partial buffers, summed on the host, so results are
deterministic), and produces the input gradient with one more GEMM.

Limits
------
* All tensors of one call must share a device and a dtype (float32, float16,
  bfloat16); under autocast they are cast to the autocast dtype (``_triton_common``).
* MSTA keeps the whole bottleneck on chip: r <= 128 in fp32, r <= 256 in 16-bit.
  ST-Adapter tiles r and takes any r.
* The dropout mask is indexed by ``m*r + c`` in 32 bits: past 2**32 elements per call
  the Philox stream repeats (the mask stays identical between forward and backward).
* No double backward.
* On the GPU nothing here has been timed or tuned yet: tile sizes are fixed, not
  autotuned (the interpreter cannot autotune).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _backend
from ._triton_common import autocast_dtype, cast_inputs, common_reasons, cuda_only

Tensor = torch.Tensor

# The MSTA bottleneck kernels keep a (rows, r) tile and the whole shared weight Ws (r, r)
# on chip; compiled for sm_90, r=256 needs ~148 KB of shared memory in 16-bit and ~290 KB
# (more than an H100 has) in fp32, so fp32 stops at r=128.
_MSTA_MAX_R = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _linear_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, M, K, N, TOK, stride_wn, stride_wk,
                   HAS_BIAS: tl.constexpr, ZERO_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """``out[m, n] = sum_k a[m, k] * W[n, k] + bias[n]``, fp32 accumulation.

    ``a`` is a contiguous (M, K) matrix, ``out`` a contiguous (M, N) matrix in its own
    dtype; ``W[n, k]`` is read at ``w_ptr + n*stride_wn + k*stride_wk`` (so the same
    kernel computes ``x @ Wd^T`` with Wd (N, K) and ``dy @ Wu`` with Wu (K, N)).
    ``ZERO_CLS`` writes zeros on [CLS] rows (``m % TOK == 0``).
    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ZERO_CLS:
        acc = tl.where((rm % TOK != 0)[:, None], acc, 0.0)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _up_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ataps_ptr, atbias_ptr, otaps_ptr, otbias_ptr,
               M, K, N, TOK, T, GROUP, scale, stride_wn, stride_wk,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, A_TAPS: tl.constexpr, O_TAPS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Up-projection with the temporal mix fused: ``out = res + scale * branch``.

    ``a`` is the contiguous (M, K) bottleneck, ``W[n, k]`` at ``n*stride_wn + k*stride_wk``,
    ``res``/``out`` contiguous (M, N). Rows follow the module layout (TOK = 1+N tokens
    per frame, T frames per clip); ``prev``/``next`` are rows ``m -/+ TOK`` of the same clip.

    * plain: ``branch[m, n] = sum_k a[m, k] W[n, k] + bias[n]``.
    * ``A_TAPS`` (ST-Adapter): ``a`` is first mixed over frames per bottleneck channel,
      ``a~[m, k] = wa[k,0] a[prev, k] + wa[k,1] a[m, k] + wa[k,2] a[next, k] + ba[k]``
      (zero-padded ends; ``wa`` is (K, 3)), and ``branch = 0`` on [CLS] rows.
    * ``O_TAPS`` (MSTA vision): on patch rows ``branch[m, n] += wo[n,0] a[prev, c] +
      wo[n,1] a[m, c] + wo[n,2] a[next, c] + bo[n]`` with ``c = n // GROUP`` (``wo`` (N, 3)).
    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``.
    """
    scale = tl.cast(scale, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    t = (rm // TOK) % T
    patch = m_ok & (rm % TOK != 0)
    has_prev = patch & (t > 0)
    has_next = patch & (t < T - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if A_TAPS:
            ap = tl.load(a_ptr + (rm - TOK)[:, None] * K + kk[None, :],
                         mask=has_prev[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            an = tl.load(a_ptr + (rm + TOK)[:, None] * K + kk[None, :],
                         mask=has_next[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w0 = tl.load(ataps_ptr + kk * 3 + 0, mask=k_ok, other=0.0).to(tl.float32)
            w1 = tl.load(ataps_ptr + kk * 3 + 1, mask=k_ok, other=0.0).to(tl.float32)
            w2 = tl.load(ataps_ptr + kk * 3 + 2, mask=k_ok, other=0.0).to(tl.float32)
            bt = tl.load(atbias_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            mixed = ap * w0[None, :] + a.to(tl.float32) * w1[None, :] + an * w2[None, :] + bt[None, :]
            a = tl.where(patch[:, None] & k_ok[None, :], mixed, 0.0).to(a_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if O_TAPS:
        c = rn // GROUP
        hp = tl.load(a_ptr + (rm - TOK)[:, None] * K + c[None, :], mask=has_prev[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        hc = tl.load(a_ptr + rm[:, None] * K + c[None, :], mask=patch[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        hn = tl.load(a_ptr + (rm + TOK)[:, None] * K + c[None, :], mask=has_next[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        o0 = tl.load(otaps_ptr + rn * 3 + 0, mask=n_ok, other=0.0).to(tl.float32)
        o1 = tl.load(otaps_ptr + rn * 3 + 1, mask=n_ok, other=0.0).to(tl.float32)
        o2 = tl.load(otaps_ptr + rn * 3 + 2, mask=n_ok, other=0.0).to(tl.float32)
        ob = tl.load(otbias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tmix = hp * o0[None, :] + hc * o1[None, :] + hn * o2[None, :] + ob[None, :]
        acc += tl.where(patch[:, None], tmix, 0.0)
    if A_TAPS:
        acc = tl.where(patch[:, None], acc, 0.0)
    acc = acc * scale
    io_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * N + rn[None, :], mask=io_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _st_taps_bwd_kernel(h_ptr, dg_ptr, taps_ptr, tbias_ptr, g_ptr, dh_ptr, part_ptr, M, R, TOK, T,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Backward of the ST-Adapter depthwise temporal conv on the (M, R) bottleneck.

    Inputs: ``h`` (recomputed ``x @ Wd^T + bd``) and ``dg = dy @ Wu`` (zero on [CLS]
    rows), both contiguous (M, R); taps ``w`` (R, 3), bias (R,). Writes
    ``g = taps_t(h)`` (zero on [CLS] rows, input of ``dWu = dy^T g``),
    ``dh[m] = w0 dg[next] + w1 dg[m] + w2 dg[prev]`` (the transposed correlation), and
    fp32 partial sums over this program's rows into ``part[pid_m, j, :]``:
    ``j=0..2: sum_m dg[m] * h[prev/m/next]`` (tap grads), ``j=3: sum_m dg[m]`` (bias).
    Grid: ``(cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))``.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    t = (rm // TOK) % T
    patch = m_ok & (rm % TOK != 0)
    prev_ok = (patch & (t > 0))[:, None] & r_ok[None, :]
    next_ok = (patch & (t < T - 1))[:, None] & r_ok[None, :]
    cur_ok = patch[:, None] & r_ok[None, :]
    cur = rm[:, None] * R + rr[None, :]
    h = tl.load(h_ptr + cur, mask=cur_ok, other=0.0).to(tl.float32)
    hp = tl.load(h_ptr + cur - TOK * R, mask=prev_ok, other=0.0).to(tl.float32)
    hn = tl.load(h_ptr + cur + TOK * R, mask=next_ok, other=0.0).to(tl.float32)
    dg = tl.load(dg_ptr + cur, mask=cur_ok, other=0.0).to(tl.float32)
    dgp = tl.load(dg_ptr + cur - TOK * R, mask=prev_ok, other=0.0).to(tl.float32)
    dgn = tl.load(dg_ptr + cur + TOK * R, mask=next_ok, other=0.0).to(tl.float32)
    w0 = tl.load(taps_ptr + rr * 3 + 0, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(taps_ptr + rr * 3 + 1, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(taps_ptr + rr * 3 + 2, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    b = tl.load(tbias_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    g = tl.where(cur_ok, w0 * hp + w1 * h + w2 * hn + b, 0.0)
    dh = tl.where(cur_ok, w0 * dgn + w1 * dg + w2 * dgp, 0.0)
    io_mask = m_ok[:, None] & r_ok[None, :]
    tl.store(g_ptr + cur, g.to(g_ptr.dtype.element_ty), mask=io_mask)
    tl.store(dh_ptr + cur, dh.to(dh_ptr.dtype.element_ty), mask=io_mask)
    base = part_ptr + pid_m * 4 * R + rr
    tl.store(base + 0 * R, tl.sum(dg * hp, axis=0), mask=r_ok)
    tl.store(base + 1 * R, tl.sum(dg * h, axis=0), mask=r_ok)
    tl.store(base + 2 * R, tl.sum(dg * hn, axis=0), mask=r_ok)
    tl.store(base + 3 * R, tl.sum(dg, axis=0), mask=r_ok)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, vec_ptr, M, P, Q, TOK, T, GROUP, ROWS_PER_SPLIT,
                  BIAS_ROWS: tl.constexpr, O_TAPS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_PREC: tl.constexpr):
    """Weight-gradient reduction over rows, fp32, split over row ranges.

    ``out[s, p, q] = sum_{m in split s} a[m, p] * b[m, q]`` for contiguous ``a`` (M, P)
    and ``b`` (M, Q), i.e. one split's share of ``a^T @ b``. Programs with
    ``pid_q == 0`` also write per-split vectors ``vec[s, j, p]``:
    ``j=0``: ``sum_m a[m, p]`` over all rows (``BIAS_ROWS == 1``) or patch rows only
    (``BIAS_ROWS == 2``); with ``O_TAPS`` (MSTA grouped temporal up-projection, ``a = dy``,
    ``b = hd``, ``c = p // GROUP``) ``j=1..3``: ``sum_{patch m} a[m, p] * b[prev/m/next, c]``
    and ``j=4``: ``sum_{patch m} a[m, p]``.
    Grid: ``(cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q), splits)``.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = rp < P
    q_ok = rq < Q
    c = rp // GROUP
    start = pid_s * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    vb = tl.zeros((BLOCK_P,), dtype=tl.float32)
    v0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    v1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    v2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    vt = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        a = tl.load(a_ptr + rm[:, None] * P + rp[None, :], mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rm[:, None] * Q + rq[None, :], mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
        if pid_q == 0:
            af = a.to(tl.float32)
            patch = m_ok & (rm % TOK != 0)
            if BIAS_ROWS == 1:
                vb += tl.sum(af, axis=0)
            if BIAS_ROWS == 2:
                vb += tl.sum(tl.where(patch[:, None], af, 0.0), axis=0)
            if O_TAPS:
                t = (rm // TOK) % T
                pm = (patch & (t > 0))[:, None] & p_ok[None, :]
                nm = (patch & (t < T - 1))[:, None] & p_ok[None, :]
                cm = patch[:, None] & p_ok[None, :]
                bp = tl.load(b_ptr + (rm - TOK)[:, None] * Q + c[None, :], mask=pm, other=0.0).to(tl.float32)
                bc = tl.load(b_ptr + rm[:, None] * Q + c[None, :], mask=cm, other=0.0).to(tl.float32)
                bn = tl.load(b_ptr + (rm + TOK)[:, None] * Q + c[None, :], mask=nm, other=0.0).to(tl.float32)
                v0 += tl.sum(af * bp, axis=0)
                v1 += tl.sum(af * bc, axis=0)
                v2 += tl.sum(af * bn, axis=0)
                vt += tl.sum(tl.where(cm, af, 0.0), axis=0)
    tl.store(out_ptr + pid_s * P * Q + rp[:, None] * Q + rq[None, :], acc, mask=p_ok[:, None] & q_ok[None, :])
    if pid_q == 0:
        base = vec_ptr + pid_s * 5 * P + rp
        tl.store(base + 0 * P, vb, mask=p_ok)
        tl.store(base + 1 * P, v0, mask=p_ok)
        tl.store(base + 2 * P, v1, mask=p_ok)
        tl.store(base + 3 * P, v2, mask=p_ok)
        tl.store(base + 4 * P, vt, mask=p_ok)


@triton.jit
def _msta_bottleneck_fwd_kernel(u_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, seed_ptr, hd_ptr, M, D, R, p_drop,
                                HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """MSTA bottleneck ``hd = dropout(relu(relu(u @ Wd^T + bd) @ Ws^T + bs))``.

    ``u`` contiguous (M, D), ``Wd`` (R, D), ``Ws`` (R, R), ``hd`` (M, R). One program
    owns BLOCK_M rows and the whole bottleneck width (BLOCK_R >= R), so the shared GEMM
    runs on the on-chip tile. Dropout keeps element ``(m, c)`` when
    ``tl.rand(seed, m*R + c) >= p`` and scales kept values by ``1/(1-p)``.
    Grid: ``(cdiv(M, BLOCK_M),)``.
    """
    p_drop = tl.cast(p_drop, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < D
        a = tl.load(u_ptr + rm[:, None] * D + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wd_ptr + rr[None, :] * D + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    h1 = tl.maximum(acc + tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    ws_t = tl.load(ws_ptr + rr[None, :] * R + rr[:, None], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    z2 = tl.dot(h1.to(hd_ptr.dtype.element_ty), ws_t, input_precision=DOT_PREC)
    h2 = tl.maximum(z2 + tl.load(bs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offs = (rm[:, None] * R + rr[None, :]).to(tl.int32)
        keep = tl.rand(seed, offs) >= p_drop
        h2 = tl.where(keep, h2 / (1.0 - p_drop), 0.0)
    tl.store(hd_ptr + rm[:, None] * R + rr[None, :], h2.to(hd_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _msta_bottleneck_bwd_kernel(u_ptr, dy_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, wt_ptr, seed_ptr,
                                hd_ptr, h1_ptr, dz2_ptr, dz1_ptr, M, D, R, TOK, T, GROUP, p_drop,
                                HAS_DROPOUT: tl.constexpr, O_TAPS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
                                TAPS_PREC: tl.constexpr):
    """MSTA bottleneck backward with the forward bottleneck recomputed on chip.

    Inputs: ``u`` and ``dy = dA`` contiguous (M, D) (the gradient scaling has already
    cancelled: weights see ``dA = dy``), ``Wd`` (R, D), ``Ws`` (R, R), ``Wu`` (D, R),
    ``w_tconv`` (D, 3). One loop over D accumulates both ``u @ Wd^T`` and
    ``dhd = dA @ Wu + up_t^T(dA)``, where with ``O_TAPS`` on patch rows
    ``up_t^T(dA)[m, c] = sum_{o: o // GROUP == c} wt[o,0] dA[next, o] + wt[o,1] dA[m, o] +
    wt[o,2] dA[prev, o]`` (the group sum is a dot with a 0/1 matrix). Then
    ``h1 = relu(.)``, ``h2 = relu(h1 Ws^T + bs)``, the dropout mask from the same seed
    as forward, ``dz2 = dhd * keep/(1-p) * [h2 > 0]``, ``dz1 = (dz2 @ Ws) * [h1 > 0]``.
    Writes ``hd`` (for dWu), ``h1`` and ``dz2`` (for dWs), ``dz1`` (for dWd and du), all
    (M, R). Grid: ``(cdiv(M, BLOCK_M),)``.
    """
    p_drop = tl.cast(p_drop, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    t = (rm // TOK) % T
    patch = m_ok & (rm % TOK != 0)
    has_prev = patch & (t > 0)
    has_next = patch & (t < T - 1)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < D
        io = m_ok[:, None] & k_ok[None, :]
        a = tl.load(u_ptr + rm[:, None] * D + kk[None, :], mask=io, other=0.0)
        w = tl.load(wd_ptr + rr[None, :] * D + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc1 = tl.dot(a, w, acc1, input_precision=DOT_PREC)
        g = tl.load(dy_ptr + rm[:, None] * D + kk[None, :], mask=io, other=0.0)
        wu = tl.load(wu_ptr + kk[:, None] * R + rr[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc2 = tl.dot(g, wu, acc2, input_precision=DOT_PREC)
        if O_TAPS:
            gp = tl.load(dy_ptr + (rm - TOK)[:, None] * D + kk[None, :], mask=has_prev[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            gn = tl.load(dy_ptr + (rm + TOK)[:, None] * D + kk[None, :], mask=has_next[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            w0 = tl.load(wt_ptr + kk * 3 + 0, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w1 = tl.load(wt_ptr + kk * 3 + 1, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(wt_ptr + kk * 3 + 2, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            q = tl.where(patch[:, None], w0 * gn + w1 * g.to(tl.float32) + w2 * gp, 0.0)
            group = tl.where((kk[:, None] // GROUP == rr[None, :]) & k_ok[:, None], 1.0, 0.0)
            acc2 = tl.dot(q, group, acc2, input_precision=TAPS_PREC)
    h1 = tl.maximum(acc1 + tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    h1c = h1.to(hd_ptr.dtype.element_ty)
    ws_t = tl.load(ws_ptr + rr[None, :] * R + rr[:, None], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    z2 = tl.dot(h1c, ws_t, input_precision=DOT_PREC)
    h2 = tl.maximum(z2 + tl.load(bs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    dh2 = acc2
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offs = (rm[:, None] * R + rr[None, :]).to(tl.int32)
        keep = tl.rand(seed, offs) >= p_drop
        h2 = tl.where(keep, h2 / (1.0 - p_drop), 0.0)
        dh2 = tl.where(keep, dh2 / (1.0 - p_drop), 0.0)
    # h2 > 0 before dropout; a dropped element has no gradient either way
    dz2 = tl.where(h2 > 0.0, dh2, 0.0)
    dz2c = dz2.to(hd_ptr.dtype.element_ty)
    ws = tl.load(ws_ptr + rr[:, None] * R + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    dh1 = tl.dot(dz2c, ws, input_precision=DOT_PREC)
    dz1 = tl.where(h1 > 0.0, dh1, 0.0)
    io = m_ok[:, None] & r_ok[None, :]
    out = rm[:, None] * R + rr[None, :]
    tl.store(hd_ptr + out, h2.to(hd_ptr.dtype.element_ty), mask=io)
    tl.store(h1_ptr + out, h1c, mask=io)
    tl.store(dz2_ptr + out, dz2c, mask=io)
    tl.store(dz1_ptr + out, dz1.to(dz1_ptr.dtype.element_ty), mask=io)


# --------------------------------------------------------------------- host launchers


def _dot_prec(dtype):
    # fp32 inputs must not silently drop to tf32 on the GPU (the contract is fp32 math)
    return "ieee" if dtype == torch.float32 else "tf32"


def _cfg(device: torch.device):
    """Tile sizes: small in the CPU interpreter (several programs per launch, so block
    edges and neighbour rows in other programs are exercised), larger on the GPU."""
    if device.type != "cuda":
        return dict(BM=16, BN=32, BK=16, WM=16, WP=32, WQ=32, warps=4)
    return dict(BM=64, BN=128, BK=32, WM=64, WP=64, WQ=64, warps=4)


def _splits(device, rows, block_m, tiles):
    """How many row ranges a weight-gradient reduction is split into."""
    blocks = triton.cdiv(rows, block_m)
    if device.type != "cuda":
        return max(1, min(2, blocks))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, max(tiles, 1))))


def _linear(a, w, bias, out, *, n, stride_wn, stride_wk, tok=1, zero_cls=False):
    m, k = a.shape
    c = _cfg(a.device)
    grid = (triton.cdiv(m, c["BM"]), triton.cdiv(n, c["BN"]))
    _linear_kernel[grid](a, w, bias if bias is not None else w, out, m, k, n, tok, stride_wn, stride_wk,
                         HAS_BIAS=bias is not None, ZERO_CLS=zero_cls, BLOCK_M=c["BM"], BLOCK_N=c["BN"],
                         BLOCK_K=c["BK"], DOT_PREC=_dot_prec(a.dtype), num_warps=c["warps"])
    return out


def _up(a, w, bias, res, out, *, n, stride_wn, stride_wk, tok=1, frames=1, scale=1.0,
        a_taps=None, o_taps=None, group=1):
    m, k = a.shape
    c = _cfg(a.device)
    grid = (triton.cdiv(m, c["BM"]), triton.cdiv(n, c["BN"]))
    at = a_taps if a_taps is not None else (w, w)
    ot = o_taps if o_taps is not None else (w, w)
    _up_kernel[grid](a, w, bias if bias is not None else w, res if res is not None else out, out,
                     at[0], at[1], ot[0], ot[1], m, k, n, tok, frames, group, float(scale), stride_wn, stride_wk,
                     HAS_BIAS=bias is not None, HAS_RES=res is not None, A_TAPS=a_taps is not None,
                     O_TAPS=o_taps is not None, BLOCK_M=c["BM"], BLOCK_N=c["BN"], BLOCK_K=c["BK"],
                     DOT_PREC=_dot_prec(a.dtype), num_warps=c["warps"])
    return out


def _wgrad(a, b, *, tok=1, frames=1, group=1, bias_rows=0, o_taps=False):
    """fp32 ``a^T @ b`` and its per-column vectors (see ``_wgrad_kernel``)."""
    m, p = a.shape
    q = b.shape[1]
    c = _cfg(a.device)
    tiles = triton.cdiv(p, c["WP"]) * triton.cdiv(q, c["WQ"])
    s = _splits(a.device, m, c["WM"], tiles)
    rows_per = triton.cdiv(triton.cdiv(m, s), c["WM"]) * c["WM"]
    s = triton.cdiv(m, rows_per)
    out = torch.empty((s, p, q), device=a.device, dtype=torch.float32)
    vec = torch.empty((s, 5, p), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(p, c["WP"]), triton.cdiv(q, c["WQ"]), s)
    _wgrad_kernel[grid](a, b, out, vec, m, p, q, tok, frames, group, rows_per, BIAS_ROWS=bias_rows,
                        O_TAPS=o_taps, BLOCK_M=c["WM"], BLOCK_P=c["WP"], BLOCK_Q=c["WQ"],
                        DOT_PREC=_dot_prec(a.dtype), num_warps=c["warps"])
    return out.sum(0), vec.sum(0)


def _msta_cfg(device, r):
    block_r = max(16, triton.next_power_of_2(r))
    if device.type != "cuda":
        return dict(BM=16, BR=block_r, BK=16, warps=4)
    return dict(BM=64 if block_r <= 128 else 32, BR=block_r, BK=32, warps=8 if block_r >= 128 else 4)


def _st_forward(x, w_down, b_down, w_conv, b_conv, w_up, b_up, num_frames):
    x, w_down, b_down, w_conv, b_conv, w_up, b_up = (t.contiguous() for t in
                                                      (x, w_down, b_down, w_conv, b_conv, w_up, b_up))
    bt, tok, d = x.shape
    r = w_down.shape[0]
    y = torch.empty((bt, tok, d), device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return y
    x2 = x.view(-1, d)
    h = torch.empty((x2.shape[0], r), device=x.device, dtype=x.dtype)
    _linear(x2, w_down, b_down, h, n=r, stride_wn=d, stride_wk=1)
    _up(h, w_up, b_up, x2, y.view(-1, d), n=d, stride_wn=r, stride_wk=1, tok=tok, frames=num_frames,
        a_taps=(w_conv, b_conv))
    return y


def _st_backward(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames):
    dy, x, w_down, b_down, w_conv, b_conv, w_up = (t.contiguous() for t in
                                                    (dy, x, w_down, b_down, w_conv, b_conv, w_up))
    bt, tok, d = x.shape
    r = w_down.shape[0]
    if x.numel() == 0:
        z = [torch.zeros(t.shape, device=x.device, dtype=t.dtype) for t in (w_down, b_down, w_conv, b_conv, w_up)]
        return (torch.empty(x.shape, device=x.device, dtype=x.dtype), *z, torch.zeros(d, device=x.device, dtype=x.dtype))
    x2, dy2 = x.view(-1, d), dy.view(-1, d)
    m = x2.shape[0]
    h = torch.empty((m, r), device=x.device, dtype=x.dtype)
    dg = torch.empty_like(h)
    _linear(x2, w_down, b_down, h, n=r, stride_wn=d, stride_wk=1)
    _linear(dy2, w_up, None, dg, n=r, stride_wn=1, stride_wk=r, tok=tok, zero_cls=True)
    g = torch.empty_like(h)
    dh = torch.empty_like(h)
    c = _cfg(x.device)
    bm, br = c["BM"], c["BN"]
    part = torch.empty((triton.cdiv(m, bm), 4, r), device=x.device, dtype=torch.float32)
    _st_taps_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(r, br))](
        h, dg, w_conv, b_conv, g, dh, part, m, r, tok, num_frames, BLOCK_M=bm, BLOCK_R=br, num_warps=c["warps"])
    del h, dg
    taps = part.sum(0)
    d_wconv = taps[:3].t().contiguous().to(w_conv.dtype)
    d_bconv = taps[3].to(b_conv.dtype, copy=True)
    d_wup, vec_up = _wgrad(dy2, g, tok=tok, bias_rows=2)
    del g
    d_wdown, vec_down = _wgrad(dh, x2, bias_rows=1)
    dx = torch.empty((bt, tok, d), device=x.device, dtype=x.dtype)
    _up(dh, w_down, None, dy2, dx.view(-1, d), n=d, stride_wn=1, stride_wk=d)
    return (dx, d_wdown.to(w_down.dtype), vec_down[0].to(b_down.dtype), d_wconv, d_bconv,
            d_wup.to(w_up.dtype), vec_up[0].to(w_up.dtype))


def _msta_forward(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, seed, scale,
                  num_frames, dropout_p):
    u, w_down, b_down, w_shared, b_shared, w_up, b_up, seed = (
        t.contiguous() for t in (u, w_down, b_down, w_shared, b_shared, w_up, b_up, seed))
    vision = w_tconv is not None
    if vision:
        w_tconv, b_tconv = w_tconv.contiguous(), b_tconv.contiguous()
    bt, tok, d = u.shape
    r = w_down.shape[0]
    out = torch.empty((bt, tok, d), device=u.device, dtype=u.dtype)
    if u.numel() == 0:
        return out
    u2 = u.view(-1, d)
    m = u2.shape[0]
    hd = torch.empty((m, r), device=u.device, dtype=u.dtype)
    c = _msta_cfg(u.device, r)
    _msta_bottleneck_fwd_kernel[(triton.cdiv(m, c["BM"]),)](
        u2, w_down, b_down, w_shared, b_shared, seed, hd, m, d, r, float(dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=c["BM"], BLOCK_R=c["BR"], BLOCK_K=c["BK"],
        DOT_PREC=_dot_prec(u.dtype), num_warps=c["warps"])
    _up(hd, w_up, b_up, None, out.view(-1, d), n=d, stride_wn=r, stride_wk=1, tok=tok,
        frames=num_frames if vision else 1, scale=scale, o_taps=(w_tconv, b_tconv) if vision else None,
        group=d // r if vision else 1)
    return out


def _msta_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames,
                   dropout_p):
    dy, u, w_down, b_down, w_shared, b_shared, w_up, seed = (
        t.contiguous() for t in (dy, u, w_down, b_down, w_shared, b_shared, w_up, seed))
    vision = w_tconv is not None
    if vision:
        w_tconv = w_tconv.contiguous()
    bt, tok, d = u.shape
    r = w_down.shape[0]
    dev = u.device
    if u.numel() == 0:
        z = [torch.zeros(t.shape, device=dev, dtype=t.dtype) for t in (w_down, b_down, w_shared, b_shared, w_up)]
        zt = [torch.zeros((d, 3) if vision else (0,), device=dev, dtype=u.dtype),
              torch.zeros((d,) if vision else (0,), device=dev, dtype=u.dtype)]
        return (torch.empty(u.shape, device=dev, dtype=u.dtype), *z, torch.zeros(d, device=dev, dtype=u.dtype), *zt)
    u2, dy2 = u.view(-1, d), dy.view(-1, d)
    m = u2.shape[0]
    group = d // r if vision else 1
    frames = num_frames if vision else 1
    hd = torch.empty((m, r), device=dev, dtype=u.dtype)
    h1, dz2, dz1 = torch.empty_like(hd), torch.empty_like(hd), torch.empty_like(hd)
    c = _msta_cfg(dev, r)
    _msta_bottleneck_bwd_kernel[(triton.cdiv(m, c["BM"]),)](
        u2, dy2, w_down, b_down, w_shared, b_shared, w_up, w_tconv if vision else w_up, seed,
        hd, h1, dz2, dz1, m, d, r, tok, frames, group, float(dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, O_TAPS=vision, BLOCK_M=c["BM"], BLOCK_R=c["BR"], BLOCK_K=c["BK"],
        DOT_PREC=_dot_prec(u.dtype), TAPS_PREC=_dot_prec(u.dtype), num_warps=c["warps"])
    d_wup, vec_up = _wgrad(dy2, hd, tok=tok, frames=frames, group=group, bias_rows=1, o_taps=vision)
    del hd
    d_wshared, vec_shared = _wgrad(dz2, h1, bias_rows=1)
    del dz2, h1
    d_wdown, vec_down = _wgrad(dz1, u2, bias_rows=1)
    du = torch.empty((bt, tok, d), device=dev, dtype=u.dtype)
    _up(dz1, w_down, None, None, du.view(-1, d), n=d, stride_wn=1, stride_wk=d, scale=scale)
    if vision:
        d_wt = vec_up[1:4].t().contiguous().to(w_tconv.dtype)
        d_bt = vec_up[4].to(w_tconv.dtype, copy=True)
    else:
        d_wt = torch.zeros((0,), device=dev, dtype=u.dtype)
        d_bt = torch.zeros((0,), device=dev, dtype=u.dtype)
    return (du, d_wdown.to(w_down.dtype), vec_down[0].to(b_down.dtype), d_wshared.to(w_shared.dtype),
            vec_shared[0].to(b_shared.dtype), d_wup.to(w_up.dtype), vec_up[0].to(w_up.dtype, copy=True), d_wt, d_bt)


# --------------------------------------------------------- torch.library registration


@torch.library.custom_op("vpeft::st_adapter", mutates_args=())
def _st_adapter_op(x: Tensor, w_down: Tensor, b_down: Tensor, w_conv: Tensor, b_conv: Tensor,
                   w_up: Tensor, b_up: Tensor, num_frames: int) -> Tensor:
    return _st_forward(x, w_down, b_down, w_conv, b_conv, w_up, b_up, num_frames)


@_st_adapter_op.register_fake
def _(x, w_down, b_down, w_conv, b_conv, w_up, b_up, num_frames):
    return x.new_empty(x.shape)


@torch.library.custom_op("vpeft::st_adapter_backward", mutates_args=())
def _st_adapter_bwd_op(dy: Tensor, x: Tensor, w_down: Tensor, b_down: Tensor, w_conv: Tensor, b_conv: Tensor,
                       w_up: Tensor, num_frames: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _st_backward(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames)


@_st_adapter_bwd_op.register_fake
def _(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames):
    return (x.new_empty(x.shape), w_down.new_empty(w_down.shape), b_down.new_empty(b_down.shape),
            w_conv.new_empty(w_conv.shape), b_conv.new_empty(b_conv.shape), w_up.new_empty(w_up.shape),
            w_up.new_empty((w_up.shape[0],)))


def _st_setup_context(ctx, inputs, output):
    x, w_down, b_down, w_conv, b_conv, w_up, b_up, num_frames = inputs
    ctx.save_for_backward(x, w_down, b_down, w_conv, b_conv, w_up)
    ctx.num_frames = num_frames


def _st_autograd_backward(ctx, dy):
    grads = torch.ops.vpeft.st_adapter_backward(dy, *ctx.saved_tensors, ctx.num_frames)
    return (*grads, None)


_st_adapter_op.register_autograd(_st_autograd_backward, setup_context=_st_setup_context)


@torch.library.custom_op("vpeft::msta_adapter", mutates_args=())
def _msta_adapter_op(u: Tensor, w_down: Tensor, b_down: Tensor, w_shared: Tensor, b_shared: Tensor,
                     w_up: Tensor, b_up: Tensor, w_tconv: Optional[Tensor], b_tconv: Optional[Tensor],
                     seed: Tensor, scale: float, num_frames: int, dropout_p: float) -> Tensor:
    return _msta_forward(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, seed, scale,
                         num_frames, dropout_p)


@_msta_adapter_op.register_fake
def _(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, seed, scale, num_frames, dropout_p):
    return u.new_empty(u.shape)


@torch.library.custom_op("vpeft::msta_adapter_backward", mutates_args=())
def _msta_adapter_bwd_op(dy: Tensor, u: Tensor, w_down: Tensor, b_down: Tensor, w_shared: Tensor,
                         b_shared: Tensor, w_up: Tensor, w_tconv: Optional[Tensor], seed: Tensor, scale: float,
                         num_frames: int, dropout_p: float
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the MSTA branch; the last two (w_tconv, b_tconv) are empty for text."""
    return _msta_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames,
                          dropout_p)


@_msta_adapter_bwd_op.register_fake
def _(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames, dropout_p):
    d = u.shape[-1]
    vision = w_tconv is not None
    return (u.new_empty(u.shape), w_down.new_empty(w_down.shape), b_down.new_empty(b_down.shape),
            w_shared.new_empty(w_shared.shape), b_shared.new_empty(b_shared.shape), w_up.new_empty(w_up.shape),
            w_up.new_empty((d,)), u.new_empty((d, 3) if vision else (0,)), u.new_empty((d,) if vision else (0,)))


def _msta_setup_context(ctx, inputs, output):
    u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, seed, scale, num_frames, dropout_p = inputs
    ctx.vision = w_tconv is not None
    ctx.save_for_backward(u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed)
    ctx.args = (scale, num_frames, dropout_p)


def _msta_autograd_backward(ctx, dy):
    u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed = ctx.saved_tensors
    g = torch.ops.vpeft.msta_adapter_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up,
                                              w_tconv if ctx.vision else None, seed, *ctx.args)
    wt, bt = (g[7], g[8]) if ctx.vision else (None, None)
    return (*g[:7], wt, bt, None, None, None, None)


_msta_adapter_op.register_autograd(_msta_autograd_backward, setup_context=_msta_setup_context)


# ------------------------------------------------------------------ public functions


def st_adapter_triton(x, w_down, b_down, w_conv, b_conv, w_up, b_up, *, num_frames):
    """Triton ST-Adapter; same signature and numbers as :func:`reference.st_adapter`.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first.
    """
    args = cast_inputs((x, w_down, b_down, w_conv, b_conv, w_up, b_up), x.device.type)
    return torch.ops.vpeft.st_adapter(*args, int(num_frames))


def msta_adapter_triton(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv=None, b_tconv=None, *,
                        scale, num_frames=None, dropout_p=0.0, layout="bt"):
    """Triton MSTA branch; same signature and numbers as :func:`reference.msta_adapter`.

    With ``dropout_p > 0`` a 31-bit seed is drawn from torch's RNG on ``u``'s device
    (so ``torch.manual_seed`` makes runs repeatable); the kernel's Philox stream for
    that seed gives the mask, and backward regenerates it from the saved seed. The
    mask differs from the one ``torch.nn.functional.dropout`` would draw. Under
    ``torch.autocast`` the inputs are cast to the autocast dtype first.
    """
    u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv = cast_inputs(
        (u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv), u.device.type)
    p = float(dropout_p)
    if p > 0.0:
        seed = torch.randint(0, 2 ** 31 - 1, (1,), device=u.device, dtype=torch.int64)
    else:
        seed = torch.zeros((1,), device=u.device, dtype=torch.int64)
    return torch.ops.vpeft.msta_adapter(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv,
                                        seed, float(scale), int(num_frames or 1), p)


def dropout_keep_mask(seed: Tensor, rows: int, r: int, p: float) -> Tensor:
    """The (rows, r) keep mask the MSTA kernels use for ``seed`` (for tests and debugging)."""
    keep = torch.empty((rows, r), device=seed.device, dtype=torch.float32)
    c = _msta_cfg(seed.device, r)
    _keep_mask_kernel[(triton.cdiv(rows, c["BM"]),)](seed, keep, rows, r, float(p), BLOCK_M=c["BM"],
                                                     BLOCK_R=c["BR"])
    return keep.bool()


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, R, p_drop, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[m, c] = tl.rand(seed, m*R + c) >= p`` as 0/1 floats, the MSTA dropout rule."""
    p_drop = tl.cast(p_drop, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    offs = (rm[:, None] * R + rr[None, :]).to(tl.int32)
    keep = tl.rand(seed, offs) >= p_drop
    tl.store(out_ptr + rm[:, None] * R + rr[None, :], tl.where(keep, 1.0, 0.0),
             mask=(rm < M)[:, None] & (rr < R)[None, :])


# ------------------------------------------------------------ backend registration


def _st_reasons(x, w_down, b_down, w_conv, b_conv, w_up, b_up, *, num_frames) -> List[str]:
    return common_reasons((x, w_down, b_down, w_conv, b_conv, w_up, b_up))


def _msta_reasons(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv=None, b_tconv=None, *, scale,
                  num_frames=None, dropout_p=0.0, layout="bt") -> List[str]:
    why = common_reasons((u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv))
    if layout != "bt" and w_tconv is not None:
        why.append(f"layout={layout!r} (ViCLIP clip tokens) is not implemented in the Triton kernels; "
                   "they read temporal neighbours in the per-frame (b t) layout")
    r = w_down.shape[0]
    dtype = autocast_dtype(u.device.type) or u.dtype
    max_r = _MSTA_MAX_R.get(dtype, 0)
    if max_r and r > max_r:
        why.append(f"bottleneck r={r} is larger than {max_r} for {dtype}: the MSTA kernels keep the whole "
                   "(rows, r) tile and the shared (r, r) weight on chip")
    return why


_backend.register("st_adapter", "triton", st_adapter_triton, reasons=_st_reasons, auto_reasons=cuda_only)
_backend.register("msta_adapter", "triton", msta_adapter_triton, reasons=_msta_reasons, auto_reasons=cuda_only)

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
  1. ``hd = dropout(relu(relu(u @ Wd^T + bd) @ Ws^T + bs))``, one program per row
     tile, each GEMM in column blocks of the bottleneck (h1 goes through L2 between
     the two GEMMs); dropout from Philox (``tl.rand``) keyed by a seed tensor and the
     element index, so backward regenerates the same mask.
  2. ``out = scale * (hd @ Wu^T + bu + up_t(hd))``, ``up_t`` the grouped temporal
     up-projection added in the epilogue (patch rows only): output channel ``o`` reads
     bottleneck channel ``o // (D/r)`` of rows ``m - (1+N), m, m + (1+N)``.
Backward recomputes the bottleneck from the saved input (no (M, r) or (M, D)
activation is saved; the saved tensors are the op's inputs). Weight-matrix gradients
are BLAS GEMMs with fp32 output (``torch.mm(..., out_dtype=torch.float32)`` on CUDA);
bias and temporal-tap gradients are fp32 per-row-tile partial sums written by the
kernels that already read those rows, summed on the host (deterministic, no atomics).
Gradients autograd does not need (``ctx.needs_input_grad``) are not computed. The input
gradient is one more GEMM.

GEMM-shaped kernels run on a 1-D grid in GROUP_M tile order (:func:`_tile_ids`) and are
autotuned on the GPU over Hopper tiles (one config under the interpreter); every config
is compiled for sm_90 by :mod:`vpeft_kernels.sm90_check`, which fails on a spill.

Limits
------
* All tensors of one call must share a device and a dtype (float32, float16,
  bfloat16); under autocast they are cast to the autocast dtype (``_triton_common``).
* Both adapters take any r: the MSTA bottleneck kernels walk r in column blocks
  (one fp32 accumulator of (64, <= 128) on chip), ST-Adapter tiles r.
* The dropout mask is indexed by ``m*r + c`` in 32 bits: past 2**32 elements per call
  the Philox stream repeats (the mask stays identical between forward and backward).
* No double backward.
* Nothing here has run on a GPU yet (`vpeft selftest` is the check to run on one).
* fp32 dots use 3xTF32 on the GPU (``_triton_common.dot_precision``), IEEE fp32 in the
  interpreter.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _backend
from ._triton_common import (INTERPRET, cast_inputs, common_reasons, cuda_only, device_guard,
                             dot_precision)

Tensor = torch.Tensor


# ----------------------------------------------------------------------- GPU configs
#
# The GEMM-shaped kernels (_linear_kernel, _up_kernel) are autotuned on the GPU over
# Hopper tiles; under the interpreter there is one small config (the interpreter cannot
# time configs, and small tiles make tiny test shapes span several row and column tiles).
# vpeft_kernels.sm90_check compiles every config below for sm_90 and fails on a spill.

_GEMM_16 = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), fp16/bf16 (wgmma)
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
_GEMM_32 = [  # fp32 (3xTF32 products on the tensor cores): operands take twice the room
    (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
# The fused temporal epilogues hold extra (rows, cols) tiles: configs that spill with
# them on sm_90 (vpeft_kernels.sm90_check) are replaced by these smaller ones.
_A_TAPS_16 = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
_O_TAPS_16 = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 64, 4, 3)]
_O_TAPS_32 = [(64, 64, 32, 4, 3), (64, 32, 32, 4, 3)]
_GROUP_M = 8  # row tiles per group of the tile swizzle


def _gemm_configs():
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2), num_warps=4, num_stages=1)]
    tables = _GEMM_16 + _GEMM_32 + _A_TAPS_16 + _O_TAPS_16 + _O_TAPS_32
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=_GROUP_M), num_warps=w, num_stages=s)
            for (m, n, k, w, s) in dict.fromkeys(tables)]


def _cfg_key(c):
    kw = c.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages


def _gemm_table(dtype, a_taps=False, o_taps=False):
    """The GPU configs one call of _linear_kernel / _up_kernel may be tuned over."""
    fp32 = dtype == torch.float32
    if o_taps:
        return _O_TAPS_32 if fp32 else _O_TAPS_16
    if a_taps and not fp32:
        return _A_TAPS_16
    return _GEMM_32 if fp32 else _GEMM_16


def _prune_gemm(configs, named_args, **kwargs):
    """The configs meant for this call (the autotuner's ``early_config_prune``)."""
    if INTERPRET:
        return configs
    table = set(_gemm_table(named_args["a_ptr"].dtype, kwargs.get("A_TAPS", False), kwargs.get("O_TAPS", False)))
    return [c for c in configs if _cfg_key(c) in table]


# The ST temporal-conv backward is elementwise over (M, r) with six live fp32 tiles.
_TAPS_GPU = dict(BLOCK_M=32, BLOCK_R=64, num_warps=4, num_stages=1)
_TAPS_INTERP = dict(BLOCK_M=16, BLOCK_R=16, num_warps=4, num_stages=1)


def _taps_cfg():
    return dict(_TAPS_INTERP if INTERPRET else _TAPS_GPU)


# MSTA bottleneck kernels: one program owns BLOCK_M rows (64 on the GPU at every r, so
# the GEMMs stay on wgmma in 16-bit) and walks each of its GEMMs in BLOCK_N-wide column
# blocks of the bottleneck, one fp32 (BLOCK_M, BLOCK_N) accumulator live at a time, so
# r only sets loop trip counts: r > BLOCK_N compiles to the same kernel as r = BLOCK_N.
# BLOCK_K / BLOCK_C are the K steps over D and over r; BLOCK_CT x BLOCK_G the (channel,
# group member) tile of the backward's grouped temporal sum. 3xTF32 (fp32) triples the
# dot operands, so fp32 takes narrower blocks and shorter K steps.
# Widest column block per (dtype class, pass), the largest that compiles for sm_90
# without spills (`python -m vpeft_kernels.sm90_check --filter _msta`): the backward
# holds more (its dA pass, the mask, two outputs per block) and spills at 128 in 16-bit.
_MSTA_BLOCK_N = {(False, False): 128, (False, True): 64, (True, False): 64, (True, True): 32}  # (fp32, bwd)


def _msta_cfg(r, dtype=torch.bfloat16, bwd=False):
    """Launch config of the MSTA bottleneck kernels for bottleneck width ``r``."""
    if INTERPRET:  # small blocks: the test shapes span several column blocks and group steps
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_C=16, num_warps=4, num_stages=1,
                    **(dict(BLOCK_CT=4, BLOCK_G=2) if bwd else {}))
    fp32 = dtype == torch.float32
    block_n = min(max(16, triton.next_power_of_2(r)), _MSTA_BLOCK_N[fp32, bwd])
    step = 32 if fp32 else 64
    cfg = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=step, BLOCK_C=step,
               num_warps=4 if block_n <= (16 if fp32 and bwd else 32) else 8, num_stages=2)
    if bwd:
        cfg.update(BLOCK_CT=8, BLOCK_G=4)
    return cfg


def _msta_block_ns(dtype, bwd):
    """Every BLOCK_N :func:`_msta_cfg` gives for ``dtype`` (r = 16, 32, ... up to the cap)."""
    cap = _MSTA_BLOCK_N[dtype == torch.float32, bwd]
    return [16 << i for i in range(8) if 16 << i <= cap]


_KEEP_MASK_CFG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program on a 1-D grid, in GROUP_M-row groups.

    Consecutive programs walk the column tiles of GROUP_M row tiles before moving on, so
    a row tile of the input and a column tile of the weight are reused from L2 by the
    programs that run at the same time instead of being streamed from HBM again (the
    Triton matmul tutorial's grouped ordering).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "ZERO_CLS", "COLSUM"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _linear_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, colsum_ptr, M, K, N, TOK, stride_wn, stride_wk,
                   HAS_BIAS: tl.constexpr, ZERO_CLS: tl.constexpr, COLSUM: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``out[m, n] = sum_k a[m, k] * W[n, k] + bias[n]``, fp32 accumulation.

    ``a`` is a contiguous (M, K) matrix, ``out`` a contiguous (M, N) matrix in its own
    dtype; ``W[n, k]`` is read at ``w_ptr + n*stride_wn + k*stride_wk`` (so the same
    kernel computes ``x @ Wd^T`` with Wd (N, K) and ``dy @ Wu`` with Wu (K, N)).
    ``ZERO_CLS`` writes zeros on [CLS] rows (``m % TOK == 0``). ``COLSUM``: the programs
    of the first column tile also write the fp32 column sums of the ``a`` rows they read
    (patch rows only with ``ZERO_CLS``) to ``colsum[row tile, k]`` -- a bias gradient
    folded into the pass that reads those rows anyway.
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``, tile order from :func:`_tile_ids`.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    patch = m_ok & (rm % TOK != 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if COLSUM:
            if pid_n == 0:
                keep = patch if ZERO_CLS else m_ok
                s = tl.sum(tl.where(keep[:, None], a.to(tl.float32), 0.0), axis=0)
                tl.store(colsum_ptr + pid_m * K + kk, s, mask=k_ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ZERO_CLS:
        acc = tl.where(patch[:, None], acc, 0.0)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "HAS_RES", "A_TAPS", "O_TAPS"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _up_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ataps_ptr, atbias_ptr, otaps_ptr, otbias_ptr,
               M, K, N, TOK, T, GROUP, scale, stride_wn, stride_wk,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, A_TAPS: tl.constexpr, O_TAPS: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
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
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``, tile order from :func:`_tile_ids`.
    """
    scale = tl.cast(scale, tl.float32)
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    t = (rm // TOK) % T
    patch = m_ok & (rm % TOK != 0)
    has_prev = patch & (t > 0)
    has_next = patch & (t < T - 1)
    local = tl.arange(0, BLOCK_M)
    a_tile = a_ptr + pid_m * BLOCK_M * K  # 64-bit base of this row tile in the bottleneck
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if A_TAPS:
            w0 = tl.load(ataps_ptr + kk * 3 + 0, mask=k_ok, other=0.0).to(tl.float32)
            w1 = tl.load(ataps_ptr + kk * 3 + 1, mask=k_ok, other=0.0).to(tl.float32)
            w2 = tl.load(ataps_ptr + kk * 3 + 2, mask=k_ok, other=0.0).to(tl.float32)
            bt = tl.load(atbias_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            mixed = a.to(tl.float32) * w1[None, :] + bt[None, :]
            # neighbour rows: 32-bit offsets from this tile's first row (fewer registers)
            nb = a_tile + k0 + (local[:, None] * K + rk[None, :])
            ap = tl.load(nb - TOK * K, mask=has_prev[:, None] & k_ok[None, :], other=0.0)
            mixed += ap.to(tl.float32) * w0[None, :]
            an = tl.load(nb + TOK * K, mask=has_next[:, None] & k_ok[None, :], other=0.0)
            mixed += an.to(tl.float32) * w2[None, :]
            a = tl.where(patch[:, None] & k_ok[None, :], mixed, 0.0).to(a_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if O_TAPS:
        # one neighbour tile at a time, so at most two (rows, cols) fp32 tiles are live
        c = rn // GROUP
        ob = tl.load(otbias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(patch[:, None], ob[None, :], 0.0)
        o1 = tl.load(otaps_ptr + rn * 3 + 1, mask=n_ok, other=0.0).to(tl.float32)
        gather = a_tile + (local[:, None] * K + c.to(tl.int32)[None, :])
        hc = tl.load(gather, mask=patch[:, None] & n_ok[None, :], other=0.0)
        acc += hc.to(tl.float32) * o1[None, :]
        o0 = tl.load(otaps_ptr + rn * 3 + 0, mask=n_ok, other=0.0).to(tl.float32)
        hp = tl.load(gather - TOK * K, mask=has_prev[:, None] & n_ok[None, :], other=0.0)
        acc += hp.to(tl.float32) * o0[None, :]
        o2 = tl.load(otaps_ptr + rn * 3 + 2, mask=n_ok, other=0.0).to(tl.float32)
        hn = tl.load(gather + TOK * K, mask=has_next[:, None] & n_ok[None, :], other=0.0)
        acc += hn.to(tl.float32) * o2[None, :]
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
    ``j=0..2: sum_m dg[m] * h[prev/m/next]`` (tap grads), ``j=3: sum_m dg[m]`` (tap
    bias), ``j=4: sum_m dh[m]`` (down-projection bias).
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
    w0 = tl.load(taps_ptr + rr * 3 + 0, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(taps_ptr + rr * 3 + 1, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(taps_ptr + rr * 3 + 2, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    b = tl.load(tbias_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    dg = tl.load(dg_ptr + cur, mask=cur_ok, other=0.0).to(tl.float32)
    base = part_ptr + pid_m * 5 * R + rr
    tl.store(base + 3 * R, tl.sum(dg, axis=0), mask=r_ok)
    h = tl.load(h_ptr + cur, mask=cur_ok, other=0.0).to(tl.float32)
    tl.store(base + 1 * R, tl.sum(dg * h, axis=0), mask=r_ok)
    g = w1 * h + b
    hp = tl.load(h_ptr + cur - TOK * R, mask=prev_ok, other=0.0).to(tl.float32)
    tl.store(base + 0 * R, tl.sum(dg * hp, axis=0), mask=r_ok)
    g += w0 * hp
    hn = tl.load(h_ptr + cur + TOK * R, mask=next_ok, other=0.0).to(tl.float32)
    tl.store(base + 2 * R, tl.sum(dg * hn, axis=0), mask=r_ok)
    g += w2 * hn
    io_mask = m_ok[:, None] & r_ok[None, :]
    tl.store(g_ptr + cur, tl.where(cur_ok, g, 0.0).to(g_ptr.dtype.element_ty), mask=io_mask)
    dh = w1 * dg
    dh += w0 * tl.load(dg_ptr + cur + TOK * R, mask=next_ok, other=0.0).to(tl.float32)
    dh += w2 * tl.load(dg_ptr + cur - TOK * R, mask=prev_ok, other=0.0).to(tl.float32)
    dh = tl.where(cur_ok, dh, 0.0)
    dhc = dh.to(dh_ptr.dtype.element_ty)
    tl.store(dh_ptr + cur, dhc, mask=io_mask)
    tl.store(base + 4 * R, tl.sum(dhc.to(tl.float32), axis=0), mask=r_ok)


@triton.jit
def _msta_up_taps_grad_kernel(dy_ptr, hd_ptr, part_ptr, M, D, R, TOK, T, GROUP,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weight gradient of MSTA's grouped temporal up-projection, partial over row tiles.

    ``part[pid_m, j, o] = sum_{patch m in tile} dy[m, o] * hd[m -TOK / m / m+TOK, o // GROUP]``
    for ``j = 0, 1, 2`` (zero-padded ends); ``dy`` (M, D), ``hd`` (M, R) contiguous.
    Grid: ``(cdiv(M, BLOCK_M), cdiv(D, BLOCK_N))``.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < D
    t = (rm // TOK) % T
    patch = m_ok & (rm % TOK != 0)
    c = rn // GROUP
    cur_ok = patch[:, None] & n_ok[None, :]
    g = tl.load(dy_ptr + rm[:, None] * D + rn[None, :], mask=cur_ok, other=0.0).to(tl.float32)
    base = part_ptr + pid_m * 3 * D + rn
    hc = tl.load(hd_ptr + rm[:, None] * R + c[None, :], mask=cur_ok, other=0.0).to(tl.float32)
    tl.store(base + 1 * D, tl.sum(g * hc, axis=0), mask=n_ok)
    hp = tl.load(hd_ptr + (rm - TOK)[:, None] * R + c[None, :], mask=(patch & (t > 0))[:, None] & n_ok[None, :],
                 other=0.0).to(tl.float32)
    tl.store(base + 0 * D, tl.sum(g * hp, axis=0), mask=n_ok)
    hn = tl.load(hd_ptr + (rm + TOK)[:, None] * R + c[None, :],
                 mask=(patch & (t < T - 1))[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(base + 2 * D, tl.sum(g * hn, axis=0), mask=n_ok)


@triton.jit
def _rows_times(src_ptr, K, w_ptr, stride_wn, stride_wk, rm, m_ok, rn, n_ok, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``src[rm, :] @ W[:, rn]`` in fp32 for the contiguous (M, K) matrix ``src`` and
    ``W[k, n]`` at ``w_ptr + n*stride_wn + k*stride_wk``, in BLOCK_K steps over K.

    The MSTA bottleneck kernels call it once per BLOCK_N-wide column block of each of
    their GEMMs, so one (BLOCK_M, BLOCK_N) fp32 accumulator is live at a time whatever
    r is. When ``src`` holds rows this program has just written (h1, dz2), the caller
    puts a barrier in between; they are re-read from L2.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(src_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _msta_bottleneck_rows(u_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, seed_ptr, h1_ptr, hd_ptr, rm, m_ok, D, R, p_drop,
                          HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """The MSTA bottleneck of rows ``rm``: ``h1 = relu(u @ Wd^T + bd)`` to ``h1``, then
    ``hd = dropout(relu(h1 @ Ws^T + bs))`` to ``hd``, both (M, R), column block by column
    block. ``h1_ptr`` may equal ``hd_ptr`` when R <= BLOCK_N (one block: every slice of
    h1 is read before hd is written). Dropout keeps ``(m, c)`` when
    ``tl.rand(seed, m*R + c) >= p`` and scales kept values by ``1/(1-p)``.
    """
    for n0 in range(0, R, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < R
        acc = _rows_times(u_ptr, D, wd_ptr, D, 1, rm, m_ok, rn, n_ok, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        h1 = tl.maximum(acc + tl.load(bd_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        tl.store(h1_ptr + rm[:, None] * R + rn[None, :], h1.to(h1_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    tl.debug_barrier()  # h1 of all columns is written before it is read back
    for n0 in range(0, R, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < R
        z2 = _rows_times(h1_ptr, R, ws_ptr, R, 1, rm, m_ok, rn, n_ok, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_C)
        h2 = tl.maximum(z2 + tl.load(bs_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            keep = tl.rand(seed, (rm[:, None] * R + rn[None, :]).to(tl.int32)) >= p_drop
            h2 = tl.where(keep, h2 / (1.0 - p_drop), 0.0)
        tl.debug_barrier()  # with h1 in hd: every slice of h1 is read before hd is written
        tl.store(hd_ptr + rm[:, None] * R + rn[None, :], h2.to(hd_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _msta_bottleneck_fwd_kernel(u_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, seed_ptr, h1_ptr, hd_ptr, M, D, R, p_drop,
                                HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """MSTA bottleneck ``hd = dropout(relu(relu(u @ Wd^T + bd) @ Ws^T + bs))``.

    ``u`` contiguous (M, D), ``Wd`` (R, D), ``Ws`` (R, R), ``hd`` (M, R); ``h1`` (M, R) is
    scratch for the shared GEMM's input (``hd`` itself when R <= BLOCK_N). One program
    owns BLOCK_M rows and walks the bottleneck in BLOCK_N-wide column blocks
    (:func:`_msta_bottleneck_rows`). Grid: ``(cdiv(M, BLOCK_M),)``.
    """
    p_drop = tl.cast(p_drop, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    _msta_bottleneck_rows(u_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, seed_ptr, h1_ptr, hd_ptr, rm, rm < M, D, R, p_drop,
                          HAS_DROPOUT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C)


@triton.jit
def _msta_bottleneck_bwd_kernel(u_ptr, dy_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, wt_ptr, seed_ptr,
                                hd_ptr, h1_ptr, dz2_ptr, dz1_ptr, part_ptr, M, D, R, TOK, T, GROUP, p_drop,
                                HAS_DROPOUT: tl.constexpr, O_TAPS: tl.constexpr, DOT_PREC: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_G: tl.constexpr):
    """MSTA bottleneck backward with the forward bottleneck recomputed on chip.

    Inputs: ``u`` and ``dy = dA`` contiguous (M, D) (the gradient scaling has already
    cancelled: weights see ``dA = dy``), ``Wd`` (R, D), ``Ws`` (R, R), ``Wu`` (D, R),
    ``w_tconv`` (D, 3). Steps, each GEMM one BLOCK_N-wide column block at a time (one
    fp32 accumulator live):

    1. ``h1 = relu(u Wd^T + bd)``, ``hd = dropout(relu(h1 Ws^T + bs))`` to ``h1``/``hd``
       (:func:`_msta_bottleneck_rows`, the forward's code and mask).
    2. dA's column sums; with ``O_TAPS`` also the grouped temporal up-projection's
       transpose on patch rows, ``up_t^T(dA)[m, c] = sum_{o // GROUP == c} wt[o,0] dA[next, o]
       + wt[o,1] dA[m, o] + wt[o,2] dA[prev, o]``: (rows, BLOCK_CT channels, BLOCK_G group
       members) tiles summed over the member axis (``tl.sum``, no GEMM), into ``dz2`` as
       scratch.
    3. ``dhd = dA Wu (+ step 2)``; ``dz2 = dhd * keep/(1-p) * [h2 > 0]``, read as
       ``[hd > 0]`` from the stored ``hd`` (a kept positive value is non-zero).
    4. ``dz1 = (dz2 Ws) * [h1 > 0]`` with the stored (rounded) h1, as eager autograd does.

    Writes ``hd`` (for dWu), ``h1`` and ``dz2`` (for dWs), ``dz1`` (for dWd and du), all
    (M, R), and this row tile's fp32 column sums into ``part[pid_m]``, a row of
    ``2D + 2R`` floats: ``[0, D)`` sum of dA over all rows (up bias), ``[D, 2D)`` over
    patch rows (temporal up-projection bias, with ``O_TAPS``), ``[2D, 2D+R)`` sum of
    dz2 (shared bias), ``[2D+R, 2D+2R)`` sum of dz1 (down bias).
    Grid: ``(cdiv(M, BLOCK_M),)``.
    """
    p_drop = tl.cast(p_drop, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    part = part_ptr + pid_m * (2 * D + 2 * R)
    _msta_bottleneck_rows(u_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, seed_ptr, h1_ptr, hd_ptr, rm, m_ok, D, R, p_drop,
                          HAS_DROPOUT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C)
    # dA's column sums (and with O_TAPS the temporal group sums), in a pass of their own
    # so the GEMM loop below streams dA straight into shared memory
    tile = pid_m * BLOCK_M * D  # 64-bit offset of this row tile; offsets below are 32-bit
    local = tl.arange(0, BLOCK_M)
    if O_TAPS:
        t = (rm // TOK) % T
        patch = m_ok & (rm % TOK != 0)
        has_prev = (patch & (t > 0))[:, None, None]
        has_next = (patch & (t < T - 1))[:, None, None]
        rows = (local * D)[:, None, None]
        for c0 in range(0, R, BLOCK_CT):
            ch = c0 + tl.arange(0, BLOCK_CT)
            c_ok = ch < R
            tsum = tl.zeros((BLOCK_M, BLOCK_CT), dtype=tl.float32)
            for g0 in range(0, GROUP, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                o = ch[:, None] * GROUP + g[None, :]  # (channel, member) -> output column
                o_ok = c_ok[:, None] & (g < GROUP)[None, :]
                o3_ok = o_ok[None, :, :]
                nb = dy_ptr + tile + (rows + o[None, :, :])
                ga = tl.load(nb, mask=m_ok[:, None, None] & o3_ok, other=0.0).to(tl.float32)
                tl.store(part + o, tl.sum(ga, axis=0), mask=o_ok)
                gc = tl.where(patch[:, None, None], ga, 0.0)
                tl.store(part + D + o, tl.sum(gc, axis=0), mask=o_ok)
                q = gc * tl.load(wt_ptr + o * 3 + 1, mask=o_ok, other=0.0).to(tl.float32)[None, :, :]
                gn = tl.load(nb + TOK * D, mask=has_next & o3_ok, other=0.0).to(tl.float32)
                q += gn * tl.load(wt_ptr + o * 3 + 0, mask=o_ok, other=0.0).to(tl.float32)[None, :, :]
                gp = tl.load(nb - TOK * D, mask=has_prev & o3_ok, other=0.0).to(tl.float32)
                q += gp * tl.load(wt_ptr + o * 3 + 2, mask=o_ok, other=0.0).to(tl.float32)[None, :, :]
                tsum += tl.sum(q, axis=2)
            tl.store(dz2_ptr + rm[:, None] * R + ch[None, :], tsum.to(dz2_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & c_ok[None, :])
    else:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < D
            g = tl.load(dy_ptr + tile + (local[:, None] * D + kk[None, :]), mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            tl.store(part + kk, tl.sum(g.to(tl.float32), axis=0), mask=k_ok)
    tl.debug_barrier()  # hd (and the tap sums in dz2) are written before they are read back
    for n0 in range(0, R, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < R
        io = m_ok[:, None] & n_ok[None, :]
        out = rm[:, None] * R + rn[None, :]
        acc = _rows_times(dy_ptr, D, wu_ptr, 1, R, rm, m_ok, rn, n_ok, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        if O_TAPS:
            acc += tl.load(dz2_ptr + out, mask=io, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            acc = acc / (1.0 - p_drop)
        hd = tl.load(hd_ptr + out, mask=io, other=0.0)
        dz2c = tl.where(hd > 0.0, acc, 0.0).to(dz2_ptr.dtype.element_ty)
        tl.debug_barrier()  # every thread has read its tap sums before dz2 overwrites them
        tl.store(dz2_ptr + out, dz2c, mask=io)
        tl.store(part + 2 * D + rn, tl.sum(dz2c.to(tl.float32), axis=0), mask=n_ok)
    tl.debug_barrier()  # dz2 of all columns is written before it is read back
    for n0 in range(0, R, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < R
        io = m_ok[:, None] & n_ok[None, :]
        out = rm[:, None] * R + rn[None, :]
        dh1 = _rows_times(dz2_ptr, R, ws_ptr, 1, R, rm, m_ok, rn, n_ok, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_C)
        h1s = tl.load(h1_ptr + out, mask=io, other=0.0)
        dz1c = tl.where(h1s > 0.0, dh1, 0.0).to(dz1_ptr.dtype.element_ty)
        tl.store(dz1_ptr + out, dz1c, mask=io)
        tl.store(part + 2 * D + R + rn, tl.sum(dz1c.to(tl.float32), axis=0), mask=n_ok)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, R, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[m, c] = tl.rand(seed, m*R + c) >= p`` as 0/1 floats, the MSTA dropout rule.
    Grid: ``(cdiv(M, BLOCK_M), cdiv(R, BLOCK_N))``."""
    p_drop = tl.cast(p_drop, tl.float32)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(seed_ptr)
    keep = tl.rand(seed, (rm[:, None] * R + rn[None, :]).to(tl.int32)) >= p_drop
    tl.store(out_ptr + rm[:, None] * R + rn[None, :], tl.where(keep, 1.0, 0.0),
             mask=(rm < M)[:, None] & (rn < R)[None, :])


# --------------------------------------------------------------------- host launchers


def _gemm_grid(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731


def _linear(a, w, bias, out, *, n, stride_wn, stride_wk, tok=1, zero_cls=False, colsum=None):
    """``out = a @ W^T (+ bias)``; with ``colsum`` returns the fp32 column sums of ``a``
    (patch rows only with ``zero_cls``)."""
    m, k = a.shape
    part = None
    if colsum:
        # one row of partial sums per row tile of the smallest BLOCK_M any config uses
        part = torch.zeros((triton.cdiv(m, _min_block_m()), k), device=a.device, dtype=torch.float32)
    _linear_kernel[_gemm_grid(m, n)](a, w, bias if bias is not None else w, out, part if part is not None else out,
                                     m, k, n, tok, stride_wn, stride_wk, HAS_BIAS=bias is not None,
                                     ZERO_CLS=zero_cls, COLSUM=bool(colsum), DOT_PREC=dot_precision(a.dtype))
    return part.sum(0) if part is not None else None


def _min_block_m():
    return min(c.kwargs["BLOCK_M"] for c in _gemm_configs())


def _up(a, w, bias, res, out, *, n, stride_wn, stride_wk, tok=1, frames=1, scale=1.0,
        a_taps=None, o_taps=None, group=1):
    m, k = a.shape
    at = a_taps if a_taps is not None else (w, w)
    ot = o_taps if o_taps is not None else (w, w)
    _up_kernel[_gemm_grid(m, n)](a, w, bias if bias is not None else w, res if res is not None else out, out,
                                 at[0], at[1], ot[0], ot[1], m, k, n, tok, frames, group, float(scale), stride_wn,
                                 stride_wk, HAS_BIAS=bias is not None, HAS_RES=res is not None,
                                 A_TAPS=a_taps is not None, O_TAPS=o_taps is not None, DOT_PREC=dot_precision(a.dtype))
    return out


def _wgrad(a, b):
    """``a^T @ b`` in fp32 through the BLAS library (cuBLAS on the GPU), fp32 output
    from 16-bit inputs without a 16-bit intermediate."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a.t(), b, out_dtype=torch.float32)
    return torch.mm(a.t().float(), b.float())  # fp32, or the CPU (interpreter) path


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
    with device_guard(x):
        _linear(x2, w_down, b_down, h, n=r, stride_wn=d, stride_wk=1)
        _up(h, w_up, b_up, x2, y.view(-1, d), n=d, stride_wn=r, stride_wk=1, tok=tok, frames=num_frames,
            a_taps=(w_conv, b_conv))
    return y


def _st_backward(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames, needs):
    """Gradients of (x, w_down, b_down, w_conv, b_conv, w_up, b_up); the ones whose
    ``needs`` entry is False are returned empty and not computed."""
    dy, x, w_down, b_down, w_conv, b_conv, w_up = (t.contiguous() for t in
                                                    (dy, x, w_down, b_down, w_conv, b_conv, w_up))
    bt, tok, d = x.shape
    r = w_down.shape[0]
    shapes = [x.shape, w_down.shape, b_down.shape, w_conv.shape, b_conv.shape, w_up.shape, (d,)]
    if x.numel() == 0:
        return [torch.zeros(s, device=x.device, dtype=x.dtype) if n else x.new_empty((0,))
                for s, n in zip(shapes, needs)]
    x2, dy2 = x.view(-1, d), dy.view(-1, d)
    m = x2.shape[0]
    out = [x.new_empty((0,)) for _ in shapes]
    with device_guard(x):
        h = torch.empty((m, r), device=x.device, dtype=x.dtype)
        dg = torch.empty_like(h)
        _linear(x2, w_down, b_down, h, n=r, stride_wn=d, stride_wk=1)
        d_bup = _linear(dy2, w_up, None, dg, n=r, stride_wn=1, stride_wk=r, tok=tok, zero_cls=True, colsum=True)
        g = torch.empty_like(h)
        dh = torch.empty_like(h)
        c = _taps_cfg()
        bm, br = c["BLOCK_M"], c["BLOCK_R"]
        part = torch.empty((triton.cdiv(m, bm), 5, r), device=x.device, dtype=torch.float32)
        _st_taps_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(r, br))](
            h, dg, w_conv, b_conv, g, dh, part, m, r, tok, num_frames, BLOCK_M=bm, BLOCK_R=br,
            num_warps=c["num_warps"], num_stages=c["num_stages"])
        del h, dg
        sums = part.sum(0)
        if needs[5]:
            out[5] = _wgrad(dy2, g).to(w_up.dtype)
        del g
        if needs[1]:
            out[1] = _wgrad(dh, x2).to(w_down.dtype)
        if needs[0]:
            dx = torch.empty((bt, tok, d), device=x.device, dtype=x.dtype)
            _up(dh, w_down, None, dy2, dx.view(-1, d), n=d, stride_wn=1, stride_wk=d)
            out[0] = dx
    if needs[2]:
        out[2] = sums[4].to(b_down.dtype, copy=True)
    if needs[3]:
        out[3] = sums[:3].t().to(w_conv.dtype, memory_format=torch.contiguous_format, copy=True)
    if needs[4]:
        out[4] = sums[3].to(b_conv.dtype, copy=True)
    if needs[6]:
        out[6] = d_bup.to(w_up.dtype)
    return out


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
    c = _msta_cfg(r, u.dtype)
    # h1 passes through hd when one column block holds all of r, else through a scratch
    h1 = hd if r <= c["BLOCK_N"] else torch.empty_like(hd)
    with device_guard(u):
        _msta_bottleneck_fwd_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
            u2, w_down, b_down, w_shared, b_shared, seed, h1, hd, m, d, r, float(dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, DOT_PREC=dot_precision(u.dtype), **c)
        _up(hd, w_up, b_up, None, out.view(-1, d), n=d, stride_wn=r, stride_wk=1, tok=tok,
            frames=num_frames if vision else 1, scale=scale, o_taps=(w_tconv, b_tconv) if vision else None,
            group=d // r if vision else 1)
    return out


def _msta_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames,
                   dropout_p, needs):
    """Gradients of (u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv);
    the ones whose ``needs`` entry is False (and the temporal ones for text) come back empty."""
    dy, u, w_down, b_down, w_shared, b_shared, w_up, seed = (
        t.contiguous() for t in (dy, u, w_down, b_down, w_shared, b_shared, w_up, seed))
    vision = w_tconv is not None
    if vision:
        w_tconv = w_tconv.contiguous()
    else:
        needs = list(needs[:7]) + [False, False]
    bt, tok, d = u.shape
    r = w_down.shape[0]
    dev = u.device
    shapes = [u.shape, w_down.shape, b_down.shape, w_shared.shape, b_shared.shape, w_up.shape, (d,), (d, 3), (d,)]
    if u.numel() == 0:
        return [torch.zeros(s, device=dev, dtype=u.dtype) if n else u.new_empty((0,)) for s, n in zip(shapes, needs)]
    u2, dy2 = u.view(-1, d), dy.view(-1, d)
    m = u2.shape[0]
    group = d // r if vision else 1
    frames = num_frames if vision else 1
    out = [u.new_empty((0,)) for _ in shapes]
    with device_guard(u):
        hd = torch.empty((m, r), device=dev, dtype=u.dtype)
        h1, dz2, dz1 = torch.empty_like(hd), torch.empty_like(hd), torch.empty_like(hd)
        c = _msta_cfg(r, u.dtype, bwd=True)
        tiles = triton.cdiv(m, c["BLOCK_M"])
        part = torch.empty((tiles, 2 * d + 2 * r), device=dev, dtype=torch.float32)
        _msta_bottleneck_bwd_kernel[(tiles,)](
            u2, dy2, w_down, b_down, w_shared, b_shared, w_up, w_tconv if vision else w_up, seed,
            hd, h1, dz2, dz1, part, m, d, r, tok, frames, group, float(dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, O_TAPS=vision, DOT_PREC=dot_precision(u.dtype), **c)
        sums = part.sum(0)
        if needs[7]:
            tc = _taps_cfg()
            bm, bn = tc["BLOCK_M"], 2 * tc["BLOCK_R"]
            tpart = torch.empty((triton.cdiv(m, bm), 3, d), device=dev, dtype=torch.float32)
            _msta_up_taps_grad_kernel[(triton.cdiv(m, bm), triton.cdiv(d, bn))](
                dy2, hd, tpart, m, d, r, tok, frames, group, BLOCK_M=bm, BLOCK_N=bn, num_warps=tc["num_warps"],
                num_stages=tc["num_stages"])
            out[7] = tpart.sum(0).t().contiguous().to(w_tconv.dtype)
        if needs[5]:
            out[5] = _wgrad(dy2, hd).to(w_up.dtype)
        del hd
        if needs[3]:
            out[3] = _wgrad(dz2, h1).to(w_shared.dtype)
        del dz2, h1
        if needs[1]:
            out[1] = _wgrad(dz1, u2).to(w_down.dtype)
        if needs[0]:
            du = torch.empty((bt, tok, d), device=dev, dtype=u.dtype)
            _up(dz1, w_down, None, None, du.view(-1, d), n=d, stride_wn=1, stride_wk=d, scale=scale)
            out[0] = du
    if needs[6]:
        out[6] = sums[:d].to(w_up.dtype, copy=True)
    if needs[8]:
        out[8] = sums[d:2 * d].to(w_tconv.dtype, copy=True)
    if needs[4]:
        out[4] = sums[2 * d:2 * d + r].to(b_shared.dtype, copy=True)
    if needs[2]:
        out[2] = sums[2 * d + r:].to(b_down.dtype, copy=True)
    return out


# ----------------------------------------------------------- sm_90 compile variants


def _as_config(cfg):
    """A launch-config dict (constexprs + num_warps/num_stages) as a ``triton.Config``."""
    consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(consts, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1))


def sm90_variants(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Every GPU launch of this module's kernels, for :mod:`vpeft_kernels.sm90_check`:
    the constexpr specialisations the launchers above use, in fp32, fp16 and bf16, at
    each config the launcher or the autotuner (after :func:`_prune_gemm`) may pick."""
    from types import SimpleNamespace
    from .sm90_check import expand, ptr
    out = []
    i32 = "i32"
    for dtype in dtypes:
        p, f32, prec, name = ptr(dtype), ptr(torch.float32), dot_precision(dtype), str(dtype).replace("torch.", "")
        fake = {"a_ptr": SimpleNamespace(dtype=dtype)}
        lin_types = dict(a_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, colsum_ptr=f32, M=i32, K=i32, N=i32, TOK=i32,
                         stride_wn=i32, stride_wk=i32)
        for bias, zero, colsum in ((True, False, False), (False, True, True)):
            flags = dict(HAS_BIAS=bias, ZERO_CLS=zero, COLSUM=colsum)
            out += expand(f"_linear_kernel[{name},{flags}]", _linear_kernel, lin_types,
                          dict(flags, DOT_PREC=prec), _prune_gemm(_linear_kernel.configs, fake, **flags),
                          aligned=("a_ptr", "w_ptr", "out_ptr", "K", "N"))
        up_types = dict(a_ptr=p, w_ptr=p, bias_ptr=p, res_ptr=p, out_ptr=p, ataps_ptr=p, atbias_ptr=p, otaps_ptr=p,
                        otbias_ptr=p, M=i32, K=i32, N=i32, TOK=i32, T=i32, GROUP=i32, scale="fp32",
                        stride_wn=i32, stride_wk=i32)
        # ST fwd, ST dx, MSTA vision fwd, MSTA text fwd, MSTA du
        for bias, res, at, ot in ((True, True, True, False), (False, True, False, False),
                                  (True, False, False, True), (True, False, False, False),
                                  (False, False, False, False)):
            flags = dict(HAS_BIAS=bias, HAS_RES=res, A_TAPS=at, O_TAPS=ot)
            out += expand(f"_up_kernel[{name},{flags}]", _up_kernel, up_types, dict(flags, DOT_PREC=prec),
                          _prune_gemm(_up_kernel.configs, fake, **flags),
                          aligned=("a_ptr", "w_ptr", "res_ptr", "out_ptr", "K", "N"))
        tc = _taps_cfg()
        cfg = triton.Config({k: tc[k] for k in ("BLOCK_M", "BLOCK_R")}, num_warps=tc["num_warps"],
                            num_stages=tc["num_stages"])
        out += expand(f"_st_taps_bwd_kernel[{name}]", _st_taps_bwd_kernel,
                      dict(h_ptr=p, dg_ptr=p, taps_ptr=p, tbias_ptr=p, g_ptr=p, dh_ptr=p, part_ptr=f32, M=i32,
                           R=i32, TOK=i32, T=i32), {}, [cfg], aligned=("h_ptr", "dg_ptr", "g_ptr", "dh_ptr", "R"))
        cfg = triton.Config(dict(BLOCK_M=tc["BLOCK_M"], BLOCK_N=2 * tc["BLOCK_R"]), num_warps=tc["num_warps"],
                            num_stages=tc["num_stages"])
        out += expand(f"_msta_up_taps_grad_kernel[{name}]", _msta_up_taps_grad_kernel,
                      dict(dy_ptr=p, hd_ptr=p, part_ptr=f32, M=i32, D=i32, R=i32, TOK=i32, T=i32, GROUP=i32),
                      {}, [cfg], aligned=("dy_ptr", "hd_ptr", "D"))
        if dtype == dtypes[0]:  # the keep-mask kernel (dropout_keep_mask) writes fp32 whatever the dtype
            out += expand("_keep_mask_kernel", _keep_mask_kernel,
                          dict(seed_ptr=ptr(torch.int64), out_ptr=f32, M=i32, R=i32, p_drop="fp32"), {},
                          [_as_config(_KEEP_MASK_CFG)], aligned=("out_ptr",))
        # MSTA bottleneck kernels at every column block width _msta_cfg gives (all r)
        for drop in (False, True):
            for bn in _msta_block_ns(dtype, bwd=False):
                out += expand(f"_msta_bottleneck_fwd_kernel[{name},dropout={drop}]", _msta_bottleneck_fwd_kernel,
                              dict(u_ptr=p, wd_ptr=p, bd_ptr=p, ws_ptr=p, bs_ptr=p, seed_ptr=ptr(torch.int64),
                                   h1_ptr=p, hd_ptr=p, M=i32, D=i32, R=i32, p_drop="fp32"),
                              dict(HAS_DROPOUT=drop, DOT_PREC=prec), [_as_config(_msta_cfg(bn, dtype))],
                              aligned=("u_ptr", "wd_ptr", "D"))
            for bn in _msta_block_ns(dtype, bwd=True):
                for taps in (False, True):
                    out += expand(f"_msta_bottleneck_bwd_kernel[{name},dropout={drop},o_taps={taps}]",
                                  _msta_bottleneck_bwd_kernel,
                                  dict(u_ptr=p, dy_ptr=p, wd_ptr=p, bd_ptr=p, ws_ptr=p, bs_ptr=p, wu_ptr=p, wt_ptr=p,
                                       seed_ptr=ptr(torch.int64), hd_ptr=p, h1_ptr=p, dz2_ptr=p, dz1_ptr=p,
                                       part_ptr=f32, M=i32, D=i32, R=i32, TOK=i32, T=i32, GROUP=i32, p_drop="fp32"),
                                  dict(HAS_DROPOUT=drop, O_TAPS=taps, DOT_PREC=prec),
                                  [_as_config(_msta_cfg(bn, dtype, bwd=True))],
                                  aligned=("u_ptr", "dy_ptr", "wd_ptr", "wu_ptr", "D"))
    return out


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
                       w_up: Tensor, num_frames: int, needs: List[bool]) -> List[Tensor]:
    """Gradients of (x, w_down, b_down, w_conv, b_conv, w_up, b_up); an entry whose
    ``needs`` flag is False is an empty tensor and is not computed."""
    return _st_backward(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames, needs)


@_st_adapter_bwd_op.register_fake
def _(dy, x, w_down, b_down, w_conv, b_conv, w_up, num_frames, needs):
    shapes = [x.shape, w_down.shape, b_down.shape, w_conv.shape, b_conv.shape, w_up.shape, (w_up.shape[0],)]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _st_setup_context(ctx, inputs, output):
    x, w_down, b_down, w_conv, b_conv, w_up, b_up, num_frames = inputs
    ctx.save_for_backward(x, w_down, b_down, w_conv, b_conv, w_up)
    ctx.num_frames = num_frames


def _st_autograd_backward(ctx, dy):
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = torch.ops.vpeft.st_adapter_backward(dy, *ctx.saved_tensors, ctx.num_frames, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], None)


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
                         num_frames: int, dropout_p: float, needs: List[bool]) -> List[Tensor]:
    """Gradients of (u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv);
    an entry whose ``needs`` flag is False (and the temporal pair for text) is empty."""
    return _msta_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames,
                          dropout_p, needs)


@_msta_adapter_bwd_op.register_fake
def _(dy, u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed, scale, num_frames, dropout_p, needs):
    d = u.shape[-1]
    vision = w_tconv is not None
    shapes = [u.shape, w_down.shape, b_down.shape, w_shared.shape, b_shared.shape, w_up.shape, (d,), (d, 3), (d,)]
    flags = list(needs[:7]) + ([needs[7], needs[8]] if vision else [False, False])
    return [u.new_empty(s if n else (0,)) for s, n in zip(shapes, flags)]


def _msta_setup_context(ctx, inputs, output):
    u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv, seed, scale, num_frames, dropout_p = inputs
    ctx.vision = w_tconv is not None
    ctx.save_for_backward(u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed)
    ctx.args = (scale, num_frames, dropout_p)


def _msta_autograd_backward(ctx, dy):
    u, w_down, b_down, w_shared, b_shared, w_up, w_tconv, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:9]]
    if not ctx.vision:
        needs[7] = needs[8] = False
    g = torch.ops.vpeft.msta_adapter_backward(dy, u, w_down, b_down, w_shared, b_shared, w_up,
                                              w_tconv if ctx.vision else None, seed, *ctx.args, needs)
    return (*[t if n else None for t, n in zip(g, needs)], None, None, None, None)


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
    c = _KEEP_MASK_CFG
    with device_guard(seed):
        _keep_mask_kernel[(triton.cdiv(rows, c["BLOCK_M"]), triton.cdiv(r, c["BLOCK_N"]))](
            seed, keep, rows, r, float(p), **c)
    return keep.bool()


# ------------------------------------------------------------ backend registration


def _st_reasons(x, w_down, b_down, w_conv, b_conv, w_up, b_up, *, num_frames) -> List[str]:
    return common_reasons((x, w_down, b_down, w_conv, b_conv, w_up, b_up))


def _msta_reasons(u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv=None, b_tconv=None, *, scale,
                  num_frames=None, dropout_p=0.0, layout="bt") -> List[str]:
    why = common_reasons((u, w_down, b_down, w_shared, b_shared, w_up, b_up, w_tconv, b_tconv))
    if layout != "bt" and w_tconv is not None:
        why.append(f"layout={layout!r} (ViCLIP clip tokens) is not implemented in the Triton kernels; "
                   "they read temporal neighbours in the per-frame (b t) layout")
    return why


_backend.register("st_adapter", "triton", st_adapter_triton, reasons=_st_reasons, auto_reasons=cuda_only)
_backend.register("msta_adapter", "triton", msta_adapter_triton, reasons=_msta_reasons, auto_reasons=cuda_only)

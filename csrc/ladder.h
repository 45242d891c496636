// vpeft ladder projection: shared declarations of the compiled extension.
//
// Math (see vpeft_kernels/reference.py::ladder_projection, the numerical contract):
//   L levels, each with its own LayerNorm and Linear, on z[l] of shape (M, D):
//   norm "pre":  out[l] = LN_l(z[l]) @ W[l]^T + b[l]     LN over D, gamma/beta (L, D)
//   norm "post": out[l] = LN_l(z[l] @ W[l]^T + b[l])     LN over d, gamma/beta (L, d)
//   W (L, d, D), b (L, d), out (L, M, d). LayerNorm uses the biased variance and
//   1 / sqrt(var + eps); statistics are accumulated in at::opmath_type (fp32 for
//   fp16/bf16/fp32 inputs, fp64 for fp64 inputs): Welford per lane merged across the
//   warp on CUDA, two passes over the cache-resident row on CPU.
//
// The host flow (ladder_flow.cpp) is written once with ATen GEMMs and a few row /
// column primitives that each device implements (ladder_cpu.cpp, ladder_cuda.cu):
//   rows_forward:  per row (l, m) of src[l] (M, N): mean/rstd, and when dst is defined
//                  dst[l, m, :] = (x - mean) * rstd * gamma[l] + beta[l]
//   rows_backward: per row, given the gradient g wrt the LayerNorm output,
//                  dx = rstd * (a - mean_j(a) - xhat * mean_j(a * xhat)), a = g * gamma[l]
//   fold_epilogue: in place on out (L', M, N): out = rstd * (out - mean * s[l]) + c[l]
//                  (s, c (L', N) in opmath): the pre-norm forward's LayerNorm, applied
//                  after the GEMM (see ladder_flow.cpp)
//   scale_rows:    dst = rstd * g (rounded to g's dtype), and the column sums
//                  sums[l, 0, j] = sum_m g[l, m, j], sums[l, 1, j] = sum_m mean * dst
//   post_backward: rows_backward of the post-norm LayerNorm (dst may alias src) and, in
//                  the same pass, sums[l, 0, j] = sum_m g * xhat (dgamma),
//                  sums[l, 1, j] = sum_m g (dbeta), sums[l, 2, j] = sum_m dx (db, of the
//                  rounded dx that the weight gradient GEMMs read)
//   mm_acc:        out (opmath dtype) = a @ b, accumulated and written in opmath (cuBLAS
//                  fp32 output on CUDA; operands upcast on CPU)
// Column sums are fixed-order partial sums over row chunks, then one ATen sum:
// deterministic, no atomics.
// The ops take z as L contiguous tensors (..., D) of one shape, M = their row count.
// src is a list of L contiguous (M, N) tensors (the caller's level tensors, read in
// place, never stacked); dst and g are stacked (L, M, N). dst may alias src (post
// norm, in place over the GEMM output) or g (rows_backward in place): every
// primitive reads element j of a row before it writes element j of the same row.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace vpeft {

struct LadderPrims {
  void (*rows_forward)(const std::vector<at::Tensor>& src, const at::Tensor& gamma,
                       const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dst, double eps);
  void (*rows_backward)(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& dst);
  void (*fold_epilogue)(const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& s, const at::Tensor& c);
  void (*scale_rows)(const at::Tensor& grad, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& dst, const at::Tensor& sums);
  void (*post_backward)(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& dst, const at::Tensor& sums);
  void (*mm_acc)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
};

// Returns (out (L, M, d), mean (L, M), rstd (L, M)); statistics in opmath dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ladder_forward(
    const LadderPrims& prims, at::TensorList z, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_proj, const at::Tensor& b_proj, bool post,
    double eps);

// Returns (grad_z (L, M, D), rows in z's order, or an empty tensor when input_grad is false,
//          grad_ln_weight, grad_ln_bias, grad_w_proj, grad_b_proj).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ladder_backward(
    const LadderPrims& prims, const at::Tensor& grad_out, at::TensorList z,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w_proj,
    const at::Tensor& b_proj, const at::Tensor& mean, const at::Tensor& rstd, bool post,
    double eps, bool input_grad);

// Levels per kernel launch on CUDA (their base pointers travel as a kernel argument).
constexpr int kMaxLevelsPerLaunch = 64;

}  // namespace vpeft

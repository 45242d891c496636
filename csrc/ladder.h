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
// The host flow (ladder_flow.cpp) is written once with ATen GEMMs (one batched GEMM
// over levels per product) and three row/column primitives that each device
// implements (ladder_cpu.cpp, ladder_cuda.cu):
//   rows_forward:  per row (l, m) of src[l] (M, N): mean/rstd (computed or given),
//                  dst[l, m, :] = (x - mean) * rstd * gamma[l] + beta[l]
//   rows_backward: per row, given the gradient g wrt the LayerNorm output,
//                  dx = rstd * (a - mean_j(a) - xhat * mean_j(a * xhat)), a = g * gamma[l]
//   cols_backward: dgamma[l, j] = sum_m g[l, m, j] * xhat[l, m, j], dbeta[l, j] = sum_m g
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
                       const at::Tensor& dst, double eps, bool compute_stats);
  void (*rows_backward)(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& dst);
  void (*cols_backward)(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dgamma,
                        const at::Tensor& dbeta);
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

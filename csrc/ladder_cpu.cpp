// CPU build of the ladder projection: the op schemas (TORCH_LIBRARY), the CPU
// row / column primitives of ladder.h (at::parallel_for over levels x rows or row
// chunks, opmath accumulation, two-pass statistics over the cache-resident row), the
// CPU registrations and the Python module vpeft_kernels._C, which records the versions
// it was built with.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "build_info.h"
#include "ladder.h"

namespace vpeft {
namespace {

template <typename T>
std::vector<const T*> level_ptrs(const std::vector<at::Tensor>& src) {
  std::vector<const T*> p(src.size());
  for (size_t l = 0; l < src.size(); ++l) p[l] = src[l].const_data_ptr<T>();
  return p;
}

// sum_{j < n} f(j) with kLanes independent partial sums (breaks the add latency chain
// and lets the compiler vectorise), combined in a fixed order.
constexpr int kLanes = 8;
template <typename acc_t, typename F>
inline acc_t row_sum(int64_t n, const F& f) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) part[k] += f(j + k);
  }
  acc_t total = 0;
  for (; j < n; ++j) total += f(j);
  for (int k = 0; k < kLanes; ++k) total += part[k];
  return total;
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

void cpu_rows_forward(const std::vector<at::Tensor>& src, const at::Tensor& gamma,
                      const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
                      const at::Tensor& dst, double eps) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xs = level_ptrs<scalar_t>(src);
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* b = beta.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    scalar_t* out = dst.defined() ? dst.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, L * M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r / M, m = r % M;
        const scalar_t* x = xs[l] + m * N;
        // Two passes over the (cache-resident) row, each with kLanes independent
        // accumulators: as robust as Welford, without its serial division chain.
        const acc_t mu = row_sum<acc_t>(N, [&](int64_t j) { return static_cast<acc_t>(x[j]); }) / static_cast<acc_t>(N);
        const acc_t var = row_sum<acc_t>(N, [&](int64_t j) {
          const acc_t c = static_cast<acc_t>(x[j]) - mu;
          return c * c;
        }) / static_cast<acc_t>(N);
        const acc_t rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        mp[r] = mu;
        rp[r] = rs;
        if (out == nullptr) continue;  // statistics only
        const scalar_t* gl = g + l * N;
        const scalar_t* bl = b + l * N;
        scalar_t* o = out + r * N;  // may alias x: element j is read before it is written
        for (int64_t j = 0; j < N; ++j) {
          o[j] = static_cast<scalar_t>((static_cast<acc_t>(x[j]) - mu) * rs * static_cast<acc_t>(gl[j]) +
                                       static_cast<acc_t>(bl[j]));
        }
      }
    });
  });
}

// LayerNorm backward of one row: o = rstd * (a - mean(a) - xhat * mean(a * xhat)),
// a = g * w. o may alias x or g. With acc (3 x N) also acc[0] += g * xhat,
// acc[1] += g, acc[2] += o (as rounded).
template <typename scalar_t, typename acc_t>
inline void ln_backward_row(const scalar_t* x, const scalar_t* gr, const scalar_t* wl, acc_t mu, acc_t rs,
                            scalar_t* o, int64_t N, acc_t* acc) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
  const acc_t sum_a = row_sum<acc_t>(N, [&](int64_t j) {
    return static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wl[j]);
  });
  const acc_t sum_ax = row_sum<acc_t>(N, [&](int64_t j) {
    return static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wl[j]) * (static_cast<acc_t>(x[j]) - mu) * rs;
  });
  const acc_t c1 = sum_a * inv_n, c2 = sum_ax * inv_n;
  for (int64_t j = 0; j < N; ++j) {
    const acc_t gv = static_cast<acc_t>(gr[j]);
    const acc_t a = gv * static_cast<acc_t>(wl[j]);
    const acc_t xh = (static_cast<acc_t>(x[j]) - mu) * rs;
    const scalar_t v = static_cast<scalar_t>(rs * (a - c1 - xh * c2));
    o[j] = v;
    if (acc != nullptr) {
      acc[j] += gv * xh;
      acc[N + j] += gv;
      acc[2 * N + j] += static_cast<acc_t>(v);
    }
  }
}

void cpu_rows_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                       const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dst) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xs = level_ptrs<scalar_t>(src);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* w = gamma.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, L * M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r / M, m = r % M;
        ln_backward_row<scalar_t, acc_t>(xs[l] + m * N, gp + r * N, w + l * N, mp[r], rp[r], out + r * N, N,
                                         nullptr);
      }
    });
  });
}

void cpu_fold_epilogue(const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& s, const at::Tensor& c) {
  const int64_t L = out.size(0), M = out.size(1), N = out.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ladder_fold_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t* cp = c.const_data_ptr<acc_t>();
    at::parallel_for(0, L * M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r / M;
        const acc_t mu = mp[r], rs = rp[r];
        const acc_t* sl = sp + l * N;
        const acc_t* cl = cp + l * N;
        scalar_t* o = op + r * N;
        for (int64_t j = 0; j < N; ++j) {
          o[j] = static_cast<scalar_t>(rs * (static_cast<acc_t>(o[j]) - mu * sl[j]) + cl[j]);
        }
      }
    });
  });
}

constexpr int64_t kColChunk = 256;  // rows per partial sum of the column reductions

// One pass over the rows of L (M, N) blocks with column sums: row(l, m, acc) handles
// row m of level l and adds into acc (nacc x N, this row chunk's partial sums). Fixed-
// order partial sums per (level, row chunk), then one sum into sums (L, nacc, N):
// deterministic.
template <typename acc_t, typename RowFn>
void rows_with_col_sums(int64_t L, int64_t M, int64_t N, int64_t nacc, const at::Tensor& sums,
                        const RowFn& row) {
  const int64_t chunks = std::max<int64_t>(1, (M + kColChunk - 1) / kColChunk);
  at::Tensor part = at::zeros({L, chunks, nacc, N}, sums.options());
  acc_t* pp = part.mutable_data_ptr<acc_t>();
  at::parallel_for(0, L * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / chunks, c = task % chunks;
      acc_t* acc = pp + task * nacc * N;
      const int64_t m_end = std::min(M, (c + 1) * kColChunk);
      for (int64_t m = c * kColChunk; m < m_end; ++m) row(l, m, acc);
    }
  });
  at::sum_out(const_cast<at::Tensor&>(sums), part, {1});
}

void cpu_scale_rows(const at::Tensor& grad, const at::Tensor& mean, const at::Tensor& rstd,
                    const at::Tensor& dst, const at::Tensor& sums) {
  const int64_t L = grad.size(0), M = grad.size(1), N = grad.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ladder_scale_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    rows_with_col_sums<acc_t>(L, M, N, 2, sums, [&](int64_t l, int64_t m, acc_t* acc) {
      const int64_t r = l * M + m;
      const acc_t mu = mp[r], rs = rp[r];
      const scalar_t* gr = gp + r * N;
      scalar_t* o = out + r * N;
      for (int64_t j = 0; j < N; ++j) {
        const acc_t gv = static_cast<acc_t>(gr[j]);
        const scalar_t v = static_cast<scalar_t>(rs * gv);
        o[j] = v;
        acc[j] += gv;
        acc[N + j] += mu * static_cast<acc_t>(v);
      }
    });
  });
}

void cpu_post_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                       const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dst, const at::Tensor& sums) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_post_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xs = level_ptrs<scalar_t>(src);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* w = gamma.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    rows_with_col_sums<acc_t>(L, M, N, 3, sums, [&](int64_t l, int64_t m, acc_t* acc) {
      const int64_t r = l * M + m;
      ln_backward_row<scalar_t, acc_t>(xs[l] + m * N, gp + r * N, w + l * N, mp[r], rp[r], out + r * N, N, acc);
    });
  });
}

// fp32 output for 16-bit operands: ATen's mm with out_dtype is CUDA-only, so the CPU
// upcasts the operands (a transient of one level).
void cpu_mm_acc(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor o = out;
  const auto acc = out.scalar_type();
  at::mm_out(o, a.scalar_type() == acc ? a : a.to(acc), b.scalar_type() == acc ? b : b.to(acc));
}

const LadderPrims kCpuPrims{cpu_rows_forward, cpu_rows_backward, cpu_fold_epilogue, cpu_scale_rows,
                            cpu_post_backward, cpu_mm_acc};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    at::TensorList z, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& w_proj, const at::Tensor& b_proj, bool post, double eps) {
  return ladder_forward(kCpuPrims, z, ln_weight, ln_bias, w_proj, b_proj, post, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, at::TensorList z, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_proj, const at::Tensor& b_proj,
    const at::Tensor& mean, const at::Tensor& rstd, bool post, double eps, bool input_grad) {
  return ladder_backward(kCpuPrims, grad_out, z, ln_weight, ln_bias, w_proj, b_proj, mean, rstd,
                         post, eps, input_grad);
}

}  // namespace
}  // namespace vpeft

// Namespace "vpeft_ext" so that the compiled ops never collide with ops that other
// parts of vpeft define from Python.
TORCH_LIBRARY(vpeft_ext, m) {
  // z: L level tensors of one shape (..., D), contiguous, M rows each; parameters
  // (L, ...) of z's dtype. The inputs are read in place (never stacked or copied).
  // Returns the projection (L, M, d) and the LayerNorm statistics mean, rstd (L, M)
  // in fp32 (fp64 for fp64 inputs).
  m.def("ladder_forward(Tensor[] z, Tensor ln_weight, Tensor ln_bias, Tensor w_proj, "
        "Tensor b_proj, bool post, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradients (z as one stacked (L, M, D) tensor, or shape (0,) when input_grad is
  // false), ln_weight, ln_bias, w_proj, b_proj.
  m.def("ladder_backward(Tensor grad_out, Tensor[] z, Tensor ln_weight, Tensor ln_bias, "
        "Tensor w_proj, Tensor b_proj, Tensor mean, Tensor rstd, bool post, float eps, "
        "bool input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vpeft_ext, CPU, m) {
  m.impl("ladder_forward", &vpeft::forward_cpu);
  m.impl("ladder_backward", &vpeft::backward_cpu);
}

// ---- Python module: build information only (the ops live in torch.ops.vpeft_ext) ----

static PyObject* vpeft_build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString(VPEFT_BUILD_INFO_JSON);
}

static PyMethodDef vpeft_methods[] = {
    {"build_info", vpeft_build_info, METH_NOARGS,
     "JSON: the torch and CUDA versions this extension was compiled against."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef vpeft_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "vpeft ladder projection, CPU kernels (ops in torch.ops.vpeft_ext)",
                                   -1, vpeft_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vpeft_module); }

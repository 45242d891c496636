// CPU build of the ladder projection: the op schemas (TORCH_LIBRARY), the CPU
// LayerNorm primitives (at::parallel_for over levels x rows, opmath accumulation,
// two-pass statistics over the cache-resident row), the CPU registrations and the
// Python module vpeft_kernels._C, which records the versions it was built with.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
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
                      const at::Tensor& dst, double eps, bool compute_stats) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xs = level_ptrs<scalar_t>(src);
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* b = beta.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, L * M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r / M, m = r % M;
        const scalar_t* x = xs[l] + m * N;
        acc_t mu, rs;
        if (compute_stats) {
          // Two passes over the (cache-resident) row, each with kLanes independent
          // accumulators: as robust as Welford, without its serial division chain.
          mu = row_sum<acc_t>(N, [&](int64_t j) { return static_cast<acc_t>(x[j]); }) / static_cast<acc_t>(N);
          const acc_t var = row_sum<acc_t>(N, [&](int64_t j) {
            const acc_t c = static_cast<acc_t>(x[j]) - mu;
            return c * c;
          }) / static_cast<acc_t>(N);
          rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
          mp[r] = mu;
          rp[r] = rs;
        } else {
          mu = mp[r];
          rs = rp[r];
        }
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
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    at::parallel_for(0, L * M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r / M, m = r % M;
        const scalar_t* x = xs[l] + m * N;
        const scalar_t* gr = gp + r * N;
        const scalar_t* wl = w + l * N;
        const acc_t mu = mp[r], rs = rp[r];
        const acc_t sum_a = row_sum<acc_t>(N, [&](int64_t j) {
          return static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wl[j]);
        });
        const acc_t sum_ax = row_sum<acc_t>(N, [&](int64_t j) {
          return static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wl[j]) * (static_cast<acc_t>(x[j]) - mu) * rs;
        });
        const acc_t c1 = sum_a * inv_n, c2 = sum_ax * inv_n;
        scalar_t* o = out + r * N;  // may alias x or the gradient rows
        for (int64_t j = 0; j < N; ++j) {
          const acc_t a = static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wl[j]);
          const acc_t xh = (static_cast<acc_t>(x[j]) - mu) * rs;
          o[j] = static_cast<scalar_t>(rs * (a - c1 - xh * c2));
        }
      }
    });
  });
}

constexpr int64_t kColChunk = 256;  // rows per partial sum of the column reductions

void cpu_cols_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                       const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dgamma,
                       const at::Tensor& dbeta) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  const int64_t chunks = std::max<int64_t>(1, (M + kColChunk - 1) / kColChunk);
  // Fixed-order partial sums per (level, row chunk), then one sum: deterministic.
  at::Tensor pg = at::empty({L, chunks, N}, dgamma.options());
  at::Tensor pb = at::empty({L, chunks, N}, dgamma.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_cols_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xs = level_ptrs<scalar_t>(src);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    acc_t* pgp = pg.mutable_data_ptr<acc_t>();
    acc_t* pbp = pb.mutable_data_ptr<acc_t>();
    at::parallel_for(0, L * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t l = task / chunks, c = task % chunks;
        acc_t* sg = pgp + task * N;
        acc_t* sb = pbp + task * N;
        std::fill(sg, sg + N, acc_t(0));
        std::fill(sb, sb + N, acc_t(0));
        const int64_t m_end = std::min(M, (c + 1) * kColChunk);
        for (int64_t m = c * kColChunk; m < m_end; ++m) {
          const scalar_t* x = xs[l] + m * N;
          const scalar_t* gr = gp + (l * M + m) * N;
          const acc_t mu = mp[l * M + m], rs = rp[l * M + m];
          for (int64_t j = 0; j < N; ++j) {
            const acc_t gv = static_cast<acc_t>(gr[j]);
            sg[j] += gv * (static_cast<acc_t>(x[j]) - mu) * rs;
            sb[j] += gv;
          }
        }
      }
    });
  });
  at::sum_out(const_cast<at::Tensor&>(dgamma), pg, {1});
  at::sum_out(const_cast<at::Tensor&>(dbeta), pb, {1});
}

const LadderPrims kCpuPrims{cpu_rows_forward, cpu_rows_backward, cpu_cols_backward};

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

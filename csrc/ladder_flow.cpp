// Host flow of the ladder projection, shared by the CPU and the CUDA builds: argument
// checks, the GEMMs (ATen bmm/baddbmm/addmm: MKL/oneDNN on CPU, cuBLAS on CUDA, with
// the bias as the GEMM's C operand), and calls into the device's LayerNorm primitives
// (see ladder.h). Pre norm: the LayerNorm kernel writes the normalised rows of all
// levels into one (L, M, D) block, so the projection is one strided batched GEMM.
// Post norm: the GEMM reads z itself: one batched GEMM when the levels are one strided
// block (a stacked z), else one GEMM per level on the caller's tensors, never a copy.
//
// Memory: the forward saves nothing itself; the autograd wrapper keeps the inputs and
// the (L, M) statistics. Pre norm: the normalised rows xhat are recomputed in the
// backward into one transient (L, M, D) buffer, reused for the input gradient; the
// parameter gradients come from one GEMM over it (see ladder_backward). Post norm: the
// GEMM output is recomputed (one more GEMM) instead of saved.
#include "ladder.h"

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace vpeft {
namespace {

struct Dims {
  int64_t L, M, D, d;
};

// The level tensors (..., D) as (M, D) views (all contiguous, of one shape).
std::vector<at::Tensor> flatten_levels(at::TensorList z) {
  TORCH_CHECK(!z.empty(), "ladder_projection: z is an empty list, expected L >= 1 levels");
  TORCH_CHECK(z[0].dim() >= 1, "ladder_projection: z[0] must be (..., D), got a 0-d tensor");
  std::vector<at::Tensor> out;
  out.reserve(z.size());
  for (size_t l = 0; l < z.size(); ++l) {
    TORCH_CHECK(z[l].sizes() == z[0].sizes(), "ladder_projection: z[", l, "] has shape ",
                z[l].sizes(), ", expected ", z[0].sizes(), " like z[0]");
    TORCH_CHECK(z[l].is_contiguous(), "ladder_projection: z[", l, "] must be contiguous");
    out.push_back(z[l].reshape({-1, z[0].size(-1)}));
  }
  return out;
}

Dims check_args(at::TensorList z, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                const at::Tensor& w_proj, const at::Tensor& b_proj, bool post) {
  TORCH_CHECK(!z.empty(), "ladder_projection: z is an empty list, expected L >= 1 levels");
  const at::Tensor& z0 = z[0];
  TORCH_CHECK(z0.dim() == 2, "ladder_projection: z[0] must be 2-D (M, D), got ", z0.sizes());
  Dims s{static_cast<int64_t>(z.size()), z0.size(0), z0.size(1), 0};
  auto st = z0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "ladder_projection: unsupported dtype ", st);
  for (int64_t l = 0; l < s.L; ++l) {
    const at::Tensor& t = z[l];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.M && t.size(1) == s.D, "ladder_projection: z[", l,
                "] has shape ", t.sizes(), ", expected (", s.M, ", ", s.D, ")");
    TORCH_CHECK(t.scalar_type() == st && t.device() == z0.device(), "ladder_projection: z[", l,
                "] has dtype/device ", t.scalar_type(), "/", t.device(), ", expected ", st, "/",
                z0.device());
    TORCH_CHECK(t.is_contiguous(), "ladder_projection: z[", l, "] must be contiguous");
  }
  TORCH_CHECK(w_proj.dim() == 3 && w_proj.size(0) == s.L && w_proj.size(2) == s.D,
              "ladder_projection: w_proj has shape ", w_proj.sizes(), ", expected (", s.L,
              ", d, ", s.D, ")");
  s.d = w_proj.size(1);
  const int64_t n_ln = post ? s.d : s.D;
  TORCH_CHECK(b_proj.dim() == 2 && b_proj.size(0) == s.L && b_proj.size(1) == s.d,
              "ladder_projection: b_proj has shape ", b_proj.sizes(), ", expected (", s.L, ", ",
              s.d, ")");
  for (const at::Tensor* p : {&ln_weight, &ln_bias}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == s.L && p->size(1) == n_ln,
                "ladder_projection: LayerNorm parameter has shape ", p->sizes(), ", expected (",
                s.L, ", ", n_ln, ")");
  }
  for (const at::Tensor* p : {&ln_weight, &ln_bias, &w_proj, &b_proj}) {
    TORCH_CHECK(p->scalar_type() == st && p->device() == z0.device(),
                "ladder_projection: parameters must have the dtype and device of z (", st, "/",
                z0.device(), "), got ", p->scalar_type(), "/", p->device());
    TORCH_CHECK(p->is_contiguous(), "ladder_projection: parameters must be contiguous");
  }
  return s;
}

// (L, M, D) view of the level tensors when they already lie one after another in one
// storage (e.g. the unbind of a stacked tensor), else an undefined tensor: the caller
// then runs one GEMM per level on the tensors in place rather than copying them into a
// stack (for ViT-E that copy would be a transient of several GB).
at::Tensor stacked_view(at::TensorList z, const Dims& s) {
  if (s.L == 1) return z[0].unsqueeze(0);
  const int64_t step = s.M * s.D;
  const auto* base = static_cast<const char*>(z[0].const_data_ptr());
  const int64_t item = z[0].element_size();
  for (int64_t l = 1; l < s.L; ++l) {
    if (!z[l].storage().is_alias_of(z[0].storage()) ||
        static_cast<const char*>(z[l].const_data_ptr()) != base + l * step * item) {
      return at::Tensor();
    }
  }
  return z[0].as_strided({s.L, s.M, s.D}, {step, s.D, 1}, z[0].storage_offset());
}

// y (L, M, d) = z[l] @ W[l]^T + b[l]: one batched GEMM over levels when z is one
// strided block, else one GEMM per level.
at::Tensor project(at::TensorList z, const at::Tensor& zs, const at::Tensor& w_proj,
                   const at::Tensor& b_proj, const Dims& s) {
  if (zs.defined()) return at::baddbmm(b_proj.unsqueeze(1), zs, w_proj.transpose(1, 2));
  at::Tensor y = at::empty({s.L, s.M, s.d}, z[0].options());
  for (int64_t l = 0; l < s.L; ++l) {
    at::Tensor yl = y.select(0, l);
    at::addmm_out(yl, b_proj.select(0, l), z[l], w_proj.select(0, l).t());
  }
  return y;
}

std::vector<at::Tensor> as_vector(at::TensorList z) { return std::vector<at::Tensor>(z.begin(), z.end()); }

at::ScalarType stats_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

void check_stats(const at::Tensor& mean, const at::Tensor& rstd, const Dims& s, at::ScalarType st) {
  for (const at::Tensor* p : {&mean, &rstd}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == s.L && p->size(1) == s.M && p->is_contiguous() &&
                    p->scalar_type() == stats_type(st),
                "ladder_projection backward: statistics must be contiguous (L, M) ",
                stats_type(st), ", got ", p->sizes(), " ", p->scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ladder_forward(
    const LadderPrims& prims, at::TensorList z_in, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_proj, const at::Tensor& b_proj, bool post,
    double eps) {
  const std::vector<at::Tensor> zf = flatten_levels(z_in);
  const at::TensorList z(zf);
  const Dims s = check_args(z, ln_weight, ln_bias, w_proj, b_proj, post);
  auto opts = z[0].options();
  auto sopts = opts.dtype(stats_type(z[0].scalar_type()));
  at::Tensor mean = at::empty({s.L, s.M}, sopts);
  at::Tensor rstd = at::empty({s.L, s.M}, sopts);
  if (!post) {
    at::Tensor xn = at::empty({s.L, s.M, s.D}, opts);  // transient, freed on return
    prims.rows_forward(as_vector(z), ln_weight, ln_bias, mean, rstd, xn, eps, true);
    // Bias as the GEMM's C operand (beta = 1), one batched GEMM over levels.
    at::Tensor out = at::baddbmm(b_proj.unsqueeze(1), xn, w_proj.transpose(1, 2));
    return {out, mean, rstd};
  }
  at::Tensor y = project(z, stacked_view(z, s), w_proj, b_proj, s);  // (L, M, d)
  prims.rows_forward(y.unbind(0), ln_weight, ln_bias, mean, rstd, y, eps, true);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ladder_backward(
    const LadderPrims& prims, const at::Tensor& grad_out, at::TensorList z_in,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w_proj,
    const at::Tensor& b_proj, const at::Tensor& mean, const at::Tensor& rstd, bool post,
    double eps, bool input_grad) {
  const std::vector<at::Tensor> zf = flatten_levels(z_in);
  const at::TensorList z(zf);
  const Dims s = check_args(z, ln_weight, ln_bias, w_proj, b_proj, post);
  const auto st = z[0].scalar_type();
  check_stats(mean, rstd, s, st);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.L && grad_out.size(1) == s.M &&
                  grad_out.size(2) == s.d,
              "ladder_projection backward: grad_out has shape ", grad_out.sizes(),
              ", expected (", s.L, ", ", s.M, ", ", s.d, ")");
  const at::Tensor g = grad_out.to(st).contiguous();
  auto opts = z[0].options();
  auto sopts = opts.dtype(stats_type(st));
  const int64_t n_ln = post ? s.d : s.D;
  at::Tensor dgamma = at::empty({s.L, n_ln}, sopts);
  at::Tensor dbeta = at::empty({s.L, n_ln}, sopts);
  at::Tensor grad_z, grad_w, grad_b;

  if (!post) {
    // With xn = xhat * gamma + beta and out = xn @ W^T + b, every parameter gradient
    // follows from H = g^T @ xhat (L, d, D), one batched GEMM over the recomputed xhat:
    //   dW = H * gamma + gsum (x) beta,  dgamma = sum_k W * H,  dbeta = gsum @ W,
    // with gsum = sum_m g (= db). No (M, D) gradient and no column reduction are needed
    // for the parameters; dxn = g @ W is formed only when z needs its gradient.
    const auto acc = stats_type(st);
    at::Tensor buf = at::empty({s.L, s.M, s.D}, opts);
    const at::Tensor ones = at::ones({s.L, s.D}, opts), zeros = at::zeros({s.L, s.D}, opts);
    prims.rows_forward(as_vector(z), ones, zeros, mean, rstd, buf, eps, false);  // xhat
    const at::Tensor h = at::bmm(g.transpose(1, 2), buf).to(acc);  // (L, d, D)
    const at::Tensor gsum = at::sum(g, {1}, false, acc);           // (L, d)
    const at::Tensor w_acc = w_proj.to(acc);
    grad_b = gsum.to(st);
    grad_w = (h * ln_weight.to(acc).unsqueeze(1) + gsum.unsqueeze(2) * ln_bias.to(acc).unsqueeze(1)).to(st);
    dgamma = (h * w_acc).sum(1);
    dbeta = at::bmm(gsum.unsqueeze(1), w_acc).squeeze(1);
    if (input_grad) {
      at::bmm_out(buf, g, w_proj);  // buf := dxn (L, M, D); xhat is no longer needed
      prims.rows_backward(buf, as_vector(z), ln_weight, mean, rstd, buf);  // in place: dz
      grad_z = buf;
    }
  } else {
    const at::Tensor zs = stacked_view(z, s);
    at::Tensor y = project(z, zs, w_proj, b_proj, s);  // recomputed GEMM output
    const std::vector<at::Tensor> yl = y.unbind(0);
    prims.cols_backward(g, yl, mean, rstd, dgamma, dbeta);
    prims.rows_backward(g, yl, ln_weight, mean, rstd, y);  // y := dy, in place
    grad_b = at::sum(y, {1}, false, stats_type(st)).to(st);
    if (zs.defined()) {
      grad_w = at::bmm(y.transpose(1, 2), zs);
      if (input_grad) grad_z = at::bmm(y, w_proj);
    } else {
      grad_w = at::empty({s.L, s.d, s.D}, opts);
      if (input_grad) grad_z = at::empty({s.L, s.M, s.D}, opts);
      for (int64_t l = 0; l < s.L; ++l) {
        at::Tensor gw = grad_w.select(0, l);
        at::mm_out(gw, y.select(0, l).t(), z[l]);
        if (input_grad) {
          at::Tensor gz = grad_z.select(0, l);
          at::mm_out(gz, y.select(0, l), w_proj.select(0, l));
        }
      }
    }
  }
  if (!grad_z.defined()) grad_z = at::empty({0}, opts);
  return {grad_z, dgamma.to(st), dbeta.to(st), grad_w, grad_b};
}

}  // namespace vpeft

// Host flow of the ladder projection, shared by the CPU and the CUDA builds: argument
// checks, the GEMMs (ATen mm/bmm/addmm: MKL/oneDNN on CPU, cuBLAS on CUDA) and calls
// into the device's row / column primitives (see ladder.h).
//
// Pre norm, forward: the LayerNorm is folded into the projection, so the normalised
// copy of z is never written. With xhat = rstd * (z - mean), Wg = gamma * W (per
// column k of W), s = Wg 1 and c = W beta + b:
//   out = xhat Wg^T + c = rstd * (z Wg^T - mean * s) + c.
// z is the raw input: when |mean| >> std the two terms cancel. The GEMM therefore uses
// the row-centred weights Wc = Wg - (s / D) 1^T (rounded to z's dtype): z Wc^T is
// invariant to adding a constant to a row of z, so the GEMM output is of the size of
// the result, not of mean * s, and may be rounded to z's dtype; what is left of the
// mean, mean * s' with s' = Wc 1 summed in fp32 from the rounded Wc (nonzero only by
// rounding), is removed in fp32 by the epilogue:
//   out = rstd * (z Wc^T - mean * s') + c          (fold_epilogue, in place)
// Launches: statistics (reads z), one GEMM (reads z, writes out), epilogue (reads and
// writes out); no bias operand, so no expanded-bias copy into the output.
// Pre norm, backward: with G = rstd * g (scaled rows of the output gradient, z's
// dtype) and u = sum_m mean[m] G[m], H = g^T xhat = G^T z - u 1^T comes from one GEMM
// per level with fp32 output (mm_acc) over the saved z itself; then, all in fp32,
//   dW = H * gamma + gsum beta^T,  dgamma = sum_j W * H,  dbeta = gsum W,  db = gsum,
// gsum = sum_m g, cast to the parameter dtype at the end. dz (only when z needs it)
// is rows_backward over g W.
// Post norm: y = z W^T + b by one addmm per level (bias as a 1-D operand: cuBLASLt's
// bias epilogue on CUDA), the LayerNorm in place. Backward: y recomputed the same way
// (not saved), then one pass over (g, y) writes dy over y and sums dgamma, dbeta and
// db (post_backward); dW = dy^T z and dz = dy W by GEMMs.
//
// Memory: the forward saves nothing itself; the autograd wrapper keeps the inputs and
// the (L, M) statistics.
#include "ladder.h"

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
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

// y (L, M, d) = z[l] @ W[l]^T + b[l], one addmm per level with the bias as a 1-D
// operand (at::baddbmm with an expanded bias would first copy it into the output).
at::Tensor project(at::TensorList z, const at::Tensor& w_proj, const at::Tensor& b_proj,
                   const Dims& s) {
  at::Tensor y = at::empty({s.L, s.M, s.d}, z[0].options());
  for (int64_t l = 0; l < s.L; ++l) {
    at::Tensor yl = y.select(0, l);
    at::addmm_out(yl, b_proj.select(0, l), z[l], w_proj.select(0, l).t());
  }
  return y;
}

// out (L, M, n) = z[l] @ w[l]^T: one batched GEMM when z is one strided block, else one
// GEMM per level on the caller's tensors.
void project_nobias(at::TensorList z, const at::Tensor& zs, const at::Tensor& w, at::Tensor& out) {
  if (zs.defined()) {
    at::bmm_out(out, zs, w.transpose(1, 2));
    return;
  }
  for (size_t l = 0; l < z.size(); ++l) {
    at::Tensor ol = out.select(0, l);
    at::mm_out(ol, z[l], w.select(0, l).t());
  }
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
    prims.rows_forward(as_vector(z), ln_weight, ln_bias, mean, rstd, at::Tensor(), eps);  // stats
    // The folded weights (L, d, D), from the parameters in fp32 (see the top of the file).
    const auto acc = stats_type(z[0].scalar_type());
    const at::Tensor w_acc = w_proj.to(acc);
    const at::Tensor wg = w_acc * ln_weight.to(acc).unsqueeze(1);
    const at::Tensor wc = (wg - wg.mean({2}, true)).to(z[0].scalar_type());
    const at::Tensor s_res = wc.sum({2}, false, acc);  // (L, d): row sums of the rounded Wc
    const at::Tensor c = at::bmm(w_acc, ln_bias.to(acc).unsqueeze(2)).squeeze(2) + b_proj.to(acc);
    at::Tensor out = at::empty({s.L, s.M, s.d}, opts);
    project_nobias(z, stacked_view(z, s), wc, out);
    prims.fold_epilogue(out, mean, rstd, s_res, c);
    return {out, mean, rstd};
  }
  at::Tensor y = project(z, w_proj, b_proj, s);  // (L, M, d)
  prims.rows_forward(y.unbind(0), ln_weight, ln_bias, mean, rstd, y, eps);
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
  at::Tensor dgamma, dbeta, grad_z, grad_w, grad_b;

  if (!post) {
    const auto acc = stats_type(st);
    const at::Tensor w_acc = w_proj.to(acc);
    // H = g^T xhat = G^T z - u 1^T with G = rstd * g, u = sum_m mean G (see the top).
    at::Tensor h = at::empty({s.L, s.d, s.D}, sopts);
    at::Tensor sums = at::empty({s.L, 2, s.d}, sopts);
    {
      at::Tensor gs = at::empty({s.L, s.M, s.d}, opts);  // G, transient
      prims.scale_rows(g, mean, rstd, gs, sums);
      for (int64_t l = 0; l < s.L; ++l) prims.mm_acc(h.select(0, l), gs.select(0, l).t(), z[l]);
    }
    // h holds G^T z; H = h - u 1^T is never formed: with gsum = sums[:, 0], u = sums[:, 1],
    //   dW = h * gamma + (gsum beta^T - u gamma^T),  dgamma = sum_j W * h - u W,
    //   dbeta = gsum W: the rank-2 terms by one small bmm each.
    const at::Tensor gsum = sums.select(1, 0);
    const at::Tensor lnp = at::stack({ln_bias.to(acc), ln_weight.to(acc)}, 1);  // (L, 2, D)
    const at::Tensor coef = at::stack({gsum, -sums.select(1, 1)}, 2);          // (L, d, 2)
    grad_b = gsum.to(st);
    grad_w = at::addcmul(at::bmm(coef, lnp), h, ln_weight.to(acc).unsqueeze(1)).to(st);
    const at::Tensor gw = at::bmm(coef.transpose(1, 2), w_acc);  // (L, 2, D): gsum W, -u W
    dbeta = gw.select(1, 0);
    dgamma = (h * w_proj).sum(1) + gw.select(1, 1);
    if (input_grad) {
      grad_z = at::bmm(g, w_proj);  // dxn (L, M, D)
      prims.rows_backward(grad_z, as_vector(z), ln_weight, mean, rstd, grad_z);  // in place: dz
    }
  } else {
    at::Tensor y = project(z, w_proj, b_proj, s);  // recomputed GEMM output, not saved
    at::Tensor sums = at::empty({s.L, 3, s.d}, sopts);
    prims.post_backward(g, y.unbind(0), ln_weight, mean, rstd, y, sums);  // y := dy
    dgamma = sums.select(1, 0);
    dbeta = sums.select(1, 1);
    grad_b = sums.select(1, 2).to(st);
    const at::Tensor zs = stacked_view(z, s);
    if (zs.defined()) {
      grad_w = at::bmm(y.transpose(1, 2), zs);
    } else {
      grad_w = at::empty({s.L, s.d, s.D}, opts);
      for (int64_t l = 0; l < s.L; ++l) {
        at::Tensor gw = grad_w.select(0, l);
        at::mm_out(gw, y.select(0, l).t(), z[l]);
      }
    }
    if (input_grad) grad_z = at::bmm(y, w_proj);
  }
  if (!grad_z.defined()) grad_z = at::empty({0}, opts);
  // dgamma, dbeta, grad_b may be views of the (L, k, n) column sums: contiguous results.
  return {grad_z, dgamma.to(st).contiguous(), dbeta.to(st).contiguous(), grad_w, grad_b.contiguous()};
}

}  // namespace vpeft

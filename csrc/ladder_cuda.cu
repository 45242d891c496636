// CUDA row / column primitives of the ladder projection (see ladder.h for the math).
//
// Row kernels (rows_forward, rows_backward, fold_epilogue): one warp per row, all L
// levels in one launch (grid.y = level, up to kMaxLevelsPerLaunch levels per launch;
// the levels' base pointers travel by value in the kernel arguments, so the caller's
// level tensors are read in place), 16-byte loads and stores where rows are aligned.
// Statistics in opmath (fp32 for fp16/bf16/fp32), Welford per lane, merged across the
// warp with Chan's formula.
// Row kernels with column sums (scale_rows, post_backward): a block of kColWarps warps
// takes kColChunk rows of one level, one warp per row; each warp adds its rows into its
// own slice of shared memory (no atomics; slots laid out so that a warp's 32 lanes hit
// 32 banks), and the block writes one fixed-order partial sum per column; one ATen sum
// over the chunks follows: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "ladder.h"

namespace vpeft {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;   // warps per block in the row kernels
constexpr int kColWarps = 4;       // warps per block in the row kernels with column sums
constexpr int64_t kColChunk = 256; // rows per block (and per partial sum) there

template <typename T>
struct LevelPtrs {
  const T* p[kMaxLevelsPerLaunch];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_sqrt(acc_t v) {
  return acc_t(1) / sqrt(v);
}
template <>
__device__ __forceinline__ float inv_sqrt<float>(float v) {
  return rsqrtf(v);
}

// VEC consecutive elements moved as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// mean/rstd of x = src.p[y][m, :] and, when dst is not null,
// dst[l0 + y, m, :] = (x - mean) * rstd * gamma + beta.
// Each lane handles VEC consecutive elements per step (VEC > 1 needs N % VEC == 0 and
// aligned pointers, checked on the host).
template <typename T, typename acc_t, int VEC>
__global__ void rows_forward_kernel(LevelPtrs<T> src, int64_t level0, const T* gamma,
                                    const T* beta, acc_t* mean, acc_t* rstd, T* dst, int64_t M,
                                    int64_t N, acc_t eps) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (m >= M) return;  // whole warp leaves together: one row per warp
  const int lane = threadIdx.x;
  const int64_t l = level0 + blockIdx.y;
  const int64_t r = l * M + m;
  const T* x = src.p[blockIdx.y] + m * N;
  const int64_t nv = N / VEC;
  acc_t count = 0, avg = 0, m2 = 0;
  for (int64_t jv = lane; jv < nv; jv += kWarp) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + jv * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {  // Welford
      const acc_t v = static_cast<acc_t>(xv.v[k]);
      count += acc_t(1);
      const acc_t delta = v - avg;
      avg += delta / count;
      m2 += delta * (v - avg);
    }
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {  // Chan's parallel merge
    const acc_t count_o = __shfl_xor_sync(0xffffffffu, count, off);
    const acc_t avg_o = __shfl_xor_sync(0xffffffffu, avg, off);
    const acc_t m2_o = __shfl_xor_sync(0xffffffffu, m2, off);
    const acc_t n = count + count_o;
    if (n > acc_t(0)) {
      const acc_t delta = avg_o - avg;
      const acc_t frac = count_o / n;
      avg += delta * frac;
      m2 += m2_o + delta * delta * count * frac;
    }
    count = n;
  }
  // Every lane holds the merged result up to rounding; take lane 0's everywhere.
  const acc_t mu = __shfl_sync(0xffffffffu, avg, 0);
  m2 = __shfl_sync(0xffffffffu, m2, 0);
  const acc_t rs = inv_sqrt<acc_t>(m2 / static_cast<acc_t>(N) + eps);
  if (lane == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  if (dst == nullptr) return;  // statistics only
  const T* g = gamma + l * N;
  const T* b = beta + l * N;
  T* o = dst + r * N;  // may alias x: a pack is read before the same pack is written
  for (int64_t jv = lane; jv < nv; jv += kWarp) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + jv * VEC);
    const Pack<T, VEC> gv = load_pack<T, VEC>(g + jv * VEC);
    const Pack<T, VEC> bv = load_pack<T, VEC>(b + jv * VEC);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.v[k] = static_cast<T>((static_cast<acc_t>(xv.v[k]) - mu) * rs * static_cast<acc_t>(gv.v[k]) +
                               static_cast<acc_t>(bv.v[k]));
    }
    *reinterpret_cast<Pack<T, VEC>*>(o + jv * VEC) = ov;
  }
}

// Shared-memory slot of column j = jv * VEC + k in a warp's column sums: element k of
// pack jv goes to k * nv + jv, so the 32 lanes (consecutive jv) hit 32 banks; the
// block's final reduction maps the slots back to columns (column_slot).
__device__ __forceinline__ int64_t sum_slot(int64_t jv, int k, int64_t nv) {
  return static_cast<int64_t>(k) * nv + jv;
}
template <int VEC>
__device__ __forceinline__ int64_t column_slot(int64_t j, int64_t nv) {
  return (j % VEC) * nv + j / VEC;
}

// LayerNorm backward of one row by one warp: o = rstd * (a - mean(a) - xhat * mean(a * xhat)),
// a = g * w; o may alias x or g (a pack is read before it is written). With acc (a
// 3 x N slice of shared memory owned by this warp) also acc[0] += g * xhat,
// acc[1] += g, acc[2] += o (as rounded).
template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void ln_backward_row(const T* x, const T* gr, const T* w, acc_t mu, acc_t rs,
                                                T* o, int64_t N, int lane, acc_t* acc) {
  const int64_t nv = N / VEC;
  acc_t sum_a = 0, sum_ax = 0;
  for (int64_t jv = lane; jv < nv; jv += kWarp) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + jv * VEC);
    const Pack<T, VEC> gv = load_pack<T, VEC>(gr + jv * VEC);
    const Pack<T, VEC> wv = load_pack<T, VEC>(w + jv * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t a = static_cast<acc_t>(gv.v[k]) * static_cast<acc_t>(wv.v[k]);
      sum_a += a;
      sum_ax += a * (static_cast<acc_t>(xv.v[k]) - mu) * rs;
    }
  }
  sum_a = warp_sum(sum_a);
  sum_ax = warp_sum(sum_ax);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
  const acc_t c1 = sum_a * inv_n, c2 = sum_ax * inv_n;
  for (int64_t jv = lane; jv < nv; jv += kWarp) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + jv * VEC);
    const Pack<T, VEC> gv = load_pack<T, VEC>(gr + jv * VEC);
    const Pack<T, VEC> wv = load_pack<T, VEC>(w + jv * VEC);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t g = static_cast<acc_t>(gv.v[k]);
      const acc_t a = g * static_cast<acc_t>(wv.v[k]);
      const acc_t xh = (static_cast<acc_t>(xv.v[k]) - mu) * rs;
      ov.v[k] = static_cast<T>(rs * (a - c1 - xh * c2));
      if (acc != nullptr) {
        const int64_t i = sum_slot(jv, k, nv);
        acc[i] += g * xh;
        acc[N + i] += g;
        acc[2 * N + i] += static_cast<acc_t>(ov.v[k]);
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(o + jv * VEC) = ov;
  }
}

// dst[l, m, :] = LayerNorm backward of row m of level l (pre norm, input gradient).
template <typename T, typename acc_t, int VEC>
__global__ void rows_backward_kernel(LevelPtrs<T> src, int64_t level0, const T* grad,
                                     const T* gamma, const acc_t* mean, const acc_t* rstd,
                                     T* dst, int64_t M, int64_t N) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (m >= M) return;
  const int64_t l = level0 + blockIdx.y;
  const int64_t r = l * M + m;
  ln_backward_row<T, acc_t, VEC>(src.p[blockIdx.y] + m * N, grad + r * N, gamma + l * N, mean[r], rstd[r],
                                 dst + r * N, N, threadIdx.x, static_cast<acc_t*>(nullptr));
}

// In place on out (levels l0.., M, N): out = rstd * (out - mean * s[l]) + c[l].
template <typename T, typename acc_t, int VEC>
__global__ void fold_epilogue_kernel(T* out, int64_t level0, const acc_t* mean, const acc_t* rstd,
                                     const acc_t* s, const acc_t* c, int64_t M, int64_t N) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (m >= M) return;
  const int64_t l = level0 + blockIdx.y;
  const int64_t r = l * M + m;
  const acc_t mu = mean[r], rs = rstd[r];
  const acc_t* sl = s + l * N;
  const acc_t* cl = c + l * N;
  T* o = out + r * N;
  for (int64_t jv = threadIdx.x; jv < N / VEC; jv += kWarp) {
    Pack<T, VEC> ov = load_pack<T, VEC>(o + jv * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = jv * VEC + k;
      ov.v[k] = static_cast<T>(rs * (static_cast<acc_t>(ov.v[k]) - mu * sl[j]) + cl[j]);
    }
    *reinterpret_cast<Pack<T, VEC>*>(o + jv * VEC) = ov;
  }
}

// Row pass of scale_rows: dst = rstd * g; acc[0] += g, acc[1] += mean * dst.
template <typename T, typename acc_t, int VEC>
struct ScaleRowsOp {
  static constexpr int kSums = 2;
  static constexpr int kVec = VEC;
  const T* grad;
  const acc_t* mean;
  const acc_t* rstd;
  T* dst;
  __device__ __forceinline__ void operator()(int64_t l, int64_t m, int64_t M, int64_t N, int lane,
                                             acc_t* acc) const {
    const int64_t r = l * M + m;
    const acc_t mu = mean[r], rs = rstd[r];
    const int64_t nv = N / VEC;
    for (int64_t jv = lane; jv < nv; jv += kWarp) {
      const Pack<T, VEC> gv = load_pack<T, VEC>(grad + r * N + jv * VEC);
      Pack<T, VEC> ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t i = sum_slot(jv, k, nv);
        const acc_t g = static_cast<acc_t>(gv.v[k]);
        ov.v[k] = static_cast<T>(rs * g);
        acc[i] += g;
        acc[N + i] += mu * static_cast<acc_t>(ov.v[k]);
      }
      *reinterpret_cast<Pack<T, VEC>*>(dst + r * N + jv * VEC) = ov;
    }
  }
};

// Row pass of post_backward: the LayerNorm backward with its column sums.
template <typename T, typename acc_t, int VEC>
struct PostBackwardOp {
  static constexpr int kSums = 3;
  static constexpr int kVec = VEC;
  LevelPtrs<T> src;  // indexed from level0
  int64_t level0;
  const T* grad;
  const T* gamma;
  const acc_t* mean;
  const acc_t* rstd;
  T* dst;
  __device__ __forceinline__ void operator()(int64_t l, int64_t m, int64_t M, int64_t N, int lane,
                                             acc_t* acc) const {
    const int64_t r = l * M + m;
    ln_backward_row<T, acc_t, VEC>(src.p[l - level0] + m * N, grad + r * N, gamma + l * N, mean[r], rstd[r],
                                   dst + r * N, N, lane, acc);
  }
};

// Block (kWarp, kColWarps) over rows [chunk * kColChunk, ...) of level level0 + blockIdx.y;
// partial[l, chunk, k, j] = this chunk's sum k of column j.
template <typename acc_t, typename Op>
__global__ void rows_col_sums_kernel(Op op, int64_t level0, int64_t M, int64_t N, int64_t chunks,
                                     acc_t* partial) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  constexpr int K = Op::kSums;
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int tid = warp * kWarp + lane;
  const int64_t l = level0 + blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t width = K * N;
  acc_t* acc = smem + warp * width;
  for (int64_t i = lane; i < width; i += kWarp) acc[i] = acc_t(0);
  __syncwarp();
  const int64_t m_end = ::min(M, (chunk + 1) * kColChunk);
  for (int64_t m = chunk * kColChunk + warp; m < m_end; m += kColWarps) op(l, m, M, N, lane, acc);
  __syncthreads();
  acc_t* out = partial + (l * chunks + chunk) * width;
  for (int64_t i = tid; i < width; i += kWarp * kColWarps) {
    const int64_t slot = (i / N) * N + column_slot<Op::kVec>(i % N, N / Op::kVec);
    acc_t v = smem[slot];
#pragma unroll
    for (int w = 1; w < kColWarps; ++w) v += smem[w * width + slot];
    out[i] = v;
  }
}

template <typename T>
LevelPtrs<T> pack(const std::vector<at::Tensor>& src, int64_t l0, int64_t count) {
  LevelPtrs<T> p{};
  for (int64_t i = 0; i < count; ++i) p.p[i] = src[l0 + i].const_data_ptr<T>();
  return p;
}

// Widest access (16 bytes) when every row of every operand starts 16-byte aligned,
// else element by element.
template <typename T>
constexpr int kVecMax = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;

template <typename T>
bool vec_ok(int64_t N, const std::vector<at::Tensor>& src, std::initializer_list<const at::Tensor*> others) {
  constexpr int V = kVecMax<T>;
  if (V <= 1 || N % V != 0) return false;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0; };
  for (const auto& t : src) {
    if (!aligned(t.const_data_ptr())) return false;
  }
  for (const at::Tensor* t : others) {
    if (t->defined() && !aligned(t->const_data_ptr())) return false;
  }
  return true;
}

void check_launch_dims(int64_t M) {
  TORCH_CHECK((M + kRowsPerBlock - 1) / kRowsPerBlock <= 2147483647LL,
              "ladder_projection: too many rows for one launch: ", M);
}

void cuda_rows_forward(const std::vector<at::Tensor>& src, const at::Tensor& gamma,
                       const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dst, double eps) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  if (M == 0 || N == 0) return;
  check_launch_dims(M);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = vec_ok<scalar_t>(N, src, {&gamma, &beta, &dst});
    scalar_t* out = dst.defined() ? dst.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t l0 = 0; l0 < L; l0 += kMaxLevelsPerLaunch) {
      const int64_t count = std::min<int64_t>(kMaxLevelsPerLaunch, L - l0);
      const dim3 grid(static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock),
                      static_cast<unsigned>(count));
      const dim3 block(kWarp, kRowsPerBlock);
      auto kernel = vec ? rows_forward_kernel<scalar_t, acc_t, kVecMax<scalar_t>>
                        : rows_forward_kernel<scalar_t, acc_t, 1>;
      kernel<<<grid, block, 0, stream>>>(
          pack<scalar_t>(src, l0, count), l0, gamma.const_data_ptr<scalar_t>(),
          beta.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), out, M, N, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void cuda_rows_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& dst) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  if (M == 0 || N == 0) return;
  check_launch_dims(M);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = vec_ok<scalar_t>(N, src, {&grad, &gamma, &dst});
    for (int64_t l0 = 0; l0 < L; l0 += kMaxLevelsPerLaunch) {
      const int64_t count = std::min<int64_t>(kMaxLevelsPerLaunch, L - l0);
      const dim3 grid(static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock),
                      static_cast<unsigned>(count));
      const dim3 block(kWarp, kRowsPerBlock);
      auto kernel = vec ? rows_backward_kernel<scalar_t, acc_t, kVecMax<scalar_t>>
                        : rows_backward_kernel<scalar_t, acc_t, 1>;
      kernel<<<grid, block, 0, stream>>>(
          pack<scalar_t>(src, l0, count), l0, grad.const_data_ptr<scalar_t>(),
          gamma.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          rstd.const_data_ptr<acc_t>(), dst.mutable_data_ptr<scalar_t>(), M, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void cuda_fold_epilogue(const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& s, const at::Tensor& c) {
  const int64_t L = out.size(0), M = out.size(1), N = out.size(2);
  if (M == 0 || N == 0) return;
  check_launch_dims(M);
  TORCH_CHECK(L <= 65535, "ladder_projection: too many levels for one launch: ", L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ladder_fold_epilogue_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = vec_ok<scalar_t>(N, {out}, {});
    const dim3 grid(static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(L));
    const dim3 block(kWarp, kRowsPerBlock);
    auto kernel = vec ? fold_epilogue_kernel<scalar_t, acc_t, kVecMax<scalar_t>>
                      : fold_epilogue_kernel<scalar_t, acc_t, 1>;
    kernel<<<grid, block, 0, stream>>>(out.mutable_data_ptr<scalar_t>(), 0, mean.const_data_ptr<acc_t>(),
                                       rstd.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
                                       c.const_data_ptr<acc_t>(), M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Launch rows_col_sums_kernel for levels [l0, l0 + count) and sum the chunk partials
// into sums (L, K, N) (done by the caller after every level range).
template <typename acc_t, typename Op>
void launch_col_sums(const Op& op, int64_t l0, int64_t count, int64_t M, int64_t N, int64_t chunks,
                     const at::Tensor& partial) {
  const size_t bytes = sizeof(acc_t) * Op::kSums * kColWarps * static_cast<size_t>(N);
  auto kernel = rows_col_sums_kernel<acc_t, Op>;
  if (bytes > 48 * 1024) {  // past the default dynamic shared memory: opt in, up to the device's limit
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          c10::cuda::current_device()));
    const size_t limit = static_cast<size_t>(optin);
    TORCH_CHECK(bytes <= limit, "ladder_projection: width ", N, " needs ", bytes,
                " bytes of shared memory for the column sums, over this GPU's ", limit,
                " (the CUDA kernels take widths up to ", limit / (sizeof(acc_t) * Op::kSums * kColWarps), ")");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(count));
  const dim3 block(kWarp, kColWarps);
  kernel<<<grid, block, bytes, c10::cuda::getCurrentCUDAStream()>>>(op, l0, M, N, chunks,
                                                                     partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t col_chunks(int64_t M) {
  const int64_t chunks = std::max<int64_t>(1, (M + kColChunk - 1) / kColChunk);
  TORCH_CHECK(chunks <= 2147483647LL, "ladder_projection: too many rows for the column sums: ", M);
  return chunks;
}

void cuda_scale_rows(const at::Tensor& grad, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& dst, const at::Tensor& sums) {
  const int64_t L = grad.size(0), M = grad.size(1), N = grad.size(2);
  const int64_t chunks = col_chunks(M);
  TORCH_CHECK(L <= 65535, "ladder_projection: too many levels for one launch: ", L);
  at::Tensor partial = at::zeros({L, chunks, 2, N}, sums.options());
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ladder_scale_rows_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool vec = vec_ok<scalar_t>(N, {grad, dst}, {});
      if (vec) {
        const ScaleRowsOp<scalar_t, acc_t, kVecMax<scalar_t>> op{
            grad.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
            dst.mutable_data_ptr<scalar_t>()};
        launch_col_sums<acc_t>(op, 0, L, M, N, chunks, partial);
      } else {
        const ScaleRowsOp<scalar_t, acc_t, 1> op{grad.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                                                 rstd.const_data_ptr<acc_t>(), dst.mutable_data_ptr<scalar_t>()};
        launch_col_sums<acc_t>(op, 0, L, M, N, chunks, partial);
      }
    });
  }
  at::sum_out(const_cast<at::Tensor&>(sums), partial, {1});
}

void cuda_post_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& dst, const at::Tensor& sums) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  const int64_t chunks = col_chunks(M);
  at::Tensor partial = at::zeros({L, chunks, 3, N}, sums.options());
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_post_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool vec = vec_ok<scalar_t>(N, src, {&grad, &gamma, &dst});
      for (int64_t l0 = 0; l0 < L; l0 += kMaxLevelsPerLaunch) {
        const int64_t count = std::min<int64_t>(kMaxLevelsPerLaunch, L - l0);
        const auto ptrs = pack<scalar_t>(src, l0, count);
        if (vec) {
          const PostBackwardOp<scalar_t, acc_t, kVecMax<scalar_t>> op{
              ptrs, l0, grad.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
              mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), dst.mutable_data_ptr<scalar_t>()};
          launch_col_sums<acc_t>(op, l0, count, M, N, chunks, partial);
        } else {
          const PostBackwardOp<scalar_t, acc_t, 1> op{
              ptrs, l0, grad.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
              mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), dst.mutable_data_ptr<scalar_t>()};
          launch_col_sums<acc_t>(op, l0, count, M, N, chunks, partial);
        }
      }
    });
  }
  at::sum_out(const_cast<at::Tensor&>(sums), partial, {1});
}

// cuBLAS with fp32 output for 16-bit operands (ATen's mm.dtype_out).
void cuda_mm_acc(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor o = out;
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(o, a, b);
  } else {
    at::mm_out(o, a, b, out.scalar_type());
  }
}

}  // namespace

const LadderPrims& cuda_prims() {
  static const LadderPrims prims{cuda_rows_forward, cuda_rows_backward, cuda_fold_epilogue,
                                 cuda_scale_rows,   cuda_post_backward, cuda_mm_acc};
  return prims;
}

}  // namespace vpeft

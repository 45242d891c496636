// CUDA LayerNorm primitives of the ladder projection (see ladder.h for the math).
//
// rows_forward / rows_backward: one warp per row, all L levels in one launch
// (grid.y = level, up to kMaxLevelsPerLaunch levels per launch; the levels' base
// pointers travel by value in the kernel arguments, so the caller's level tensors are
// read in place), 16-byte loads and stores where rows are aligned. Statistics in
// opmath (fp32 for fp16/bf16/fp32), Welford per lane, merged across the warp with
// Chan's formula.
// cols_backward: dgamma/dbeta as fixed-order partial sums over row chunks
// (block = 32 columns x 8 row lanes), then one ATen sum: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "ladder.h"

namespace vpeft {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;   // warps per block in the row kernels
constexpr int kColRows = 8;        // row lanes per block in the column kernel
constexpr int64_t kColChunk = 512; // rows per partial sum in the column kernel

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

// dst[l0 + y, m, :] = (x - mean) * rstd * gamma + beta for x = src.p[y][m, :].
// Each lane handles VEC consecutive elements per step (VEC > 1 needs N % VEC == 0 and
// aligned pointers, checked on the host).
template <typename T, typename acc_t, int VEC>
__global__ void rows_forward_kernel(LevelPtrs<T> src, int64_t level0, const T* gamma,
                                    const T* beta, acc_t* mean, acc_t* rstd, T* dst, int64_t M,
                                    int64_t N, acc_t eps, bool compute_stats) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (m >= M) return;  // whole warp leaves together: one row per warp
  const int lane = threadIdx.x;
  const int64_t l = level0 + blockIdx.y;
  const int64_t r = l * M + m;
  const T* x = src.p[blockIdx.y] + m * N;
  const int64_t nv = N / VEC;
  acc_t mu, rs;
  if (compute_stats) {
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
    mu = __shfl_sync(0xffffffffu, avg, 0);
    m2 = __shfl_sync(0xffffffffu, m2, 0);
    rs = inv_sqrt<acc_t>(m2 / static_cast<acc_t>(N) + eps);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  } else {
    mu = mean[r];
    rs = rstd[r];
  }
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

// dst[l, m, :] = rstd * (a - mean(a) - xhat * mean(a * xhat)), a = grad * gamma.
template <typename T, typename acc_t, int VEC>
__global__ void rows_backward_kernel(LevelPtrs<T> src, int64_t level0, const T* grad,
                                     const T* gamma, const acc_t* mean, const acc_t* rstd,
                                     T* dst, int64_t M, int64_t N) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (m >= M) return;
  const int lane = threadIdx.x;
  const int64_t l = level0 + blockIdx.y;
  const int64_t r = l * M + m;
  const T* x = src.p[blockIdx.y] + m * N;
  const T* gr = grad + r * N;
  const T* w = gamma + l * N;
  const int64_t nv = N / VEC;
  const acc_t mu = mean[r], rs = rstd[r];
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
  T* o = dst + r * N;  // may alias x or grad: a pack is read before it is written
  for (int64_t jv = lane; jv < nv; jv += kWarp) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + jv * VEC);
    const Pack<T, VEC> gv = load_pack<T, VEC>(gr + jv * VEC);
    const Pack<T, VEC> wv = load_pack<T, VEC>(w + jv * VEC);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t a = static_cast<acc_t>(gv.v[k]) * static_cast<acc_t>(wv.v[k]);
      const acc_t xh = (static_cast<acc_t>(xv.v[k]) - mu) * rs;
      ov.v[k] = static_cast<T>(rs * (a - c1 - xh * c2));
    }
    *reinterpret_cast<Pack<T, VEC>*>(o + jv * VEC) = ov;
  }
}

// Partial column sums over one chunk of rows: pg/pb[l, chunk, j].
template <typename T, typename acc_t>
__global__ void cols_backward_kernel(LevelPtrs<T> src, int64_t level0, const T* grad,
                                     const acc_t* mean, const acc_t* rstd, acc_t* pg, acc_t* pb,
                                     int64_t M, int64_t N, int64_t chunks) {
  __shared__ acc_t sg[kColRows][kWarp];
  __shared__ acc_t sb[kColRows][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + tx;
  const int64_t chunk = blockIdx.y;
  const int64_t l = level0 + blockIdx.z;
  const T* x = src.p[blockIdx.z];
  const int64_t m_end = ::min(M, (chunk + 1) * kColChunk);
  acc_t ag = 0, ab = 0;
  if (j < N) {
    for (int64_t m = chunk * kColChunk + ty; m < m_end; m += kColRows) {
      const int64_t r = l * M + m;
      const acc_t gv = static_cast<acc_t>(grad[r * N + j]);
      ag += gv * (static_cast<acc_t>(x[m * N + j]) - mean[r]) * rstd[r];
      ab += gv;
    }
  }
  sg[ty][tx] = ag;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && j < N) {
#pragma unroll
    for (int k = 1; k < kColRows; ++k) {
      ag += sg[k][tx];
      ab += sb[k][tx];
    }
    const int64_t out = (l * chunks + chunk) * N + j;
    pg[out] = ag;
    pb[out] = ab;
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
    if (!aligned(t->const_data_ptr())) return false;
  }
  return true;
}

void check_launch_dims(int64_t M) {
  TORCH_CHECK((M + kRowsPerBlock - 1) / kRowsPerBlock <= 2147483647LL,
              "ladder_projection: too many rows for one launch: ", M);
}

void cuda_rows_forward(const std::vector<at::Tensor>& src, const at::Tensor& gamma,
                       const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& dst, double eps, bool compute_stats) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  if (M == 0 || N == 0) return;
  check_launch_dims(M);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_rows_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = vec_ok<scalar_t>(N, src, {&gamma, &beta, &dst});
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
          rstd.mutable_data_ptr<acc_t>(), dst.mutable_data_ptr<scalar_t>(), M, N,
          static_cast<acc_t>(eps), compute_stats);
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

void cuda_cols_backward(const at::Tensor& grad, const std::vector<at::Tensor>& src,
                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dgamma,
                        const at::Tensor& dbeta) {
  const int64_t L = src.size(), M = src[0].size(0), N = src[0].size(1);
  const int64_t chunks = std::max<int64_t>(1, (M + kColChunk - 1) / kColChunk);
  TORCH_CHECK(chunks <= 65535, "ladder_projection: too many rows for the column reduction: ", M);
  at::Tensor pg = at::empty({L, chunks, N}, dgamma.options());
  at::Tensor pb = at::empty({L, chunks, N}, dgamma.options());
  if (M == 0) {
    pg.zero_();
    pb.zero_();
  } else if (N > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src[0].scalar_type(), "ladder_cols_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t l0 = 0; l0 < L; l0 += kMaxLevelsPerLaunch) {
        const int64_t count = std::min<int64_t>(kMaxLevelsPerLaunch, L - l0);
        const dim3 grid(static_cast<unsigned>((N + kWarp - 1) / kWarp),
                        static_cast<unsigned>(chunks), static_cast<unsigned>(count));
        const dim3 block(kWarp, kColRows);
        cols_backward_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            pack<scalar_t>(src, l0, count), l0, grad.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
            pg.mutable_data_ptr<acc_t>(), pb.mutable_data_ptr<acc_t>(), M, N, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::sum_out(const_cast<at::Tensor&>(dgamma), pg, {1});
  at::sum_out(const_cast<at::Tensor&>(dbeta), pb, {1});
}

}  // namespace

const LadderPrims& cuda_prims() {
  static const LadderPrims prims{cuda_rows_forward, cuda_rows_backward, cuda_cols_backward};
  return prims;
}

}  // namespace vpeft

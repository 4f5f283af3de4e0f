// CUDA kernels of gradmap::fold_projection_ and gradmap::gram_accumulate_ (tiled, shared memory).
//
// Both ops reduce to out[M, N] (+)= Aᵀ·B over a shared dimension K with A [K, M] and B [K, N] read through their
// strides in any of fp32/fp16/bf16/fp64. One thread block computes a kBM×kBN output tile: it stages kBK rows of A
// and B in shared memory (converted to the accumulation type acc_t), and each of its 16×16 threads accumulates a 4×4
// sub-tile in registers. For the Gram statistics the token dimension is split over gridDim.z when the output has few
// tiles, and partial tiles are added with atomicAdd (fp32 or fp64; needs sm_60+).
// Formulas: GradMAP (arXiv 2602.14649) Sec. 3; closed form as in ReplaceMe (arXiv 2505.02819) Eq. 4.
//
// Only ATen's core Tensor header (not the whole ATen/ATen.h: nvcc parses every header twice, for the device and the
// host pass), ATen/ops/empty.h, ATen/Dispatch.h, torch/library.h, c10/core headers and cuda_runtime.h are included,
// so this file also compiles (nvcc -c) against the headers of a CPU-only torch wheel; the current stream comes from
// the generic c10 device-guard interface instead of c10/cuda.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"

namespace gradmap {
namespace cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16;  // output tile and K step (elements)
constexpr int kThreads = 256;                // 16×16 threads, 4×4 outputs each

template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t to_acc(in_t v) {
  return static_cast<acc_t>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}

// out[m, n] = (accumulate ? out[m, n] : 0) + Σ_{k in this block's K range} A[k, m]·B[k, n]
template <typename a_t, typename b_t, typename acc_t, typename out_t, bool kAccumulate, bool kAtomic>
__global__ void __launch_bounds__(kThreads) atb_kernel(const a_t* __restrict__ A, int64_t sa0, int64_t sa1,
                                                        const b_t* __restrict__ B, int64_t sb0, int64_t sb1,
                                                        out_t* __restrict__ out, int64_t so0, int64_t so1, int64_t K,
                                                        int64_t M, int64_t N, int64_t k_per_split) {
  __shared__ acc_t As[kBK][kBM];
  __shared__ acc_t Bs[kBK][kBN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = min(K, k_begin + k_per_split);
  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = acc_t(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
    for (int l = 0; l < (kBK * kBM) / kThreads; ++l) {
      const int idx = threadIdx.x + l * kThreads, kk = idx / kBM, c = idx % kBM;
      const int64_t k = k0 + kk, m = m0 + c, n = n0 + c;
      As[kk][c] = (k < k_end && m < M) ? to_acc<acc_t>(A[k * sa0 + m * sa1]) : acc_t(0);
      Bs[kk][c] = (k < k_end && n < N) ? to_acc<acc_t>(B[k * sb0 + n * sb1]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = Bs[kk][tx + 16 * q];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += a[r] * b[q];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t m = m0 + ty + 16 * r;
    if (m >= M) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = n0 + tx + 16 * q;
      if (n >= N) continue;
      out_t* dst = out + m * so0 + n * so1;
      if constexpr (kAtomic) {
        atomicAdd(dst, static_cast<out_t>(acc[r][q]));
      } else if constexpr (kAccumulate) {
        *dst = static_cast<out_t>(static_cast<acc_t>(*dst) + acc[r][q]);
      } else {
        *dst = static_cast<out_t>(acc[r][q]);
      }
    }
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(t.device()).native_handle());
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "gradmap CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// out (+)= Aᵀ·B with A [K, M], B [K, N]; out [M, N] of type acc_t when accumulating (atomics when K is split).
template <typename acc_t, typename out_t, bool kAccumulate>
void launch_atb(const at::Tensor& A, const at::Tensor& B, const at::Tensor& out, cudaStream_t stream) {
  const int64_t K = A.size(0), M = A.size(1), N = B.size(1);
  const int64_t tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + kBN - 1) / kBN;
  // Split K (tokens) when the output alone gives fewer than ~4 blocks per SM-sized group of 128 SMs.
  int64_t splits = 1;
  if (kAccumulate) splits = std::clamp<int64_t>(512 / (tiles_m * tiles_n), 1, std::max<int64_t>(1, K / 256));
  const int64_t k_per_split = ((K + splits - 1) / splits + kBK - 1) / kBK * kBK;
  splits = std::max<int64_t>(1, (K + k_per_split - 1) / k_per_split);
  TORCH_CHECK(tiles_m < 65536 && splits < 65536, "gradmap: matrix too large for one launch");
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradmap_atb_a", [&] {
    using a_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "gradmap_atb_b", [&] {
      using b_t = scalar_t;
      const auto args = std::make_tuple(A.data_ptr<a_t>(), A.stride(0), A.stride(1), B.data_ptr<b_t>(), B.stride(0),
                                        B.stride(1), out.data_ptr<out_t>(), out.stride(0), out.stride(1), K, M, N,
                                        k_per_split);
      if constexpr (kAccumulate) {
        if (splits > 1) {
          std::apply([&](auto... a) { atb_kernel<a_t, b_t, acc_t, out_t, true, true><<<grid, kThreads, 0, stream>>>(a...); },
                     args);
        } else {
          std::apply([&](auto... a) { atb_kernel<a_t, b_t, acc_t, out_t, true, false><<<grid, kThreads, 0, stream>>>(a...); },
                     args);
        }
      } else {
        std::apply([&](auto... a) { atb_kernel<a_t, b_t, acc_t, out_t, false, false><<<grid, kThreads, 0, stream>>>(a...); },
                   args);
      }
      check_launch();
    });
  });
}

void gram_accumulate_cuda(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y) {
  check_gram_accumulate(G, C, X, Y);
  TORCH_CHECK_VALUE(G.is_cuda(), "gram_accumulate_: the CUDA kernel needs CUDA tensors");
  if (X.size(0) == 0 || X.size(1) == 0) return;
  const c10::DeviceGuard guard(G.device());
  const cudaStream_t stream = current_stream(G);
  if (G.scalar_type() == at::kDouble) {
    launch_atb<double, double, true>(X, X, G, stream);
    if (Y.size(1) > 0) launch_atb<double, double, true>(X, Y, C, stream);
  } else {
    launch_atb<float, float, true>(X, X, G, stream);
    if (Y.size(1) > 0) launch_atb<float, float, true>(X, Y, C, stream);
  }
}

// weight ← Tᵀ·weight: computed into a contiguous temporary of the weight's dtype (every output element needs a
// whole input column), then copied back into the caller's storage (any strides). Accumulation in T's dtype.
void fold_projection_cuda(at::Tensor weight, const at::Tensor& T) {
  check_fold_projection(weight, T);
  TORCH_CHECK_VALUE(weight.is_cuda(), "fold_projection_: the CUDA kernel needs CUDA tensors");
  if (weight.numel() == 0) return;
  const c10::DeviceGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight);
  at::Tensor folded = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gradmap_fold_cuda", [&] {
    if (T.scalar_type() == at::kDouble)
      launch_atb<double, scalar_t, false>(T, weight, folded, stream);
    else
      launch_atb<float, scalar_t, false>(T, weight, folded, stream);
  });
  weight.copy_(folded);
}

}  // namespace
}  // namespace cuda
}  // namespace gradmap

TORCH_LIBRARY_IMPL(gradmap, CUDA, m) {
  m.impl("fold_projection_", &gradmap::cuda::fold_projection_cuda);
  m.impl("gram_accumulate_", &gradmap::cuda::gram_accumulate_cuda);
}

// CUDA kernels of gradmap::fold_projection_ and gradmap::gram_accumulate_: panel-streamed ATen GEMMs (cuBLAS).
//
// No hand-written device code: both ops are products Aᵀ·B, which cuBLAS computes faster than any tile loop written
// here (fp64 on the fp64 tensor cores of sm_80/sm_90, fp32 without TF32), deterministically (cuBLAS does not use
// atomics unless asked to), on the caller's current stream. The file is plain C++ that includes only ATen and the
// dispatcher headers, registers its kernels for the CUDA dispatch key and is compiled into the same library as the
// CPU kernels by a C++ compiler: no nvcc, no CUDA toolkit and no CUDA headers at build time. Built against a CUDA
// torch, CUDA tensors reach these kernels; built against a CPU torch they are registered but unreachable.
//
// Accumulation (the same rule as the CPU kernels, cpu/ops_cpu.cpp):
//   * gram_accumulate_: fp64 for every product and sum, whatever G's dtype; fp32 G/C receive the fp64 increment of a
//     call rounded once (gram_streamed.h).
//   * fold_projection_: T's dtype (fp32 or fp64); fp32 in IEEE single precision: TF32 is switched off for the op's
//     GEMMs (at::NoTF32Guard) even when torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision allow it.
//
// Formulas: GradMAP (arXiv 2602.14649) Sec. 3 (projection folded into down_proj), closed form as in ReplaceMe
// (arXiv 2505.02819) Eq. 4 (Gram matrix G = MᵀM, cross term C = MᵀR) — see gradmap/projection.py.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../gram_streamed.h"

namespace gradmap {
namespace cuda {
namespace {

// Panel sizes: a byte budget per conversion buffer instead of fixed counts (GPU memory is plentiful, and a GEMM
// needs a few thousand rows to run near peak). At d = e = 4096 the Gram panels hold 2048 tokens (2 × 64 MiB fp64),
// each block-row GEMM is 512 × (≤4096) × 2048; the fold panels hold 1024 columns of a 4096-row weight (2 × 32 MiB).
constexpr int64_t kPanelBytes = int64_t(64) << 20;
constexpr int64_t kTokenPanelMin = 256, kTokenPanelMax = 8192;
constexpr int64_t kGramBlock = 512;  // symmetric update: 8 block rows at d = 4096 (56 % of a full XᵀX's FLOPs)
constexpr int64_t kFoldColumnsMin = 256;

void require_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", name, " on ", t.device());
}

void gram_accumulate_cuda(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y) {
  check_gram_accumulate(G, C, X, Y);
  require_cuda(G, "gram_accumulate_", "G");
  const c10::DeviceGuard guard(G.device());
  const int64_t row_bytes = 8 * std::max<int64_t>(1, X.size(1) + Y.size(1));
  const int64_t panel = std::clamp(kPanelBytes / row_bytes, kTokenPanelMin, kTokenPanelMax);
  gram_accumulate_streamed(G, C, X, Y, panel, kGramBlock);
}

// weight ← Tᵀ·weight in column panels: P = weight[:, c0:c0+nb] converted to T's dtype ([out, nb], contiguous),
// R = Tᵀ·P by one GEMM, R written back over the same columns in the weight's dtype (round to nearest even, as
// Tensor.to), whatever the weight's strides. Extra memory: two panels of out·nb elements of T's dtype.
void fold_projection_cuda(at::Tensor weight, const at::Tensor& T) {
  check_fold_projection(weight, T);
  require_cuda(weight, "fold_projection_", "weight");
  if (weight.numel() == 0) return;
  const c10::DeviceGuard guard(weight.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::NoTF32Guard ieee_fp32;  // thread-local; restores the caller's setting on exit
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t item = static_cast<int64_t>(T.element_size());
  const int64_t nb = std::min(in, std::max(kFoldColumnsMin, kPanelBytes / (2 * item * out)));
  const auto acc = weight.options().dtype(T.scalar_type());
  at::Tensor p_buf = at::empty({out, nb}, acc), r_buf = at::empty({out, nb}, acc);
  const at::Tensor Tt = T.t();
  for (int64_t c0 = 0; c0 < in; c0 += nb) {
    const int64_t cb = std::min(nb, in - c0);
    at::Tensor columns = weight.narrow(1, c0, cb);
    at::Tensor p = p_buf.narrow(1, 0, cb), r = r_buf.narrow(1, 0, cb);
    p.copy_(columns);
    at::mm_out(r, Tt, p);
    columns.copy_(r);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace gradmap

TORCH_LIBRARY_IMPL(gradmap, CUDA, m) {
  m.impl("fold_projection_", &gradmap::cuda::fold_projection_cuda);
  m.impl("gram_accumulate_", &gradmap::cuda::gram_accumulate_cuda);
}

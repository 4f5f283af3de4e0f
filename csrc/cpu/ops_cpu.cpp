// CPU kernels of gradmap::fold_projection_ and gradmap::gram_accumulate_ (panel-streamed, BLAS-backed).
//
// Both ops are products Aᵀ·B over a long shared dimension (tokens for the Gram statistics, the hidden size for the
// fold). Instead of converting whole operands to the accumulation type (what the PyTorch references do: X.to(fp64),
// weight.double(), which costs tokens·d·8 or out·in·8 bytes), the kernels stream fixed-size panels: a panel of rows
// (Gram) or columns (fold) is converted into a small reused buffer of the accumulation type, multiplied with ATen's
// BLAS-backed GEMM (at::mm_out / addmm_: MKL or OpenBLAS on CPU wheels), and the result is added into G/C or written
// back into the weight's own storage in its dtype, whatever the strides. Extra memory is a few panels, independent
// of the token count and of the weight's width.
//
// Formulas: GradMAP (arXiv 2602.14649) Sec. 3 (projection folded into down_proj), closed form as in ReplaceMe
// (arXiv 2505.02819) Eq. 4 (Gram matrix G = MᵀM, cross term C = MᵀR) — see gradmap/projection.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../gram_streamed.h"

namespace gradmap {
namespace cpu {
namespace {

// Panel sizes, timed on the CPU test machine (MKL, 1 thread, d = 4096; torch.mm loops with these layouts):
// * Gram: token panels of up to 1024 tokens (fp64 X and Y panels: 1024·(d + e)·8 bytes = 64 MiB at d = e = 4096).
//   A panel's GEMMs cost ∝ tokens, its read-modify-write of G and C (512 MiB of traffic at d = e = 4096, ~0.05 s)
//   does not; at 1024 tokens (~1.3 s of GEMM per panel at d = e = 4096) that overhead is ~4 %.
// * Gram: column blocks of 256 for the symmetric update (256 was 5 % faster than 512, 13 % faster than 1024).
// * fold: column panels of out/4 weight columns, clamped to [256, 1024] (two buffers of 1024·out·8 bytes = 64 MiB at
//   out = 4096). Each panel GEMM packs all of T once, so at out = 4096 narrower panels lose time to packing
//   (4096×11008, bench_ops.py, 1 thread: 512 columns 0.99× the reference's speed, 1024 columns 1.01×); at
//   out = 576 (T in cache) 512-column panels already beat the reference, so small weights get small panels.
constexpr int64_t kTokenPanel = 1024;
constexpr int64_t kGramBlock = 256;
constexpr int64_t kFoldColumnsMin = 256, kFoldColumnsMax = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------------
// gram_accumulate_: G += XᵀX, C += XᵀY with fp64 accumulation (gram_streamed.h), 1024-token panels, 256-wide blocks.

void gram_accumulate_cpu(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y) {
  check_gram_accumulate(G, C, X, Y);
  gram_accumulate_streamed(G, C, X, Y, kTokenPanel, kGramBlock);
}

// ---------------------------------------------------------------------------------------------------------------
// fold_projection_: weight ← Tᵀ·weight in place, accumulated in T's dtype (fp32 or fp64).
//
// Column panels of the weight are independent. A panel of nb columns is converted, transposed (copy_blocked), into a
// buffer P = weight[:, c0:c0+nb]ᵀ ([nb, out], T's dtype); the GEMM R = P·T ([nb, out]) is
// (Tᵀ·weight[:, c0:c0+nb])ᵀ, and Rᵀ is written back over the same columns in the weight's dtype (round to
// nearest even, as Tensor.to). Panels in this transposed layout ran at the full-matrix GEMM rate with MKL, the
// untransposed Tᵀ·panel 15-35 % slower.
// at::parallel_for spreads the panels over threads, each with its own two buffers and a one-thread GEMM.

// dst[i·d0 + j·d1] = src[i·s0 + j·s1] for i < rows, j < cols, converted with c10::convert (the rounding Tensor.to
// uses), in 32×32 blocks so that a transposing copy reads and writes whole cache lines. ATen's strided copy_ of the
// transposed panels cost ~6 % of the fold at 4096×11008 (1 thread).
template <typename dst_t, typename src_t>
void copy_blocked(const src_t* src, int64_t s0, int64_t s1, dst_t* dst, int64_t d0, int64_t d1, int64_t rows,
                  int64_t cols) {
  constexpr int64_t kB = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kB)
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t i1 = std::min(rows, i0 + kB), j1 = std::min(cols, j0 + kB);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[i * d0 + j * d1] = c10::convert<dst_t>(src[i * s0 + j * s1]);
    }
}

template <typename scalar_t, typename acc_t>
void fold_panels(const at::Tensor& weight, const at::Tensor& T, int64_t nb) {
  const int64_t out = weight.size(0), in = weight.size(1), ws0 = weight.stride(0), ws1 = weight.stride(1);
  scalar_t* w = weight.data_ptr<scalar_t>();
  const auto acc = weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::parallel_for(0, ceil_div(in, nb), 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;  // thread-local: set again on each worker
    at::Tensor p_buf = at::empty({nb, out}, acc), r_buf = at::empty({nb, out}, acc);
    acc_t* panel = p_buf.data_ptr<acc_t>();
    const acc_t* result = r_buf.data_ptr<acc_t>();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * nb, cb = std::min(nb, in - c0);
      // panel[j][i] = weight[i][c0 + j]; result = panel·T; weight[i][c0 + j] = result[j][i]
      copy_blocked(w + c0 * ws1, ws0, ws1, panel, int64_t(1), out, out, cb);
      at::Tensor r = r_buf.narrow(0, 0, cb);
      at::mm_out(r, p_buf.narrow(0, 0, cb), T);
      copy_blocked(result, int64_t(1), out, w + c0 * ws1, ws0, ws1, out, cb);
    }
  });
}

void fold_projection_cpu(at::Tensor weight, const at::Tensor& T) {
  check_fold_projection(weight, T);
  if (weight.numel() == 0) return;
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  // Panel width: out/4 within [kFoldColumnsMin, kFoldColumnsMax], and small enough that every thread gets a panel.
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t width = std::clamp(out / 4, kFoldColumnsMin, kFoldColumnsMax);
  const int64_t nb = std::max<int64_t>(1, std::min(width, ceil_div(in, std::max(1, at::get_num_threads()))));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gradmap_fold", [&] {
    if (T.scalar_type() == at::kDouble)
      fold_panels<scalar_t, double>(weight, T, nb);
    else
      fold_panels<scalar_t, float>(weight, T, nb);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace gradmap

TORCH_LIBRARY_IMPL(gradmap, CPU, m) {
  m.impl("fold_projection_", &gradmap::cpu::fold_projection_cpu);
  m.impl("gram_accumulate_", &gradmap::cpu::gram_accumulate_cpu);
}

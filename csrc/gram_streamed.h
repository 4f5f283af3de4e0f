// gram_accumulate_ for any device: G += XᵀX, C += XᵀY with fp64 accumulation, streamed in token panels through
// ATen's GEMM (at::mm_out / addmm_: MKL or OpenBLAS on CPU, cuBLAS on CUDA). Header only, ATen only (no CUDA
// headers): the CPU and the CUDA kernel both call gram_accumulate_streamed with their own panel sizes.
//
// Accumulation rule (the same on every device): every product and sum is taken in fp64. Token panels of X and Y are
// converted to fp64 into reused buffers and multiplied with fp64 GEMMs. fp64 G/C whose layout BLAS can write are
// updated in place; fp32 (or oddly strided) G/C get an fp64 accumulator for the call, added into them once at the end
// (one rounding per call). No split-K atomics: the result of a call depends only on the inputs and the BLAS library.
//
// G is symmetric in its increment: per column block [i0, i0 + b) only the block row S = X[:, i0:i0+b]ᵀ·X[:, i0:]
// (the diagonal block and everything right of it) is computed, added to G[i0:i0+b, i0:] and, transposed, to
// G[i0+b:, i0:i0+b]: about half the multiply-adds of a full XᵀX, and an exactly symmetric increment. G need not be
// symmetric on entry (each half gets its own increment).
//
// Formulas: closed-form ridge statistics as in ReplaceMe (arXiv 2505.02819) Eq. 4 (Gram matrix G = MᵀM, cross term
// C = MᵀR), used by GradMAP's stage 2 (arXiv 2602.14649) Sec. 3 — see gradmap/projection.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"

namespace gradmap {

// Whether BLAS can write into `t` directly (row- or column-major with a leading dimension), so no copy is needed.
inline bool blas_writable(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) ||
         (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0)));
}

// acc[i0:i0+b, i0:] += S and acc[i0+b:, i0:i0+b] += S[:, b:]ᵀ for every column block of width `block`;
// xp [kb, d] fp64 contiguous; block_row [min(block, d), d] fp64 scratch.
inline void add_gram_increment(at::Tensor& acc, const at::Tensor& xp, at::Tensor& block_row, int64_t block) {
  const int64_t d = xp.size(1);
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t b = std::min(block, d - i0), rest = d - i0;
    at::Tensor s = block_row.narrow(0, 0, b).narrow(1, 0, rest);
    at::mm_out(s, xp.narrow(1, i0, b).t(), xp.narrow(1, i0, rest));
    acc.narrow(0, i0, b).narrow(1, i0, rest).add_(s);
    if (rest > b) acc.narrow(0, i0 + b, rest - b).narrow(1, i0, b).add_(s.narrow(1, b, rest - b).t());
  }
}

// G += XᵀX, C += XᵀY (shapes and dtypes as checked by check_gram_accumulate), `token_panel` tokens per GEMM panel,
// symmetric update in column blocks of `block`. Extra memory: token_panel·(d + e)·8 + min(block, d)·d·8 bytes,
// plus d·d·8 (d·e·8) for an fp32 or non-BLAS-layout G (C).
inline void gram_accumulate_streamed(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y,
                                     int64_t token_panel, int64_t block) {
  const int64_t n = X.size(0), d = X.size(1), e = Y.size(1);
  if (n == 0 || d == 0) return;
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the updates below are the op's own, not traced steps
  const auto f64 = X.options().dtype(at::kDouble);
  const bool g_direct = G.scalar_type() == at::kDouble && blas_writable(G);
  const bool c_direct = C.scalar_type() == at::kDouble && blas_writable(C);
  at::Tensor g_acc = g_direct ? G : at::zeros({d, d}, f64);
  at::Tensor c_acc = (c_direct || e == 0) ? C : at::zeros({d, e}, f64);

  const int64_t kb_max = std::min(n, std::max<int64_t>(1, token_panel));
  at::Tensor x_panel = at::empty({kb_max, d}, f64), y_panel = at::empty({kb_max, e}, f64);
  at::Tensor block_row = at::empty({std::min(block, d), d}, f64);
  for (int64_t k0 = 0; k0 < n; k0 += kb_max) {
    const int64_t kb = std::min(kb_max, n - k0);
    at::Tensor xp = x_panel.narrow(0, 0, kb);
    xp.copy_(X.narrow(0, k0, kb));
    add_gram_increment(g_acc, xp, block_row, block);
    if (e > 0) {
      at::Tensor yp = y_panel.narrow(0, 0, kb);
      yp.copy_(Y.narrow(0, k0, kb));
      c_acc.addmm_(xp.t(), yp);
    }
  }
  if (!g_direct) G.add_(g_acc);
  if (!c_direct && e > 0) C.add_(c_acc);
}

}  // namespace gradmap

// CPU kernels of gradmap::fold_projection_ and gradmap::gram_accumulate_ (blocked, at::parallel_for).
//
// Both ops are products of the form Aᵀ·B over a long shared dimension K (tokens for the Gram statistics, the
// hidden size for the fold). Operands are packed into zero-padded panels of kPanel columns in the accumulation type
// (reading any strides and any of fp32/fp16/bf16/fp64), and tile_atb (tile.h) produces one kPanel×kPanel output
// tile at a time; at::parallel_for spreads output tiles over threads. Formulas: GradMAP (arXiv 2602.14649) Sec. 3,
// closed form as in ReplaceMe (arXiv 2505.02819) Eq. 4 — see gradmap/projection.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "tile.h"

namespace gradmap {
namespace cpu {
namespace {

constexpr int64_t P = kPanel;
constexpr int64_t kTokenChunk = 256;  // rows of X/Y packed per pass of gram_accumulate_
constexpr int64_t kFoldChunk = 128;   // rows of T/weight per tile_atb call in fold_projection_

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pack rows [k0, k0 + kb) of the strided matrix A ([K, cols]) into panels: out[blk][k][c] = A[k0 + k, blk·P + c]
// (0 past cols). Panels blk in [blk0, blk1); out points at panel blk0.
template <typename scalar_t, typename acc_t>
void pack_rows(const at::Tensor& A, int64_t k0, int64_t kb, int64_t blk0, int64_t blk1, acc_t* out) {
  const scalar_t* base = A.data_ptr<scalar_t>();
  const int64_t s0 = A.stride(0), s1 = A.stride(1), cols = A.size(1);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    acc_t* panel = out + (blk - blk0) * kb * P;
    const int64_t c0 = blk * P, cn = std::min(P, cols - c0);
    for (int64_t k = 0; k < kb; ++k) {
      const scalar_t* row = base + (k0 + k) * s0 + c0 * s1;
      acc_t* dst = panel + k * P;
      for (int64_t c = 0; c < cn; ++c) dst[c] = static_cast<acc_t>(static_cast<float>(row[c * s1]));
      for (int64_t c = cn; c < P; ++c) dst[c] = acc_t(0);
    }
  }
}

// double sources keep full precision (the float hop above is only for the 16-bit types).
template <>
void pack_rows<double, double>(const at::Tensor& A, int64_t k0, int64_t kb, int64_t blk0, int64_t blk1,
                               double* out) {
  const double* base = A.data_ptr<double>();
  const int64_t s0 = A.stride(0), s1 = A.stride(1), cols = A.size(1);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    double* panel = out + (blk - blk0) * kb * P;
    const int64_t c0 = blk * P, cn = std::min(P, cols - c0);
    for (int64_t k = 0; k < kb; ++k) {
      const double* row = base + (k0 + k) * s0 + c0 * s1;
      double* dst = panel + k * P;
      for (int64_t c = 0; c < cn; ++c) dst[c] = row[c * s1];
      for (int64_t c = cn; c < P; ++c) dst[c] = 0.0;
    }
  }
}

// Dispatch pack_rows on A's dtype; panels [blk0, blk1) packed in parallel.
template <typename acc_t>
void pack_parallel(const at::Tensor& A, int64_t k0, int64_t kb, acc_t* out) {
  const int64_t nblk = ceil_div(A.size(1), P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradmap_pack", [&] {
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      pack_rows<scalar_t, acc_t>(A, k0, kb, b0, b1, out + b0 * kb * P);
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// gram_accumulate_: G += XᵀX, C += XᵀY, accumulated in fp64 (added into G/C in their dtype once per token chunk).
// G is symmetric: only tiles (bi ≤ bj) are computed and each off-diagonal tile is also added transposed.

template <typename out_t>
void add_tile(const at::Tensor& out, const double* tile, int64_t r0, int64_t c0, bool transposed) {
  out_t* base = out.data_ptr<out_t>();
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  const int64_t rows = out.size(0), cols = out.size(1);
  // tile[i][j] belongs at out[r0 + i, c0 + j], or at out[c0 + j, r0 + i] when transposed.
  const int64_t ni = std::min(P, (transposed ? cols : rows) - r0);
  const int64_t nj = std::min(P, (transposed ? rows : cols) - c0);
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j) {
      out_t* dst = transposed ? base + (c0 + j) * s0 + (r0 + i) * s1 : base + (r0 + i) * s0 + (c0 + j) * s1;
      *dst = static_cast<out_t>(static_cast<double>(*dst) + tile[i * P + j]);
    }
}

void gram_accumulate_cpu(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y) {
  check_gram_accumulate(G, C, X, Y);
  const int64_t n = X.size(0), d = X.size(1), e = Y.size(1);
  if (n == 0 || d == 0) return;
  const int64_t nbd = ceil_div(d, P), nbe = ceil_div(e, P);
  std::vector<double> xp(nbd * kTokenChunk * P), yp(nbe * kTokenChunk * P);
  // Task list: upper-triangular G tiles, then every C tile.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t bi = 0; bi < nbd; ++bi)
    for (int64_t bj = bi; bj < nbd; ++bj) tasks.emplace_back(bi, bj);
  const int64_t n_gram_tasks = static_cast<int64_t>(tasks.size());
  for (int64_t bi = 0; bi < nbd; ++bi)
    for (int64_t bj = 0; bj < nbe; ++bj) tasks.emplace_back(bi, bj);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());

  for (int64_t k0 = 0; k0 < n; k0 += kTokenChunk) {
    const int64_t kb = std::min(kTokenChunk, n - k0);
    pack_parallel<double>(X, k0, kb, xp.data());
    if (e > 0) pack_parallel<double>(Y, k0, kb, yp.data());
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> tile(P * P);
      for (int64_t t = t0; t < t1; ++t) {
        const auto [bi, bj] = tasks[t];
        const bool is_gram = t < n_gram_tasks;
        std::fill(tile.begin(), tile.end(), 0.0);
        const double* b = (is_gram ? xp.data() : yp.data()) + bj * kb * P;
        tile_atb(xp.data() + bi * kb * P, b, kb, tile.data());
        const at::Tensor& out = is_gram ? G : C;
        AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gradmap_gram_add", [&] {
          add_tile<scalar_t>(out, tile.data(), bi * P, bj * P, false);
          if (is_gram && bi != bj) add_tile<scalar_t>(out, tile.data(), bi * P, bj * P, true);
        });
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// fold_projection_: weight ← Tᵀ·weight in place. Accumulates in T's dtype (fp32 or fp64). Column blocks of the
// weight are independent: each task packs its block (all K = out rows) before overwriting it, so the update is in
// place on the caller's storage, whatever its strides.

template <typename scalar_t, typename acc_t>
void fold_columns(const at::Tensor& weight, const std::vector<acc_t>& tp, int64_t cb0, int64_t cb1) {
  const int64_t out = weight.size(0), in = weight.size(1), nbm = ceil_div(out, P);
  scalar_t* base = weight.data_ptr<scalar_t>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  std::vector<acc_t> wp(out * P), tile(P * P);
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    pack_rows<scalar_t, acc_t>(weight, 0, out, cb, cb + 1, wp.data());
    const int64_t c0 = cb * P, cn = std::min(P, in - c0);
    for (int64_t bm = 0; bm < nbm; ++bm) {
      std::fill(tile.begin(), tile.end(), acc_t(0));
      // K blocked so that both panel slices stay in cache while the tile accumulates.
      for (int64_t k0 = 0; k0 < out; k0 += kFoldChunk)
        tile_atb(tp.data() + (bm * out + k0) * P, wp.data() + k0 * P, std::min(kFoldChunk, out - k0), tile.data());
      const int64_t r0 = bm * P, rn = std::min(P, out - r0);
      for (int64_t i = 0; i < rn; ++i)
        for (int64_t j = 0; j < cn; ++j)
          base[(r0 + i) * s0 + (c0 + j) * s1] = static_cast<scalar_t>(tile[i * P + j]);
    }
  }
}

template <typename acc_t>
void fold_projection_typed(const at::Tensor& weight, const at::Tensor& T) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t nbm = ceil_div(out, P), nbn = ceil_div(in, P);
  // T packed once: panel bm holds columns [bm·P, bm·P + P) of T, i.e. rows of Tᵀ, over all K = out rows.
  std::vector<acc_t> tp(nbm * out * P);
  pack_parallel<acc_t>(T, 0, out, tp.data());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gradmap_fold", [&] {
    at::parallel_for(0, nbn, 1, [&](int64_t cb0, int64_t cb1) {
      fold_columns<scalar_t, acc_t>(weight, tp, cb0, cb1);
    });
  });
}

void fold_projection_cpu(at::Tensor weight, const at::Tensor& T) {
  check_fold_projection(weight, T);
  if (weight.numel() == 0) return;
  if (T.scalar_type() == at::kDouble)
    fold_projection_typed<double>(weight, T);
  else
    fold_projection_typed<float>(weight, T);
}

}  // namespace
}  // namespace cpu
}  // namespace gradmap

TORCH_LIBRARY_IMPL(gradmap, CPU, m) {
  m.impl("fold_projection_", &gradmap::cpu::fold_projection_cpu);
  m.impl("gram_accumulate_", &gradmap::cpu::gram_accumulate_cpu);
}

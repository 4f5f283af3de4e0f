// Register-blocked micro-kernel shared by the CPU ops: one P×P output tile of Aᵀ·B from packed panels.
//
// A panel holds one block of P consecutive columns of a [K, cols] matrix, K rows of P contiguous values (row k at
// offset k·P), zero-padded past the last column, already converted to the accumulation type. The tile kernel adds
// Σ_k a_kᵀ b_k (an outer product per row k) into a row-major P×P tile, MR×NR outputs at a time held in registers.
#pragma once

#include <cstdint>

namespace gradmap {
namespace cpu {

constexpr int64_t kPanel = 64;  // P: panel width = output tile edge (elements)
constexpr int64_t kMR = 4;      // register tile rows
constexpr int64_t kNR = 8;      // register tile columns

// tile[i][j] += Σ_{k<K} a[k·P + i] · b[k·P + j] for i, j < P (accumulation in acc_t).
void tile_atb(const double* a, const double* b, int64_t K, double* tile);
void tile_atb(const float* a, const float* b, int64_t K, float* tile);

// Whether the AVX2+FMA version of tile_atb is the one in use on this CPU.
bool tile_uses_avx2_fma();

}  // namespace cpu
}  // namespace gradmap

// Micro-kernel of the CPU ops (see tile.h). On x86-64 with GCC/Clang the kernel body is compiled twice, once for
// AVX2+FMA and once for the baseline ISA, and the AVX2+FMA version is chosen at run time when the CPU reports both
// (__builtin_cpu_supports), so one portable binary still uses 256-bit FMA where available.
#include "tile.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define GRADMAP_X86_DISPATCH 1
#endif

namespace gradmap {
namespace cpu {
namespace {

template <typename acc_t>
inline __attribute__((always_inline)) void tile_atb_impl(const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                                         int64_t K, acc_t* __restrict__ tile) {
  for (int64_t i = 0; i < kPanel; i += kMR) {
    for (int64_t j = 0; j < kPanel; j += kNR) {
      acc_t c[kMR][kNR] = {};
      const acc_t* ap = a + i;
      const acc_t* bp = b + j;
      for (int64_t k = 0; k < K; ++k, ap += kPanel, bp += kPanel) {
        for (int64_t r = 0; r < kMR; ++r) {
          const acc_t ar = ap[r];
          for (int64_t q = 0; q < kNR; ++q) c[r][q] += ar * bp[q];
        }
      }
      for (int64_t r = 0; r < kMR; ++r)
        for (int64_t q = 0; q < kNR; ++q) tile[(i + r) * kPanel + j + q] += c[r][q];
    }
  }
}

template <typename acc_t>
void tile_atb_baseline(const acc_t* a, const acc_t* b, int64_t K, acc_t* tile) {
  tile_atb_impl<acc_t>(a, b, K, tile);
}

#ifdef GRADMAP_X86_DISPATCH
template <typename acc_t>
__attribute__((target("avx2,fma"))) void tile_atb_avx2(const acc_t* a, const acc_t* b, int64_t K, acc_t* tile) {
  tile_atb_impl<acc_t>(a, b, K, tile);
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <typename acc_t>
void tile_atb_dispatch(const acc_t* a, const acc_t* b, int64_t K, acc_t* tile) {
#ifdef GRADMAP_X86_DISPATCH
  if (cpu_has_avx2_fma()) return tile_atb_avx2<acc_t>(a, b, K, tile);
#endif
  tile_atb_baseline<acc_t>(a, b, K, tile);
}

}  // namespace

void tile_atb(const double* a, const double* b, int64_t K, double* tile) { tile_atb_dispatch(a, b, K, tile); }

void tile_atb(const float* a, const float* b, int64_t K, float* tile) { tile_atb_dispatch(a, b, K, tile); }

bool tile_uses_avx2_fma() {
#ifdef GRADMAP_X86_DISPATCH
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace gradmap

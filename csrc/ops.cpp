// Schemas of the gradmap ops and their Meta (shape-only) kernels.
//
//   gradmap::fold_projection_(Tensor(a!) weight, Tensor T) -> ()
//       weight ← Tᵀ·weight in place (stage-2 projection folded into down_proj; GradMAP arXiv 2602.14649 Sec. 3).
//       Accumulation in T's dtype (fp32 or fp64) on every device (on CUDA fp32 without TF32).
//   gradmap::gram_accumulate_(Tensor(a!) G, Tensor(b!) C, Tensor X, Tensor Y) -> ()
//       G += XᵀX, C += XᵀY (streamed statistics of the closed-form ridge fit; ReplaceMe arXiv 2505.02819 Eq. 4).
//       Accumulation in fp64 on every device, whatever G's dtype (fp32 G/C get each call's fp64 sum rounded once).
//
// CPU kernels: cpu/ops_cpu.cpp; CUDA kernels: cuda/ops_cuda.cpp (ATen GEMMs, plain C++); the Gram streaming both
// share: gram_streamed.h. All of them are compiled into one library (gradmap/_C*.so) by a C++ compiler.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace gradmap {
namespace {

void fold_projection_meta(at::Tensor weight, const at::Tensor& T) { check_fold_projection(weight, T); }

void gram_accumulate_meta(at::Tensor G, at::Tensor C, const at::Tensor& X, const at::Tensor& Y) {
  check_gram_accumulate(G, C, X, Y);
}

}  // namespace
}  // namespace gradmap

TORCH_LIBRARY(gradmap, m) {
  m.def("fold_projection_(Tensor(a!) weight, Tensor T) -> ()");
  m.def("gram_accumulate_(Tensor(a!) G, Tensor(b!) C, Tensor X, Tensor Y) -> ()");
}

TORCH_LIBRARY_IMPL(gradmap, Meta, m) {
  m.impl("fold_projection_", &gradmap::fold_projection_meta);
  m.impl("gram_accumulate_", &gradmap::gram_accumulate_meta);
}

// Argument checks shared by the CPU, CUDA and Meta kernels of the gradmap ops (header only; no CUDA headers).
//
// Every check raises through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE, which surface in Python as ValueError /
// TypeError with the message naming the argument and the accepted values.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <utility>

namespace gradmap {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The checks read sizes as SymInts so that the Meta kernels also work under dynamic shapes (torch.compile,
// opcheck's aot_dispatch_dynamic); for concrete tensors the comparisons are plain integer comparisons.
inline bool same_size(const c10::SymInt& a, const c10::SymInt& b) { return a == b; }  // guards when symbolic

inline bool is_symbolic(const at::Tensor& t) { return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.sym_size(i);
  s << "]";
  return s.str();
}

// Byte range [first, last] that a strided tensor touches inside its storage (numel > 0).
inline std::pair<int64_t, int64_t> storage_byte_range(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * std::abs(t.stride(i));
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {t.storage_offset() * item, (t.storage_offset() + last + 1) * item - 1};
}

inline void check_no_overlap(const at::Tensor& written, const char* wname, const at::Tensor& other,
                             const char* oname) {
  // Refuse (rather than silently corrupt) an output that shares memory with another argument. Conservative:
  // two views of one storage are refused when their byte ranges intersect, even if their elements interleave.
  if (is_symbolic(written) || is_symbolic(other)) return;  // fake tensors under tracing: no memory to compare
  if (written.numel() == 0 || other.numel() == 0 || !written.storage().is_alias_of(other.storage())) return;
  const auto a = storage_byte_range(written), b = storage_byte_range(other);
  TORCH_CHECK_VALUE(a.second < b.first || b.second < a.first, "gradmap: ", wname, " shares memory with ", oname,
                    "; pass separate tensors (e.g. ", oname, ".clone())");
}

// fold_projection_(weight, T): weight [out, in] fp32/fp16/bf16/fp64, any strides without internal overlap;
// T [out, out] fp32/fp64 on the same device; weight and T must not share memory.
inline void check_fold_projection(const at::Tensor& weight, const at::Tensor& T) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "fold_projection_: weight must be 2-D [out, in], got ", shape_str(weight));
  TORCH_CHECK_VALUE(T.dim() == 2 && same_size(T.sym_size(0), T.sym_size(1)) && same_size(T.sym_size(0), weight.sym_size(0)),
                    "fold_projection_: T must be [", weight.sym_size(0), ", ", weight.sym_size(0), "] for weight ",
                    shape_str(weight), ", got ", shape_str(T));
  TORCH_CHECK_TYPE(is_activation_dtype(weight.scalar_type()),
                   "fold_projection_: weight dtype must be float32, float16, bfloat16 or float64, got ",
                   weight.scalar_type());
  TORCH_CHECK_TYPE(T.scalar_type() == at::kFloat || T.scalar_type() == at::kDouble,
                   "fold_projection_: T dtype must be float32 or float64, got ", T.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == T.device(), "fold_projection_: weight (", weight.device(), ") and T (",
                    T.device(), ") must be on the same device");
  TORCH_CHECK_VALUE(is_symbolic(weight) || at::has_internal_overlap(weight) != at::MemOverlap::Yes,
                    "fold_projection_: weight has internally overlapping memory (e.g. from expand); "
                    "pass a tensor whose elements have distinct addresses");
  check_no_overlap(weight, "weight", T, "T");
}

// gram_accumulate_(G, C, X, Y): X [tokens, d], Y [tokens, e] fp32/fp16/bf16/fp64; G [d, d] and C [d, e]
// of one dtype, fp64 or fp32; all on one device; G and C overlap neither each other nor X/Y.
inline void check_gram_accumulate(const at::Tensor& G, const at::Tensor& C, const at::Tensor& X,
                                  const at::Tensor& Y) {
  TORCH_CHECK_VALUE(X.dim() == 2 && Y.dim() == 2 && same_size(X.sym_size(0), Y.sym_size(0)),
                    "gram_accumulate_: X and Y must be [tokens, d] and [tokens, e], got ", shape_str(X), " and ",
                    shape_str(Y));
  const c10::SymInt d = X.sym_size(1), e = Y.sym_size(1);
  TORCH_CHECK_VALUE(G.dim() == 2 && same_size(G.sym_size(0), d) && same_size(G.sym_size(1), d) && C.dim() == 2 &&
                        same_size(C.sym_size(0), d) && same_size(C.sym_size(1), e),
                    "gram_accumulate_: G and C must be [", d, ", ", d, "] and [", d, ", ", e, "], got ",
                    shape_str(G), " and ", shape_str(C));
  TORCH_CHECK_TYPE(G.scalar_type() == C.scalar_type() &&
                       (G.scalar_type() == at::kDouble || G.scalar_type() == at::kFloat),
                   "gram_accumulate_: G and C must both be float64 or both float32, got ", G.scalar_type(), " and ",
                   C.scalar_type());
  TORCH_CHECK_TYPE(is_activation_dtype(X.scalar_type()) && is_activation_dtype(Y.scalar_type()),
                   "gram_accumulate_: X and Y dtypes must be float32, float16, bfloat16 or float64, got ",
                   X.scalar_type(), " and ", Y.scalar_type());
  TORCH_CHECK_VALUE(G.device() == C.device() && G.device() == X.device() && G.device() == Y.device(),
                    "gram_accumulate_: G, C, X, Y must be on one device, got ", G.device(), ", ", C.device(), ", ",
                    X.device(), ", ", Y.device());
  TORCH_CHECK_VALUE(is_symbolic(G) || is_symbolic(C) || (at::has_internal_overlap(G) != at::MemOverlap::Yes &&
                                                         at::has_internal_overlap(C) != at::MemOverlap::Yes),
                    "gram_accumulate_: G and C must not have internally overlapping memory (e.g. from expand)");
  check_no_overlap(G, "G", C, "C");
  check_no_overlap(G, "G", X, "X");
  check_no_overlap(G, "G", Y, "Y");
  check_no_overlap(C, "C", X, "X");
  check_no_overlap(C, "C", Y, "Y");
}

}  // namespace gradmap

// The argument checks every op shares (docs/design.md §4, "The op contract"). Every message
// starts with "kxops.<op>: ", the registered op's name, and prints shapes and dtypes as Python
// does ((2, 3), torch.float32), so that an error reads the same whether kxops/_checks.py or
// the C++ op raised it. Error types: TypeError for a wrong type or dtype (TORCH_CHECK_TYPE),
// ValueError for a bad value or shape (TORCH_CHECK_VALUE), IndexError for an out-of-range id,
// RuntimeError for tensors on different devices (as torch's own ops).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <sstream>
#include <string>

namespace kxops {

// A shape or dtype as Python prints it: (2, 3), (4,), (), torch.float32.
inline std::string py(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i > 0 ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string py(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// A layout as Python prints it: torch.strided, torch.sparse_coo, torch.sparse_csr, ...
inline std::string py(at::Layout layout) {
  switch (layout) {
    case at::kStrided:
      return "torch.strided";
    case at::kSparse:
      return "torch.sparse_coo";
    case at::kSparseCsr:
      return "torch.sparse_csr";
    case at::kSparseCsc:
      return "torch.sparse_csc";
    case at::kSparseBsr:
      return "torch.sparse_bsr";
    case at::kSparseBsc:
      return "torch.sparse_bsc";
    case at::kMkldnn:
      return "torch._mkldnn";
    case at::kJagged:
      return "torch.jagged";
    default:
      return c10::str(layout);
  }
}

// The floating dtypes of every kernel (kxops/_checks.py KERNEL_DTYPES).
inline bool is_kernel_float(at::ScalarType type) {
  return type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// A tensor argument at all (None reaches a Tensor argument as an undefined tensor), dense and
// strided and not quantized: a sparse, nested, quantized or mkldnn tensor would reach ATen's
// internals.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), "kxops.", op, ": ", name, " must be a Tensor, got None");
  TORCH_CHECK_TYPE(!t.is_nested(), "kxops.", op, ": ", name,
                   " must be a dense (strided) tensor, got a nested tensor");
  TORCH_CHECK_TYPE(!t.is_quantized(), "kxops.", op, ": ", name,
                   " must be a dense (strided) tensor, got a quantized tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "kxops.", op, ": ", name,
                   " must be a dense (strided) tensor, got layout ", py(t.layout()));
}

// A dense tensor of a kernel float dtype.
inline void check_kernel_float(const char* op, const char* name, const at::Tensor& t) {
  check_tensor(op, name, t);
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), "kxops.", op, ": ", name,
                   " must be a float64, float32, float16 or bfloat16 tensor, got ",
                   py(t.scalar_type()));
}

// A dense tensor of int32 or int64 ids (class or span ids).
inline void check_ids(const char* op, const char* name, const at::Tensor& t) {
  check_tensor(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "kxops.", op, ": ",
                   name, " must be an int32 or int64 tensor, got ", py(t.scalar_type()));
}

// A dense tensor of one value per element: bool, integer or floating point (labels, masks;
// float4_e2m1fn_x2 packs two values per element).
inline void check_real_values(const char* op, const char* name, const at::Tensor& t) {
  check_tensor(op, name, t);
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(type, /*includeBool=*/true) ||
                       (at::isFloatingType(type) && type != at::kFloat4_e2m1fn_x2),
                   "kxops.", op, ": ", name,
                   " must be a bool, integer or floating-point tensor, got ", py(type));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* anchor_name, const at::Tensor& anchor) {
  TORCH_CHECK(t.device() == anchor.device(), "kxops.", op, ": ", name, " is on ", t.device(),
              " but ", anchor_name, " is on ", anchor.device(), "; put all inputs on one device");
}

// A dense tensor on the anchor's device, of its dtype (an operand of the anchor's GEMM or
// kernel).
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const char* anchor_name, const at::Tensor& anchor) {
  check_tensor(op, name, t);
  check_same_device(op, name, t, anchor_name, anchor);
  TORCH_CHECK_TYPE(t.scalar_type() == anchor.scalar_type(), "kxops.", op, ": ", name, " has dtype ",
                   py(t.scalar_type()), " but ", anchor_name, " has dtype ",
                   py(anchor.scalar_type()), "; they must match");
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "kxops.", op, ": ", name, " must have shape ", py(shape),
                    ", got ", py(t.sizes()));
}

inline void check_reduction(const char* op, c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", "kxops.", op,
                    ": reduction must be one of ('none', 'sum', 'mean'), got '", reduction, "'");
}

// grad_filter (the ops with a ZLPR row): a finite number >= 0, 0 meaning no filter.
inline void check_grad_filter(const char* op, double grad_filter) {
  TORCH_CHECK_VALUE(std::isfinite(grad_filter) && grad_filter >= 0, "kxops.", op,
                    ": grad_filter must be a finite number >= 0 (0: no filter), got ", grad_filter);
}

// grad_mask as its N flags, one per differentiable input (names: theirs, comma-separated). A
// schema's bool[N] does not fix the list's length, so a list of another length is refused here
// in the op's words (before, the dispatcher's unboxing raised a RuntimeError without them).
template <size_t N>
std::array<bool, N> check_grad_mask(const char* op, const c10::List<bool>& grad_mask,
                                    const char* names) {
  TORCH_CHECK_VALUE(grad_mask.size() == N, "kxops.", op, ": grad_mask must hold ", N,
                    N == 1 ? " flag (" : " flags (", names, "), got ", grad_mask.size());
  std::array<bool, N> flags{};
  for (size_t i = 0; i < N; ++i) flags[i] = grad_mask[i];
  return flags;
}

}  // namespace kxops

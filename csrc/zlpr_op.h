// Host-side parts of the ZLPR ops shared by the CPU and CUDA kernels: input checks, output
// allocation and the backward (a scaling of the saved gradient).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kxops::zlpr {

inline at::ScalarType opmath_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "kxops ZLPR: logits must be a floating-point tensor, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() >= 1, "kxops ZLPR: logits must have at least 1 dim (the class dim)");
}

inline void check_dense(const at::Tensor& logits, const at::Tensor& labels) {
  check_logits(logits);
  TORCH_CHECK(labels.sizes() == logits.sizes(), "kxops ZLPR: labels shape ", labels.sizes(),
              " must equal logits shape ", logits.sizes());
  TORCH_CHECK(labels.device() == logits.device(), "kxops ZLPR: labels are on ",
              labels.device(), " but logits are on ", logits.device());
  TORCH_CHECK(!labels.is_complex(), "kxops ZLPR: labels must be bool, integer or floating point");
}

inline void check_sparse(const at::Tensor& logits, const at::Tensor& positives) {
  check_logits(logits);
  TORCH_CHECK(positives.scalar_type() == at::kInt || positives.scalar_type() == at::kLong,
              "kxops ZLPR: positives must be an int32 or int64 tensor, got ",
              positives.scalar_type());
  TORCH_CHECK(positives.dim() == logits.dim() &&
                  positives.sizes().slice(0, positives.dim() - 1) ==
                      logits.sizes().slice(0, logits.dim() - 1),
              "kxops ZLPR: positives shape ", positives.sizes(),
              " must be logits.shape[:-1] + (P,) with logits shape ", logits.sizes());
  TORCH_CHECK(positives.device() == logits.device(), "kxops ZLPR: positives are on ",
              positives.device(), " but logits are on ", logits.device());
}

// (loss per row in fp32/fp64, gradient or an empty tensor when not requested).
inline std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& logits,
                                                           bool compute_grad) {
  auto row_shape = logits.sizes().slice(0, logits.dim() - 1);
  auto row_loss = at::empty(row_shape, logits.options().dtype(opmath_type(logits.scalar_type())));
  auto grad = compute_grad ? at::empty(logits.sizes(), logits.options())
                           : at::empty({0}, logits.options());
  return {row_loss, grad};
}

}  // namespace kxops::zlpr

// Host side of the ZLPR ops, shared by the CPU and CUDA kernels: the argument checks (with the
// shared ones of checks.h), output allocation, the reduction of the row losses and the
// gradient's scale, the backward (a scaling of the forward's gradient), register_ops (each
// device registers its kernels behind the same checks), register_device_generic_ops (the
// backward, once) and sparse_zlpr_rows (the row kernel through the dispatcher, for the fused
// heads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace kxops::zlpr {

inline void check_logits(const char* op, const at::Tensor& logits) {
  check_kernel_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() >= 1, "kxops.", op,
                    ": logits must have at least 1 dim (the class dim), got a 0-dim tensor");
}

inline void check_dense(const at::Tensor& logits, const at::Tensor& labels) {
  check_logits("zlpr", logits);
  check_real_values("zlpr", "labels", labels);
  TORCH_CHECK_VALUE(labels.sizes() == logits.sizes(), "kxops.zlpr: labels shape ",
                    py(labels.sizes()), " must equal logits shape ", py(logits.sizes()));
  check_same_device("zlpr", "labels", labels, "logits", logits);
}

// ignore_index is any int64: compared with the positives as int64, a value out of their
// dtype's range matches no entry, so nothing wraps.
inline void check_sparse(const at::Tensor& logits, const at::Tensor& positives) {
  check_logits("sparse_zlpr", logits);
  check_ids("sparse_zlpr", "positives", positives);
  const auto rows_shape = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(positives.dim() == logits.dim() &&
                        positives.sizes().slice(0, positives.dim() - 1) == rows_shape,
                    "kxops.sparse_zlpr: positives shape ", py(positives.sizes()),
                    " must be logits.shape[:-1] + (P,) = ", py(rows_shape), " + (P,)");
  check_same_device("sparse_zlpr", "positives", positives, "logits", logits);
}

inline void check_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_kernel_float("zlpr_backward", "grad", grad);
  check_kernel_float("zlpr_backward", "grad_loss", grad_loss);
  TORCH_CHECK_VALUE(grad.dim() >= 1,
                    "kxops.zlpr_backward: grad must have at least 1 dim (the "
                    "class dim), got a 0-dim tensor");
  const auto rows_shape = grad.sizes().slice(0, grad.dim() - 1);
  TORCH_CHECK_VALUE(grad_loss.sizes() == rows_shape, "kxops.zlpr_backward: grad_loss shape ",
                    py(grad_loss.sizes()), " must be grad.shape[:-1] = ", py(rows_shape));
  check_same_device("zlpr_backward", "grad_loss", grad_loss, "grad", grad);
}

// Contiguous labels of a type every kernel reads natively (bool, the signed integers and
// the float types of at::opmath); others (uint16/32/64, float8) as the logits' opmath type.
inline at::Tensor readable_labels(const at::Tensor& labels, at::ScalarType logits_type) {
  const auto type = labels.scalar_type();
  const bool native = type == at::kBool || type == at::kByte || type == at::kChar ||
                      type == at::kShort || type == at::kInt || type == at::kLong ||
                      is_kernel_float(type);
  return native ? labels.contiguous() : labels.to(at::toOpMathType(logits_type)).contiguous();
}

// (loss per row in fp32/fp64, gradient or an empty tensor when not requested).
inline std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& logits,
                                                           bool compute_grad) {
  auto row_shape = logits.sizes().slice(0, logits.dim() - 1);
  auto row_loss =
      at::empty(row_shape, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  auto grad =
      compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  return {row_loss, grad};
}

// The row losses reduced by `reduction` (checked): 0-dim for "mean" and "sum", else row_loss.
inline at::Tensor reduce_rows(const at::Tensor& row_loss, c10::string_view reduction) {
  return reduction == "mean" ? row_loss.mean() : reduction == "sum" ? row_loss.sum() : row_loss;
}

// The factor of the gradient output, the gradient of the reduced loss: 1 / rows for "mean"
// (divided in acc_t, as torch's mean divides), else 1 (a sum, or "none"'s rows each their own).
template <typename acc_t>
acc_t grad_scale(const at::Tensor& logits, c10::string_view reduction) {
  const int64_t rows = c10::multiply_integers(logits.sizes().slice(0, logits.dim() - 1));
  return reduction == "mean" && rows > 0 ? acc_t(1) / static_cast<acc_t>(rows) : acc_t(1);
}

// kxops::zlpr_backward: grad times grad_loss, one per row; one fused elementwise pass
// (broadcast multiply, cast to the gradient's dtype) of at:: ops, for any device.
inline at::Tensor zlpr_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_backward(grad_loss, grad);
  auto out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  return at::mul_out(out, grad, grad_loss.unsqueeze(-1));
}

// The ZLPR ops of one device, each its checked host function: the kernels return the row
// losses and the gradient of the reduced loss (scaled by grad_scale); the rows' reduction is
// the device's own at:: op.
template <auto dense_kernel, auto sparse_kernel>
void register_ops(torch::Library& m) {
  m.impl("zlpr", [](const at::Tensor& logits, const at::Tensor& labels,
                    const c10::List<bool>& grad_mask, c10::string_view reduction) {
    check_dense(logits, labels);
    const bool compute_grad = check_grad_mask<1>("zlpr", grad_mask, "logits")[0];
    check_reduction("zlpr", reduction);
    auto [row_loss, grad] = dense_kernel(logits, labels, compute_grad, reduction);
    return std::make_tuple(reduce_rows(row_loss, reduction), grad);
  });
  m.impl("sparse_zlpr",
         [](const at::Tensor& logits, const at::Tensor& positives, int64_t ignore_index,
            const c10::List<bool>& grad_mask, c10::string_view reduction, double grad_filter) {
           check_sparse(logits, positives);
           const bool compute_grad = check_grad_mask<1>("sparse_zlpr", grad_mask, "logits")[0];
           check_reduction("sparse_zlpr", reduction);
           check_grad_filter("sparse_zlpr", grad_filter);
           auto [row_loss, grad] =
               sparse_kernel(logits, positives, ignore_index, compute_grad, reduction, grad_filter);
           return std::make_tuple(reduce_rows(row_loss, reduction), grad);
         });
}

// zlpr_backward has no kernel of a device: its at:: ops run on any. It is registered once, for
// CompositeExplicitAutograd (every device, and its own check of a sparse or nested tensor), by
// the device file every build compiles (cpu/zlpr.cpp).
inline void register_device_generic_ops(torch::Library& m) {
  m.impl("zlpr_backward", &zlpr_backward);
}

// kxops::sparse_zlpr's row kernel for the logits' device, the one way a kxops driver calls
// another op: through the dispatcher, straight at the device's key (below autograd and any
// Python kernel), because the fused heads' drivers may run on worker threads, which do not
// inherit the caller's dispatch state. Returns (row losses, their gradient or an empty tensor).
inline std::tuple<at::Tensor, at::Tensor> sparse_zlpr_rows(const at::Tensor& logits,
                                                           const at::Tensor& positives,
                                                           int64_t ignore_index, bool compute_grad,
                                                           double grad_filter) {
  using Signature =
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                         const c10::List<bool>&, c10::string_view, double);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("kxops::sparse_zlpr", "").typed<Signature>();
  const c10::DispatchKeySet backend(logits.is_cuda() ? c10::DispatchKey::CUDA
                                                     : c10::DispatchKey::CPU);
  return op.redispatch(backend, logits, positives, ignore_index, c10::List<bool>({compute_grad}),
                       "none", grad_filter);
}

namespace cpu {
// sparse_zlpr_rows' gradient written over the logits (CPU, contiguous). Returns the row losses.
at::Tensor sparse_zlpr_rows_in_place(const at::Tensor& logits, const at::Tensor& positives,
                                     int64_t ignore_index, double grad_filter);
}  // namespace cpu

// sparse_zlpr_rows for a caller done with the logits: with the gradient on CPU (contiguous
// logits), it is written over them, so that no gradient tensor is allocated and faulted in
// (the same bits either way). Returns (row losses, gradient or an empty tensor).
inline std::tuple<at::Tensor, at::Tensor> sparse_zlpr_rows_over_logits(const at::Tensor& logits,
                                                                       const at::Tensor& positives,
                                                                       int64_t ignore_index,
                                                                       bool compute_grad,
                                                                       double grad_filter) {
  if (compute_grad && logits.is_cpu() && logits.is_contiguous()) {
    return {cpu::sparse_zlpr_rows_in_place(logits, positives, ignore_index, grad_filter), logits};
  }
  return sparse_zlpr_rows(logits, positives, ignore_index, compute_grad, grad_filter);
}

}  // namespace kxops::zlpr

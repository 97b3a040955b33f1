// Host-side parts of the ZLPR ops shared by the CPU and CUDA kernels: input checks, output
// allocation and the backward (a scaling of the saved gradient).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace kxops::zlpr {

inline bool is_kernel_float(at::ScalarType type) {
  return type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// A tensor argument at all (None reaches a Tensor argument as an undefined tensor), dense:
// zlpr_backward is device-generic, so a sparse or nested tensor would reach ATen's internals.
inline void check_dense_tensor(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), "kxops ZLPR: ", name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(!t.is_nested(), "kxops ZLPR: ", name,
                   " must be a dense (strided) tensor, got a nested tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "kxops ZLPR: ", name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
}

inline void check_logits(const at::Tensor& logits) {
  check_dense_tensor("logits", logits);
  TORCH_CHECK_TYPE(is_kernel_float(logits.scalar_type()),
                   "kxops ZLPR: logits must be a float64, float32, float16 or bfloat16 tensor, "
                   "got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1,
                    "kxops ZLPR: logits must have at least 1 dim (the class dim), got a 0-dim "
                    "tensor");
}

inline void check_dense(const at::Tensor& logits, const at::Tensor& labels) {
  check_logits(logits);
  check_dense_tensor("labels", labels);
  const auto type = labels.scalar_type();
  // (float4_e2m1fn_x2 packs two values per element: not a label per class.)
  TORCH_CHECK_TYPE(at::isIntegralType(type, /*includeBool=*/true) ||
                       (at::isFloatingType(type) && type != at::kFloat4_e2m1fn_x2),
                   "kxops ZLPR: labels must be a bool, integer or floating-point tensor, got ",
                   type);
  TORCH_CHECK_VALUE(labels.sizes() == logits.sizes(), "kxops ZLPR: labels shape ", labels.sizes(),
                    " must equal logits shape ", logits.sizes());
  TORCH_CHECK(labels.device() == logits.device(), "kxops ZLPR: labels are on ", labels.device(),
              " but logits are on ", logits.device());
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

// ignore_index is any int64: compared with the positives as int64, a value out of their
// dtype's range matches no entry, so nothing wraps.
inline void check_sparse(const at::Tensor& logits, const at::Tensor& positives) {
  check_logits(logits);
  check_dense_tensor("positives", positives);
  TORCH_CHECK_TYPE(positives.scalar_type() == at::kInt || positives.scalar_type() == at::kLong,
                   "kxops ZLPR: positives must be an int32 or int64 tensor, got ",
                   positives.scalar_type());
  TORCH_CHECK_VALUE(
      positives.dim() == logits.dim() && positives.sizes().slice(0, positives.dim() - 1) ==
                                             logits.sizes().slice(0, logits.dim() - 1),
      "kxops ZLPR: positives shape ", positives.sizes(),
      " must be logits.shape[:-1] + (P,) with logits shape ", logits.sizes());
  TORCH_CHECK(positives.device() == logits.device(), "kxops ZLPR: positives are on ",
              positives.device(), " but logits are on ", logits.device());
}

inline void check_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_dense_tensor("grad", grad);
  check_dense_tensor("grad_loss", grad_loss);
  TORCH_CHECK_TYPE(is_kernel_float(grad.scalar_type()),
                   "kxops ZLPR backward: grad must be a float64, float32, float16 or bfloat16 "
                   "tensor, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(is_kernel_float(grad_loss.scalar_type()),
                   "kxops ZLPR backward: grad_loss must be a float64, float32, float16 or "
                   "bfloat16 tensor, got ",
                   grad_loss.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad_loss.sizes() == grad.sizes().slice(0, grad.dim() - 1),
                    "kxops ZLPR backward: grad_loss shape ", grad_loss.sizes(),
                    " must be the shape of grad without its last dim; grad shape ", grad.sizes());
  TORCH_CHECK(grad_loss.device() == grad.device(), "kxops ZLPR backward: grad_loss is on ",
              grad_loss.device(), " but grad is on ", grad.device());
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

inline void check_reduction(const char* op, c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", "kxops ", op,
                    ": reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
}

// grad_filter (sparse_zlpr and the fused heads): a finite number >= 0, 0 meaning no filter.
inline void check_grad_filter(const char* op, double grad_filter) {
  TORCH_CHECK_VALUE(std::isfinite(grad_filter) && grad_filter >= 0, "kxops.", op,
                    ": grad_filter must be a finite number >= 0 (0: no filter), got ", grad_filter);
}

// The row losses reduced by `reduction` (checked): 0-dim for "mean" and "sum", else row_loss.
inline at::Tensor reduce_rows(const at::Tensor& row_loss, c10::string_view reduction) {
  return reduction == "mean" ? row_loss.mean() : reduction == "sum" ? row_loss.sum() : row_loss;
}

// The factor of the gradient output: 1 / rows for the gradient of the rows' mean loss
// (grad_of_mean), else 1; divided in acc_t, as torch's mean divides.
template <typename acc_t>
acc_t grad_scale(const at::Tensor& logits, bool grad_of_mean) {
  const int64_t rows = c10::multiply_integers(logits.sizes().slice(0, logits.dim() - 1));
  return grad_of_mean && rows > 0 ? acc_t(1) / static_cast<acc_t>(rows) : acc_t(1);
}

// Registers one device's kernels of the two forward ops behind the argument checks, so that
// every device checks every argument before its kernel touches memory. The kernels return the
// row losses and the gradient of the reduced loss (of the mean: grad_of_mean); the reduction of
// the rows is the device's own at:: op.
template <auto dense_kernel, auto sparse_kernel>
void impl_forward_ops(torch::Library& m) {
  m.impl("zlpr", [](const at::Tensor& logits, const at::Tensor& labels, bool compute_grad,
                    c10::string_view reduction) {
    check_dense(logits, labels);
    check_reduction("zlpr", reduction);
    auto [row_loss, grad] = dense_kernel(logits, labels, compute_grad, reduction == "mean");
    return std::make_tuple(reduce_rows(row_loss, reduction), grad);
  });
  m.impl("sparse_zlpr",
         [](const at::Tensor& logits, const at::Tensor& positives, int64_t ignore_index,
            bool compute_grad, c10::string_view reduction, double grad_filter) {
           check_sparse(logits, positives);
           check_reduction("sparse_zlpr", reduction);
           check_grad_filter("sparse_zlpr", grad_filter);
           auto [row_loss, grad] = sparse_kernel(logits, positives, ignore_index, compute_grad,
                                                 reduction == "mean", grad_filter);
           return std::make_tuple(reduce_rows(row_loss, reduction), grad);
         });
}

// kxops::sparse_zlpr's row kernel for the logits' device, the one way a kxops driver calls
// another op: through the dispatcher, straight at the device's key (below autograd and any
// Python kernel), because the fused heads' drivers may run on worker threads, which do not
// inherit the caller's dispatch state. Returns (row losses, their gradient or an empty tensor).
inline std::tuple<at::Tensor, at::Tensor> sparse_zlpr_rows(const at::Tensor& logits,
                                                           const at::Tensor& positives,
                                                           int64_t ignore_index, bool compute_grad,
                                                           double grad_filter) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       int64_t, bool, c10::string_view, double);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("kxops::sparse_zlpr", "").typed<Signature>();
  const c10::DispatchKeySet backend(logits.is_cuda() ? c10::DispatchKey::CUDA
                                                     : c10::DispatchKey::CPU);
  return op.redispatch(backend, logits, positives, ignore_index, compute_grad, "none", grad_filter);
}

}  // namespace kxops::zlpr

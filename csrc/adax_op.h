// Host-side parts of kxops::adax_ shared by the CPU and CUDA kernels: input checks and the
// grouping of tensors by dtype (one kernel launch per group).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <map>
#include <optional>
#include <vector>

#include "adax.h"

namespace kxops::adax {

struct TensorLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps;
};

// Indices of the tensors of each param dtype.
using DtypeGroups = std::map<at::ScalarType, std::vector<size_t>>;

inline DtypeGroups check_and_group(const TensorLists& t, at::DeviceType device_type) {
  const size_t n = t.params.size();
  TORCH_CHECK(t.grads.size() == n && t.exp_avgs.size() == n && t.exp_avg_sqs.size() == n &&
                  t.steps.size() == n,
              "kxops AdaX: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the "
              "same length, got ", n, ", ", t.grads.size(), ", ", t.exp_avgs.size(), ", ",
              t.exp_avg_sqs.size(), ", ", t.steps.size());
  DtypeGroups groups;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = t.params[i];
    const auto type = p.scalar_type();
    TORCH_CHECK(at::isFloatingType(type), "kxops AdaX: params[", i,
                "] must be floating point, got ", type);
    TORCH_CHECK(p.device().type() == device_type && !p.is_sparse(), "kxops AdaX: params[", i,
                "] is on ", p.device(), "; this kernel is for ", device_type, " dense tensors");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "kxops AdaX: params[", i,
                "] must be dense and non-overlapping");
    const auto state_type = at::toOpMathType(type);
    for (const auto& [name, other, want] :
         {std::tuple{"grads", &t.grads[i], type}, std::tuple{"exp_avgs", &t.exp_avgs[i], state_type},
          std::tuple{"exp_avg_sqs", &t.exp_avg_sqs[i], state_type}}) {
      TORCH_CHECK(!other->is_sparse(), "kxops AdaX: ", name, "[", i,
                  "] is sparse; AdaX does not support sparse gradients");
      TORCH_CHECK(other->scalar_type() == want, "kxops AdaX: ", name, "[", i, "] has dtype ",
                  other->scalar_type(), " but must be ", want, " for ", type, " params");
      TORCH_CHECK(other->device() == p.device(), "kxops AdaX: ", name, "[", i, "] is on ",
                  other->device(), " but params[", i, "] is on ", p.device());
      TORCH_CHECK(other->sizes() == p.sizes() && other->strides() == p.strides(),
                  "kxops AdaX: ", name, "[", i, "] must have the shape and strides of params[",
                  i, "]: ", other->sizes(), " vs ", p.sizes());
    }
    const auto& step = t.steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat,
                "kxops AdaX: state_steps[", i, "] must be a one-element float32 tensor, got ",
                step.scalar_type(), " with ", step.numel(), " elements");
    groups[type].push_back(i);
  }
  return groups;
}

inline void check_scalar(const std::optional<at::Tensor>& t, const char* name,
                         const at::TensorList& params) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, "kxops AdaX: ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(params.empty() || t->device() == params[0].device(), "kxops AdaX: ", name,
              " is on ", t->device(), " but the params are on ", params[0].device());
}

// The op's two overloads (lr as a float, lr as a one-element tensor) around one device
// implementation impl(lists, lr_tensor, hyper, grad_scale, found_inf); hyper.lr is the float lr
// when lr_tensor is absent.
using Impl = void (*)(const TensorLists&, const std::optional<at::Tensor>&, const Hyper&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

template <Impl impl>
struct Overloads {
  static void scalar_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double weight_decay, double eps,
                        bool decoupled, bool maximize,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
    impl({params, grads, exp_avgs, exp_avg_sqs, state_steps}, std::nullopt,
         {lr, beta1, beta2, weight_decay, eps, decoupled, maximize}, grad_scale, found_inf);
  }

  static void tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList state_steps,
                        const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                        double eps, bool decoupled, bool maximize,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
    impl({params, grads, exp_avgs, exp_avg_sqs, state_steps}, lr,
         {0.0, beta1, beta2, weight_decay, eps, decoupled, maximize}, grad_scale, found_inf);
  }
};

}  // namespace kxops::adax

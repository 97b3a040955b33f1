// Host-side parts of kxops::adax_ shared by the CPU and CUDA kernels: the argument checks, the
// lists a kernel can run on (dense, one layout per tensor, no tensor twice) and the grouping of
// tensors by dtype (one kernel launch per group).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "adax_math.h"
#include "checks.h"

namespace kxops::adax {

// What a device implementation gets: tensors on one device; each tensor's param, grad and
// state dense with the same strides; no param, state or step twice (so every element is
// updated once and the tensors can be updated in parallel).
// exp_avg_scales / exp_avg_sq_scales: the block scales of 8-bit (uint8) state, undefined
// tensors for other state; seeds: each tensor's rounding seed (0 where nothing rounds).
struct TensorLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
  std::vector<at::Tensor> exp_avg_scales, exp_avg_sq_scales;
  std::vector<uint64_t> seeds;
};

// Indices of the tensors of each (param dtype, state dtype).
using DtypeGroups = std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>;

inline DtypeGroups group_by_dtype(const TensorLists& t) {
  DtypeGroups groups;
  for (size_t i = 0; i < t.params.size(); ++i) {
    groups[{t.params[i].scalar_type(), t.exp_avgs[i].scalar_type()}].push_back(i);
  }
  return groups;
}

// Whether state of this dtype is stored in fewer bits than the math (bf16 or 8-bit).
inline bool is_compact(at::ScalarType state) {
  return state == at::kBFloat16 || state == at::kByte;
}

inline int64_t blocks_of(int64_t numel) { return (numel + kBlock - 1) / kBlock; }

struct Arguments {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps;
  const std::optional<at::Tensor>& lr;  // absent: hyper.lr
  const Hyper& hyper;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  at::TensorList exp_avg_scales, exp_avg_sq_scales;  // empty, or one per tensor
  at::IntArrayRef seeds;                             // empty, or one per tensor
};

constexpr const char* kOp = "adax_";

// "name[i]", the name of element i of a list argument.
inline std::string element(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

// The shared checks on element i of a list, its name built only when the check fails (a step
// checks every tensor).
inline void check_element_dense(const char* name, size_t i, const at::Tensor& t) {
  if (!t.defined() || t.is_nested() || t.layout() != at::kStrided) {
    check_tensor(kOp, element(name, i).c_str(), t);
  }
}

inline void check_element_device(const char* name, size_t i, const at::Tensor& t,
                                 const char* anchor_name, size_t j, const at::Tensor& anchor) {
  if (t.device() != anchor.device()) {
    check_same_device(kOp, element(name, i).c_str(), t, element(anchor_name, j).c_str(), anchor);
  }
}

inline void check_written(const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "kxops.adax_: ", name, "[", i,
              "] has elements that share memory (e.g. an expanded tensor); it is written in "
              "place, so clone() it first");
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                                const at::Tensor& first_param) {
  if (!t.has_value()) return;
  check_tensor(kOp, name, *t);
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "kxops.adax_: ", name,
                   " must be a floating-point tensor, got ", py(t->scalar_type()));
  TORCH_CHECK_VALUE(t->numel() == 1, "kxops.adax_: ", name, " must have one element, got ",
                    t->numel(), " (shape ", py(t->sizes()), ")");
  check_same_device(kOp, name, *t, "params[0]", first_param);
}

// The state dtype params[i] takes: exp_avgs[i]'s when it is a compact format (bf16 or uint8,
// for fp32/fp16/bf16 params), else the param's math type.
inline at::ScalarType state_dtype_of(const Arguments& a, size_t i) {
  const auto type = a.params[i].scalar_type();
  const auto given = a.exp_avgs[i].scalar_type();
  return type != at::kDouble && is_compact(given) ? given : at::toOpMathType(type);
}

// The block scales of 8-bit state, for tensor i.
inline void check_scales(const Arguments& a, size_t i) {
  const auto& p = a.params[i];
  for (const auto& [name, scales] : {std::pair{"exp_avg_scales", a.exp_avg_scales},
                                     std::pair{"exp_avg_sq_scales", a.exp_avg_sq_scales}}) {
    TORCH_CHECK_VALUE(scales.size() == a.params.size(), "kxops.adax_: uint8 state needs ", name,
                      " with one tensor per param, got ", scales.size(), " for ", a.params.size(),
                      " params");
    const auto& s = scales[i];
    check_element_dense(name, i, s);
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "kxops.adax_: ", name, "[", i,
                     "] must be float32, got ", py(s.scalar_type()));
    TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == blocks_of(p.numel()), "kxops.adax_: ", name, "[",
                      i, "] must have shape ", py({blocks_of(p.numel())}), " (one scale per ",
                      kBlock, " elements of params[", i, "]), got ", py(s.sizes()));
    check_element_device(name, i, s, "params", i, p);
    check_written(s, name, i);
  }
}

// The scales of 8-bit state and the seed of stochastic rounding, for tensor i.
inline void check_compact_state(const Arguments& a, size_t i) {
  const auto& p = a.params[i];
  const bool rounds = is_compact(a.exp_avgs[i].scalar_type()) || p.scalar_type() == at::kHalf ||
                      p.scalar_type() == at::kBFloat16;
  // A seed list is either empty or one per param (every param's seed is read when it is not).
  if ((a.hyper.stochastic && rounds) || !a.seeds.empty()) {
    TORCH_CHECK_VALUE(a.seeds.size() == a.params.size(),
                      "kxops.adax_: seeds must be empty or one seed per param (stochastic_rounding "
                      "needs one seed per param), got ",
                      a.seeds.size(), " seeds for ", a.params.size(), " params");
  }
  if (!a.seeds.empty()) {
    TORCH_CHECK_VALUE(a.seeds[i] >= 0, "kxops.adax_: seeds[", i, "] must be >= 0, got ",
                      a.seeds[i]);
  }
  if (a.exp_avgs[i].scalar_type() == at::kByte) check_scales(a, i);
}

// The hyperparameters and the lists' lengths.
inline void check_hyper(const Arguments& a) {
  const size_t n = a.params.size();
  TORCH_CHECK_VALUE(a.grads.size() == n && a.exp_avgs.size() == n && a.exp_avg_sqs.size() == n &&
                        a.steps.size() == n,
                    "kxops.adax_: params, grads, exp_avgs, exp_avg_sqs and state_steps must "
                    "have the same length, got ",
                    n, ", ", a.grads.size(), ", ", a.exp_avgs.size(), ", ", a.exp_avg_sqs.size(),
                    ", ", a.steps.size());
  const auto& h = a.hyper;
  TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, "kxops.adax_: beta1 must be in [0, 1), got ",
                    h.beta1);
  // 1/B_t needs a finite beta2 whose reciprocal is finite (1/B_1 = 1/beta2).
  TORCH_CHECK_VALUE(h.beta2 >= DBL_MIN && std::isfinite(h.beta2),
                    "kxops.adax_: beta2 must be positive (at least ", DBL_MIN, ") and finite, got ",
                    h.beta2);
  for (const auto& [name, value] : {std::pair{"lr", h.lr}, std::pair{"eps", h.eps},
                                    std::pair{"weight_decay", h.weight_decay}}) {
    TORCH_CHECK_VALUE(value >= 0.0 && std::isfinite(value), "kxops.adax_: ", name,
                      " must be finite and >= 0, got ", value);
  }
}

// params[i]: dense, a kernel dtype, on params[0]'s device, each element its own.
inline void check_param(const Arguments& a, size_t i) {
  const auto& p = a.params[i];
  check_element_dense("params", i, p);
  TORCH_CHECK_TYPE(is_kernel_float(p.scalar_type()), "kxops.adax_: params[", i,
                   "] must be float32, float64, float16 or bfloat16, got ", py(p.scalar_type()),
                   " (step complex params as torch.view_as_real)");
  check_element_device("params", i, p, "params", 0, a.params[0]);
  check_written(p, "params", i);
}

// grads[i], exp_avgs[i], exp_avg_sqs[i] and state_steps[i] against params[i].
inline void check_param_lists(const Arguments& a, size_t i) {
  const auto& p = a.params[i];
  const auto type = p.scalar_type();
  const auto state_type = state_dtype_of(a, i);
  for (const auto& [name, other, want] :
       {std::tuple{"grads", &a.grads[i], type}, std::tuple{"exp_avgs", &a.exp_avgs[i], state_type},
        std::tuple{"exp_avg_sqs", &a.exp_avg_sqs[i], state_type}}) {
    TORCH_CHECK_TYPE(other->defined() && other->layout() == at::kStrided, "kxops.adax_: ", name,
                     "[", i,
                     "] must be a dense (strided) tensor; AdaX does not support sparse gradients "
                     "or state");
    TORCH_CHECK_TYPE(other->scalar_type() == want, "kxops.adax_: ", name, "[", i, "] has dtype ",
                     py(other->scalar_type()), " but must be ", py(want), " for ", py(type),
                     " params");
    check_element_device(name, i, *other, "params", i, p);
    TORCH_CHECK_VALUE(other->sizes() == p.sizes(), "kxops.adax_: ", name, "[", i, "] has shape ",
                      py(other->sizes()), " but params[", i, "] has shape ", py(p.sizes()));
  }
  check_written(a.exp_avgs[i], "exp_avgs", i);
  check_written(a.exp_avg_sqs[i], "exp_avg_sqs", i);
  check_compact_state(a, i);
  const auto& step = a.steps[i];
  check_element_dense("state_steps", i, step);
  TORCH_CHECK_TYPE(step.scalar_type() == at::kFloat, "kxops.adax_: state_steps[", i,
                   "] must be float32, got ", py(step.scalar_type()));
  TORCH_CHECK_VALUE(step.numel() == 1, "kxops.adax_: state_steps[", i,
                    "] must have one element, got ", step.numel(), " (shape ", py(step.sizes()),
                    ")");
  TORCH_CHECK(step.device() == p.device(), "kxops.adax_: state_steps[", i, "] is on ",
              step.device(), " but params[", i, "] is on ", p.device(),
              " (the optimizer keeps it there with fused=True or capturable=True)");
}

// Every argument, before any memory is read or written.
inline void check_arguments(const Arguments& a, at::DeviceType device_type) {
  check_hyper(a);
  if (a.params.empty()) return;
  const auto& first = a.params[0];
  check_tensor(kOp, "params[0]", first);
  TORCH_CHECK(first.device().type() == device_type, "kxops.adax_: params[0] is on ", first.device(),
              "; this kernel is for ", device_type, " tensors");
  for (size_t i = 0; i < a.params.size(); ++i) {
    check_param(a, i);
    check_param_lists(a, i);
  }
  check_scalar_tensor(a.lr, "lr", first);
  check_scalar_tensor(a.grad_scale, "grad_scale", first);
  check_scalar_tensor(a.found_inf, "found_inf", first);
}

// The bytes a tensor's elements span in its storage, [begin, end); nothing for an empty one.
struct Span {
  const void* storage;
  int64_t begin, end;
};

inline std::optional<Span> span_of(const at::Tensor& t) {
  if (t.numel() == 0) return std::nullopt;
  int64_t low = t.storage_offset(), high = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? low : high) += extent;
  }
  return Span{t.storage().data(), low * t.element_size(), (high + 1) * t.element_size()};
}

// Splits the tensors into rounds in which no two written tensors (param, state, step) share
// memory — the same param twice, or views of one buffer whose spans meet — keeping each
// tensor's occurrences in order: round by round, memory shared by several entries is updated
// as often, and in the same order, as the per-param loop updates it.
inline std::vector<std::vector<size_t>> rounds(const Arguments& a) {
  const size_t n = a.params.size();
  // Per storage: the spans written so far and the first round after each.
  std::unordered_map<const void*, std::vector<std::pair<Span, size_t>>> written;
  std::vector<size_t> round_of(n);
  size_t count = n == 0 ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    std::vector<Span> spans;
    for (const auto* t : {&a.params[i], &a.exp_avgs[i], &a.exp_avg_sqs[i], &a.steps[i]}) {
      if (const auto span = span_of(*t)) spans.push_back(*span);
    }
    if (a.exp_avgs[i].scalar_type() == at::kByte) {
      for (const auto* t : {&a.exp_avg_scales[i], &a.exp_avg_sq_scales[i]}) {
        if (const auto span = span_of(*t)) spans.push_back(*span);
      }
    }
    size_t r = 0;
    for (const auto& span : spans) {
      for (const auto& [other, next] : written[span.storage]) {
        if (span.begin < other.end && other.begin < span.end) r = std::max(r, next);
      }
    }
    for (const auto& span : spans) written[span.storage].emplace_back(span, r + 1);
    round_of[i] = r;
    count = std::max(count, r + 1);
  }
  std::vector<std::vector<size_t>> out(count);
  for (size_t i = 0; i < n; ++i) out[round_of[i]].push_back(i);
  return out;
}

// A copy of t with like's layout (t itself when it already has it); like is dense.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  auto out = at::empty_like(like, t.options());
  out.copy_(t);
  return out;
}

using Impl = void (*)(const TensorLists&, const std::optional<at::Tensor>& lr, const Hyper&,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf);

// Checks the arguments, then runs impl round by round on lists it can update in place: a
// param that is not dense (a strided view) and state or grads laid out unlike their param
// (transposed, expanded, channels_last against contiguous) are stepped through dense copies,
// which are copied back.
template <at::DeviceType kDevice, Impl impl>
void run(const Arguments& a) {
  check_arguments(a, kDevice);
  for (const auto& round : rounds(a)) {
    TensorLists lists;
    std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
    for (size_t i : round) {
      const auto& p = a.params[i];
      auto param = p.is_non_overlapping_and_dense() ? p : p.contiguous();
      auto exp_avg = with_layout_of(a.exp_avgs[i], param);
      auto exp_avg_sq = with_layout_of(a.exp_avg_sqs[i], param);
      for (const auto& [original, work] :
           {std::pair{&p, &param}, std::pair{&a.exp_avgs[i], &exp_avg},
            std::pair{&a.exp_avg_sqs[i], &exp_avg_sq}}) {
        if (!work->is_same(*original)) copy_back.emplace_back(*original, *work);
      }
      lists.grads.push_back(with_layout_of(a.grads[i], param));
      lists.params.push_back(std::move(param));
      lists.exp_avgs.push_back(std::move(exp_avg));
      lists.exp_avg_sqs.push_back(std::move(exp_avg_sq));
      lists.steps.push_back(a.steps[i]);
      lists.seeds.push_back(a.seeds.empty() ? 0 : static_cast<uint64_t>(a.seeds[i]));
      const bool byte_state = a.exp_avgs[i].scalar_type() == at::kByte;
      for (const auto& [given, out] : {std::pair{&a.exp_avg_scales, &lists.exp_avg_scales},
                                       std::pair{&a.exp_avg_sq_scales, &lists.exp_avg_sq_scales}}) {
        if (!byte_state) {
          out->emplace_back();
          continue;
        }
        const auto& original = (*given)[i];
        auto work = original.contiguous();
        if (!work.is_same(original)) copy_back.emplace_back(original, work);
        out->push_back(std::move(work));
      }
    }
    impl(lists, a.lr, a.hyper, a.grad_scale, a.found_inf);
    for (auto& [original, work] : copy_back) original.copy_(work);
  }
}

// The op's two overloads (lr as a float, lr as a one-element tensor).
template <at::DeviceType kDevice, Impl impl>
void scalar_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
               double beta2, double weight_decay, double eps, bool decoupled, bool maximize,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               std::optional<at::TensorList> exp_avg_scales,
               std::optional<at::TensorList> exp_avg_sq_scales, at::IntArrayRef seeds,
               bool stochastic_rounding) {
  const Hyper hyper{lr, beta1, beta2, weight_decay, eps, decoupled, maximize, stochastic_rounding};
  const std::optional<at::Tensor> no_lr;
  run<kDevice, impl>({params, grads, exp_avgs, exp_avg_sqs, state_steps, no_lr, hyper, grad_scale,
                      found_inf, exp_avg_scales.value_or(at::TensorList()),
                      exp_avg_sq_scales.value_or(at::TensorList()), seeds});
}

template <at::DeviceType kDevice, Impl impl>
void tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr,
               double beta1, double beta2, double weight_decay, double eps, bool decoupled,
               bool maximize, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               std::optional<at::TensorList> exp_avg_scales,
               std::optional<at::TensorList> exp_avg_sq_scales, at::IntArrayRef seeds,
               bool stochastic_rounding) {
  const Hyper hyper{0.0, beta1, beta2, weight_decay, eps, decoupled, maximize, stochastic_rounding};
  const std::optional<at::Tensor> lr_tensor = lr;
  run<kDevice, impl>({params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_tensor, hyper,
                      grad_scale, found_inf, exp_avg_scales.value_or(at::TensorList()),
                      exp_avg_sq_scales.value_or(at::TensorList()), seeds});
}

// Registers both overloads' checked host functions over the device's kernel impl; each device
// file calls it once.
template <at::DeviceType kDevice, Impl impl>
void register_ops(torch::Library& m) {
  m.impl("adax_", &scalar_lr<kDevice, impl>);
  m.impl("adax_.tensor_lr", &tensor_lr<kDevice, impl>);
}

}  // namespace kxops::adax

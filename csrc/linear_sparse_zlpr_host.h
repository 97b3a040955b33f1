// Host side of the fused linear + sparse ZLPR head (kxops::linear_sparse_zlpr and the two
// block ops of its recompute path), shared by CPU and CUDA: loops over blocks of rows, each
// block's logits [rows, C] made by one GEMM (at::addmm: oneDNN/MKL on CPU, cuBLAS on CUDA) and
// fed to the existing per-device row kernel kxops::sparse_zlpr, so no [N, C] tensor ever exists.
//
// Mean/sum (linear_sparse_zlpr): a block holds all classes of its rows, so the kernel finishes
// each row's two sums inside the block and returns d loss / d logits there; the gradients are
// then two more GEMMs on the same block (grad_input = g W, grad_weight += g^T x). Three GEMMs
// in all, as the materialised path; backward only scales the saved gradients.
// Reduction "none" (linear_sparse_zlpr_backward): grad_weight needs each row's own upstream
// gradient, known only in backward, which recomputes each block's logits (a 4th GEMM).
// Label parallel: linear_sparse_zlpr_partials returns each row's log-sums over this weight's
// classes (mergeable across class slices), and linear_sparse_zlpr_partials_backward recomputes
// every block's logits given the merged sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "gemm.h"
#include "sparse_grad_host.h"
#include "workspace.h"
#include "zlpr_host.h"

namespace kxops::linear_sparse_zlpr {

using at::Tensor;

// The inputs grad_mask's flags stand for, in order.
constexpr const char* kGradNames = "input, weight, bias";

// ---- argument checks (every op checks every argument before touching memory; the same
// words as kxops/_checks.py's linear_sparse_zlpr section) ----

// input [..., d], weight [C, d], bias [C], positives [..., P] (int32/int64 class ids).
inline void check_arguments(const char* op, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& positives,
                            int64_t block_rows) {
  check_kernel_float(op, "input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "kxops.", op,
                    ": input must have at least 1 dim (the feature dim), got a 0-dim tensor");
  check_like(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(-1), "kxops.", op,
                    ": weight must be (num_classes, in_features=", input.size(-1), "), got ",
                    py(weight.sizes()));
  if (bias.has_value()) {
    check_like(op, "bias", *bias, "input", input);
    check_shape(op, "bias", *bias, {weight.size(0)});
  }
  check_ids(op, "positives", positives);
  check_same_device(op, "positives", positives, "input", input);
  const auto rows_shape = input.sizes().slice(0, input.dim() - 1);
  TORCH_CHECK_VALUE(
      positives.dim() == input.dim() && positives.sizes().slice(0, input.dim() - 1) == rows_shape,
      "kxops.", op, ": positives shape ", py(positives.sizes()),
      " must be input.shape[:-1] + (P,) = ", py(rows_shape), " + (P,)");
  TORCH_CHECK_VALUE(block_rows >= 0, "kxops.", op,
                    ": block_rows must be >= 0 (0: chosen from the sizes), got ", block_rows);
}

// This weight's classes are [class_offset, class_offset + C) of num_classes in all.
inline void check_slice(const char* op, const Tensor& weight, int64_t class_offset,
                        int64_t num_classes) {
  TORCH_CHECK_VALUE(
      class_offset >= 0 && num_classes >= 0 && class_offset <= num_classes - weight.size(0),
      "kxops.", op, ": the weight's ", weight.size(0), " classes from class_offset ", class_offset,
      " do not fit in num_classes=", num_classes);
}

// A backward's grad_loss: one value per row (input.shape[:-1]).
inline void check_grad_loss(const char* op, const Tensor& grad_loss, const Tensor& input) {
  check_kernel_float(op, "grad_loss", grad_loss);
  check_same_device(op, "grad_loss", grad_loss, "input", input);
  const auto rows_shape = input.sizes().slice(0, input.dim() - 1);
  TORCH_CHECK_VALUE(grad_loss.sizes() == rows_shape, "kxops.", op, ": grad_loss shape ",
                    py(grad_loss.sizes()), " must be input.shape[:-1] = ", py(rows_shape));
}

// The merged log-sums: input.shape[:-1] + (2,) in the partials' dtype (fp32, fp64 for fp64).
inline void check_log_z(const char* op, const Tensor& log_z, const Tensor& input) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  check_tensor(op, "log_z", log_z);
  check_same_device(op, "log_z", log_z, "input", input);
  TORCH_CHECK_TYPE(log_z.scalar_type() == opmath, "kxops.", op, ": log_z must be ", py(opmath),
                   " (the partials' dtype), got ", py(log_z.scalar_type()));
  auto shape = input.sizes().vec();
  shape.back() = 2;
  check_shape(op, "log_z", log_z, shape);
}

// Every id but ignore_index in [0, num_classes), the last check of an op: it reads the ids (a
// sync on CUDA, where the fused ops leave it to the row kernel's device-side assert).
inline void check_positives_in_range(const char* op, const Tensor& positives, int64_t ignore_index,
                                     int64_t num_classes) {
  const Tensor ids = positives.to(at::kLong);
  const Tensor bad = (ids != ignore_index) & ((ids < 0) | (ids >= num_classes));
  if (!bad.any().item<bool>()) return;
  TORCH_CHECK_INDEX(false, "kxops.", op, ": positives holds class index ",
                    ids.masked_select(bad)[0].item<int64_t>(), ", out of range for ", num_classes,
                    " classes (valid: 0..", num_classes - 1, ", or ignore_index=", ignore_index,
                    " for padding)");
}

inline int64_t leading_rows(const Tensor& input) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < input.dim(); ++i) rows *= input.size(i);
  return rows;
}

// Rows of logits per block: a block of logits (and each buffer as large: the kernel's gradient,
// the recompute path's opmath copy) holds at most max(weight bytes, 128 MiB), so the working
// memory scales with the parameters the step holds anyway (and their gradient), never with
// N x C. The 128 MiB floor keeps enough rows per block for the GEMMs to stay compute-bound:
// every block reads the whole weight twice, and below a few hundred rows that traffic shows
// (docs/design.md has the measurement). block_rows > 0 overrides the choice. At least one row.
inline int64_t rows_per_block(int64_t rows, int64_t classes, const Tensor& weight,
                              int64_t bytes_per_logit, int64_t block_rows) {
  const int64_t all = std::max<int64_t>(rows, 1);
  if (block_rows > 0) return std::min(block_rows, all);
  if (classes == 0) return all;
  const int64_t budget =
      std::max<int64_t>(weight.numel() * weight.element_size(), int64_t{128} << 20);
  return std::clamp<int64_t>(budget / (classes * bytes_per_logit), 1, all);
}

// The GEMMs below run in the dtypes the driver chose (autocast has already been applied by the
// caller, as F.linear would), and call sites may hold autocast: keep it out of the at:: calls.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline Tensor block_logits(const Tensor& x, const Tensor& weight,
                           const std::optional<Tensor>& bias) {
  return bias.has_value() ? gemm::addmm(*bias, x, weight.t()) : gemm::mm(x, weight.t());
}

// The same into out [x rows, C] (the same GEMM call, so the same bits).
inline void block_logits_out(Tensor& out, const Tensor& x, const Tensor& weight,
                             const std::optional<Tensor>& bias) {
  if (bias.has_value()) {
    gemm::addmm_out(out, *bias, x, weight.t());
  } else {
    gemm::mm_out(out, x, weight.t());
  }
}

// Gradient accumulators: fp32 (fp64 for fp64) for grad_weight and grad_bias, summed block by
// block; low-precision block products go through one [C, d] scratch in the input dtype.
struct WeightGrads {
  Tensor weight, bias, scratch;
  bool first = true;  // the first block writes the accumulator (no zero fill)
  WeightGrads(const Tensor& w, bool want_weight, bool want_bias) {
    const auto acc = w.options().dtype(at::toOpMathType(w.scalar_type()));
    const bool low_precision = acc.dtype() != w.dtype();
    // Zeros where the blocks add scratch products; otherwise the first block writes it.
    if (want_weight)
      weight = low_precision ? at::zeros(w.sizes(), acc) : empty_workspace(w.sizes(), acc);
    if (want_weight && low_precision) scratch = at::empty(w.sizes(), w.options());
    if (want_bias) bias = at::zeros({w.size(0)}, acc);
  }
  // += scale * g^T x for g [n, C] (in the input dtype), x [n, d].
  void add(const Tensor& g, const Tensor& x, double scale) {
    if (weight.defined()) {
      if (scratch.defined()) {
        gemm::addmm_out(scratch, scratch, g.t(), x, /*beta=*/0, /*alpha=*/scale);
        weight.add_(scratch);
      } else {
        // beta 0 ignores the accumulator's previous content, NaN included.
        gemm::addmm_(weight, g.t(), x, /*beta=*/first ? 0 : 1, /*alpha=*/scale);
      }
    }
    if (bias.defined()) bias.add_(at::sum(g, at::IntArrayRef{0}, false, bias.scalar_type()), scale);
    first = false;
  }
  // The same from g's sparse form (see sparse_grad_host.h): accumulated in place.
  void add(const sparse_grad::SparseRows& g, const Tensor& x, double scale) {
    sparse_grad::cols_product(g, x, weight, bias, scale, /*overwrite=*/first);
    first = false;
  }
  // Returned in the parameters' dtype; an empty tensor where not requested.
  std::tuple<Tensor, Tensor> finish(const Tensor& w) {
    if (first && weight.defined()) weight.zero_();  // no rows
    const auto cast = [&](const Tensor& t) {
      return t.defined() ? t.to(w.scalar_type()) : at::empty({0}, w.options());
    };
    return {cast(weight), cast(bias)};
  }
};

// ---- one process: blocks of rows through the row kernel ----

// The three gradient products of each block: grad_input rows = scale g W, and the parameters'
// accumulators (WeightGrads).
struct BlockGrads {
  bool want_input;
  Tensor input;
  WeightGrads params;
  BlockGrads(int64_t rows, const Tensor& x, const Tensor& weight, std::array<bool, 3> grad_mask,
             bool has_bias)
      : want_input(grad_mask[0]),
        input(want_input ? at::empty({rows, x.size(-1)}, x.options())
                         : at::empty({0}, x.options())),
        params(weight, grad_mask[1], grad_mask[2] && has_bias) {}
  bool any() const { return want_input || params.weight.defined() || params.bias.defined(); }
  // The products of g in sparse form (sparse_grad_host.h), for the block's n rows.
  void add(int64_t start, int64_t n, const sparse_grad::SparseRows& g, const Tensor& x_block,
           const Tensor& weight, double scale) {
    if (want_input) sparse_grad::rows_product(g, weight, input.narrow(0, start, n), scale);
    params.add(g, x_block, scale);
  }
  // g's gradient products: from its sparse form where the filter left it sparse enough (on
  // either device: sparse_rows converts g), else the dense GEMMs.
  void add(int64_t start, const Tensor& g, const Tensor& x_block, const Tensor& weight,
           double scale, bool filtered) {
    const Tensor rows_out = want_input ? input.narrow(0, start, g.size(0)) : Tensor();
    const auto sparse = filtered ? sparse_grad::sparse_rows(
                                       g, {x_block, weight, rows_out, params.weight, params.bias})
                                 : std::nullopt;
    if (sparse.has_value()) return add(start, g.size(0), *sparse, x_block, weight, scale);
    if (want_input) {
      Tensor out = input.narrow(0, start, g.size(0));
      gemm::addmm_out(out, out, g, weight, /*beta=*/0, /*alpha=*/scale);
    }
    params.add(g, x_block, scale);
  }
  // (grad_input in input's shape, grad_weight, grad_bias); empty where not requested.
  std::tuple<Tensor, Tensor, Tensor> finish(const Tensor& input_in, const Tensor& weight) {
    auto [grad_weight, grad_bias] = params.finish(weight);
    return {want_input ? input.view(input_in.sizes()) : input, grad_weight, grad_bias};
  }
};

// Whether the block gradients filtered by grad_filter come straight in sparse form (see
// sparse_grad_host.h): the CPU kernel's, for fp32/fp64 operands the sparse products take. The
// CUDA row kernel writes g dense; BlockGrads::add converts it.
inline bool sparse_kernel_output(const Tensor& input, const Tensor& weight, double grad_filter) {
  const auto type = input.scalar_type();
  return grad_filter > 0 && input.is_cpu() && (type == at::kFloat || type == at::kDouble) &&
         weight.stride(1) == 1;
}

// Each block's logits (one GEMM, in the input dtype) through kxops::sparse_zlpr: calls
// block(start, x_block, row_loss, g, sparse) with the gradient d row_loss / d logits when
// want_grad, its negatives below grad_filter dropped: g dense, or (g undefined) sparse, not
// null, its sparse form straight from the CPU kernel.
template <typename Block>
void for_each_block(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                    const Tensor& positives, int64_t ignore_index, int64_t block_rows,
                    bool want_grad, double grad_filter, Block block) {
  const int64_t rows = leading_rows(input), features = input.size(-1);
  const Tensor x = input.reshape({rows, features});
  const Tensor ids = positives.reshape({rows, positives.size(-1)});
  const int64_t step =
      rows_per_block(rows, weight.size(0), weight, input.element_size(), block_rows);
  // One logits buffer for every block: a fresh one per block would cost its page faults again
  // (as much time as a pass over it), each block's logits being done with before the next.
  const Tensor buffer = empty_workspace({std::min(step, rows), weight.size(0)}, input.options());
  for (int64_t start = 0; start < rows; start += step) {
    const int64_t n = std::min(step, rows - start);
    const Tensor x_block = x.narrow(0, start, n);
    Tensor logits = buffer.narrow(0, 0, n);
    block_logits_out(logits, x_block, weight, bias);
    if (want_grad && sparse_kernel_output(input, weight, grad_filter)) {
      auto [row_loss, sparse] = sparse_grad::sparse_zlpr_with_sparse_grad(
          logits, ids.narrow(0, start, n), ignore_index, grad_filter);
      if (sparse.has_value()) {
        block(start, x_block, row_loss, Tensor(), &*sparse);
        continue;
      }
    }
    auto [row_loss, g] = zlpr::sparse_zlpr_rows_over_logits(logits, ids.narrow(0, start, n),
                                                            ignore_index, want_grad, grad_filter);
    block(start, x_block, row_loss, want_grad ? g : Tensor(), nullptr);
  }
}

// The loss reduced by `reduction` (0-dim, or input.shape[:-1] for "none"; fp32/fp64) and the
// gradients of the mean (for "mean") or of the sum of the row losses, in the input dtype, each
// an empty tensor where grad_mask (input, weight, bias) is false. Three GEMMs per block: a
// block holds all classes of its rows, so the kernel finishes each row's sums inside it.
inline std::tuple<Tensor, Tensor, Tensor, Tensor> linear_sparse_zlpr(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& positives, int64_t ignore_index, c10::string_view reduction,
    const c10::List<bool>& grad_mask, int64_t block_rows, double grad_filter) {
  constexpr const char* op = "linear_sparse_zlpr";
  check_arguments(op, input, weight, bias, positives, block_rows);
  check_grad_filter(op, grad_filter);
  check_reduction(op, reduction);
  if (input.is_cpu()) check_positives_in_range(op, positives, ignore_index, weight.size(0));
  NoAutocast no_autocast;
  const int64_t rows = leading_rows(input);
  Tensor row_loss = at::empty({rows}, input.options().dtype(at::toOpMathType(input.scalar_type())));
  BlockGrads grads(rows, input, weight, check_grad_mask<3>(op, grad_mask, kGradNames),
                   bias.has_value());
  const double scale = reduction == "mean" && rows > 0 ? 1.0 / static_cast<double>(rows) : 1.0;
  for_each_block(input, weight, bias, positives, ignore_index, block_rows, grads.any(), grad_filter,
                 [&](int64_t start, const Tensor& x_block, const Tensor& loss, const Tensor& g,
                     const sparse_grad::SparseRows* sparse) {
                   row_loss.narrow(0, start, loss.size(0)).copy_(loss);
                   if (sparse != nullptr) {
                     grads.add(start, loss.size(0), *sparse, x_block, weight, scale);
                   } else if (g.defined()) {
                     grads.add(start, g, x_block, weight, scale, grad_filter > 0);
                   }
                 });
  auto [grad_input, grad_weight, grad_bias] = grads.finish(input, weight);
  Tensor loss =
      zlpr::reduce_rows(row_loss.view(input.sizes().slice(0, input.dim() - 1)), reduction);
  return {loss, grad_input, grad_weight, grad_bias};
}

// Backward of reduction "none": the gradients of sum(grad_loss * row_loss), each block's logits
// recomputed (the weight's gradient needs every row's own grad_loss, known only now) and its
// kernel gradient scaled per row: four GEMMs per block over forward and backward.
inline std::tuple<Tensor, Tensor, Tensor> linear_sparse_zlpr_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& positives, int64_t ignore_index,
    const c10::List<bool>& grad_mask, int64_t block_rows, double grad_filter) {
  constexpr const char* op = "linear_sparse_zlpr_backward";
  check_arguments(op, input, weight, bias, positives, block_rows);
  check_grad_filter(op, grad_filter);
  check_grad_loss(op, grad_loss, input);
  if (input.is_cpu()) check_positives_in_range(op, positives, ignore_index, weight.size(0));
  NoAutocast no_autocast;
  const int64_t rows = leading_rows(input);
  const Tensor row_grad = grad_loss.reshape({rows, 1});
  BlockGrads grads(rows, input, weight, check_grad_mask<3>(op, grad_mask, kGradNames),
                   bias.has_value());
  if (grads.any()) {
    for_each_block(input, weight, bias, positives, ignore_index, block_rows, true, grad_filter,
                   [&](int64_t start, const Tensor& x_block, const Tensor& loss, const Tensor& g,
                       const sparse_grad::SparseRows* sparse) {
                     const Tensor block_grad = row_grad.narrow(0, start, loss.size(0));
                     if (sparse != nullptr) {
                       // Each row's entries times its grad_loss (a dropped entry stays 0).
                       sparse->value.mul_(
                           at::repeat_interleave(block_grad.squeeze(1), sparse->row_start.diff()));
                       grads.add(start, loss.size(0), *sparse, x_block, weight, 1.0);
                       return;
                     }
                     // In place: the kernel's gradient is this block's own buffer. Filtered,
                     // only the nonzero entries are scaled, as the sparse products do: a
                     // dropped entry stays 0 under an infinite grad_loss.
                     if (grad_filter > 0) {
                       g.mul_(at::where(g != 0, block_grad, at::ones_like(block_grad)));
                     } else {
                       g.mul_(block_grad);
                     }
                     grads.add(start, g, x_block, weight, 1.0, grad_filter > 0);
                   });
  }
  return grads.finish(input, weight);
}

// ---- the recompute path: per-row sums of a class slice, and the backward given merged sums ----

// The ids of the rows' positives in this slice, once each: index [N, P] int64 where each entry
// is its local class or, for an id of another slice, ignore_index or a repeat, the spare column
// C; valid marks the entries that are a local positive (the ids checked by
// check_positives_in_range).
struct SlicePositives {
  Tensor index, valid;
};

inline SlicePositives slice_positives(const Tensor& ids, int64_t ignore_index, int64_t class_offset,
                                      int64_t classes) {
  const Tensor global = ids.to(at::kLong);
  const Tensor padding = global == ignore_index;
  const Tensor local = global - class_offset;
  const Tensor mine = padding.logical_not() & (local >= 0) & (local < classes);
  // Sorted, a repeat follows its first occurrence: only the first stays valid.
  Tensor sorted = std::get<0>(at::where(mine, local, classes).sort(-1));
  Tensor valid = sorted < classes;
  if (sorted.size(-1) > 1) {
    valid.narrow(-1, 1, sorted.size(-1) - 1)
        .logical_and_(sorted.narrow(-1, 1, sorted.size(-1) - 1) !=
                      sorted.narrow(-1, 0, sorted.size(-1) - 1));
  }
  return {at::where(valid, sorted, classes), valid};
}

// One block's logits in an opmath buffer [n, C + 1] whose spare last column (-inf) takes the
// entries of `index` that are not local positives.
inline Tensor padded_logits(const Tensor& x, const Tensor& weight,
                            const std::optional<Tensor>& bias) {
  const int64_t n = x.size(0), classes = weight.size(0);
  const auto opmath = at::toOpMathType(x.scalar_type());
  Tensor buffer = at::empty({n, classes + 1}, x.options().dtype(opmath));
  Tensor logits = buffer.narrow(1, 0, classes);
  if (opmath == x.scalar_type()) {
    if (bias.has_value()) {
      gemm::addmm_out(logits, *bias, x, weight.t());
    } else {
      gemm::mm_out(logits, x, weight.t());
    }
  } else {
    logits.copy_(block_logits(x, weight, bias));  // made in the input dtype, as F.linear would
  }
  buffer.select(1, classes).fill_(-std::numeric_limits<double>::infinity());
  return buffer;
}

struct SliceArgs {
  Tensor x, ids;
  int64_t rows, features, classes, step;
};

inline SliceArgs slice_args(const char* op, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& positives,
                            int64_t class_offset, int64_t num_classes, int64_t block_rows) {
  check_arguments(op, input, weight, bias, positives, block_rows);
  check_slice(op, weight, class_offset, num_classes);
  const int64_t rows = leading_rows(input), features = input.size(-1), classes = weight.size(0);
  const int64_t bytes = at::elementSize(at::toOpMathType(input.scalar_type()));
  return {input.reshape({rows, features}),
          positives.reshape({rows, positives.size(-1)}),
          rows,
          features,
          classes,
          rows_per_block(rows, classes + 1, weight, bytes, block_rows)};
}

// [..., 2] in fp32/fp64: per row, log sum_{j negative} e^{s_j} and log sum_{j positive} e^{-s_j}
// over this slice's classes (-inf for an empty sum; -inf logits are left out of both).
inline Tensor linear_sparse_zlpr_partials(const Tensor& input, const Tensor& weight,
                                          const std::optional<Tensor>& bias,
                                          const Tensor& positives, int64_t ignore_index,
                                          int64_t class_offset, int64_t num_classes,
                                          int64_t block_rows) {
  constexpr const char* op = "linear_sparse_zlpr_partials";
  const auto a =
      slice_args(op, input, weight, bias, positives, class_offset, num_classes, block_rows);
  check_positives_in_range(op, positives, ignore_index, num_classes);
  NoAutocast no_autocast;
  const auto [index, valid] = slice_positives(a.ids, ignore_index, class_offset, a.classes);
  auto out_shape = input.sizes().vec();
  out_shape.back() = 2;
  Tensor sums =
      at::empty({a.rows, 2}, input.options().dtype(at::toOpMathType(input.scalar_type())));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t start = 0; start < a.rows; start += a.step) {
    const int64_t n = std::min(a.step, a.rows - start);
    Tensor s = padded_logits(a.x.narrow(0, start, n), weight, bias);
    const Tensor block_index = index.narrow(0, start, n);
    const Tensor at_positives = s.gather(1, block_index);
    const Tensor kept = valid.narrow(0, start, n) & (at_positives != neg_inf);
    const Tensor positive_sum =
        at::logsumexp(at::where(kept, at_positives.neg(), neg_inf), at::IntArrayRef{1});
    // Positives leave the negative sum as -inf (exact: nothing is subtracted).
    s.scatter_(1, block_index, neg_inf);
    sums.narrow(0, start, n)
        .copy_(at::stack({at::logsumexp(s, at::IntArrayRef{1}), positive_sum}, 1));
  }
  return sums.view(out_shape);
}

// The gradients of sum_rows grad_loss * (log Z_neg + log Z_pos), with log Z_* = log(1 + the whole
// label set's sums) given in log_z [..., 2]: per class e^{s - log Z_neg} if negative,
// -e^{-s - log Z_pos} if positive, 0 at -inf logits. grad_input is this slice's contribution.
inline std::tuple<Tensor, Tensor, Tensor> linear_sparse_zlpr_partials_backward(
    const Tensor& grad_loss, const Tensor& log_z, const Tensor& input, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& positives, int64_t ignore_index,
    int64_t class_offset, int64_t num_classes, const c10::List<bool>& grad_mask, int64_t block_rows,
    double grad_filter) {
  constexpr const char* op = "linear_sparse_zlpr_partials_backward";
  const auto a =
      slice_args(op, input, weight, bias, positives, class_offset, num_classes, block_rows);
  check_grad_filter(op, grad_filter);
  check_grad_loss(op, grad_loss, input);
  check_log_z(op, log_z, input);
  check_positives_in_range(op, positives, ignore_index, num_classes);
  NoAutocast no_autocast;
  const auto [index, valid] = slice_positives(a.ids, ignore_index, class_offset, a.classes);
  const Tensor row_grad = grad_loss.reshape({a.rows, 1}).to(at::toOpMathType(input.scalar_type()));
  const Tensor z = log_z.reshape({a.rows, 2});
  BlockGrads grads(a.rows, input, weight, check_grad_mask<3>(op, grad_mask, kGradNames),
                   bias.has_value());
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t start = 0; grads.any() && start < a.rows; start += a.step) {
    const int64_t n = std::min(a.step, a.rows - start);
    const Tensor x_block = a.x.narrow(0, start, n);
    Tensor s = padded_logits(x_block, weight, bias);
    const Tensor block_index = index.narrow(0, start, n);
    const Tensor at_positives = s.gather(1, block_index);
    const Tensor kept = valid.narrow(0, start, n) & (at_positives != neg_inf);
    const Tensor z_block = z.narrow(0, start, n);
    // e^{-inf - log Z} = 0 at masked classes (and the spare column): log Z = log(1 + ...) is
    // never -inf.
    s.sub_(z_block.narrow(1, 0, 1)).exp_();
    // The negatives' own gradients, filtered before the positives' are written in.
    if (grad_filter > 0) s.masked_fill_(s < grad_filter, 0);
    const Tensor positive_grad =
        at::where(kept, at_positives.neg().sub_(z_block.narrow(1, 1, 1)).exp_().neg_(), 0.0);
    s.scatter_(1, block_index, positive_grad).mul_(row_grad.narrow(0, start, n));
    // The GEMMs take the gradient in the input dtype, as the materialised path's would.
    grads.add(start, s.narrow(1, 0, a.classes).to(input.scalar_type()), x_block, weight, 1.0,
              grad_filter > 0);
  }
  return grads.finish(input, weight);
}

// The rows per block that linear_sparse_zlpr picks for block_rows 0 (logits in weight's dtype):
// LinearZLPR.predict asks here, so the rule exists in rows_per_block alone.
inline int64_t linear_sparse_zlpr_block_rows(const Tensor& weight, int64_t rows) {
  constexpr const char* op = "linear_sparse_zlpr_block_rows";
  check_tensor(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, "kxops.", op,
                    ": weight must be (num_classes, in_features), got ", py(weight.sizes()));
  TORCH_CHECK_VALUE(rows >= 0, "kxops.", op, ": rows must be >= 0, got ", rows);
  return rows_per_block(rows, weight.size(0), weight, weight.element_size(), 0);
}

// The drivers are device-generic: each device file registers the same ones with this call.
inline void register_ops(torch::Library& m) {
  m.impl("linear_sparse_zlpr", &linear_sparse_zlpr);
  m.impl("linear_sparse_zlpr_backward", &linear_sparse_zlpr_backward);
  m.impl("linear_sparse_zlpr_partials", &linear_sparse_zlpr_partials);
  m.impl("linear_sparse_zlpr_partials_backward", &linear_sparse_zlpr_partials_backward);
  m.impl("linear_sparse_zlpr_block_rows", &linear_sparse_zlpr_block_rows);
}

}  // namespace kxops::linear_sparse_zlpr

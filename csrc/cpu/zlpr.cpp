// ZLPR loss on CPU: one task per block of rows; each row is read once into two fp32/fp64
// buffers, which then hold the exponential terms, so the gradient costs no second read of the
// logits or labels and no second round of exponentials.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "cpu/vec_math.h"

#include "zlpr_host.h"
#include "zlpr_math.h"

namespace kxops::zlpr {
namespace {

using at::vec::Vectorized;

template <typename acc_t>
acc_t lanes_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
acc_t lanes_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Rows whose sums are not finite (a NaN, a +inf logit, an infinite label) go class by class
// through the shared math, which carries the reference's NaN/inf rules (zlpr_math.h). The classes
// are summed in strided partial sums merged at the end, as the CUDA threads sum and merge
// theirs, so that these rows test merge too. target(j) gives class j's target.
template <typename acc_t, typename Target>
RowSums<acc_t> exact_sums(const acc_t* s, int64_t n, Target target) {
  constexpr int64_t kPartials = 4;
  RowSums<acc_t> partial[kPartials];
  for (int64_t j = 0; j < n; ++j) partial[j % kPartials].add(s[j], target(j));
  RowSums<acc_t> sums = partial[0];
  for (int64_t k = 1; k < kPartials; ++k) sums = merge(sums, partial[k]);
  return sums;
}

// The dense row through the shared math: s and t hold the row's logits and targets (opmath);
// s may be the gradient row itself.
template <typename acc_t, typename scalar_t>
void exact_row(const acc_t* s, const acc_t* t, int64_t n, acc_t* loss, scalar_t* grad) {
  const RowSums<acc_t> sums = exact_sums(s, n, [&](int64_t j) { return t[j]; });
  *loss = sums.loss();
  if (grad == nullptr) return;
  const RowGrad<acc_t> finish(sums);
  for (int64_t j = 0; j < n; ++j) grad[j] = static_cast<scalar_t>(finish(s[j], t[j]));
}

template <typename acc_t>
bool is_finite(const ExpSum<acc_t>& acc) {
  return std::isfinite(acc.max) && std::isfinite(acc.sum);
}

// One row whose logits are in s and targets in t (both opmath, length n). Returns false, with
// s and t overwritten and nothing written, when the row's sums are not finite: the caller then
// reloads the row into exact_row. Otherwise s and t are overwritten with the weighted
// exponential terms, and the loss and, when grad is not null, d loss / d logits are written.
template <typename acc_t, typename scalar_t>
bool zlpr_row(acc_t* s, acc_t* t, int64_t n, acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const int64_t vec_end = n - n % kWidth;
  const Vec zero(0), one(1), neg_inf(-std::numeric_limits<acc_t>::infinity());

  // Maxima of the terms that enter each sum (0 stands for the "1 +"). The lanes take the
  // membership rule of in_negative / in_positive; a NaN or +inf that reaches a maximum or a
  // sum sends the row to exact_row.
  Vec max_neg(0), max_pos(0);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    const Vec sj = Vec::loadu(s + j), tj = Vec::loadu(t + j);
    const Vec masked = sj == neg_inf;
    max_neg = at::vec::maximum(max_neg, Vec::blendv(sj, zero, masked | (tj >= one)));
    max_pos = at::vec::maximum(max_pos, Vec::blendv(zero - sj, zero, masked | (tj <= zero)));
  }
  acc_t m_neg = lanes_max(max_neg);
  acc_t m_pos = lanes_max(max_pos);
  for (int64_t j = vec_end; j < n; ++j) {
    if (in_negative(s[j], t[j])) m_neg = std::max(m_neg, s[j]);
    if (in_positive(s[j], t[j])) m_pos = std::max(m_pos, -s[j]);
  }

  // Weighted terms w e^{x - max}; blend, not multiply, so that a dropped term whose
  // exponential overflows gives 0 rather than 0 * inf.
  const Vec vm_neg(m_neg), vm_pos(m_pos);
  Vec sum_neg(0), sum_pos(0);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    const Vec sj = Vec::loadu(s + j), tj = Vec::loadu(t + j);
    const Vec masked = sj == neg_inf;
    const Vec out_neg = masked | (tj >= one), out_pos = masked | (tj <= zero);
    // Hard labels leave most vectors with one sum only: skip the other's exponentials.
    const Vec e_neg = out_neg.zero_mask() == 0
                          ? zero
                          : Vec::blendv((one - tj) * (sj - vm_neg).exp_u20(), zero, out_neg);
    const Vec e_pos = out_pos.zero_mask() == 0
                          ? zero
                          : Vec::blendv(tj * (zero - sj - vm_pos).exp_u20(), zero, out_pos);
    sum_neg = sum_neg + e_neg;
    sum_pos = sum_pos + e_pos;
    e_neg.store(s + j);
    e_pos.store(t + j);
  }
  RowSums<acc_t> sums;
  sums.neg = {m_neg, lanes_sum(sum_neg)};
  sums.pos = {m_pos, lanes_sum(sum_pos)};
  for (int64_t j = vec_end; j < n; ++j) {
    const acc_t e_neg = in_negative(s[j], t[j]) ? (1 - t[j]) * std::exp(s[j] - m_neg) : 0;
    const acc_t e_pos = in_positive(s[j], t[j]) ? t[j] * std::exp(-s[j] - m_pos) : 0;
    sums.neg.sum += e_neg;
    sums.pos.sum += e_pos;
    s[j] = e_neg;
    t[j] = e_pos;
  }
  if (!is_finite(sums.neg) || !is_finite(sums.pos)) return false;
  *loss = sums.loss();
  if (grad == nullptr) return true;

  // Finite sums: every stored term is finite and 0 outside its sum, so the products below
  // follow the membership rule without testing it again.
  const RowGrad<acc_t> finish(sums);
  const Vec inv_neg(finish.inv_neg), inv_pos(finish.inv_pos);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    (Vec::loadu(s + j) * inv_neg - Vec::loadu(t + j) * inv_pos).store(s + j);
  }
  for (int64_t j = vec_end; j < n; ++j) s[j] = s[j] * finish.inv_neg - t[j] * finish.inv_pos;
  if (static_cast<void*>(s) != static_cast<void*>(grad)) at::vec::convert(s, grad, n);
  return true;
}

// The exact sparse row: positives leave the negative sum because their logits are replaced by
// -inf in the private copy s (no subtraction), so the negative side costs one exponential per
// class without reading targets, and the positive side is a short online sum over the listed
// positives. `kept` receives (class, logit) of each distinct positive that is not masked.
// Returns false, with s overwritten and nothing written, when the negative sum is not finite:
// the caller then reloads the row into exact_sparse_row.
template <typename acc_t, typename scalar_t, typename index_t>
bool sparse_zlpr_row(acc_t* s, int64_t n, const index_t* positives, int64_t per_row,
                     int64_t ignore_index, std::vector<std::pair<int64_t, acc_t>>& kept,
                     acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  kept.clear();
  for (const index_t* p = positives; p != positives + per_row; ++p) {
    // Compared as int64: an ignore_index out of index_t's range matches nothing.
    if (*p == ignore_index) continue;
    TORCH_CHECK_INDEX(*p >= 0 && *p < n, "kxops ZLPR: positives holds class index ", *p,
                      ", out of range for ", n, " classes (valid: 0..", n - 1,
                      ", or ignore_index=", ignore_index, " for padding)");
    // A -inf here is a masked positive or a duplicate already taken: neither adds a term.
    if (s[*p] == kNegInf) continue;
    kept.emplace_back(*p, s[*p]);
    s[*p] = kNegInf;
  }

  // -inf logits are neutral in the max and give e^{-inf} = 0; a NaN or +inf makes the
  // maximum or the sum non-finite.
  const int64_t vec_end = n - n % Vec::size();
  Vec max_vec(0);
  for (int64_t j = 0; j < vec_end; j += Vec::size()) {
    max_vec = at::vec::maximum(max_vec, Vec::loadu(s + j));
  }
  acc_t max_neg = lanes_max(max_vec);
  for (int64_t j = vec_end; j < n; ++j) max_neg = std::max(max_neg, s[j]);
  const Vec max_neg_vec(max_neg);
  Vec sum_vec(0);
  for (int64_t j = vec_end; j < n; ++j) s[j] = std::exp(s[j] - max_neg);
  for (int64_t j = 0; j < vec_end; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - max_neg_vec).exp_u20();
    sum_vec = sum_vec + e;
    e.store(s + j);
  }
  RowSums<acc_t> sums;
  sums.neg.max = max_neg;
  sums.neg.sum = std::accumulate(s + vec_end, s + n, lanes_sum(sum_vec));
  if (!is_finite(sums.neg)) return false;
  // The positive sum goes through the shared math as it is, whatever its values.
  for (const auto& [index, logit] : kept) push(sums.pos, -logit, acc_t(1));
  *loss = sums.loss();
  if (grad == nullptr) return true;

  const RowGrad<acc_t> finish(sums);
  at::vec::map([&](Vec e) { return e * Vec(finish.inv_neg); }, s, s, n);
  for (const auto& [index, logit] : kept) s[index] = finish(logit, acc_t(1));
  if (static_cast<void*>(s) != static_cast<void*>(grad)) at::vec::convert(s, grad, n);
  return true;
}

// The sparse row through the shared math: s holds the row's logits with its positives (kept,
// from sparse_zlpr_row) at -inf, so every other class is a negative (target 0).
template <typename acc_t, typename scalar_t>
void exact_sparse_row(const acc_t* s, int64_t n, const std::vector<std::pair<int64_t, acc_t>>& kept,
                      acc_t* loss, scalar_t* grad) {
  RowSums<acc_t> sums = exact_sums(s, n, [](int64_t) { return acc_t(0); });
  for (const auto& [index, logit] : kept) sums.add(logit, acc_t(1));
  *loss = sums.loss();
  if (grad == nullptr) return;
  const RowGrad<acc_t> finish(sums);
  for (int64_t j = 0; j < n; ++j) grad[j] = static_cast<scalar_t>(finish(s[j], acc_t(0)));
  for (const auto& [index, logit] : kept) {
    grad[index] = static_cast<scalar_t>(finish(logit, acc_t(1)));
  }
}

// Runs row_fn(row, logits_row, s, loss, grad) over every row in parallel, with s holding the
// row's logits in opmath.
template <typename scalar_t, typename RowFn>
void for_each_row(const at::Tensor& logits, at::Tensor& row_loss, at::Tensor& grad,
                  bool compute_grad, RowFn row_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(-1);
  const int64_t rows = row_loss.numel();
  const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
  acc_t* loss_data = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = rows_per_task(n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buffer(n);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* grad_row = grad_data == nullptr ? nullptr : grad_data + row * n;
      // An fp32/fp64 gradient row is the working copy itself: no final copy out.
      acc_t* s = s_buffer.data();
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (grad_row != nullptr) s = grad_row;
      }
      const scalar_t* logits_row = logits_data + row * n;
      at::vec::convert(logits_row, s, n);
      row_fn(row, logits_row, s, loss_data + row, grad_row);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> zlpr_cpu(const at::Tensor& logits_in,
                                            const at::Tensor& labels_in, bool compute_grad) {
  check_dense(logits_in, labels_in);
  const auto logits = logits_in.contiguous();
  const auto labels = readable_labels(labels_in, logits.scalar_type());
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad);
  const int64_t n = logits.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "zlpr_cpu", [&] {
    using logit_t = scalar_t;
    using acc_t = at::opmath_type<logit_t>;
    AT_DISPATCH_ALL_TYPES_AND3(
        at::kBool, at::kHalf, at::kBFloat16, labels.scalar_type(), "zlpr_cpu_labels", [&] {
          const scalar_t* label_data = labels.const_data_ptr<scalar_t>();
          for_each_row<logit_t>(
              logits, row_loss, grad, compute_grad,
              [&](int64_t row, const logit_t* logits_row, acc_t* s, acc_t* loss, logit_t* g) {
                thread_local std::vector<acc_t> t;
                t.resize(n);
                const scalar_t* labels_row = label_data + row * n;
                at::vec::convert(labels_row, t.data(), n);
                if (zlpr_row(s, t.data(), n, loss, g)) return;
                at::vec::convert(logits_row, s, n);
                at::vec::convert(labels_row, t.data(), n);
                exact_row(s, t.data(), n, loss, g);
              });
        });
  });
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_zlpr_cpu(const at::Tensor& logits_in,
                                                   const at::Tensor& positives_in,
                                                   int64_t ignore_index, bool compute_grad) {
  check_sparse(logits_in, positives_in);
  const auto logits = logits_in.contiguous();
  const auto positives = positives_in.contiguous();
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad);
  const int64_t n = logits.size(-1);
  const int64_t per_row = positives.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparse_zlpr_cpu", [&] {
        using logit_t = scalar_t;
        using acc_t = at::opmath_type<logit_t>;
        AT_DISPATCH_INDEX_TYPES(positives.scalar_type(), "sparse_zlpr_cpu_index", [&] {
          const index_t* index_data = positives.const_data_ptr<index_t>();
          for_each_row<logit_t>(
              logits, row_loss, grad, compute_grad,
              [&](int64_t row, const logit_t* logits_row, acc_t* s, acc_t* loss, logit_t* g) {
                thread_local std::vector<std::pair<int64_t, acc_t>> kept;
                if (sparse_zlpr_row(s, n, index_data + row * per_row, per_row, ignore_index, kept,
                                    loss, g)) {
                  return;
                }
                at::vec::convert(logits_row, s, n);
                for (const auto& [index, logit] : kept) {
                  s[index] = -std::numeric_limits<acc_t>::infinity();
                }
                exact_sparse_row(s, n, kept, loss, g);
              });
        });
      });
  return {row_loss, grad};
}

// Device-generic: one fused elementwise pass (broadcast multiply, cast to the gradient's dtype).
at::Tensor zlpr_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_backward(grad_loss, grad);
  auto out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  return at::mul_out(out, grad, grad_loss.unsqueeze(-1));
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("zlpr", &zlpr_cpu);
  m.impl("sparse_zlpr", &sparse_zlpr_cpu);
}

TORCH_LIBRARY_IMPL(kxops, CompositeExplicitAutograd, m) { m.impl("zlpr_backward", &zlpr_backward); }

}  // namespace kxops::zlpr

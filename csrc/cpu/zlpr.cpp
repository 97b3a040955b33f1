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

#include "zlpr.h"
#include "zlpr_op.h"

namespace kxops::zlpr {
namespace {

using at::vec::Vectorized;

// Enough classes per task that thread start-up is paid for.
constexpr int64_t kGrainElements = 32768;

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

// One row whose logits are in s and targets in t (both opmath, length n). On return s and t
// are overwritten with the weighted exponential terms; writes the loss and, when grad is not
// null, d loss / d logits.
template <typename acc_t, typename scalar_t>
void zlpr_row(acc_t* s, acc_t* t, int64_t n, acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const int64_t vec_end = n - n % kWidth;
  constexpr int kAllLanes = (1 << kWidth) - 1;
  const Vec zero(0), one(1), neg_inf(-std::numeric_limits<acc_t>::infinity());

  // Maxima of the terms that enter each sum (0 stands for the "1 +"); a NaN need not win
  // here: it turns the sums below into NaN.
  Vec max_neg(0), max_pos(0);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    const Vec sj = Vec::loadu(s + j), tj = Vec::loadu(t + j);
    const Vec kept = sj != neg_inf;
    max_neg = at::vec::maximum(max_neg, Vec::blendv(zero, sj, kept & ((one - tj) > zero)));
    max_pos = at::vec::maximum(max_pos, Vec::blendv(zero, zero - sj, kept & (tj > zero)));
  }
  acc_t m_neg = lanes_max(max_neg);
  acc_t m_pos = lanes_max(max_pos);
  for (int64_t j = vec_end; j < n; ++j) {
    if (negative_weight(s[j], t[j]) > 0) m_neg = std::max(m_neg, s[j]);
    if (positive_weight(s[j], t[j]) > 0) m_pos = std::max(m_pos, -s[j]);
  }

  // Weighted terms w e^{x - max}; blend, not multiply, so that a dropped term whose
  // exponential overflows gives 0 rather than 0 * inf.
  const Vec vm_neg(m_neg), vm_pos(m_pos);
  Vec sum_neg(0), sum_pos(0);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    const Vec sj = Vec::loadu(s + j), tj = Vec::loadu(t + j);
    const Vec kept = sj != neg_inf;
    const Vec w_neg = one - tj;
    const Vec in_neg = kept & (w_neg > zero), in_pos = kept & (tj > zero);
    // Hard labels leave most vectors with one sum only: skip the other's exponentials.
    const Vec e_neg = in_neg.zero_mask() == kAllLanes
                          ? zero
                          : Vec::blendv(zero, w_neg * (sj - vm_neg).exp_u20(), in_neg);
    const Vec e_pos = in_pos.zero_mask() == kAllLanes
                          ? zero
                          : Vec::blendv(zero, tj * (zero - sj - vm_pos).exp_u20(), in_pos);
    sum_neg = sum_neg + e_neg;
    sum_pos = sum_pos + e_pos;
    e_neg.store(s + j);
    e_pos.store(t + j);
  }
  RowSums<acc_t> sums;
  sums.neg = {m_neg, lanes_sum(sum_neg)};
  sums.pos = {m_pos, lanes_sum(sum_pos)};
  for (int64_t j = vec_end; j < n; ++j) {
    const acc_t w_neg = negative_weight(s[j], t[j]);
    const acc_t w_pos = positive_weight(s[j], t[j]);
    const acc_t e_neg = w_neg > 0 || w_neg != w_neg ? w_neg * std::exp(s[j] - m_neg) : 0;
    const acc_t e_pos = w_pos > 0 || w_pos != w_pos ? w_pos * std::exp(-s[j] - m_pos) : 0;
    sums.neg.sum += e_neg;
    sums.pos.sum += e_pos;
    s[j] = e_neg;
    t[j] = e_pos;
  }
  *loss = sums.loss();
  if (grad == nullptr) return;

  const RowGrad<acc_t> finish(sums);
  const Vec inv_neg(finish.inv_neg), inv_pos(finish.inv_pos);
  for (int64_t j = 0; j < vec_end; j += kWidth) {
    (Vec::loadu(s + j) * inv_neg - Vec::loadu(t + j) * inv_pos).store(s + j);
  }
  for (int64_t j = vec_end; j < n; ++j) s[j] = s[j] * finish.inv_neg - t[j] * finish.inv_pos;
  if (static_cast<void*>(s) != static_cast<void*>(grad)) at::vec::convert(s, grad, n);
}

// The exact sparse row: positives leave the negative sum because their logits are replaced by
// -inf in the private copy s (no subtraction), so the negative side costs one exponential per
// class without reading targets, and the positive side is a short online sum over the listed
// positives. `kept` receives (class, logit) of each distinct positive that is not masked.
template <typename acc_t, typename scalar_t, typename index_t>
void sparse_zlpr_row(acc_t* s, int64_t n, const index_t* positives, int64_t per_row,
                     int64_t ignore_index, std::vector<std::pair<int64_t, acc_t>>& kept,
                     acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  kept.clear();
  for (const index_t* p = positives; p != positives + per_row; ++p) {
    if (*p == ignore_index) continue;
    TORCH_CHECK_INDEX(*p >= 0 && *p < n, "kxops ZLPR: positives holds class index ", *p,
                      ", out of range for ", n, " classes (valid: 0..", n - 1,
                      ", or ignore_index=", ignore_index, " for padding)");
    // A -inf here is a masked positive or a duplicate already taken: neither adds a term.
    if (s[*p] == kNegInf) continue;
    kept.emplace_back(*p, s[*p]);
    s[*p] = kNegInf;
  }
  RowSums<acc_t> sums;
  for (const auto& [index, logit] : kept) push(sums.pos, -logit, acc_t(1));

  // -inf logits are neutral in the max and give e^{-inf} = 0; a NaN makes the sum NaN.
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
  sums.neg.max = max_neg;
  sums.neg.sum = std::accumulate(s + vec_end, s + n, lanes_sum(sum_vec));
  *loss = sums.loss();
  if (grad == nullptr) return;

  const RowGrad<acc_t> finish(sums);
  at::vec::map([&](Vec e) { return e * Vec(finish.inv_neg); }, s, s, n);
  for (const auto& [index, logit] : kept) s[index] = finish(logit, acc_t(1));
  if (static_cast<void*>(s) != static_cast<void*>(grad)) at::vec::convert(s, grad, n);
}

// Runs row_fn(row, s, loss, grad) over every row in parallel, with s holding the row's
// logits in opmath.
template <typename scalar_t, typename RowFn>
void for_each_row(const at::Tensor& logits, at::Tensor& row_loss, at::Tensor& grad,
                  bool compute_grad, RowFn row_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(-1);
  const int64_t rows = row_loss.numel();
  const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
  acc_t* loss_data = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buffer(n);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* grad_row = grad_data == nullptr ? nullptr : grad_data + row * n;
      // An fp32/fp64 gradient row is the working copy itself: no final copy out.
      acc_t* s = s_buffer.data();
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (grad_row != nullptr) s = grad_row;
      }
      at::vec::convert(logits_data + row * n, s, n);
      row_fn(row, s, loss_data + row, grad_row);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> zlpr_cpu(const at::Tensor& logits_in,
                                            const at::Tensor& labels_in, bool compute_grad) {
  check_dense(logits_in, labels_in);
  const auto logits = logits_in.contiguous();
  const auto labels = labels_in.contiguous();
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad);
  const int64_t n = logits.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "zlpr_cpu", [&] {
    using logit_t = scalar_t;
    using acc_t = at::opmath_type<logit_t>;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, labels.scalar_type(),
                               "zlpr_cpu_labels", [&] {
      const scalar_t* label_data = labels.const_data_ptr<scalar_t>();
      for_each_row<logit_t>(logits, row_loss, grad, compute_grad,
                            [&](int64_t row, acc_t* s, acc_t* loss, logit_t* g) {
                              thread_local std::vector<acc_t> t;
                              t.resize(n);
                              at::vec::convert(label_data + row * n, t.data(), n);
                              zlpr_row(s, t.data(), n, loss, g);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sparse_zlpr_cpu", [&] {
    using logit_t = scalar_t;
    using acc_t = at::opmath_type<logit_t>;
    AT_DISPATCH_INDEX_TYPES(positives.scalar_type(), "sparse_zlpr_cpu_index", [&] {
      const index_t* index_data = positives.const_data_ptr<index_t>();
      for_each_row<logit_t>(logits, row_loss, grad, compute_grad,
                            [&](int64_t row, acc_t* s, acc_t* loss, logit_t* g) {
                              thread_local std::vector<std::pair<int64_t, acc_t>> kept;
                              sparse_zlpr_row(s, n, index_data + row * per_row, per_row,
                                              ignore_index, kept, loss, g);
                            });
    });
  });
  return {row_loss, grad};
}

// Device-generic: one fused elementwise pass (broadcast multiply, cast to the gradient's dtype).
at::Tensor zlpr_backward(const at::Tensor& grad_loss, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 1 && grad_loss.sizes() == grad.sizes().slice(0, grad.dim() - 1),
              "kxops ZLPR backward: grad_loss shape ", grad_loss.sizes(),
              " must be the saved gradient's shape without its last dim, ", grad.sizes());
  auto out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  return at::mul_out(out, grad, grad_loss.unsqueeze(-1));
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("zlpr", &zlpr_cpu);
  m.impl("sparse_zlpr", &sparse_zlpr_cpu);
}

TORCH_LIBRARY_IMPL(kxops, CompositeExplicitAutograd, m) {
  m.impl("zlpr_backward", &zlpr_backward);
}

}  // namespace kxops::zlpr

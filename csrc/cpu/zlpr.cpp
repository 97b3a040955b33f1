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
#include <vector>

#include "zlpr.h"
#include "zlpr_op.h"

namespace kxops::zlpr {
namespace {

using at::vec::Vectorized;

// Enough classes per task that thread start-up is paid for.
constexpr int64_t kGrainElements = 32768;

// One row whose logits are in s and targets in t (both opmath, length n). On return s and t
// are overwritten with the weighted exponential terms; writes the loss and, when grad is not
// null, d loss / d logits.
template <typename acc_t, typename scalar_t>
void zlpr_row(acc_t* s, acc_t* t, int64_t n, acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const int64_t vec_end = n - n % kWidth;
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
  acc_t m_neg = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_neg);
  acc_t m_pos = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_pos);
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
    const Vec e_neg = Vec::blendv(zero, w_neg * (sj - vm_neg).exp(), kept & (w_neg > zero));
    const Vec e_pos = Vec::blendv(zero, tj * (zero - sj - vm_pos).exp(), kept & (tj > zero));
    sum_neg = sum_neg + e_neg;
    sum_pos = sum_pos + e_pos;
    e_neg.store(s + j);
    e_pos.store(t + j);
  }
  RowSums<acc_t> sums;
  sums.neg = {m_neg, at::vec::vec_reduce_all<acc_t>(
                         [](Vec& a, Vec& b) { return a + b; }, sum_neg)};
  sums.pos = {m_pos, at::vec::vec_reduce_all<acc_t>(
                         [](Vec& a, Vec& b) { return a + b; }, sum_pos)};
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
  at::vec::convert(s, grad, n);
}

// Runs fill_targets(row, s, t) then zlpr_row over every row, in parallel.
template <typename scalar_t, typename FillTargets>
void for_each_row(const at::Tensor& logits, at::Tensor& row_loss, at::Tensor& grad,
                  bool compute_grad, FillTargets fill_targets) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(-1);
  const int64_t rows = n == 0 ? row_loss.numel() : logits.numel() / n;
  const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
  acc_t* loss_data = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n), t(n);
    for (int64_t row = begin; row < end; ++row) {
      at::vec::convert(logits_data + row * n, s.data(), n);
      fill_targets(row, t.data());
      zlpr_row(s.data(), t.data(), n, loss_data + row,
               grad_data == nullptr ? nullptr : grad_data + row * n);
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
      for_each_row<logit_t>(logits, row_loss, grad, compute_grad, [&](int64_t row, acc_t* t) {
        at::vec::convert(label_data + row * n, t, n);
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
      for_each_row<logit_t>(logits, row_loss, grad, compute_grad, [&](int64_t row, acc_t* t) {
        std::fill(t, t + n, acc_t(0));
        // Setting a target twice is harmless: duplicates count once.
        for (const index_t* p = index_data + row * per_row; p != index_data + (row + 1) * per_row; ++p) {
          if (*p == ignore_index) continue;
          TORCH_CHECK_INDEX(*p >= 0 && *p < n, "kxops ZLPR: positives holds class index ", *p,
                            ", out of range for ", n, " classes (valid: 0..", n - 1,
                            ", or ignore_index=", ignore_index, " for padding)");
          t[*p] = 1;
        }
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

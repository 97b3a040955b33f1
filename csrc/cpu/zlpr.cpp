// ZLPR loss on CPU: one task per block of rows; each row is read once into fp32/fp64 buffers
// (the gradient row itself where it is fp32/fp64), which then hold the exponential terms, so
// the gradient costs no second read of the logits or labels and no second round of
// exponentials. Each row runs in steps: the maxima, the weighted terms and their sums, the
// finished gradient; rows whose sums are not finite are redone class by class.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/nonzeros.h"
#include "cpu/vec_math.h"
#include "sparse_grad_host.h"
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

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Calls step(j, count) for each vector of a row of n: count = the vector width, except for a
// shorter last one.
template <typename acc_t, typename Step>
void for_each_vector(int64_t n, Step step) {
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  for (int64_t j = 0; j < n; j += kWidth) step(j, std::min(kWidth, n - j));
}

// count values from p, the other lanes set to fill.
template <typename acc_t>
Vectorized<acc_t> load(const acc_t* p, int64_t count, acc_t fill) {
  using Vec = Vectorized<acc_t>;
  if (count == Vec::size()) return Vec::loadu(p);
  return Vec::set(Vec(fill), Vec::loadu(p, count), count);
}

// A row's logits, the lanes past its end masked (-inf: in no sum, neutral in every maximum).
template <typename acc_t>
Vectorized<acc_t> load_logits(const acc_t* s, int64_t count) {
  return load(s, count, kNegInf<acc_t>);
}

template <typename acc_t>
bool is_finite(const ExpSum<acc_t>& acc) {
  return std::isfinite(acc.max) && std::isfinite(acc.sum);
}

template <typename acc_t>
bool is_finite(const RowSums<acc_t>& sums) {
  return is_finite(sums.neg) && is_finite(sums.pos);
}

// Writes the finished opmath row s to the gradient row, unless s is the gradient row itself.
template <typename acc_t, typename scalar_t>
void store_grad(const acc_t* s, int64_t n, scalar_t* grad) {
  if (static_cast<const void*>(s) != static_cast<const void*>(grad)) at::vec::convert(s, grad, n);
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
// s may be the gradient row itself; grad_scale as RowGrad's scale.
template <typename acc_t, typename scalar_t>
void exact_row(const acc_t* s, const acc_t* t, int64_t n, acc_t grad_scale, acc_t* loss,
               scalar_t* grad) {
  const RowSums<acc_t> sums = exact_sums(s, n, [&](int64_t j) { return t[j]; });
  *loss = sums.loss();
  if (grad == nullptr) return;
  const RowGrad<acc_t> finish(sums, grad_scale);
  for (int64_t j = 0; j < n; ++j) grad[j] = static_cast<scalar_t>(finish(s[j], t[j]));
}

// The maxima of the terms that enter each sum (0 stands for the "1 +"); a NaN reaches them.
template <typename acc_t>
std::pair<acc_t, acc_t> term_maxima(const acc_t* s, const acc_t* t, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec max_neg(0), max_pos(0);
  for_each_vector<acc_t>(n, [&](int64_t j, int64_t count) {
    const Vec sj = load_logits(s + j, count), tj = load(t + j, count, acc_t(0));
    max_neg = at::vec::maximum(max_neg, select(out_of_negative(sj, tj), Vec(0), sj));
    max_pos = at::vec::maximum(max_pos, select(out_of_positive(sj, tj), Vec(0), Vec(0) - sj));
  });
  return {lanes_max(max_neg), lanes_max(max_pos)};
}

// Overwrites s and t with the weighted terms of the negative and the positive sum, and returns
// the sums.
template <typename acc_t>
RowSums<acc_t> weighted_terms(acc_t* s, acc_t* t, int64_t n, acc_t max_neg, acc_t max_pos) {
  using Vec = Vectorized<acc_t>;
  const Vec vmax_neg(max_neg), vmax_pos(max_pos);
  Vec sum_neg(0), sum_pos(0);
  for_each_vector<acc_t>(n, [&](int64_t j, int64_t count) {
    const Vec sj = load_logits(s + j, count), tj = load(t + j, count, acc_t(0));
    const Vec e_neg = negative_term(sj, tj, vmax_neg), e_pos = positive_term(sj, tj, vmax_pos);
    sum_neg = sum_neg + e_neg;
    sum_pos = sum_pos + e_pos;
    e_neg.store(s + j, count);
    e_pos.store(t + j, count);
  });
  RowSums<acc_t> sums;
  sums.neg = {max_neg, lanes_sum(sum_neg)};
  sums.pos = {max_pos, lanes_sum(sum_pos)};
  return sums;
}

// One row whose logits are in s and targets in t (both opmath, length n). Returns false, with
// s and t overwritten and nothing written, when the row's sums are not finite: the caller then
// reloads the row into exact_row. Otherwise writes the loss and, when grad is not null,
// d loss / d logits times grad_scale.
template <typename acc_t, typename scalar_t>
bool zlpr_row(acc_t* s, acc_t* t, int64_t n, acc_t grad_scale, acc_t* loss, scalar_t* grad) {
  using Vec = Vectorized<acc_t>;
  const auto [max_neg, max_pos] = term_maxima(s, t, n);
  const RowSums<acc_t> sums = weighted_terms(s, t, n, max_neg, max_pos);
  if (!is_finite(sums)) return false;
  *loss = sums.loss();
  if (grad == nullptr) return true;
  // Finite sums: every stored term is finite and 0 outside its sum, so the products below
  // follow the membership rule without testing it again.
  const RowGrad<acc_t> finish(sums, grad_scale);
  const Vec inv_neg(finish.inv_neg), inv_pos(finish.inv_pos);
  at::vec::map2([&](Vec e_neg, Vec e_pos) { return e_neg * inv_neg - e_pos * inv_pos; }, s, s, t,
                n);
  store_grad(s, n, grad);
  return true;
}

// (class, logit) of each distinct positive of a sparse row that is not masked.
template <typename acc_t>
using Positives = std::vector<std::pair<int64_t, acc_t>>;

// Collects a sparse row's positives into kept and masks them (-inf) in s, its private copy of
// the logits, so that every class left in s is a negative: the negative sum is then exact (no
// subtraction) and costs one exponential per class without reading targets.
template <typename acc_t, typename index_t>
void take_positives(acc_t* s, int64_t n, const index_t* positives, int64_t per_row,
                    int64_t ignore_index, Positives<acc_t>& kept) {
  kept.clear();
  for (const index_t* p = positives; p != positives + per_row; ++p) {
    // Compared as int64: an ignore_index out of index_t's range matches nothing.
    if (*p == ignore_index) continue;
    TORCH_CHECK_INDEX(*p >= 0 && *p < n, "kxops.sparse_zlpr: positives holds class index ", *p,
                      ", out of range for ", n, " classes (valid: 0..", n - 1,
                      ", or ignore_index=", ignore_index, " for padding)");
    // A -inf here is a masked positive or a duplicate already taken: neither adds a term.
    if (s[*p] == kNegInf<acc_t>) continue;
    kept.emplace_back(*p, s[*p]);
    s[*p] = kNegInf<acc_t>;
  }
}

// The maximum of s, at least 0; a NaN reaches it.
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec max(0);
  for_each_vector<acc_t>(
      n, [&](int64_t j, int64_t count) { max = at::vec::maximum(max, load_logits(s + j, count)); });
  return lanes_max(max);
}

// Copies a row's logits into s (opmath) and returns row_max of them, in one pass where the
// logits are opmath already.
template <typename scalar_t, typename acc_t>
acc_t copy_with_max(const scalar_t* logits, acc_t* s, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    Vec max(0);
    for_each_vector<acc_t>(n, [&](int64_t j, int64_t count) {
      const Vec v = load_logits(logits + j, count);
      v.store(s + j, count);
      max = at::vec::maximum(max, v);
    });
    return lanes_max(max);
  } else {
    at::vec::convert(logits, s, n);
    return row_max(s, n);
  }
}

// Overwrites s (the negatives, with target 0) with their terms, and returns their sum.
// negative_term(s, 0, max) without its selects, which cost a fifth of the row: the caller
// checks the result (max and sum finite, else the exact path), so the only non-finite logits
// here are -inf (masked, or a positive taken out), whose exponential is exactly 0 (exp_u20
// flushes arguments below log(FLT_MIN) to 0; the fp64 exp is Sleef's).
template <typename acc_t>
ExpSum<acc_t> negative_terms(acc_t* s, int64_t n, acc_t max) {
  using Vec = Vectorized<acc_t>;
  const Vec vmax(max);
  Vec sum(0);
  for_each_vector<acc_t>(n, [&](int64_t j, int64_t count) {
    const Vec e = exponential(load_logits(s + j, count) - vmax);
    sum = sum + e;
    e.store(s + j, count);
  });
  return {max, lanes_sum(sum)};
}

// The positive sum of kept positives whose logits are all finite, as push sums them but with
// one vector exponential pass instead of a scalar exponential per positive (a fifth of a
// [1024, 1000] row): terms gets e^{-s - max} of each, in kept's order, for the gradient.
template <typename acc_t>
ExpSum<acc_t> finite_positive_terms(const Positives<acc_t>& kept, std::vector<acc_t>& terms) {
  const int64_t n = static_cast<int64_t>(kept.size());
  terms.resize(n);
  for (int64_t k = 0; k < n; ++k) terms[k] = -kept[k].second;
  return negative_terms(terms.data(), n, row_max(terms.data(), n));
}

// A sparse row's scale and grad_filter (see RowGrad).
template <typename acc_t>
struct GradOptions {
  acc_t scale, filter;
};

// s holds the negatives' terms e^{s - max} (0 at the positives): their gradients, filtered
// when options.filter > 0 (the same values as RowGrad's).
template <typename acc_t>
void negative_grads(acc_t* s, int64_t n, const RowGrad<acc_t>& finish, GradOptions<acc_t> options) {
  using Vec = Vectorized<acc_t>;
  if (options.filter > acc_t(0)) {
    const Vec inv(finish.unscaled_inv_neg), filter(options.filter), inv_neg(finish.inv_neg);
    at::vec::map([&](Vec e) { return filtered(e, inv, filter, inv_neg); }, s, s, n);
  } else {
    const Vec inv_neg(finish.inv_neg);
    at::vec::map([&](Vec e) { return e * inv_neg; }, s, s, n);
  }
}

// One sparse row whose logits are in s (opmath, its private copy), row_max of them in
// logits_max. Returns false, with s overwritten and nothing written, when the negative sum is
// not finite: the caller then reloads the row into exact_sparse_row. Otherwise as zlpr_row.
template <typename acc_t, typename scalar_t, typename index_t>
bool sparse_zlpr_row(acc_t* s, int64_t n, acc_t logits_max, const index_t* positives,
                     int64_t per_row, int64_t ignore_index, Positives<acc_t>& kept,
                     GradOptions<acc_t> options, acc_t* loss, scalar_t* grad) {
  take_positives(s, n, positives, per_row, ignore_index, kept);
  // The negatives' maximum is the row's unless a positive reaches it (or it is NaN).
  const bool positive_on_top = std::any_of(kept.begin(), kept.end(), [&](const auto& positive) {
    return !(positive.second < logits_max);
  });
  RowSums<acc_t> sums;
  sums.neg = negative_terms(s, n, positive_on_top ? row_max(s, n) : logits_max);
  if (!is_finite(sums.neg)) return false;
  // Finite positives in one vector pass; otherwise the shared math, whatever their values.
  thread_local std::vector<acc_t> terms;
  const bool finite = std::all_of(kept.begin(), kept.end(), [](const auto& positive) {
    return std::isfinite(positive.second);
  });
  if (finite) {
    sums.pos = finite_positive_terms(kept, terms);
  } else {
    for (const auto& [index, logit] : kept) push(sums.pos, -logit, acc_t(1));
  }
  *loss = sums.loss();
  if (grad == nullptr) return true;
  const RowGrad<acc_t> finish(sums, options.scale, options.filter);
  negative_grads(s, n, finish, options);
  // A positive is in the positive sum only (t = 1): finish(logit, 1) = -term * inv_pos.
  for (size_t k = 0; k < kept.size(); ++k) {
    const auto& [index, logit] = kept[k];
    s[index] = finite ? -terms[k] * finish.inv_pos : finish(logit, acc_t(1));
  }
  store_grad(s, n, grad);
  return true;
}

// The sparse row through the shared math: s holds the row's logits with its positives (kept,
// from take_positives) at -inf, so every other class is a negative (target 0).
template <typename acc_t, typename scalar_t>
void exact_sparse_row(const acc_t* s, int64_t n, const Positives<acc_t>& kept,
                      GradOptions<acc_t> options, acc_t* loss, scalar_t* grad) {
  RowSums<acc_t> sums = exact_sums(s, n, [](int64_t) { return acc_t(0); });
  for (const auto& [index, logit] : kept) sums.add(logit, acc_t(1));
  *loss = sums.loss();
  if (grad == nullptr) return;
  const RowGrad<acc_t> finish(sums, options.scale, options.filter);
  for (int64_t j = 0; j < n; ++j) grad[j] = static_cast<scalar_t>(finish(s[j], acc_t(0)));
  for (const auto& [index, logit] : kept) {
    grad[index] = static_cast<scalar_t>(finish(logit, acc_t(1)));
  }
}

// A thread's opmath row buffer of n values, reused from row to row.
template <typename acc_t>
acc_t* row_buffer(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  buffer.resize(n);
  return buffer.data();
}

// Runs row_fn(row, logits_row, s, loss, grad) over every row in parallel, s being the row's
// opmath working buffer: an fp32/fp64 gradient row itself (no final copy out), else a buffer.
// grad may be the logits themselves: s is then a buffer too, and a row is overwritten only
// after row_fn's last read of it (its final store).
template <typename scalar_t, typename RowFn>
void for_each_row(const at::Tensor& logits, at::Tensor& row_loss, at::Tensor& grad,
                  bool compute_grad, RowFn row_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(-1);
  const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
  acc_t* loss_data = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const bool grad_row_is_buffer =
      std::is_same_v<scalar_t, acc_t> && compute_grad && grad_data != logits_data;
  at::parallel_for(0, row_loss.numel(), rows_per_task(n), [&](int64_t begin, int64_t end) {
    acc_t* buffer = grad_row_is_buffer ? nullptr : row_buffer<acc_t>(n);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* grad_row = grad_data == nullptr ? nullptr : grad_data + row * n;
      acc_t* s = buffer;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (grad_row_is_buffer) s = grad_row;
      }
      row_fn(row, logits_data + row * n, s, loss_data + row, grad_row);
    }
  });
}

// Both ops, their inputs checked: makes the logits contiguous, allocates the outputs and runs
// the rows: with_row_fn(n, grad_scale, run) calls run(row_fn) with the op's row function for
// rows of n logits (see for_each_row); grad_scale is an opmath value. in_place (contiguous
// logits): the gradient is written over the logits, and returned as them.
template <typename WithRowFn>
std::tuple<at::Tensor, at::Tensor> run_rows(const at::Tensor& logits_in, bool compute_grad,
                                            c10::string_view reduction, WithRowFn with_row_fn,
                                            bool in_place = false) {
  TORCH_INTERNAL_ASSERT(!in_place || (compute_grad && logits_in.is_contiguous()));
  const auto logits = logits_in.contiguous();
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad && !in_place);
  if (in_place) grad = logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "zlpr_cpu", [&] {
    const auto scale = grad_scale<at::opmath_type<scalar_t>>(logits, reduction);
    with_row_fn(logits.size(-1), scale, [&](auto row_fn) {
      for_each_row<scalar_t>(logits, row_loss, grad, compute_grad, row_fn);
    });
  });
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> zlpr_cpu(const at::Tensor& logits, const at::Tensor& labels_in,
                                            bool compute_grad, c10::string_view reduction) {
  const auto labels = readable_labels(labels_in, logits.scalar_type());
  return run_rows(logits, compute_grad, reduction, [&](int64_t n, auto scale, auto run) {
    AT_DISPATCH_ALL_TYPES_AND3(
        at::kBool, at::kHalf, at::kBFloat16, labels.scalar_type(), "zlpr_cpu_labels", [&] {
          const scalar_t* label_data = labels.const_data_ptr<scalar_t>();
          run([&](int64_t row, const auto* logits_row, auto* s, auto* loss, auto* g) {
            thread_local std::vector<decltype(scale)> t;
            t.resize(n);
            const scalar_t* labels_row = label_data + row * n;
            at::vec::convert(logits_row, s, n);
            at::vec::convert(labels_row, t.data(), n);
            if (zlpr_row(s, t.data(), n, scale, loss, g)) return;
            at::vec::convert(logits_row, s, n);
            at::vec::convert(labels_row, t.data(), n);
            exact_row(s, t.data(), n, scale, loss, g);
          });
        });
  });
}

// One sparse row (logits_row, n classes): its loss and, when g is not null, its gradient; s is
// the row's opmath working buffer, and g may be s itself.
template <typename acc_t, typename scalar_t, typename index_t, typename grad_t>
void sparse_row(const scalar_t* logits_row, acc_t* s, int64_t n, const index_t* positives,
                int64_t per_row, int64_t ignore_index, GradOptions<acc_t> options, acc_t* loss,
                grad_t* g) {
  thread_local Positives<acc_t> kept;
  const acc_t logits_max = copy_with_max(logits_row, s, n);
  if (sparse_zlpr_row(s, n, logits_max, positives, per_row, ignore_index, kept, options, loss, g)) {
    return;
  }
  at::vec::convert(logits_row, s, n);
  for (const auto& [index, logit] : kept) s[index] = kNegInf<acc_t>;
  exact_sparse_row(s, n, kept, options, loss, g);
}

// kxops::sparse_zlpr's kernel; in_place: see run_rows.
std::tuple<at::Tensor, at::Tensor> sparse_rows(const at::Tensor& logits,
                                               const at::Tensor& positives_in, int64_t ignore_index,
                                               bool compute_grad, c10::string_view reduction,
                                               double grad_filter, bool in_place) {
  const auto positives = positives_in.contiguous();
  const int64_t per_row = positives.size(-1);
  const auto with_row_fn = [&](int64_t n, auto scale, auto run) {
    using acc_t = decltype(scale);
    const GradOptions<acc_t> options{scale, static_cast<acc_t>(grad_filter)};
    AT_DISPATCH_INDEX_TYPES(positives.scalar_type(), "sparse_zlpr_cpu_index", [&] {
      const index_t* index_data = positives.const_data_ptr<index_t>();
      run([&](int64_t row, const auto* logits_row, acc_t* s, acc_t* loss, auto* g) {
        sparse_row(logits_row, s, n, index_data + row * per_row, per_row, ignore_index, options,
                   loss, g);
      });
    });
  };
  return run_rows(logits, compute_grad, reduction, with_row_fn, in_place);
}

std::tuple<at::Tensor, at::Tensor> sparse_zlpr_cpu(const at::Tensor& logits,
                                                   const at::Tensor& positives,
                                                   int64_t ignore_index, bool compute_grad,
                                                   c10::string_view reduction, double grad_filter) {
  return sparse_rows(logits, positives, ignore_index, compute_grad, reduction, grad_filter, false);
}

// The rows of sparse_zlpr_with_sparse_grad, each row's nonzero gradients kept in its task's
// buffers (in row order); nothing once more than max_density() of the gradient survives.
template <typename T, typename index_t>
std::optional<sparse_grad::SparseRows> rows_with_sparse_grad(const at::Tensor& logits,
                                                             const at::Tensor& positives,
                                                             int64_t ignore_index,
                                                             double grad_filter,
                                                             at::Tensor& row_loss) {
  const int64_t rows = logits.size(0), n = logits.size(1), per_row = positives.size(1);
  const double limit = sparse_grad::max_density() * static_cast<double>(rows * n);
  const GradOptions<T> options{T(1), static_cast<T>(grad_filter)};
  const T* data = logits.const_data_ptr<T>();
  const index_t* ids = positives.const_data_ptr<index_t>();
  T* loss = row_loss.mutable_data_ptr<T>();
  std::vector<sparse_grad::cpu::Entries<T>> chunks(rows);  // at task starts
  at::Tensor row_start = at::empty({rows + 1}, logits.options().dtype(at::kLong));
  int64_t* start = row_start.mutable_data_ptr<int64_t>();
  std::atomic<int64_t> total{0};
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
    auto& [cols, values] = chunks[begin];
    T* s = row_buffer<T>(n);
    for (int64_t row = begin; row < end && static_cast<double>(total.load()) <= limit; ++row) {
      sparse_row(data + row * n, s, n, ids + row * per_row, per_row, ignore_index, options,
                 loss + row, s);
      const int64_t count = sparse_grad::count_nonzeros(s, n), at = cols.size();
      cols.resize(at + count);
      values.resize(at + count);
      sparse_grad::take_nonzeros(s, n, cols.data() + at, values.data() + at);
      start[row + 1] = count;
      total += count;
    }
  });
  if (static_cast<double>(total.load()) > limit) return std::nullopt;
  return sparse_grad::cpu::join_rows(row_start, chunks, n, logits.options());
}

}  // namespace

at::Tensor cpu::sparse_zlpr_rows_in_place(const at::Tensor& logits, const at::Tensor& positives,
                                          int64_t ignore_index, double grad_filter) {
  return std::get<0>(sparse_rows(logits, positives, ignore_index, true, "none", grad_filter, true));
}

TORCH_LIBRARY_IMPL(kxops, CPU, m) { register_ops<&zlpr_cpu, &sparse_zlpr_cpu>(m); }

TORCH_LIBRARY_IMPL(kxops, CompositeExplicitAutograd, m) { register_device_generic_ops(m); }

}  // namespace kxops::zlpr

namespace kxops::sparse_grad {

std::tuple<at::Tensor, std::optional<SparseRows>> sparse_zlpr_with_sparse_grad(
    const at::Tensor& logits_in, const at::Tensor& positives_in, int64_t ignore_index,
    double grad_filter) {
  TORCH_INTERNAL_ASSERT(logits_in.is_cpu() && logits_in.dim() == 2 && grad_filter > 0);
  const auto logits = logits_in.contiguous();
  const auto positives = positives_in.contiguous();
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options());
  std::optional<SparseRows> out;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sparse_zlpr_with_sparse_grad", [&] {
    AT_DISPATCH_INDEX_TYPES(positives.scalar_type(), "sparse_zlpr_with_sparse_grad_index", [&] {
      out = zlpr::rows_with_sparse_grad<scalar_t, index_t>(logits, positives, ignore_index,
                                                           grad_filter, row_loss);
    });
  });
  return {row_loss, out};
}

}  // namespace kxops::sparse_grad

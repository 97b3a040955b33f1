// kxops::global_pointer_zlpr on CPU: the shared host driver (GEMMs + the CPU sparse_zlpr kernel),
// and the filtered row kernel of its packed rows (see filtered_sparse_grad in the host header).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec_math.h"
#include "global_pointer_zlpr_host.h"
#include "zlpr_math.h"

namespace kxops::global_pointer_zlpr {
namespace {

using at::vec::Vectorized;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The candidates' threshold sits this far (in log space) below the bound it stands for, far
// more than the exponential's and the products' rounding: a candidate is only re-examined, so
// a loose threshold costs time, never a survivor.
constexpr double kThresholdMargin = 0.125;

// The row's distinct positives that are not masked, (column, logit) in the order the row
// kernel sums them (first occurrence), and their columns sorted, to mask them in the loads.
template <typename T>
struct RowPositives {
  std::vector<std::pair<int64_t, T>> kept;
  std::vector<int64_t> sorted;
  std::vector<T> terms;

  void take(const T* s, int64_t n, const int64_t* ids, int64_t per_row) {
    kept.clear();
    sorted.clear();
    for (const int64_t* p = ids; p != ids + per_row; ++p) {
      if (*p == -1) continue;  // ignored (the driver's packed positives)
      TORCH_CHECK_INDEX(*p >= 0 && *p < n, "kxops.global_pointer_zlpr: packed span id ", *p,
                        " out of range for ", n, " packed spans");
      const bool seen = std::find(sorted.begin(), sorted.end(), *p) != sorted.end();
      if (seen || s[*p] == kNegInf<T>) continue;  // a duplicate, or a masked span
      kept.emplace_back(*p, s[*p]);
      sorted.push_back(*p);
    }
    std::sort(sorted.begin(), sorted.end());
  }

  bool finite() const {
    return std::all_of(kept.begin(), kept.end(),
                       [](const auto& positive) { return std::isfinite(positive.second); });
  }
};

// v (the vector at j) with the lanes of the positives among next.. at -inf.
template <typename T>
C10_NOINLINE Vectorized<T> mask_positives(const Vectorized<T>& v, int64_t j, int64_t count,
                                          const int64_t*& next, const int64_t* end) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  for (; next != end && *next < j + count; ++next) lanes[*next - j] = kNegInf<T>;
  return Vectorized<T>::loadu(lanes);
}

// Loads the vector of s at j (count lanes, the rest -inf) with the positives' lanes at -inf, as
// the row kernel sees its negatives; next walks the sorted positive columns along the row.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> load_negatives(const T* s, int64_t j, int64_t count,
                                               const int64_t*& next, const int64_t* end) {
  using Vec = Vectorized<T>;
  Vec v = count == Vec::size() ? Vec::loadu(s + j)
                               : Vec::set(Vec(kNegInf<T>), Vec::loadu(s + j, count), count);
  if (C10_LIKELY(next == end || *next >= j + count)) return v;
  return mask_positives(v, j, count, next, end);
}

// The lanes' sum in the row kernel's order (the same reduction, so the same bits).
template <typename T>
T lanes_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
bool any_lane(const Vectorized<T>& mask) {
  return mask.zero_mask() != (1 << Vectorized<T>::size()) - 1;
}

// The maximum of the row's negatives, at least 0 (a NaN reaches it): the row kernel's.
template <typename T>
T negatives_max(const T* s, int64_t n, const std::vector<int64_t>& masked) {
  using Vec = Vectorized<T>;
  const int64_t* next = masked.data();
  Vec max(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    max = at::vec::maximum(max, load_negatives(s, j, count, next, masked.data() + masked.size()));
  }
  return at::vec::vec_reduce_all<T>(
      [](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, max);
}

// The negatives' terms e^{s - max} summed as the row kernel sums them (the same lanes, the same
// order, so the same bits); the vectors with a lane whose s - max reaches threshold are
// appended to candidates (at most cap of them: past it, candidates is cleared and false
// returned, and the caller scans the whole row).
template <typename T>
T negatives_sum(const T* s, int64_t n, T max, const std::vector<int64_t>& masked, T threshold,
                std::vector<int64_t>& candidates, size_t cap, bool& complete) {
  using Vec = Vectorized<T>;
  const int64_t* next = masked.data();
  const Vec vmax(max), vthreshold(threshold);
  Vec sum(0);
  complete = true;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec x = load_negatives(s, j, count, next, masked.data() + masked.size()) - vmax;
    sum = sum + exponential(x);
    if (complete && any_lane<T>(x >= vthreshold)) {
      candidates.push_back(j);
      if (candidates.size() > cap) complete = false;
    }
  }
  if (!complete) candidates.clear();
  return lanes_sum(sum);
}

// The positive sum as the row kernel forms it from finite positives: one vector pass over
// -logit; terms keeps each e^{-s - max} for the gradient.
template <typename T>
zlpr::ExpSum<T> positives_sum(RowPositives<T>& positives) {
  const int64_t n = static_cast<int64_t>(positives.kept.size());
  auto& terms = positives.terms;
  terms.resize(n);
  for (int64_t k = 0; k < n; ++k) terms[k] = -positives.kept[k].second;
  const std::vector<int64_t> none;
  const T max = negatives_max(terms.data(), n, none);
  using Vec = Vectorized<T>;
  const Vec vmax(max);
  Vec sum(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec e =
        exponential(Vec::set(Vec(kNegInf<T>), Vec::loadu(terms.data() + j, count), count) - vmax);
    sum = sum + e;
    e.store(terms.data() + j, count);
  }
  return {max, lanes_sum(sum)};
}

// The row's filtered gradient where it is nonzero: the negatives of the vectors at the given
// starts (every other negative is below the filter), through RowGrad's rule in the row
// kernel's lanes, merged in column order with the positives' entries.
template <typename T>
void emit_entries(const T* s, int64_t n, T max, const RowPositives<T>& positives,
                  const zlpr::RowGrad<T>& finish, const std::vector<int64_t>& starts,
                  sparse_grad::cpu::Entries<T>& out) {
  using Vec = Vectorized<T>;
  const Vec vmax(max), inv(finish.unscaled_inv_neg), filter(finish.grad_filter),
      inv_neg(finish.inv_neg);
  std::vector<std::pair<int64_t, T>> positive_entries;
  for (size_t k = 0; k < positives.kept.size(); ++k) {
    const T value = -positives.terms[k] * finish.inv_pos;
    if (value != T(0)) positive_entries.emplace_back(positives.kept[k].first, value);
  }
  std::sort(positive_entries.begin(), positive_entries.end());
  auto positive = positive_entries.begin();
  auto flush_positives = [&](int64_t before) {
    for (; positive != positive_entries.end() && positive->first < before; ++positive) {
      out.cols.push_back(positive->first);
      out.values.push_back(positive->second);
    }
  };
  const int64_t* masked_end = positives.sorted.data() + positives.sorted.size();
  for (const int64_t j : starts) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const int64_t* next = std::lower_bound(positives.sorted.data(), masked_end, j);
    const Vec x = load_negatives(s, j, count, next, masked_end) - vmax;
    alignas(64) T lanes[Vec::size()];
    zlpr::filtered(exponential(x), inv, filter, inv_neg).store(lanes);
    for (int64_t lane = 0; lane < count; ++lane) {
      if (lanes[lane] == T(0)) continue;
      flush_positives(j + lane);
      out.cols.push_back(j + lane);
      out.values.push_back(lanes[lane]);
    }
  }
  flush_positives(n);
}

// One packed row: its loss and its filtered gradient's entries. False (nothing appended) where
// a sum or a positive is not finite: the row kernel's exact path is then needed.
template <typename T>
bool filtered_row(const T* s, int64_t n, const int64_t* ids, int64_t per_row, T max, T grad_filter,
                  T* loss, sparse_grad::cpu::Entries<T>& out, size_t cap) {
  thread_local RowPositives<T> positives;
  thread_local std::vector<int64_t> starts;
  using Vec = Vectorized<T>;
  positives.take(s, n, ids, per_row);
  if (!positives.finite()) return false;
  // Every sum holds a term of at least 1 (the "1 +" at max 0, else the largest negative's), so
  // a negative's gradient e * inv with e = e^{s - max} reaches the filter only where e does.
  starts.clear();
  bool complete = false;
  zlpr::RowSums<T> sums;
  sums.neg.max = max;
  sums.neg.sum =
      negatives_sum(s, n, max, positives.sorted,
                    static_cast<T>(std::log(static_cast<double>(grad_filter)) - kThresholdMargin),
                    starts, cap, complete);
  if (!std::isfinite(sums.neg.max) || !std::isfinite(sums.neg.sum)) return false;
  sums.pos = positives_sum(positives);
  *loss = sums.loss();
  const zlpr::RowGrad<T> finish(sums, T(1), grad_filter);
  if (!complete) {  // too many candidates: the whole row against the exact bound
    const T threshold = static_cast<T>(
        std::log(static_cast<double>(grad_filter) / static_cast<double>(finish.unscaled_inv_neg)) -
        kThresholdMargin);
    const Vec vmax(max), vthreshold(threshold);
    const int64_t* next = positives.sorted.data();
    const int64_t* end = next + positives.sorted.size();
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      if (any_lane<T>((load_negatives(s, j, count, next, end) - vmax) >= vthreshold)) {
        starts.push_back(j);
      }
    }
  }
  emit_entries(s, n, max, positives, finish, starts, out);
  return true;
}

template <typename T>
FilteredGrad filtered_rows(const at::Tensor& logits, const at::Tensor& positives,
                           const at::Tensor& maxima, double grad_filter) {
  const int64_t rows = logits.size(0), n = logits.size(1), per_row = positives.size(1);
  const double limit = sparse_grad::max_density() * static_cast<double>(rows * n);
  const T* data = logits.const_data_ptr<T>();
  const int64_t* ids = positives.const_data_ptr<int64_t>();
  const T* max = maxima.const_data_ptr<T>();
  FilteredGrad result{at::empty({rows}, logits.options()), std::nullopt, FilteredGrad::kSparse};
  T* loss = result.row_loss.mutable_data_ptr<T>();
  std::vector<sparse_grad::cpu::Entries<T>> entries(rows);
  std::atomic<int64_t> total{0};
  std::atomic<bool> non_finite{false};
  const size_t cap = static_cast<size_t>(limit / Vectorized<T>::size()) + 1;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (non_finite.load() || static_cast<double>(total.load()) > limit) return;
      if (!filtered_row(data + row * n, n, ids + row * per_row, per_row, max[row],
                        static_cast<T>(grad_filter), loss + row, entries[row], cap)) {
        non_finite.store(true);
      }
      total += static_cast<int64_t>(entries[row].cols.size());
    }
  });
  if (non_finite.load()) return {at::Tensor(), std::nullopt, FilteredGrad::kNonFinite};
  if (static_cast<double>(total.load()) > limit) {
    return {at::Tensor(), std::nullopt, FilteredGrad::kTooDense};
  }
  auto row_start = at::empty({rows + 1}, logits.options().dtype(at::kLong));
  int64_t* count = row_start.mutable_data_ptr<int64_t>() + 1;
  for (int64_t row = 0; row < rows; ++row) {
    count[row] = static_cast<int64_t>(entries[row].cols.size());
  }
  result.grad = sparse_grad::cpu::join_rows(row_start, entries, n, logits.options());
  return result;
}

}  // namespace

void fill_lower_triangles(const at::Tensor& block) {
  TORCH_INTERNAL_ASSERT(block.is_cpu() && block.dim() == 3 && block.stride(2) == 1);
  const int64_t heads = block.size(0), rows = block.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, block.scalar_type(), "fill_lower", [&] {
    scalar_t* data = block.mutable_data_ptr<scalar_t>();
    const auto neg_inf = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t r = 1; r < rows; ++r) {
        std::fill_n(data + h * block.stride(0) + r * block.stride(1), r, neg_inf);
      }
    }
  });
}

void update_negative_maxima(const at::Tensor& logits, int64_t begin, int64_t end,
                            const at::Tensor& positives, const at::Tensor& maxima) {
  TORCH_INTERNAL_ASSERT(logits.is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                        positives.scalar_type() == at::kLong && positives.is_contiguous() &&
                        maxima.scalar_type() == logits.scalar_type() && maxima.is_contiguous());
  const int64_t n = logits.size(1), per_row = positives.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "global_pointer_negative_maxima", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    const int64_t* ids = positives.const_data_ptr<int64_t>();
    scalar_t* max = maxima.mutable_data_ptr<scalar_t>();
    std::vector<int64_t> masked;
    for (int64_t row = 0; row < logits.size(0); ++row) {
      masked.clear();
      for (const int64_t* p = ids + row * per_row; p != ids + (row + 1) * per_row; ++p) {
        if (*p >= begin && *p < end) masked.push_back(*p - begin);
      }
      std::sort(masked.begin(), masked.end());
      masked.erase(std::unique(masked.begin(), masked.end()), masked.end());
      const scalar_t block = negatives_max(data + row * n + begin, end - begin, masked);
      // The maximum is exact in any grouping; a NaN, once in, stays (as in one pass).
      if (std::isnan(block) || block > max[row]) max[row] = block;
    }
  });
}

FilteredGrad filtered_sparse_grad(const at::Tensor& logits, const at::Tensor& positives,
                                  const at::Tensor& maxima, double grad_filter) {
  TORCH_INTERNAL_ASSERT(logits.is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                        positives.scalar_type() == at::kLong && grad_filter > 0 &&
                        maxima.scalar_type() == logits.scalar_type() && maxima.is_contiguous());
  const auto ids = positives.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(
      logits.scalar_type(), "global_pointer_filtered_sparse_grad",
      [&] { return filtered_rows<scalar_t>(logits, ids, maxima, grad_filter); });
}

}  // namespace kxops::global_pointer_zlpr

TORCH_LIBRARY_IMPL(kxops, CPU, m) { kxops::global_pointer_zlpr::register_ops(m); }

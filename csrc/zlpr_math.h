// ZLPR math shared by the CPU and CUDA kernels.
//
// Per row, with logits s and targets t in [0, 1]:
//   loss = log(1 + sum_j (1 - t_j) e^{s_j}) + log(1 + sum_j t_j e^{-s_j})
// Each sum is held as a stabilised pair (max, sum) with  1 + sum_j w_j e^{x_j} = e^{max} *
// (e^{-max} + sum): max starts at 0 (the "1" term), so it is finite from the start and the loss
// never forms -inf - -inf.
//
// Non-finite inputs give the reference's values (it works in the log domain, term_j =
// x_j + log w_j): a class is left out of a sum only when its logit is -inf (masked) or its
// label excludes it (t >= 1 for the negative sum, t <= 0 for the positive one), so a NaN label
// joins both sums and makes them NaN. A +inf term makes its sum, and the loss, +inf; the
// gradient is then 0 at the finite terms and NaN (inf/inf) at the infinite ones. A NaN makes
// its sum NaN, and the gradient NaN at every class in that sum, and only there.
//
// The rules of a class (which sum it enters, its weighted term) are templates over T: acc_t
// (CUDA, the CPU's exact rows) or a CPU vector (at::vec::Vectorized<acc_t>, whose primitives
// cpu/vec_math.h provides), so that every path applies the same rule.
#pragma once

#include <cmath>

#include "host_device.h"

namespace kxops::zlpr {

// Stabilised sum of w_j e^{x_j}: the sum equals e^{max} * sum, the "1 +" is added at the end.
// max is never NaN (a NaN term goes to sum).
template <typename acc_t>
struct ExpSum {
  acc_t max = 0;
  acc_t sum = 0;
};

// e^{x - max} for x <= max; 1 when x == max, also for x == max == +inf (not inf - inf = NaN),
// so that terms tied at +inf count once each.
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t relative_exp(acc_t x, acc_t max) {
  return x == max ? acc_t(1) : exponential(x - max);
}

// Adds w e^x (w > 0, +inf or NaN) online: rescales the running sum when the maximum moves.
template <typename acc_t>
KXOPS_HOST_DEVICE void push(ExpSum<acc_t>& acc, acc_t x, acc_t w) {
  if (w == INFINITY) {  // inf e^x = e^{x + inf}: +inf, or NaN for x = -inf, as log-domain terms
    x += w;
    w = 1;
  }
  if (x > acc.max) {
    acc.sum = acc.sum * relative_exp(acc.max, x) + w;
    acc.max = x;
  } else {
    acc.sum += w * relative_exp(x, acc.max);  // NaN x (not > max) lands here: the sum is NaN
  }
}

template <typename acc_t>
KXOPS_HOST_DEVICE ExpSum<acc_t> merge(const ExpSum<acc_t>& a, const ExpSum<acc_t>& b) {
  ExpSum<acc_t> out;
  out.max = a.max > b.max ? a.max : b.max;
  out.sum = a.sum * relative_exp(a.max, out.max) + b.sum * relative_exp(b.max, out.max);
  return out;
}

// log(1 + sum_j w_j e^{x_j}).
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t log_one_plus(const ExpSum<acc_t>& acc) {
  return acc.max + std::log(exponential(-acc.max) + acc.sum);
}

// 1 / (1 + sum_j w_j e^{x_j}), expressed relative to e^{max}: multiply by w e^{x - max}.
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t inv_total(const ExpSum<acc_t>& acc) {
  return acc_t(1) / (exponential(-acc.max) + acc.sum);
}

// Whether a class is left out of the negative sum (weight 1 - t, term e^{s}) and of the
// positive sum (weight t, term e^{-s}): when its logit is masked or its label excludes it;
// written so that a NaN label stays in both. A bool for a scalar, a lane mask for a vector.
template <typename T>
KXOPS_HOST_DEVICE auto out_of_negative(T s, T t) {
  return (s == T(-INFINITY)) | (t >= T(1));
}

template <typename T>
KXOPS_HOST_DEVICE auto out_of_positive(T s, T t) {
  return (s == T(-INFINITY)) | (t <= T(0));
}

// scale w e^{x - max} for a class in its sum, 0 for one left out: selected, not multiplied, so
// that a left-out term whose exponential overflows, or whose scale is NaN, still gives 0.
template <typename T, typename Mask>
KXOPS_HOST_DEVICE T weighted_term(Mask out, T w, T x, T max, T scale) {
  if (all_lanes(out)) return T(0);  // hard labels: most classes are in one sum only
  return select(out, T(0), w * exponential(x - max) * scale);
}

// A class's terms of the two sums, relative to their maxima (times scale).
template <typename T>
KXOPS_HOST_DEVICE T negative_term(T s, T t, T max, T scale = T(1)) {
  return weighted_term(out_of_negative(s, t), T(1) - t, s, max, scale);
}

template <typename T>
KXOPS_HOST_DEVICE T positive_term(T s, T t, T max, T scale = T(1)) {
  return weighted_term(out_of_positive(s, t), t, T(0) - s, max, scale);
}

// Both sums of one row, accumulated one class at a time.
template <typename acc_t>
struct RowSums {
  ExpSum<acc_t> neg;
  ExpSum<acc_t> pos;

  KXOPS_HOST_DEVICE void add(acc_t s, acc_t t) {
    if (!out_of_negative(s, t)) push(neg, s, acc_t(1) - t);
    if (!out_of_positive(s, t)) push(pos, -s, t);
  }

  KXOPS_HOST_DEVICE acc_t loss() const { return log_one_plus(neg) + log_one_plus(pos); }
};

template <typename acc_t>
KXOPS_HOST_DEVICE RowSums<acc_t> merge(const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
  return {merge(a.neg, b.neg), merge(a.pos, b.pos)};
}

// A negative's filtered gradient from its term e = w e^{s - max} (see RowGrad): 0 where its
// unscaled gradient u = e * unscaled_inv is below f, else e * scaled_inv, the unfiltered
// expression's value bit for bit (not u * scale, which rounds differently under a mean's
// scale). T is acc_t or a CPU vector.
template <typename T>
KXOPS_HOST_DEVICE T filtered(T e, T unscaled_inv, T grad_filter, T scaled_inv) {
  return select(e * unscaled_inv < grad_filter, T(0), e * scaled_inv);
}

// The finished row: d loss / d s_j = w_neg e^{s - max_neg} / Z_neg - w_pos e^{-s - max_pos} /
// Z_pos, each part only for a class in that sum (elsewhere 0, even when the other sum is NaN),
// times scale (1, or 1 / rows for the gradient of the mean loss: see grad_scale).
//
// grad_filter f > 0 (the fused heads' negligible-gradient filter): a class in the negative sum
// only (a negative) whose own gradient u = w_neg e^{s - max_neg} / Z_neg, before the scale, is
// below f gets 0, and the unfiltered expression's value otherwise (bit for bit); positives are
// never filtered, a NaN u is kept. f = 0 computes exactly the unfiltered expression above.
template <typename acc_t>
struct RowGrad {
  acc_t max_neg, inv_neg, max_pos, inv_pos;
  acc_t unscaled_inv_neg, scale, grad_filter;

  KXOPS_HOST_DEVICE RowGrad(const RowSums<acc_t>& sums, acc_t scale, acc_t grad_filter = 0)
      : max_neg(sums.neg.max),
        inv_neg(inv_total(sums.neg) * scale),
        max_pos(sums.pos.max),
        inv_pos(inv_total(sums.pos) * scale),
        unscaled_inv_neg(inv_total(sums.neg)),
        scale(scale),
        grad_filter(grad_filter) {}

  KXOPS_HOST_DEVICE acc_t operator()(acc_t s, acc_t t) const {
    if (grad_filter > acc_t(0) && out_of_positive(s, t)) {
      return filtered(negative_term(s, t, max_neg), unscaled_inv_neg, grad_filter, inv_neg);
    }
    return negative_term(s, t, max_neg, inv_neg) - positive_term(s, t, max_pos, inv_pos);
  }
};

}  // namespace kxops::zlpr

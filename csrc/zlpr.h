// ZLPR math shared by the CPU and CUDA kernels.
//
// Per row, with logits s and targets t in [0, 1]:
//   loss = log(1 + sum_j (1 - t_j) e^{s_j}) + log(1 + sum_j t_j e^{-s_j})
// Each sum is held as a stabilised pair (max, sum) with  1 + sum_j w_j e^{x_j} = e^{max} *
// (e^{-max} + sum): max starts at 0 (the "1" term), so it is finite from the start and the loss
// never forms -inf - -inf. A term enters only with weight > 0 and a logit that is not -inf, so a
// masked logit or a zero weight drops out even when its exponential would overflow.
#pragma once

#include <cmath>

#include "host_device.h"

namespace kxops::zlpr {

// Stabilised sum of w_j e^{x_j}: the sum equals e^{max} * sum, the "1 +" is added at the end.
template <typename acc_t>
struct ExpSum {
  acc_t max = 0;
  acc_t sum = 0;
};

// Adds w e^x (w > 0) online: rescales the running sum when the maximum moves. NaN x makes the
// sum NaN, so NaN propagates.
template <typename acc_t>
KXOPS_HOST_DEVICE void push(ExpSum<acc_t>& acc, acc_t x, acc_t w) {
  if (x > acc.max) {
    acc.sum = acc.sum * std::exp(acc.max - x) + w;
    acc.max = x;
  } else {
    acc.sum += w * std::exp(x - acc.max);
  }
}

template <typename acc_t>
KXOPS_HOST_DEVICE ExpSum<acc_t> merge(const ExpSum<acc_t>& a, const ExpSum<acc_t>& b) {
  ExpSum<acc_t> out;
  out.max = a.max > b.max ? a.max : b.max;
  out.sum = a.sum * std::exp(a.max - out.max) + b.sum * std::exp(b.max - out.max);
  return out;
}

// log(1 + sum_j w_j e^{x_j}).
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t log_one_plus(const ExpSum<acc_t>& acc) {
  return acc.max + std::log(std::exp(-acc.max) + acc.sum);
}

// 1 / (1 + sum_j w_j e^{x_j}), expressed relative to e^{max}: multiply by w e^{x - max}.
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t inv_total(const ExpSum<acc_t>& acc) {
  return acc_t(1) / (std::exp(-acc.max) + acc.sum);
}

// Weights of a class in the negative (e^{s}) and positive (e^{-s}) sums; zero for -inf logits.
template <typename acc_t>
KXOPS_HOST_DEVICE acc_t negative_weight(acc_t s, acc_t t) {
  return s == -INFINITY ? acc_t(0) : acc_t(1) - t;
}

template <typename acc_t>
KXOPS_HOST_DEVICE acc_t positive_weight(acc_t s, acc_t t) {
  return s == -INFINITY ? acc_t(0) : t;
}

// Both sums of one row, accumulated one class at a time.
template <typename acc_t>
struct RowSums {
  ExpSum<acc_t> neg;
  ExpSum<acc_t> pos;

  KXOPS_HOST_DEVICE void add(acc_t s, acc_t t) {
    const acc_t w_neg = negative_weight(s, t);
    const acc_t w_pos = positive_weight(s, t);
    if (w_neg > 0 || w_neg != w_neg) push(neg, s, w_neg);
    if (w_pos > 0 || w_pos != w_pos) push(pos, -s, w_pos);
  }

  KXOPS_HOST_DEVICE acc_t loss() const { return log_one_plus(neg) + log_one_plus(pos); }
};

template <typename acc_t>
KXOPS_HOST_DEVICE RowSums<acc_t> merge(const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
  return {merge(a.neg, b.neg), merge(a.pos, b.pos)};
}

// The finished row: d loss / d s_j = w_neg e^{s - max_neg} / Z_neg - w_pos e^{-s - max_pos} / Z_pos.
template <typename acc_t>
struct RowGrad {
  acc_t max_neg, inv_neg, max_pos, inv_pos;

  KXOPS_HOST_DEVICE explicit RowGrad(const RowSums<acc_t>& sums)
      : max_neg(sums.neg.max),
        inv_neg(inv_total(sums.neg)),
        max_pos(sums.pos.max),
        inv_pos(inv_total(sums.pos)) {}

  KXOPS_HOST_DEVICE acc_t operator()(acc_t s, acc_t t) const {
    const acc_t w_neg = negative_weight(s, t);
    const acc_t w_pos = positive_weight(s, t);
    const acc_t g_neg = w_neg != 0 ? w_neg * std::exp(s - max_neg) * inv_neg : acc_t(0);
    const acc_t g_pos = w_pos != 0 ? w_pos * std::exp(-s - max_pos) * inv_pos : acc_t(0);
    return g_neg - g_pos;
  }
};

}  // namespace kxops::zlpr

// AdaX / AdaX-W math shared by the CPU and CUDA kernels (docs/design.md §2).
//
// The state keeps v_hat = v / B_t with B_t = (1 + beta2)^t - 1, so per step
//   v_hat = (1 - beta2 / B_t) v_hat + (beta2 / B_t) g^2,   p -= lr m / (sqrt(v_hat) + eps /
//   sqrt(B_t))
// which is the authors' update without v's overflow. Only 1 / B_t is formed, in double: B_t
// itself overflows double near t = 7e6 for beta2 = 1e-4.
#pragma once

#include <cfloat>
#include <cmath>

#include "host_device.h"

namespace kxops::adax {

// 1 / B_t = e^{-x} / (1 - e^{-x}) with x = t log1p(beta2): accurate for tiny beta2, any t.
KXOPS_HOST_DEVICE double inverse_bias_correction(double step, double beta2) {
  const double neg_x = -step * log1p(beta2);
  return exp(neg_x) / -expm1(neg_x);
}

// Everything one tensor's update needs besides its data, in the math type T (or a vector of
// it). g_scale folds maximize and GradScaler's 1/scale; p_decay is AdaX-W's 1 - lr wd (1 for
// AdaX); l2_wd is AdaX's weight decay added to the gradient (0 for AdaX-W).
template <typename T>
struct Constants {
  T lr, one_minus_beta1, g_scale, l2_wd, p_decay, v_decay, v_weight, eps_term;

  template <typename U>
  KXOPS_HOST_DEVICE static Constants broadcast(const Constants<U>& c) {
    return {T(c.lr),      T(c.one_minus_beta1), T(c.g_scale),  T(c.l2_wd),
            T(c.p_decay), T(c.v_decay),         T(c.v_weight), T(c.eps_term)};
  }
};

struct Hyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool decoupled, maximize;
};

// The constants of a tensor whose step count is `step` after the increment.
KXOPS_HOST_DEVICE Constants<double> make_constants(const Hyper& h, double lr, double inv_grad_scale,
                                                   double step) {
  const double inv_bc = inverse_bias_correction(step, h.beta2);
  Constants<double> c;
  c.lr = lr;
  c.one_minus_beta1 = 1.0 - h.beta1;
  c.g_scale = h.maximize ? -inv_grad_scale : inv_grad_scale;
  c.l2_wd = h.decoupled ? 0.0 : h.weight_decay;
  c.p_decay = h.decoupled ? 1.0 - lr * h.weight_decay : 1.0;
  c.v_decay = 1.0 - h.beta2 * inv_bc;
  c.v_weight = h.beta2 * inv_bc;
  c.eps_term = h.eps * sqrt(inv_bc);
  return c;
}

// The constants in the math type T (float or double). eps / sqrt(B_t) underflows as t grows
// (to 0 in float32 past ~1.5M steps at beta2 = 1e-4, in double past ~7e6): an element whose
// gradient has always been 0 would then get 0/0. The term is kept at least T's smallest normal
// number, so that element keeps the authors' zero update (0/eps); next to any non-zero
// sqrt(v_hat) (at least ~4e-23 in float32) the floor is far below rounding.
template <typename T>
KXOPS_HOST_DEVICE Constants<T> math_constants(const Constants<double>& c) {
  auto out = Constants<T>::broadcast(c);
  const T tiny = T(sizeof(T) == sizeof(float) ? FLT_MIN : DBL_MIN);
  if (out.eps_term < tiny) out.eps_term = tiny;  // a NaN eps stays NaN
  return out;
}

// One element (T = float/double) or one CPU vector (T = at::vec::Vectorized<...>, see
// cpu/vec_math.h). l2 is whether AdaX's weight decay term is added.
template <typename T>
KXOPS_HOST_DEVICE void update(T& p, T g, T& m, T& v, const Constants<T>& c, bool l2) {
  g = g * c.g_scale;
  if (l2) g = g + c.l2_wd * p;
  p = p * c.p_decay;
  m = m + c.one_minus_beta1 * (g - m);
  v = v * c.v_decay + c.v_weight * g * g;  // (w g) g, as the loop's addcmul: g * g may overflow
  p = p - m / (square_root(v) + c.eps_term) * c.lr;
}

}  // namespace kxops::adax
